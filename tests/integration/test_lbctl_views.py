"""``lbctl status`` and ``lbctl metrics`` (lbshared/lbctl_views.py).

End to end: a private redis-server, three demo backends, three real ``lbnode`` processes
in cluster mode on 127.0.0.2-4 (same listener port, one address each), a known mix of
traffic sent through each node; then the views are checked against what was sent.
Before that, the pure parts (percentiles from merged histograms, summary parsing, the
aggregation of health and breaker states, the node's rate window) on small tables.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from lbnode import metrics as node_metrics
from lbnode.cluster import agent
from lbshared import lbctl, lbctl_views
from lbshared.config import parse_config
from lbshared.events import Heartbeat
from lbshared.lbctl_views import BadSummary, Totals
from tests.conftest import REPO_ROOT
from tests.integration.conftest import (
    Launcher,
    RawClient,
    free_port,
    port_free_on_all,
    wait_for,
    wait_ready,
)
from tests.redisproc import RedisProc, redis_proc  # noqa: F401

TIMEOUT = 30.0  # bound of any lbctl subprocess
STATS_WAIT = 20.0  # nodes publish every 2 s
N_BUCKETS = len(lbctl_views.BUCKETS) + 1

# -- the pure parts ------------------------------------------------------------------------------


def test_bucket_layout_and_key_match_the_node() -> None:
    assert lbctl_views.BUCKETS == node_metrics.BUCKETS
    assert lbctl_views.stats_key("api-lb") == agent.stats_key("api-lb") == "lb:{api-lb}:stats"


@given(st.lists(st.integers(0, 50), min_size=N_BUCKETS, max_size=N_BUCKETS),
       st.floats(0.0, 1.0))  # fmt: skip
def test_quantile_is_the_nodes_quantile(counts: list[int], q: float) -> None:
    hist = node_metrics.Histogram.from_list(counts)
    assert lbctl_views.quantile(counts, q) == hist.quantile(q)


def hist_at(bucket: int, n: int) -> list[int]:
    counts = [0] * N_BUCKETS
    counts[bucket] = n
    return counts


def summary(node: str, at: float, entries: dict[str, tuple[list[int], int, list[int]]],
            rate: float | None = 1.0, targets: dict[str, Any] | None = None) -> str:  # fmt: skip
    """A stats summary as a node publishes it: entries "rule|target" -> (classes, errors, hist)."""
    body: dict[str, Any] = {
        "node": node, "at": at,
        "stats": {k: {"classes": c, "errors": e, "hist": h, "sum": 0.0}
                  for k, (c, e, h) in entries.items()},
        "targets": targets or {},
    }  # fmt: skip
    if rate is not None:
        body["request_rate"] = rate
    return json.dumps(body)


def test_cluster_percentiles_come_from_merged_histograms_not_averages() -> None:
    # Node a: 99 requests in (0.5 ms, 1 ms]; node b: 1 request in (2.5 s, 5 s].
    a = lbctl_views.parse_summary(summary("a", 0.0, {"|t1": ([0, 99, 0, 0, 0], 0, hist_at(1, 99))}))
    b = lbctl_views.parse_summary(summary("b", 0.0, {"|t1": ([0, 0, 0, 0, 1], 1, hist_at(12, 1))},
                                          rate=2.5))  # fmt: skip
    view = lbctl_views.metrics_view([a, b])
    merged = node_metrics.Histogram.from_list(hist_at(1, 99))
    merged.merge(node_metrics.Histogram.from_list(hist_at(12, 1)))
    cluster = view["cluster"]
    p50 = merged.quantile(0.5)
    assert p50 is not None and cluster["latency_ms"]["p50"] == round(p50 * 1000, 3)
    assert 0.5 < cluster["latency_ms"]["p50"] <= 1.0
    # The mean of the nodes' p50s would say about 1.9 s.
    nodes = view["nodes"]
    mean_p50 = (nodes["a"]["latency_ms"]["p50"] + nodes["b"]["latency_ms"]["p50"]) / 2
    assert mean_p50 > 1000
    assert (cluster["requests_total"], cluster["errors_total"]) == (100, 1)
    assert cluster["error_rate"] == 0.01
    assert cluster["request_rate"] == 3.5
    assert cluster["responses"] == {"1xx": 0, "2xx": 99, "3xx": 0, "4xx": 0, "5xx": 1}
    assert view["targets"]["t1"]["requests_total"] == 100


def test_empty_figures() -> None:
    assert lbctl_views.metrics_view([]) == {
        "cluster": {"requests_total": 0, "request_rate": None, "error_rate": 0.0,
                    "latency_ms": {"p50": None, "p95": None, "p99": None}, "errors_total": 0,
                    "responses": {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0}},
        "nodes": {}, "targets": {},
    }  # fmt: skip


BAD_SUMMARIES = [
    ("not json", "not JSON"),
    ("[]", "no node id"),
    ('{"node": "a"}', "at is not a number"),
    ('{"node": "a", "at": true}', "at is not a number"),
    ('{"node": "a", "at": 1, "stats": []}', "stats or targets is not an object"),
    ('{"node": "a", "at": 1, "stats": {"no-bar": {}}}', "stats entry 'no-bar' is malformed"),
    ('{"node": "a", "at": 1, "stats": {"|t": {"classes": [1, 2], "hist": []}}}',
     "|t.classes is not a list of 5 counts"),
    ('{"node": "a", "at": 1, "stats": {"|t": {"classes": [0, 1, 0, 0, 0], "hist": [1]}}}',
     "|t.hist (bucket layout) is not a list of 17 counts"),
    ('{"node": "a", "at": 1, "request_rate": "fast"}', "request_rate is not a number"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "problem"), BAD_SUMMARIES)
def test_unreadable_summaries_name_the_problem(raw: str, problem: str) -> None:
    with pytest.raises(BadSummary) as info:
        lbctl_views.parse_summary(raw)
    assert str(info.value) == problem


def test_stale_summaries_are_left_out_and_old_ones_expired() -> None:
    now = 1000.0
    raw = {b"fresh": summary("fresh", now - 1, {}), b"stale": summary("stale", now - 20, {}),
           b"old": summary("old", now - 61, {}), b"bad": "{"}  # fmt: skip
    warnings: list[str] = []
    fresh, expired = lbctl_views.read_summaries(raw, now, warnings.append)
    assert [s.node for s in fresh] == ["fresh"]
    assert expired == [b"old"]
    assert warnings == [
        "left out the stats of node 'stale': 20.0s old (stopped, or cut off from Redis?)",
        "skipped the stats of node 'bad': unreadable (not JSON)",
    ]


LB = parse_config({"load_balancers": [{
    "name": "api", "listeners": [{"port": 8080}],
    "targets": [{"id": "t1", "address": "127.0.0.1:1", "weight": 30},
                {"id": "t2", "address": "127.0.0.1:2"}]}]}).load_balancers[0]  # fmt: skip

# (what nodes a and b publish for t1; expected health, breaker of t1)
HEALTH_CASES = [
    (({"healthy": True}, {"healthy": True}), "healthy", "closed"),
    (({"healthy": False}, {"healthy": False}), "unhealthy", "closed"),
    (({"healthy": True}, {"healthy": False}), "mixed", "closed"),
    (({"healthy": True}, None), "healthy", "closed"),
    ((None, None), "unknown", "closed"),
    (({"health": "draining"}, {"health": "draining"}), "draining", "closed"),
    (({"breaker": "half_open"}, {"breaker": "closed"}), "healthy", "half_open"),
    (({"breaker": "open"}, {"breaker": "half_open"}), "healthy", "open"),
]  # fmt: skip


@pytest.mark.parametrize(("published", "health", "breaker"), HEALTH_CASES)
def test_status_aggregates_targets_over_nodes(published: tuple[Any, Any], health: str,
                                              breaker: str) -> None:  # fmt: skip
    now = 500.0
    summaries = []
    for node, t1 in zip(("a", "b"), published, strict=True):
        targets = {"t2": {"active": 1, "healthy": True, "requests_total": 4, "request_rate": 0.5}}
        if t1 is not None:
            targets["t1"] = {"active": 2, "requests_total": 10, "request_rate": 1.25, **t1}
        summaries.append(lbctl_views.parse_summary(summary(node, now, {}, targets=targets)))
    beats = [Heartbeat(id="b", address="127.0.0.3", admin="127.0.0.3:9901", last_heartbeat=now - 10,
                       config_version=3),
             Heartbeat(id="a", address="127.0.0.2", admin="127.0.0.2:9901", last_heartbeat=now - 1,
                       config_version=7, degraded=True)]  # fmt: skip
    view = lbctl_views.status_view("api", 7, LB, beats, summaries, now)
    assert (view["name"], view["version"], view["listeners"]) == ("api", 7, ["http:8080"])
    assert view["nodes"] == [
        {"id": "a", "address": "127.0.0.2", "admin": "127.0.0.2:9901", "live": True,
         "degraded": True, "config_version": 7, "in_sync": True, "last_heartbeat": now - 1,
         "stats_at": now},
        {"id": "b", "address": "127.0.0.3", "admin": "127.0.0.3:9901", "live": False,
         "degraded": False, "config_version": 3, "in_sync": False, "last_heartbeat": now - 10,
         "stats_at": now},
    ]  # fmt: skip
    t1, t2 = view["targets"]
    reporting = sum(p is not None for p in published)
    assert t1 == {
        "id": "t1", "address": "127.0.0.1:1", "weight": 30, "health": health, "breaker": breaker,
        "active_connections": 2 * reporting, "requests_total": 10 * reporting,
        "request_rate": 1.25 * reporting if reporting else None,
        "health_by_node": t1["health_by_node"],
    }  # fmt: skip
    assert set(t1["health_by_node"]) == {n for n, p in zip("ab", published, strict=True) if p}
    assert t2 == {"id": "t2", "address": "127.0.0.1:2", "weight": 100, "health": "healthy",
                  "breaker": "closed", "active_connections": 2, "requests_total": 8,
                  "request_rate": 1.0,
                  "health_by_node": {"a": "healthy", "b": "healthy"}}  # fmt: skip


def test_status_falls_back_on_stats_when_a_node_publishes_no_target_totals() -> None:
    raw = summary("a", 10.0, {"r|t1": ([0, 3, 0, 0, 1], 1, hist_at(2, 4)),
                              "|t1": ([0, 2, 0, 0, 0], 0, hist_at(2, 2)),
                              "|t2": ([0, 5, 0, 0, 0], 0, hist_at(2, 5))},
                  rate=None, targets={"t1": {"active": 0, "healthy": True}})  # fmt: skip
    view = lbctl_views.status_view("api", 1, LB, [], [lbctl_views.parse_summary(raw)], 10.0)
    assert [(t["id"], t["requests_total"], t["request_rate"]) for t in view["targets"]] == [
        ("t1", 6, None), ("t2", 0, None)]  # fmt: skip


# (samples of (monotonic time, {key: cumulative count}); expected (rates, span) of the last)
RATE_CASES = [
    ([(2.0, {None: 10, "t": 4})], ({None: 5.0, "t": 2.0}, 2.0)),
    ([(2.0, {None: 10}), (4.0, {None: 30})], ({None: 7.5}, 4.0)),
    # past the window the oldest samples drop: base = the newest sample >= 10 s old
    ([(2.0, {None: 10}), (4.0, {None: 30}), (12.0, {None: 40}), (14.0, {None: 50})],
     ({None: 2.0}, 10.0)),
    # a target re-created under the same id counts from 0 again: never a negative rate
    ([(2.0, {"t": 8}), (12.0, {"t": 9}), (14.0, {"t": 2})], ({"t": 0.0}, 12.0)),
    ([(0.0, {None: 3})], ({None: 0.0}, 0.0)),
]  # fmt: skip


@pytest.mark.parametrize(("samples", "expected"), RATE_CASES)
def test_the_nodes_rate_window(
    samples: list[tuple[float, dict[str | None, int]]],
    expected: tuple[dict[str | None, float], float],
) -> None:
    window = agent.RateWindow(0.0)
    got = None
    for now, counts in samples:
        got = window.update(now, counts)
    assert got == expected


def test_totals_add_keeps_no_rate_as_none() -> None:
    total = Totals()
    total.add(Totals(classes=[0, 1, 0, 0, 0]))
    assert total.rate is None and total.requests == 1
    total.add(Totals(rate=2.0))
    assert total.rate == 2.0


# -- a real cluster ------------------------------------------------------------------------------

ADDRS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
OK = (10, 20, 30)  # "GET /" through node 1, 2, 3
ERRORS = 6  # "GET /status/500" through node 2
SLOW = 2  # "GET /slow?delay=0.3" through node 3
SLOW_DELAY = 0.3


def ctl(url: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = lbctl.run(["--redis", url, *argv], stdout=out, stderr=err, environ={})
    return code, out.getvalue(), err.getvalue()


def lbctl_proc(url: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("LB_REDIS_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "lbshared.lbctl", "--redis", url, *argv],
        capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=REPO_ROOT,
    )  # fmt: skip


@pytest.fixture
def cluster(redis_proc: RedisProc, launcher: Launcher, tmp_path: Path,  # noqa: F811
            ) -> Iterator[dict[str, Any]]:  # fmt: skip
    backends = [launcher.backend(f"web-{i}") for i in (1, 2, 3)]
    port = port_free_on_all(ADDRS)
    config = {"load_balancers": [{
        "name": "demo", "listeners": [{"port": port}], "algorithm": "round_robin",
        "targets": [{"id": b.id, "address": b.address, "weight": 100 - 20 * i}
                    for i, b in enumerate(backends)],
        # A breaker that this test's few errors cannot trip: status shows it "closed".
        "circuit_breaker": {"enabled": True, "threshold": 0.9, "min_requests": 1000},
    }]}  # fmt: skip
    path = tmp_path / "demo.yaml"
    path.write_text(json.dumps(config))
    assert ctl(redis_proc.url, "apply", "-f", str(path))[:2] == (0, "applied demo version 1\n")
    nodes = []
    for i, addr in enumerate(ADDRS, start=1):
        _proc, node = launcher.spawn_node(
            "", env={"LB_ADMIN": "127.0.0.1:{admin_port}"},
            args=["--redis", redis_proc.url, "--node-id", f"n{i}", "--bind", addr,
                  "--access-log", "off", "--log-level", "info"],
        )  # fmt: skip
        nodes.append(node)
    for node in nodes:
        wait_ready(node, timeout=20.0)
    yield {"url": redis_proc.url, "port": port, "backends": backends, "nodes": nodes}


def send(addr: str, port: int, path: str, n: int, expect: int) -> None:
    for _ in range(n):
        with RawClient(port, host=addr) as client:
            resp = client.get(path)
        assert resp.status == expect, resp


def test_status_and_metrics_of_a_three_node_cluster(cluster: dict[str, Any]) -> None:
    url, port = cluster["url"], cluster["port"]
    send(ADDRS[0], port, "/", OK[0], 200)
    send(ADDRS[1], port, "/", OK[1], 200)
    send(ADDRS[1], port, "/status/500", ERRORS, 500)
    send(ADDRS[2], port, "/", OK[2], 200)
    send(ADDRS[2], port, f"/slow?delay={SLOW_DELAY}", SLOW, 200)
    total = sum(OK) + ERRORS + SLOW

    def metrics_when_complete() -> dict[str, Any] | None:
        code, out, err = ctl(url, "metrics", "demo", "--json")
        assert code == 0, err
        view = json.loads(out)
        return view if view["cluster"]["requests_total"] == total else None

    view = wait_for(metrics_when_complete, STATS_WAIT, "the nodes' stats to count every request")
    cluster_figures = view["cluster"]
    assert cluster_figures["errors_total"] == ERRORS
    assert cluster_figures["error_rate"] == pytest.approx(ERRORS / total, abs=1e-6)
    assert cluster_figures["responses"]["2xx"] == total - ERRORS
    assert cluster_figures["responses"]["5xx"] == ERRORS
    lat = cluster_figures["latency_ms"]
    assert lat["p50"] <= lat["p95"] <= lat["p99"]
    # 66 fast requests, then 2 of >= 300 ms: p50 and p95 fall among the fast ones
    # (under 250 ms, a bucket bound), p99 (rank 67.3 of 68) in the (250 ms, 500 ms] bucket.
    assert 0 < lat["p50"] < 250 and lat["p95"] < 250
    assert 250 <= lat["p99"] <= 500
    # Per node: exactly what went through it.
    sent = {"n1": OK[0], "n2": OK[1] + ERRORS, "n3": OK[2] + SLOW}
    assert {n: f["requests_total"] for n, f in view["nodes"].items()} == sent
    assert {n: f["errors_total"] for n, f in view["nodes"].items()} == {"n1": 0, "n2": ERRORS,
                                                                         "n3": 0}  # fmt: skip
    assert view["nodes"]["n2"]["error_rate"] == pytest.approx(ERRORS / sent["n2"], abs=1e-6)
    p99 = {n: f["latency_ms"]["p99"] for n, f in view["nodes"].items()}
    assert p99["n1"] < 250 <= p99["n3"]
    # Rates: this summary was published right after the traffic, inside its ~10 s window.
    rates = [f["request_rate"] for f in view["nodes"].values()]
    assert all(r > 0 for r in rates)
    assert cluster_figures["request_rate"] == pytest.approx(sum(rates), abs=0.01)
    assert sum(f["requests_total"] for f in view["targets"].values()) == total
    assert set(view["targets"]) == {"web-1", "web-2", "web-3"}

    code, out, err = ctl(url, "status", "demo", "--json")
    assert code == 0, err
    status = json.loads(out)
    assert (status["name"], status["version"], status["listeners"]) == ("demo", 1, [f"http:{port}"])
    assert [(n["id"], n["address"], n["live"], n["degraded"], n["config_version"], n["in_sync"])
            for n in status["nodes"]] == [
        ("n1", ADDRS[0], True, False, 1, True), ("n2", ADDRS[1], True, False, 1, True),
        ("n3", ADDRS[2], True, False, 1, True)]  # fmt: skip
    targets = status["targets"]
    assert [(t["id"], t["address"], t["weight"], t["health"], t["breaker"], t["active_connections"])
            for t in targets] == [
        (b.id, b.address, 100 - 20 * i, "healthy", "closed", 0)
        for i, b in enumerate(cluster["backends"])]  # fmt: skip
    # Every request went to exactly one target (no retries: all targets answer).
    assert sum(t["requests_total"] for t in targets) == total
    # What each backend itself counted is what status says it was sent.
    for t, backend in zip(targets, cluster["backends"], strict=True):
        counted = sum(backend.stats()["paths"].values())  # (/stats counts not itself)
        assert t["requests_total"] == counted, (t, backend.stats())
        assert t["health_by_node"] == {"n1": "healthy", "n2": "healthy", "n3": "healthy"}
        assert t["request_rate"] is not None and t["request_rate"] >= 0

    # The tables, for people (a subprocess: the real entry point).
    table = lbctl_proc(url, "status", "demo")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == f"demo   version 1   listeners http:{port}"
    assert lines[2].split() == ["NODE", "ADDRESS", "CONFIG", "VERSION", "IN", "SYNC", "DEGRADED",
                                "LIVE", "STATS"]  # fmt: skip
    assert [line.split()[:6] for line in lines[3:6]] == [
        [f"n{i}", ADDRS[i - 1], "1", "yes", "no", "yes"] for i in (1, 2, 3)]  # fmt: skip
    head = lines.index(next(x for x in lines if x.startswith("TARGET")))
    assert lines[head].split() == ["TARGET", "ADDRESS", "WEIGHT", "HEALTH", "BREAKER", "ACTIVE",
                                   "REQUESTS", "RATE/S"]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[head + 1:]}
    for t in targets:
        assert rows[t["id"]][:7] == [t["id"], t["address"], str(t["weight"]), "healthy",
                                     "closed", "0", str(t["requests_total"])]  # fmt: skip

    table = lbctl_proc(url, "metrics", "demo")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["SCOPE", "REQUESTS", "RATE/S", "5XX", "ERROR", "RATE", "P50", "MS",
                                "P95", "MS", "P99", "MS"]  # fmt: skip
    first = lines[1].split()
    assert first[:2] == ["cluster", str(total)] and first[3:5] == [str(ERRORS),
                                                                   f"{100 * ERRORS / total:.2f}%"]
    assert [line.split()[:3] for line in lines[2:5]] == [
        ["node", n, str(c)] for n, c in sent.items()]  # fmt: skip
    assert [line.split()[:2] for line in lines[5:8]] == [["target", f"web-{i}"] for i in (1, 2, 3)]


def test_failures_are_one_line(cluster: dict[str, Any]) -> None:
    url = cluster["url"]
    for command in ("status", "metrics"):
        done = lbctl_proc(url, command, "nope", "--json")
        assert (done.returncode, done.stdout, done.stderr) == (
            1, "", "lbctl: no load balancer named 'nope'\n")  # fmt: skip
        port = free_port()
        down = lbctl_proc(f"redis://127.0.0.1:{port}/0", command, "demo")
        assert (down.returncode, down.stdout) == (3, "")
        assert down.stderr == (
            f"lbctl: cannot reach Redis at redis://127.0.0.1:{port}/0: Connection refused\n"
        )


def test_a_stopped_nodes_stats_are_left_out(cluster: dict[str, Any]) -> None:
    url = cluster["url"]
    nodes = cluster["nodes"]
    send(ADDRS[0], cluster["port"], "/", 3, 200)
    wait_for(lambda: json.loads(ctl(url, "metrics", "demo", "--json")[1])["nodes"]
             .get("n1", {}).get("requests_total") == 3, STATS_WAIT, "n1's stats")  # fmt: skip
    # Make n1's summary look 20 s old: lbctl leaves it out, with a warning.
    r = redis.Redis.from_url(url, socket_timeout=5)
    try:
        nodes[0].stop()
        raw = json.loads(r.hget("lb:{demo}:stats", "n1"))  # type: ignore[arg-type]
        raw["at"] -= 20
        r.hset("lb:{demo}:stats", "n1", json.dumps(raw))
        code, out, err = ctl(url, "metrics", "demo", "--json")
        assert code == 0
        assert "n1" not in json.loads(out)["nodes"]
        assert "left out the stats of node 'n1'" in err
        # Past a minute it is deleted from the hash.
        raw["at"] -= 60
        r.hset("lb:{demo}:stats", "n1", json.dumps(raw))
        code, _out, err = ctl(url, "status", "demo", "--json")
        assert code == 0 and "n1" not in err
        assert r.hget("lb:{demo}:stats", "n1") is None
    finally:
        r.close()
