"""Micro-benchmark of rule matching: per-request time for 10, 100, 1,000 rules.

Usage: ``python bench/bench_rules.py [--requests N] [--repeat R]``
(from the repository root; no installation needed).

Theory of operation
===================

Each rule set is a realistic mix for one load balancer: most rules route a
distinct path prefix (``/svc17/*``, some with a deeper ``/svc17/v2/*``
variant), a tenth also restrict the method, a tenth the host, a tenth need a
header; 2 % have no path at all (header- or host-only rules, e.g. canaries),
and one glob has a wildcard in its first segment (``/*.php``). The request
mix hits early, middle and late rules and misses everything (a quarter of
the requests), with a Host header and a few ordinary headers.

Every request is a fresh ``RequestView`` (built before the clock starts, so
only ``CompiledRules.match`` is timed, including the lazy path split the
view does on first use). The best of ``--repeat`` runs is reported, in
microseconds per request, next to a naive linear scan over the same compiled
rules for scale. Target: under 20 us per request at 1,000 rules.

A second table reports the rate-limit counter store's memory per key
(tracemalloc over 100,000 keys) and its per-check time.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lbnode.policy.ratelimit import MemoryCounterStore, RateLimiter  # noqa: E402
from lbnode.policy.request import RequestView  # noqa: E402
from lbnode.policy.rules import CompiledRules, _header_map  # noqa: E402
from lbshared.config import RateLimit, Rule, ValueMatch  # noqa: E402

SIZES = (10, 100, 1000)


def build_rules(n: int) -> list[Rule]:
    rules: list[Rule] = []
    for i in range(n):
        kw: dict[str, Any] = {}
        if i % 50 == 7:  # 2 %: no path constraint
            kw["header"] = ValueMatch(name="X-Canary", value=f"c{i}")
            rules.append(Rule(name=f"canary{i}", **kw))
            continue
        if i == n // 2:
            rules.append(Rule(name="php", path="/*.php"))
            continue
        kw["path"] = f"/svc{i}/v2/*" if i % 3 == 0 else f"/svc{i}/*"
        if i % 10 == 1:
            kw["method"] = ["GET", "HEAD"]
        if i % 10 == 2:
            kw["host"] = "*.example.com"
        if i % 10 == 3:
            kw["header"] = ValueMatch(name="X-Tenant", regex="^t[0-9]+$")
        if i % 10 == 4:
            kw["query"] = ValueMatch(name="debug", present=False)
        rules.append(Rule(name=f"svc{i}", **kw))
    return rules


def build_requests(n_rules: int, count: int) -> list[RequestView]:
    base_headers = [
        (b"host", b"api.example.com"),
        (b"user-agent", b"bench/1.0"),
        (b"accept", b"*/*"),
        (b"x-tenant", b"t42"),
    ]
    out: list[RequestView] = []
    for j in range(count):
        which = j % 4
        if which == 3:
            target = f"/nowhere/{j}/x"  # misses every rule
        else:
            i = (j * 7919) % n_rules  # spread over early, middle and late rules
            target = f"/svc{i}/v2/items/{j}?page=2" if i % 3 == 0 else f"/svc{i}/items/{j}"
        out.append(RequestView(b"GET", target.encode(), base_headers, f"10.0.{j % 256}.{j % 199}"))
    return out


def time_match(cr: CompiledRules, requests: list[RequestView], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        views = [RequestView(r.method, r.target, r.headers, r.client_ip) for r in requests]
        match = cr.match
        t0 = time.perf_counter()
        for view in views:
            match(view)
        best = min(best, (time.perf_counter() - t0) / len(views))
    return best * 1e6


def time_linear(cr: CompiledRules, requests: list[RequestView], repeat: int) -> float:
    # Every compiled rule in order, as an unindexed scan would test them.
    everything = sorted(
        {id(c): c for node in _nodes(cr._root) for c in node.own}.values(),
        key=lambda c: c.match.index,
    )
    best = float("inf")
    for _ in range(repeat):
        views = [RequestView(r.method, r.target, r.headers, r.client_ip) for r in requests]
        t0 = time.perf_counter()
        for view in views:
            path, host, headers = view.path, view.host, _header_map(view.headers)
            for c in everything:
                if c.takes(view, path, host, None, headers):
                    break
        best = min(best, (time.perf_counter() - t0) / len(views))
    return best * 1e6


def _nodes(node: Any) -> list[Any]:
    out = [node]
    for child in node.children.values():
        out.extend(_nodes(child))
    return out


def bench_store(keys: int) -> tuple[float, float]:
    names = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(keys)]
    store = MemoryCounterStore(60.0, max_keys=keys)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for name in names:
            store.add(name, 1, 1000.0)
        per_key = (tracemalloc.get_traced_memory()[0] - before) / keys
    finally:
        tracemalloc.stop()
    limiter = RateLimiter(RateLimit(limit=1_000_000, interval=60.0))
    sample = names[:1000]
    t0 = time.perf_counter()
    for i in range(100_000):
        limiter.check(sample[i % 1000], 1000.0 + i * 1e-4)
    per_check = (time.perf_counter() - t0) / 100_000 * 1e6
    return per_key, per_check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    print(f"rule matching ({args.requests} requests, best of {args.repeat})")
    print(f"{'rules':>6} {'indexed us/req':>15} {'linear us/req':>14}")
    for n in SIZES:
        cr = CompiledRules(build_rules(n))
        requests = build_requests(n, args.requests)
        indexed = time_match(cr, requests, args.repeat)
        linear = time_linear(cr, requests, max(1, args.repeat // 2))
        print(f"{n:>6} {indexed:>15.2f} {linear:>14.2f}")

    per_key, per_check = bench_store(100_000)
    print()
    print("rate-limit counter store (B = 10 sub-buckets)")
    print(f"  memory per key (100,000 keys, key strings excluded): {per_key:.0f} bytes")
    print(f"  RateLimiter.check: {per_check:.2f} us")


if __name__ == "__main__":
    main()
