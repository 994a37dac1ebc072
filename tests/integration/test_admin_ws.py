"""The admin port's health feed websocket: history, resume, filters, auth, slow subscribers."""

from __future__ import annotations

import json
import socket

import pytest
import trio
from trio_websocket import open_websocket_url

from lbnode.feed import HealthFeed
from lbnode.node import Node, NodeOptions
from lbshared.config import parse_config

from .conftest import free_port

CFG = parse_config({"load_balancers": [{"name": "t", "targets": [{"id": "a", "address": "127.0.0.1:9"}]}]})


async def start(nursery: trio.Nursery, token: str | None = None) -> tuple[Node, int]:
    port = free_port()
    opts = NodeOptions(admin=("127.0.0.1", port), admin_token=token, access_log="off")
    node = await nursery.start(Node(CFG, opts).run)
    return node, port


async def test_since_zero_replays_history_then_streams_live_without_duplicates() -> None:
    async with trio.open_nursery() as nursery:
        node, port = await start(nursery)
        first = node.feed.emit("unhealthy", "t", "a", "status 503, expected 200-399")
        async with open_websocket_url(f"ws://127.0.0.1:{port}/events/health?since=0") as ws:
            got = json.loads(await ws.get_message())
            assert got == first
            assert set(got) == {"id", "type", "lb", "target", "reason", "at", "node"}
            live = node.feed.emit("healthy", "t", "a", "2 probes passed")
            assert json.loads(await ws.get_message())["id"] == live["id"]
        # Resume after the first event: exactly the second one, then live ones.
        async with open_websocket_url(f"ws://127.0.0.1:{port}/events/health?since={first['id']}") as ws:
            assert json.loads(await ws.get_message())["id"] == live["id"]
            third = node.feed.emit("circuit_open", "t", "a", "error rate 60%")
            assert json.loads(await ws.get_message())["id"] == third["id"]
        node.stop()


async def test_without_since_only_new_events_and_lb_filter() -> None:
    async with trio.open_nursery() as nursery:
        node, port = await start(nursery)
        node.feed.emit("unhealthy", "t", "a", "old")
        async with open_websocket_url(f"ws://127.0.0.1:{port}/events/health?lb=x") as ws:
            node.feed.emit("healthy", "t", "a", "other lb")
            wanted = node.feed.emit("circuit_open", "x", "b", "errors")
            assert json.loads(await ws.get_message())["id"] == wanted["id"]
        node.stop()


async def _upgrade_status(port: int, path: str, *headers: bytes) -> bytes:
    """Send a websocket upgrade by hand and return the status line."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        extra = b"".join(h + b"\r\n" for h in headers)
        await stream.send_all(
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port
            + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            + extra + b"\r\n"
        )
        with trio.fail_after(5):
            data = await stream.receive_some(4096)
        return data.split(b"\r\n", 1)[0]
    finally:
        await stream.aclose()


async def test_token_and_origin_are_checked_before_upgrading() -> None:
    async with trio.open_nursery() as nursery:
        node, port = await start(nursery, token="s3cret")
        url = f"ws://127.0.0.1:{port}/events/health"
        assert (await _upgrade_status(port, "/events/health")).startswith(b"HTTP/1.1 401")
        async with open_websocket_url(url, extra_headers=[("Authorization", "Bearer s3cret")]) as ws:
            event = node.feed.emit("healthy", "t", "a", "ok")
            assert json.loads(await ws.get_message())["id"] == event["id"]
        async with open_websocket_url(url + "?token=s3cret") as ws:  # what a browser can send
            event = node.feed.emit("healthy", "t", "a", "ok again")
            assert json.loads(await ws.get_message())["id"] == event["id"]
        status = await _upgrade_status(
            port, "/events/health?token=s3cret", b"Origin: http://evil.example"
        )
        assert status.startswith(b"HTTP/1.1 403")
        same = await _upgrade_status(
            port, "/events/health?token=s3cret", b"Origin: http://127.0.0.1:%d" % port
        )
        assert same.startswith(b"HTTP/1.1 101")
        node.stop()


async def test_plain_get_is_told_to_upgrade() -> None:
    async with trio.open_nursery() as nursery:
        node, port = await start(nursery)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /events/health HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            data = await stream.receive_some(4096)
        assert data.startswith(b"HTTP/1.1 426")
        await stream.aclose()
        node.stop()


async def test_a_slow_subscriber_is_cut_off_and_never_blocks_publishing() -> None:
    feed = HealthFeed("n1")
    sub = feed.subscribe(size=4)
    for i in range(10):  # never waits, whatever the subscriber does
        feed.emit("healthy", "t", "a", f"event {i}")
    got = []
    with pytest.raises(Exception) as overflow:
        async for event in sub:
            got.append(event)
    assert type(overflow.value).__name__ == "FeedOverflow"
    assert len(got) == 4 and feed.subscribers == 0


async def test_a_websocket_client_that_stops_reading_is_disconnected() -> None:
    async with trio.open_nursery() as nursery:
        node, port = await start(nursery)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        try:
            sock.sendall(
                b"GET /events/health HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            with trio.fail_after(10):
                while node.feed.subscribers == 0:
                    await trio.sleep(0.01)
            # The client reads nothing more: the node's writes back up, its
            # queue fills, and it is cut off; publishing never waits.
            with trio.fail_after(20):
                i = 0
                while node.feed.subscribers:
                    node.feed.emit("healthy", "t", "a", "x" * 500 + str(i))
                    i += 1
                    if i % 100 == 0:
                        await trio.sleep(0.01)
            assert i > 256
        finally:
            sock.close()
        node.stop()
