"""A target that dies under its pooled connections: requests without a body go elsewhere."""

from __future__ import annotations

import socket
import struct

import pytest
import trio

import lbnode.upstream
from lbnode.api import HttpRequest
from lbnode.demo_backend import serve_backend
from lbnode.node import Node, NodeOptions
from lbshared.config import parse_config


async def test_a_request_on_a_dead_pooled_connection_is_served_by_another_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Skip the pool's liveness peek, so the dead connection is really used:
    # the race the peek narrows but cannot close.
    monkeypatch.setattr(lbnode.upstream, "PEEK_AFTER", 3600.0)
    async with trio.open_nursery() as nursery:
        a_scope = trio.CancelScope()

        async def backend_a(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            with a_scope:
                await serve_backend("127.0.0.1", 0, "a", task_status=task_status)

        port_a = await nursery.start(backend_a)
        port_b = await nursery.start(serve_backend, "127.0.0.1", 0, "b")
        cfg = parse_config({"load_balancers": [{
            "name": "r", "algorithm": "round_robin",
            "targets": [{"id": "a", "address": f"127.0.0.1:{port_a}"},
                        {"id": "b", "address": f"127.0.0.1:{port_b}"}]}]})  # fmt: skip
        node = await nursery.start(Node(cfg, NodeOptions(admin=None, access_log="off")).run)
        seen = [(await node.route(HttpRequest(path="/"))).header("x-backend") for _ in range(2)]
        assert sorted(seen) == ["a", "b"]  # both now have a pooled connection
        a_scope.cancel()  # backend a dies: its listener and connections close
        await trio.sleep(0.05)
        replies = [await node.route(HttpRequest(path="/")) for _ in range(4)]
        assert [r.status for r in replies] == [200] * 4
        assert {r.header("x-backend") for r in replies} == {"b"}
        node.stop()
        nursery.cancel_scope.cancel()


async def _hang_up_after_the_head(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """An upstream that reads a request head, then resets without answering a byte."""

    async def handle(stream: trio.SocketStream) -> None:
        with trio.move_on_after(5):
            got = b""
            while b"\r\n\r\n" not in got:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                got += chunk
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()  # RST: "connection reset by peer" on the proxy's side

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


@pytest.mark.parametrize("algorithm", ["round_robin", "least_connections"])
async def test_an_idempotent_request_whose_target_hangs_up_unanswered_goes_elsewhere(
    algorithm: str,
) -> None:
    # nginx's default (proxy_next_upstream error): a GET, HEAD, PUT or DELETE
    # without body that got not one byte back is sent to another target once.
    # A POST is not: its target may have acted on it before dying.
    async with trio.open_nursery() as nursery:
        port_bad = await nursery.start(_hang_up_after_the_head)
        port_ok = await nursery.start(serve_backend, "127.0.0.1", 0, "ok")
        cfg = parse_config({"load_balancers": [{
            "name": "r", "algorithm": algorithm,
            "targets": [{"id": "bad", "address": f"127.0.0.1:{port_bad}"},
                        {"id": "ok", "address": f"127.0.0.1:{port_ok}"}]}]})  # fmt: skip
        node = await nursery.start(Node(cfg, NodeOptions(admin=None, access_log="off")).run)
        for method in ("GET", "HEAD", "DELETE", "GET", "PUT", "OPTIONS"):
            reply = await node.route(HttpRequest(method=method, path="/x"))
            assert reply.status == 200, (method, reply.status, reply.body)
            assert reply.header("x-backend") == "ok"
        statuses = {"bad": 0, "ok": 0}
        for _ in range(6):  # POST: one of them reaches "bad" and is refused, not replayed
            reply = await node.route(HttpRequest(method="POST", path="/x"))
            if reply.status == 502:
                assert b"bad gateway: bad:" in reply.body, reply.body
                statuses["bad"] += 1
            else:
                assert reply.status == 200 and reply.header("x-backend") == "ok"
                statuses["ok"] += 1
        assert statuses["bad"] >= 1 and statuses["ok"] >= 1, statuses
        node.stop()
        nursery.cancel_scope.cancel()


async def test_with_no_other_target_the_hang_up_is_a_502() -> None:
    async with trio.open_nursery() as nursery:
        port_bad = await nursery.start(_hang_up_after_the_head)
        cfg = parse_config({"load_balancers": [{
            "name": "r", "targets": [{"id": "bad", "address": f"127.0.0.1:{port_bad}"}]}]})  # fmt: skip
        node = await nursery.start(Node(cfg, NodeOptions(admin=None, access_log="off")).run)
        reply = await node.route(HttpRequest(path="/x"))
        assert reply.status == 502 and b"bad gateway: bad:" in reply.body, (reply.status, reply.body)
        node.stop()
        nursery.cancel_scope.cancel()


async def _get(stream: trio.SocketStream, path: str) -> tuple[bytes, bytes]:
    """One GET on a kept-alive connection: (head, body) of a Content-Length response."""
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    buf = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in buf:
            chunk = await stream.receive_some(65536)
            assert chunk, f"the node closed the connection: {buf!r}"
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:"))  # fmt: skip
        while len(body) < length:
            body += await stream.receive_some(65536)
    return head, body


@pytest.mark.parametrize("http_impl", ["h11", "httptools"])
async def test_the_client_connection_survives_a_request_served_elsewhere(http_impl: str) -> None:
    # What the client sees of the retry is one 200 on its kept-alive
    # connection, which then serves the next request.
    async with trio.open_nursery() as nursery:
        port_bad = await nursery.start(_hang_up_after_the_head)
        port_ok = await nursery.start(serve_backend, "127.0.0.1", 0, "ok")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            listen_port = s.getsockname()[1]
        cfg = parse_config({"load_balancers": [{
            "name": "r", "algorithm": "round_robin",
            "listeners": [{"protocol": "http", "port": listen_port}],
            "targets": [{"id": "bad", "address": f"127.0.0.1:{port_bad}"},
                        {"id": "ok", "address": f"127.0.0.1:{port_ok}"}]}]})  # fmt: skip
        opts = NodeOptions(bind="127.0.0.1", admin=None, access_log="off", http_impl=http_impl)
        node = await nursery.start(Node(cfg, opts).run)
        stream = await trio.open_tcp_stream("127.0.0.1", listen_port)
        for i in range(6):  # round robin: every other one first goes to "bad"
            head, body = await _get(stream, f"/n{i}")
            assert head.startswith(b"HTTP/1.1 200"), (i, head, body)
            assert b"connection: close" not in head.lower()
        await stream.aclose()
        node.stop()
        nursery.cancel_scope.cancel()
