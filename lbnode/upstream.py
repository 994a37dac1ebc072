"""Pooled keep-alive connections to upstream targets.

One ``UpstreamPool`` per target address, shared by every load balancer and
kept across reloads. A pool holds at most ``max_idle`` idle connections
(last in, first out, so the warm ones are reused and the cold ones age out)
and lets at most ``max_connections`` be open at once; a request that finds
the pool full waits for a slot within the connect timeout.

An idle connection the upstream has closed is found at checkout with a
non-blocking peek (one syscall) and thrown away; the remaining race (the
upstream closes just after the peek) is covered by the proxy, which retries
a request without a body once on a fresh connection when a reused one fails
before any response byte.
"""

from __future__ import annotations

import errno
import socket
import time

import trio

from lbnode.fastsock import fast_stream
from lbnode.http1 import ClientProtocol, make_client

RECEIVE_SIZE = 65536
# An idle upstream connection older than this is closed rather than reused:
# many application servers close idle keep-alive connections after a few
# seconds, and a fresh connect is cheaper than a failed reuse.
DEFAULT_IDLE_TTL = 30.0

_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT
# Idle for less than this, a pooled connection is reused without the peek.
# Zero: always peek. Skipping it for recently used connections saved ~1.6 %
# CPU but sent the first request after a backend died onto its dead
# connection (a 502 when the retry on the same target was refused).
PEEK_AFTER = 0.0


class ConnectError(Exception):
    """Could not open a connection to a target (safe to retry elsewhere)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _describe_oserror(exc: OSError) -> str:
    cause = exc.__cause__
    if exc.errno is None and isinstance(cause, BaseExceptionGroup):
        # trio.open_tcp_stream's "all attempts to connect ... failed": the
        # first address's own error says why.
        first = next((e for e in cause.exceptions if isinstance(e, OSError)), None)
        if first is not None:
            exc = first
    if exc.errno == errno.ECONNREFUSED or isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "host unreachable"
    text = exc.strerror or str(exc)
    return text.lower()


class UpstreamConn:
    __slots__ = ("stream", "proto", "pool", "reused", "idle_since", "_raw")

    def __init__(self, stream: trio.abc.HalfCloseableStream, proto: ClientProtocol, pool: UpstreamPool) -> None:
        self.stream = stream
        self.proto = proto
        self.pool = pool
        self.reused = False
        self.idle_since = 0.0
        # The stdlib socket under trio's wrapper, for the liveness peek.
        self._raw = getattr(stream.socket, "_sock", None)

    def looks_alive(self) -> bool:
        raw = self._raw
        if raw is None:
            return True
        try:
            data = raw.recv(1, _PEEK_FLAGS)
        except BlockingIOError:
            return True  # nothing to read: still open and quiet
        except OSError:
            return False
        # EOF (b""), or bytes the upstream sent unasked: either way unusable.
        del data
        return False

    def close(self) -> None:
        try:
            self.stream.socket.close()
        except OSError:
            pass


class UpstreamPool:
    __slots__ = (
        "host",
        "port",
        "max_idle",
        "max_connections",
        "idle_ttl",
        "http_impl",
        "_idle",
        "_open",
        "_waiters",
        "connects",
        "connect_failures",
    )

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_idle: int = 64,
        max_connections: int = 1024,
        idle_ttl: float = DEFAULT_IDLE_TTL,
        http_impl: str = "h11",
    ) -> None:
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self.max_connections = max_connections
        self.idle_ttl = idle_ttl
        self.http_impl = http_impl
        self._idle: list[UpstreamConn] = []
        self._open = 0
        self._waiters = trio.lowlevel.ParkingLot()
        self.connects = 0
        self.connect_failures = 0

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def acquire(self, connect_timeout: float) -> UpstreamConn:
        """A ready connection: a live idle one, or a new one.

        Raises ``ConnectError`` when the target cannot be reached in time.
        """
        idle = self._idle
        if idle:
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                idle_for = now - conn.idle_since
                # The peek (one syscall) finds connections the upstream closed
                # or reset while they sat idle (a backend that died).
                if idle_for < self.idle_ttl and (idle_for < PEEK_AFTER or conn.looks_alive()):
                    conn.reused = True
                    # No checkpoint here: the streams yield for fairness
                    # (lbnode/fastsock.py), and a scheduler round per request
                    # is a measurable share of the node's CPU.
                    return conn
                self._discard(conn)
        with trio.move_on_after(connect_timeout) as scope:
            while self._open >= self.max_connections:
                await self._waiters.park()
            self._open += 1
            try:
                stream = await trio.open_tcp_stream(self.host, self.port)
            except OSError as exc:
                self._open -= 1
                self._waiters.unpark()
                self.connect_failures += 1
                raise ConnectError(_describe_oserror(exc)) from None
            except BaseException:
                self._open -= 1
                self._waiters.unpark()
                raise
        if scope.cancelled_caught:
            self.connect_failures += 1
            if self._open >= self.max_connections:
                raise ConnectError(f"connection limit ({self.max_connections}) reached")
            raise ConnectError(f"connect timeout after {connect_timeout:g}s")
        self.connects += 1
        return UpstreamConn(fast_stream(stream), make_client(self.http_impl), self)

    def release(self, conn: UpstreamConn, reusable: bool) -> None:
        """Give a connection back after a request: kept idle if it can serve
        another, closed otherwise."""
        if reusable and len(self._idle) < self.max_idle:
            try:
                conn.proto.start_next_cycle()
            except Exception:
                self._discard(conn)
                return
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
            return
        self._discard(conn)

    def _discard(self, conn: UpstreamConn) -> None:
        conn.close()
        self._open -= 1
        self._waiters.unpark()

    def close_idle(self) -> None:
        while self._idle:
            self._discard(self._idle.pop())
