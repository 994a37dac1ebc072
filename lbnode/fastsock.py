"""A plain-TCP stream that does not yield to the scheduler when it need not.

trio's ``SocketStream`` makes every ``send_all`` and ``receive_some`` two
scheduler traps even when the socket is ready (``checkpoint_if_cancelled``
before the system call, ``cancel_shielded_checkpoint`` after it). A proxied
request makes four such calls (read the request, write it upstream, read the
response, write it back); two of them (the writes) nearly always complete at
once, and under load the reads often find data waiting too. Each trap is a
trip through trio's run loop (``trio.lowlevel.checkpoint()`` costs about
6.6 µs on the benchmark VM); ``bench/bench_streams.py`` measures a round trip
of two sends and two receives 1.4x cheaper with this stream.

``FastSocketStream`` first tries the system call and only waits (a real
checkpoint, where cancellation and timeouts are delivered) when the kernel
says it would block. To stay fair, a stream that keeps finding its socket
ready yields once every ``YIELD_EVERY`` calls anyway, so a fast download
between a fast backend and a fast client cannot starve other connections, and
a deadline or a drain still reaches it within a bounded number of calls.

It implements the ``trio.abc.HalfCloseableStream`` interface the data path
uses (``receive_some``, ``send_all``, ``send_eof``, ``aclose``,
``wait_send_all_might_not_block``) and keeps ``.socket`` (the trio socket)
for ``getpeername`` and ``setsockopt``. It does not detect concurrent use of
one direction (trio's ``ConflictDetector``): the proxy never does that.
"""

from __future__ import annotations

import socket as _stdsocket

import trio

#: A stream whose socket was always ready yields after this many calls.
YIELD_EVERY = 16
#: ``receive_some()`` without a size reads at most this much.
DEFAULT_RECEIVE_SIZE = 65536


class FastSocketStream(trio.abc.HalfCloseableStream):
    """A ``trio.SocketStream`` replacement for plain TCP (see the module docstring)."""

    __slots__ = ("socket", "_sock", "_ready_streak")

    def __init__(self, sock: trio.socket.SocketType, raw: _stdsocket.socket) -> None:
        self.socket = sock
        self._sock = raw  # the stdlib socket under trio's, non-blocking
        self._ready_streak = 0

    async def _fair(self) -> None:
        self._ready_streak += 1
        if self._ready_streak >= YIELD_EVERY:
            self._ready_streak = 0
            await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        sock = self._sock
        if sock.fileno() < 0:
            raise trio.ClosedResourceError("this stream was closed")
        size = DEFAULT_RECEIVE_SIZE if max_bytes is None else max_bytes
        while True:
            try:
                data = sock.recv(size)
            except (BlockingIOError, InterruptedError):
                self._ready_streak = 0
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc
            await self._fair()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        sock = self._sock
        if sock.fileno() < 0:
            raise trio.ClosedResourceError("this stream was closed")
        total = len(data)
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from exc
        if sent == total:
            await self._fair()
            return
        self._ready_streak = 0
        with memoryview(data) as view:
            while sent < total:
                await trio.lowlevel.wait_writable(sock)
                try:
                    sent += sock.send(view[sent:])
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    raise trio.BrokenResourceError(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        if self._sock.fileno() < 0:
            raise trio.ClosedResourceError("this stream was closed")
        await trio.lowlevel.wait_writable(self._sock)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        try:
            self._sock.shutdown(_stdsocket.SHUT_WR)
        except OSError:
            pass

    async def aclose(self) -> None:
        self.socket.close()
        await trio.lowlevel.checkpoint()


def fast_stream(stream: trio.SocketStream) -> trio.abc.HalfCloseableStream:
    """``stream`` as a ``FastSocketStream``, or as is where trio's socket
    does not expose the stdlib socket it wraps."""
    raw = getattr(stream.socket, "_sock", None)
    if not isinstance(raw, _stdsocket.socket):
        return stream
    return FastSocketStream(stream.socket, raw)
