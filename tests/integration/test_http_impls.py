"""The data path behaves the same with either HTTP/1.1 implementation.

A representative set of end-to-end behaviours, run against a node started
with ``--http h11`` and one started with ``--http httptools``: keep-alive
downstream and pooled connections upstream, chunked bodies both ways,
``100-continue``, a websocket tunnel, the 431/400/501/505 and 502 mappings,
pipelining, and a few MiB streamed each way. The exhaustive comparison of
the two parsers (a corpus of hostile requests, every byte in every
position) is ``tests/unit/test_http1_differential.py``.
"""

from __future__ import annotations

import json

import pytest
import trio
from trio_websocket import open_websocket_url

from lbnode.demo_backend import expected_bytes

from .conftest import IO_TIMEOUT, Launcher, Node, RawClient, RawUpstream, request, scripted

IMPLS = ("h11", "httptools")
WS_DEADLINE = 10.0
MIB = 1024 * 1024

BAD_UPSTREAM = {
    "/resp-cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n",
    "/resp-garbage": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    # No length, no chunks: the body ends when the upstream closes.
    "/close-delimited": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close",
}


class Env:
    def __init__(self, impl: str, node: Node, raw: RawUpstream) -> None:
        self.impl = impl
        self.node = node
        self.port = node.ports["demo"][0]
        self.raw_port = node.ports["raw"][0]
        self.raw = raw


@pytest.fixture(scope="module", params=IMPLS)
def env(request: pytest.FixtureRequest, module_launcher: Launcher) -> Env:
    impl: str = request.param
    backend = module_launcher.backend(f"demo-{impl}")
    raw = module_launcher.raw_upstream(scripted(BAD_UPSTREAM))
    config = {
        "load_balancers": [
            {"name": "demo", "listeners": [{"protocol": "http", "port": 0}],
             "targets": [{"id": "a", "address": backend.address}]},
            {"name": "raw", "listeners": [{"protocol": "http", "port": 0}],
             "targets": [{"id": "raw", "address": raw.address}]},
        ]
    }  # fmt: skip
    node = module_launcher.node(config, "--http", impl, access_log="off")
    return Env(impl, node, raw)


def test_the_node_runs_the_implementation_asked_for(env: Env) -> None:
    assert f"HTTP/1.1 implementation: {env.impl}" in env.node.stderr_text()


def test_keep_alive_downstream_and_pooled_upstream(env: Env) -> None:
    accepts = env.raw.accepts
    for c in range(3):
        with RawClient(env.raw_port) as client:
            for i in range(5):
                resp = client.get(f"/keep-{c}-{i}")
                assert resp.status == 200 and resp.body == b"ok"
                assert resp.header("connection") is None  # still open
    # Fifteen requests over three client connections, one upstream connection.
    assert env.raw.accepts - accepts == 1
    for c in range(3):
        for i in range(5):
            assert f"GET /keep-{c}-{i} HTTP/1.1".encode() in env.raw.received


def test_chunked_request_and_chunked_response(env: Env) -> None:
    body = bytes(range(256)) * 1200  # 300 KiB, sent in uneven chunks
    pieces, at = [], 0
    for size in [1, 7000, 65536, 13, 100_000]:
        pieces.append(body[at : at + size])
        at += size
    pieces.append(body[at:])
    chunked_body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    with RawClient(env.port) as c:
        c.send(c.request_bytes("POST", "/echo", [("Transfer-Encoding", "chunked"),
                                                 ("Content-Type", "application/x-test")])
               + chunked_body)  # fmt: skip
        resp = c.read_response()
        assert resp.status == 200 and resp.chunked and resp.body == body
        resp = c.get("/bytes/200000?chunked=1")
        assert resp.status == 200 and resp.chunked and resp.body == expected_bytes(200000)


def test_expect_100_continue(env: Env) -> None:
    body = b"x" * 100_000
    with RawClient(env.port) as c:
        c.send(c.request_bytes("POST", "/sink", [("Expect", "100-continue"),
                                                 ("Content-Length", str(len(body)))]))  # fmt: skip
        interim = c.read_head()
        assert interim.status == 100
        c.send(body)
        resp = c.read_response()
        assert resp.status == 200 and resp.json()["received"] == len(body)
        assert c.get("/").status == 200  # the connection is still usable


async def test_websocket_tunnel(env: Env) -> None:
    with trio.fail_after(WS_DEADLINE):
        async with open_websocket_url(f"ws://127.0.0.1:{env.port}/ws") as ws:
            for i in range(3):
                await ws.send_message(f"message {i}")
                assert await ws.get_message() == f"message {i}"
            blob = bytes(range(256)) * 800
            await ws.send_message(blob)
            assert await ws.get_message() == blob
            await ws.send_message(json.dumps({"last": True}))
            assert json.loads(await ws.get_message()) == {"last": True}


def H(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (H("GET / HTTP/1.1", "Host: x", *(f"X-F{i}: v" for i in range(100))), 431),
        (H("GET / HTTP/1.1", "Host: x", "X-Big: " + "a" * 40000), 431),
        (H("POST / HTTP/1.1", "Host: x", "Content-Length: 3", "Transfer-Encoding: chunked")
         + b"0\r\n\r\n", 400),
        (H("GET / HTTP/1.1", "Host: x", "Host: y"), 400),
        (H("GET / HTTP/1.1", "Host: x", "X-A: a\x01b"), 400),
        (H("POST / HTTP/1.1", "Host: x", "Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n", 501),
        (H("GET / HTTP/2.0", "Host: x"), 505),
    ],
    ids=["too-many-fields", "head-too-large", "cl-and-te", "two-hosts", "control-character",
         "gzip-chunked", "http-2.0"],
)  # fmt: skip
def test_refusals_map_to_the_same_statuses(env: Env, raw: bytes, status: int) -> None:
    with RawClient(env.port) as c:
        c.send(raw)
        resp = c.read_response()
        assert resp.status == status
        assert resp.header("connection") == "close"
        assert c.wait_closed()


def test_a_close_delimited_response_is_streamed_whole_and_not_reused(env: Env) -> None:
    with RawClient(env.raw_port) as c:
        resp = c.get("/close-delimited")
        # Re-framed for the client (chunked), which keeps its connection.
        assert resp.status == 200 and resp.chunked and resp.body == b"until the close"
        # Then a request with a body, at once: it must not go to the closed
        # upstream connection (a body is never replayed).
        resp = c.request("POST", "/after-close", body=b"payload")
        assert resp.status == 200 and resp.body == b"ok"


@pytest.mark.parametrize("path", ["/resp-cl-te", "/resp-garbage"])
def test_bad_upstream_responses_are_502(env: Env, path: str) -> None:
    resp = request(env.raw_port, "GET", path)
    assert resp.status == 502
    assert b"abc" not in resp.body


def test_pipelined_requests_are_answered_in_order(env: Env) -> None:
    n = 200
    with RawClient(env.port) as c:
        c.send(b"".join(c.request_bytes("GET", f"/headers?n={i}") for i in range(n)))
        for i in range(n):
            resp = c.read_response()
            assert resp.status == 200 and resp.json()["target"] == f"/headers?n={i}"


def test_streaming_a_few_mib_each_way(env: Env) -> None:
    size = 4 * MIB
    with RawClient(env.port, timeout=IO_TIMEOUT * 3) as c:
        resp = c.get(f"/bytes/{size}")
        assert resp.status == 200 and resp.body == expected_bytes(size)
        upload = expected_bytes(size)
        resp = c.request("POST", "/sink", body=upload)
        assert resp.status == 200 and resp.json()["received"] == size
        resp = c.request("POST", "/echo", body=upload[: 3 * MIB])
        assert resp.status == 200 and resp.body == upload[: 3 * MIB]


def test_small_chunks_are_capped_by_httptools_only(env: Env) -> None:
    """The one deliberate difference: httptools refuses a chunked request
    body of 1-byte chunks past its first 64 KiB (h11 has no such cap)."""
    body = b"1\r\na\r\n" * 20000 + b"0\r\n\r\n"  # 117 KiB of 1-byte chunks
    with RawClient(env.port) as c:
        try:
            c.send(H("POST /sink HTTP/1.1", "Host: x", "Transfer-Encoding: chunked") + body)
        except OSError:  # the node closed while we were still sending
            pass
        if env.impl == "h11":
            resp = c.read_response()
            assert resp.status == 200 and resp.json()["received"] == 20000
        else:
            assert b'"received"' not in c.read_until_close()  # cut off, not forwarded whole
