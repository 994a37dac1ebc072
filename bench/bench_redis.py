"""Benchmark of ``lbshared.redis_trio``: what does automatic pipelining buy?

Theory of operation
===================

The script starts its own ``redis-server`` on a free port (never the system
one), then runs two loads, each for ``--duration`` seconds (default 3) on one
:class:`~lbshared.redis_trio.RedisClient`:

* **sequential**: one task, one command per round trip (``GET`` of a key);
  this is what a naive client costs, bounded by the round-trip time;
* **concurrent**: ``--tasks`` (default 100) trio tasks share the client, each
  in its own loop of ``GET``; the client's writer coalesces whatever is queued
  into one ``send_all``, so one round trip carries many commands.

For each it prints commands/s and the per-call latency p50/p99 (measured
around each ``execute``), the number of ``send_all`` calls the client made,
and the throughput ratio concurrent / sequential, which must be at least
``MIN_RATIO`` (exit status 1 otherwise). ``--json`` prints one JSON object
instead of the table.

The redis-server is stopped by its PID in a ``finally`` block (SIGTERM,
bounded wait, SIGKILL).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from lbshared.redis_trio import RedisClient  # noqa: E402
from tests.redisproc import RedisProc  # noqa: E402

#: The concurrent load must beat the sequential one by at least this factor.
MIN_RATIO = 10.0
# Bound of the wait for the client's first connection.
CONNECT_WAIT = 10.0
# Per-call timeout of the benchmark's client: generous, a timeout is a failure here.
CALL_TIMEOUT = 10.0


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, nearest-rank."""
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


async def _load(client: RedisClient, tasks: int, duration: float) -> dict[str, Any]:
    latencies: list[float] = []
    record = latencies.append
    execute = client.execute
    clock = time.perf_counter
    writes_before = client.stats.writes
    running = True

    async def stopper() -> None:
        nonlocal running
        await trio.sleep(duration)
        running = False

    async def worker() -> None:
        while running:
            t0 = clock()
            await execute("GET", "bench:key")
            record(clock() - t0)

    started = clock()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stopper)
        for _ in range(tasks):
            nursery.start_soon(worker)
    elapsed = clock() - started
    latencies.sort()
    return {
        "tasks": tasks,
        "commands": len(latencies),
        "seconds": round(elapsed, 3),
        "commands_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        "send_all_calls": client.stats.writes - writes_before,
    }


async def run_bench(url: str, duration: float, tasks: int) -> dict[str, Any]:
    client = RedisClient(url, call_timeout=CALL_TIMEOUT, name="bench")
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        if not await client.wait_connected(CONNECT_WAIT):
            raise RuntimeError(f"could not connect to {url}: {client.last_error}")
        await client.execute("SET", "bench:key", "x" * 16)
        sequential = await _load(client, 1, duration)
        concurrent = await _load(client, tasks, duration)
        nursery.cancel_scope.cancel()
    ratio = concurrent["commands_per_s"] / sequential["commands_per_s"]
    return {
        "sequential": sequential,
        "concurrent": concurrent,
        "ratio": round(ratio, 2),
        "min_ratio": MIN_RATIO,
        "ok": ratio >= MIN_RATIO,
        "errors": client.stats.errors,
        "timeouts": client.stats.timeouts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per load (3)")
    parser.add_argument("--tasks", type=int, default=100, help="concurrent tasks (100)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        proc = RedisProc(Path(tmp))
        try:
            proc.start()
            result = trio.run(run_bench, proc.url, args.duration, args.tasks)
        finally:
            proc.stop()
    result["redis_server_pid"] = proc.pid

    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'load':<12}{'tasks':>6}{'commands/s':>14}{'p50 ms':>10}{'p99 ms':>10}"
              f"{'send_all':>10}")  # fmt: skip
        for name in ("sequential", "concurrent"):
            r = result[name]
            print(f"{name:<12}{r['tasks']:>6}{r['commands_per_s']:>14,.0f}{r['p50_ms']:>10.3f}"
                  f"{r['p99_ms']:>10.3f}{r['send_all_calls']:>10,}")  # fmt: skip
        verdict = "ok" if result["ok"] else f"FAIL (< {MIN_RATIO:g}x)"
        print(f"ratio concurrent/sequential: {result['ratio']:.1f}x  {verdict}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
