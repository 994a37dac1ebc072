"""Memory per idle keep-alive client connection of one lbnode process.

Starts a node (standalone, one listener, access log off) and opens N client
connections that each send one request and then stay idle (keep-alive).
Prints the node's resident memory before and after, and the difference per
connection.

    python bench/bench_idle.py [--connections 10000] [--http auto|h11|httptools]
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import fast_backend, free_port  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def raise_fd_limit(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(max(soft, n), hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--http", default="auto")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    raise_fd_limit(a.connections * 2 + 1000)
    with fast_backend() as backend_port, tempfile.TemporaryDirectory() as tmp:
        port, admin = free_port(), free_port()
        cfg = Path(tmp) / "idle.yaml"
        cfg.write_text(yaml.safe_dump({"load_balancers": [{
            "name": "idle", "listeners": [{"protocol": "http", "port": port}],
            "targets": [{"id": "fast", "address": f"127.0.0.1:{backend_port}"}],
            "timeouts": {"idle": "10m"}}]}))  # fmt: skip
        node = subprocess.Popen(
            [sys.executable, "-m", "lbnode", "--config", str(cfg), "--bind", "127.0.0.1",
             "--admin", f"127.0.0.1:{admin}", "--access-log", "off", "--log-level", "warning",
             "--http", a.http],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        socks: list[socket.socket] = []
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            warm = socket.create_connection(("127.0.0.1", port))
            warm.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            warm.recv(65536)
            time.sleep(0.5)
            before = rss_kib(node.pid)
            request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            for _ in range(a.connections):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.sendall(request)
                socks.append(s)
            for s in socks:  # every connection answered once, then idle
                s.recv(65536)
            time.sleep(1.0)
            after = rss_kib(node.pid)
        finally:
            for s in socks:
                s.close()
            node.terminate()
            node.wait(timeout=30)
    per = (after - before) / a.connections
    doc = {"connections": a.connections, "http": a.http, "rss_before_kib": before,
           "rss_after_kib": after, "per_connection_kib": round(per, 2)}  # fmt: skip
    if a.json:
        print(json.dumps(doc))
    else:
        print(f"{a.connections} idle keep-alive connections (--http {a.http}): node RSS "
              f"{before / 1024:.1f} MiB -> {after / 1024:.1f} MiB, {per:.2f} KiB per connection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
