"""FastSocketStream: trio's stream contract, minus the traps it need not take."""

from __future__ import annotations

import pytest
import trio

from lbnode.fastsock import YIELD_EVERY, FastSocketStream, fast_stream


def _pair() -> tuple[FastSocketStream, FastSocketStream]:
    a, b = trio.socket.socketpair()
    sa, sb = fast_stream(trio.SocketStream(a)), fast_stream(trio.SocketStream(b))
    assert isinstance(sa, FastSocketStream) and isinstance(sb, FastSocketStream)
    return sa, sb


async def test_bytes_go_both_ways_and_eof_reads_empty() -> None:
    a, b = _pair()
    await a.send_all(b"ping")
    assert await b.receive_some(100) == b"ping"
    await b.send_all(bytearray(b"pong"))
    assert await a.receive_some() == b"pong"
    await a.send_eof()
    assert await b.receive_some(100) == b""
    await b.send_all(b"still open this way")  # a half-close leaves the other direction
    assert await a.receive_some(100) == b"still open this way"
    await a.aclose()
    await b.aclose()


async def test_a_send_larger_than_the_socket_buffers_waits_for_the_reader() -> None:
    a, b = _pair()
    payload = bytes(range(256)) * 40_000  # 10 MB: far past the kernel's buffers
    got = bytearray()

    async def reader() -> None:
        while len(got) < len(payload):
            chunk = await b.receive_some(65536)
            assert chunk
            got.extend(chunk)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await a.send_all(memoryview(payload))
    assert bytes(got) == payload
    await a.aclose()
    await b.aclose()


async def test_a_closed_stream_says_so_and_a_reset_peer_is_broken() -> None:
    a, b = _pair()
    await a.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await a.receive_some(10)
    with pytest.raises(trio.ClosedResourceError):
        await a.send_all(b"x")
    await b.aclose()
    # The peer went away with unread data: the next operations fail as broken.
    c, d = _pair()
    await c.send_all(b"unread")
    await d.aclose()  # closing with unread data sends an RST
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(10):  # the first send may still be accepted by the kernel
            await c.send_all(b"x" * 65536)
            await c.receive_some(10)
    await c.aclose()


async def test_closing_wakes_a_blocked_receive() -> None:
    a, b = _pair()

    async def close_soon() -> None:
        await trio.sleep(0.05)
        await a.aclose()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_soon)
            with pytest.raises(trio.ClosedResourceError):
                await a.receive_some(10)
    await b.aclose()


async def test_a_blocked_receive_honours_its_deadline() -> None:
    a, b = _pair()
    with trio.move_on_after(0.05) as scope:
        await a.receive_some(10)
    assert scope.cancelled_caught
    await a.aclose()
    await b.aclose()


async def test_a_stream_that_is_always_ready_still_lets_others_run() -> None:
    # Ready sockets do not yield on every call, but at least every YIELD_EVERY
    # calls: a busy copy loop cannot starve the other tasks.
    a, b = _pair()
    ticks = 0
    done = False

    async def other() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.sleep(0)
        ticks = 0
        calls = YIELD_EVERY * 10
        for _ in range(calls // 2):
            await a.send_all(b"x")
            await b.receive_some(10)
        done = True
    assert ticks >= 10 // 2, ticks  # b and a each yield once per YIELD_EVERY calls
    await a.aclose()
    await b.aclose()
