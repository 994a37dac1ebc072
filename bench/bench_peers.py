"""lbnode next to the proxies operators know, on the same backend and client.

One run measures, with the same wrk load (64 keep-alive connections, 2
threads) against the same `bench/fast_backend.py`: the backend alone,
HAProxy (Debian package, one thread), nginx as a reverse proxy (one worker,
upstream keep-alive), the bare trio + h11 proxy, and lbnode with
`--http h11` and `--http httptools` (one worker, and `--workers 2`). It
prints requests/s, p50 and p99 and each proxy's ratio to HAProxy. A peer that
is not installed is skipped, and the table says so.

    python bench/bench_peers.py [--duration 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402
    HOST,
    SCENARIOS,
    LoadGenerator,
    Measurement,
    bare_proxy,
    child,
    fast_backend,
    free_port,
    lbnode,
    measure,
    port_open,
    wait_until,
)

SCENARIO = SCENARIOS[0]  # 64 connections, 2 threads


@contextmanager
def haproxy(backend_port: int) -> Iterator[int]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "haproxy.cfg"
        cfg.write_text(
            f"""global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
frontend fe
    bind {HOST}:{port}
    default_backend be
backend be
    http-reuse always
    server fast {HOST}:{backend_port}
"""
        )
        with child([shutil.which("haproxy") or "haproxy", "-db", "-f", str(cfg)], "haproxy") as (
            proc,
            log,
        ):
            wait_until(lambda: port_open(port), proc, log, "haproxy")
            yield port


@contextmanager
def nginx(backend_port: int) -> Iterator[int]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "nginx.conf"
        cfg.write_text(
            f"""worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    client_body_temp_path {tmp};
    proxy_temp_path {tmp};
    upstream be {{ server {HOST}:{backend_port}; keepalive 64; }}
    server {{
        listen {HOST}:{port};
        location / {{
            proxy_pass http://be;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
        )
        argv = [shutil.which("nginx") or "nginx", "-c", str(cfg), "-p", tmp]
        with child(argv, "nginx") as (proc, log):
            wait_until(lambda: port_open(port), proc, log, "nginx")
            yield port


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    gen = LoadGenerator("auto")
    rows: list[tuple[str, Measurement | None, str]] = []

    def run(name: str, port: int) -> None:
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows.append((name, measure(gen, port, SCENARIO, a.duration, a.warmup), ""))

    with fast_backend() as backend:
        run("backend alone", backend)
        for name, binary, ctx in (("HAProxy, 1 thread", "haproxy", haproxy),
                                  ("nginx, 1 worker", "nginx", nginx)):  # fmt: skip
            if shutil.which(binary) is None:
                rows.append((name, None, f"skipped: {binary} is not installed"))
                continue
            with ctx(backend) as port:
                run(name, port)
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            rows.append(("aiohttp reverse proxy", None, "skipped: aiohttp is not installed"))
        else:
            rows.append(("aiohttp reverse proxy", None, "skipped: not written yet"))
        with bare_proxy(backend) as port:
            run("bare trio + h11 proxy", port)
        for label, args in (("lbnode --http h11", ["--http", "h11"]),
                            ("lbnode --http httptools", ["--http", "httptools"]),
                            ("lbnode --http httptools --workers 2",
                             ["--http", "httptools", "--workers", "2"])):  # fmt: skip
            with ExitStack() as stack:
                port = stack.enter_context(lbnode(backend, SCENARIO, args))
                run(label, port)
    haproxy_rps = next((m.rps for n, m, _ in rows if n.startswith("HAProxy") and m), None)
    if a.json:
        print(json.dumps([{"name": n, "rps": m and m.rps, "p50_ms": m and m.p50_ms,
                           "p99_ms": m and m.p99_ms, "note": note} for n, m, note in rows]))  # fmt: skip
        return 0
    print(f"peers, {SCENARIO.name}, {a.duration:g}s per run, same backend and client")
    print(f"{'proxy':38} {'rps':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs HAProxy':>11}")
    for name, m, note in rows:
        if m is None:
            print(f"{name:38} {note}")
            continue
        ratio = f"{m.rps / haproxy_rps:.2f}x" if haproxy_rps else "-"
        print(f"{name:38} {m.rps:8,.0f} {m.p50_ms:8.2f} {m.p99_ms:8.2f} {ratio:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
