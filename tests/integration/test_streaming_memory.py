"""Bodies stream through the node in bounded memory: 1 GiB each way.

The node's peak resident memory (VmHWM, reset through /proc/PID/clear_refs
before each transfer) may grow by less than ``MAX_GROWTH`` over its resident
size before the transfer. Both transfers check every byte.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lbnode.demo_backend import expected_bytes

from .conftest import Launcher, Node, RawClient

GIB = 1 << 30
MAX_GROWTH = 32 << 20
BLOCK = 1 << 20
# The /bytes pattern is bytes(range(256)) repeated: any window of it starts
# at some offset of this buffer.
PATTERN = expected_bytes(BLOCK + 256)
TRANSFER_TIMEOUT = 120.0


def kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak(pid: int) -> int:
    """Reset VmHWM to the current VmRSS; return that."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return kib(pid, "VmRSS")


@pytest.fixture(scope="module")
def node(module_launcher: Launcher) -> Node:
    a = module_launcher.backend("a")
    config = {
        "load_balancers": [
            {
                "name": "big",
                "listeners": [{"protocol": "http", "port": 0}],
                "targets": [{"id": "a", "address": a.address}],
                "timeouts": {"upstream_response": "60s", "idle": "60s"},
            }
        ]
    }
    n = module_launcher.node(config, access_log="off")
    # Warm up: pools, buffers and code paths in use before the baseline.
    with RawClient(n.port) as c:
        assert c.request("POST", "/sink", body=b"x" * (8 * BLOCK)).status == 200
        assert len(c.get(f"/bytes/{8 * BLOCK}").body) == 8 * BLOCK
    return n


def upload(port: int, size: int) -> dict[str, int]:
    block = b"u" * BLOCK
    with RawClient(port, timeout=TRANSFER_TIMEOUT) as c:
        c.send(c.request_bytes("POST", "/sink", [("Content-Length", str(size))]))
        sent = 0
        while sent < size:
            n = min(BLOCK, size - sent)
            c.sock.sendall(block if n == BLOCK else block[:n])
            sent += n
        resp = c.read_response()
        assert resp.status == 200, resp
        return json.loads(resp.body)  # type: ignore[no-any-return]


def download(port: int, size: int) -> int:
    with RawClient(port, timeout=TRANSFER_TIMEOUT) as c:
        c.send(c.request_bytes("GET", f"/bytes/{size}"))
        head = c.read_head()
        assert head.status == 200 and head.header("content-length") == str(size)
        got = len(c.buf)
        assert bytes(c.buf) == PATTERN[:got]
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        while got < size:
            n = c.sock.recv_into(view, min(BLOCK, size - got))
            assert n, f"connection closed after {got} bytes"
            start = got % 256
            assert view[:n] == PATTERN[start : start + n], f"corrupt at {got}"
            got += n
        return got


def test_one_gib_upload_in_bounded_memory(node: Node) -> None:
    pid = node.proc.pid
    base = reset_peak(pid)
    t0 = time.monotonic()
    assert upload(node.port, GIB)["received"] == GIB
    elapsed = time.monotonic() - t0
    growth = kib(pid, "VmHWM") - base
    print(f"upload 1 GiB: {elapsed:.1f}s, node RSS {base >> 20} MiB, "
          f"peak growth {growth / 2**20:.1f} MiB")
    assert growth < MAX_GROWTH


def test_one_gib_download_in_bounded_memory(node: Node) -> None:
    pid = node.proc.pid
    base = reset_peak(pid)
    t0 = time.monotonic()
    assert download(node.port, GIB) == GIB
    elapsed = time.monotonic() - t0
    growth = kib(pid, "VmHWM") - base
    print(f"download 1 GiB: {elapsed:.1f}s, node RSS {base >> 20} MiB, "
          f"peak growth {growth / 2**20:.1f} MiB")
    assert growth < MAX_GROWTH
