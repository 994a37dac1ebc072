"""A trio-native Redis client: one pipelined connection shared by every task of a node.

redis-py's async client runs on asyncio only; lbnode runs on trio. This module
speaks RESP2 over a ``trio`` stream (TCP, or TLS through ``trio.SSLStream``),
encodes commands with ``hiredis.pack_command`` and parses replies with
``hiredis.Reader``. It is the only place a node talks to Redis.

Theory of operation
===================

One :class:`RedisClient` owns at most one live connection at a time. Four
kinds of task touch it:

* **callers** (any number of tasks) call :meth:`RedisClient.execute` or
  :meth:`RedisClient.pipeline`. A call never does I/O itself: it encodes its
  command(s), appends the bytes to the connection's *outbuf* and a
  :class:`_Waiter` to its *pending* FIFO in one synchronous step, wakes the
  writer and parks. Appending both in the same step, with no checkpoint in
  between, is what makes the order of bytes on the wire equal the order of
  waiters in the FIFO.
* the **writer** task sleeps until the outbuf is non-empty, then joins
  everything queued into one buffer and makes one ``send_all``. While it is
  in ``send_all``, more callers queue, and the next round sends them all
  together: under load, pipelining happens by itself, with no timer and no
  batching delay (an idle client sends each command at once).
* the **reader** task feeds whatever arrives to a ``hiredis.Reader`` and, for
  each complete reply, resolves the waiter at the head of the FIFO (a
  pipeline's waiter takes as many replies as it sent commands).
* the **timer** task enforces call timeouts. A cancel scope per call would
  cost more than the rest of the call (trio registers every deadline), so
  callers park with ``wait_task_rescheduled`` and no deadline of their own;
  waiters with the default timeout also join a deque, which is in deadline
  order because they are appended in time order with the same timeout, and
  waiters with a timeout of their own join a heap. The timer sleeps until
  the earliest deadline, wakes the callers whose time is up with
  :class:`RedisTimeout`; answered waiters leave the front of those queues
  as the reader resolves them, so the timer wakes about once per
  ``call_timeout`` on a busy connection, not once per call.

Redis answers the commands of one connection strictly in order, so the head
of the FIFO always owns the next reply. That is also how timeouts stay
correct: a caller that gives up (its timeout, or its own cancellation) only
marks its waiter *abandoned*; the waiter stays in the FIFO, and when its reply
finally arrives the reader discards it instead of handing it to the next
waiter. A timeout therefore never tears the connection down and never shifts
replies. The connection is treated as *poisoned* (dropped and rebuilt) only
when the stream can no longer be trusted:

* a reply arrives while nothing is pending (out of step with the FIFO), or
  hiredis reports a protocol error;
* the stream breaks, or the server closes it;
* the timer sees the oldest pending request unanswered ``stall_timeout``
  seconds past its own deadline: the server (or the path to it) is gone
  without a reset, as with a half-open TCP connection, and waiting longer
  only piles up abandoned waiters.

When a connection is dropped every waiter still pending (and any bytes not yet
sent) fails at once with :class:`RedisUnavailable`; while there is no
connection, calls raise :class:`RedisUnavailable` immediately instead of
waiting for a reconnect: the hot path never waits on Redis.

:meth:`RedisClient.run` is the connection manager, a long-running task the
node starts in its nursery. It reports ``started()`` at once (a node must
start while Redis is down), then loops forever: connect (TCP, TLS handshake,
then ``AUTH``, ``SELECT``, ``CLIENT SETNAME`` and a ``PING``, pipelined, all
within ``connect_timeout``), serve (writer, reader and timer in a nursery
of their own) until the connection drops, then wait an exponential, jittered
backoff (50 ms doubling to 2 s) and try again. Every connect and disconnect
calls ``on_state_change(True/False)``. A refused handshake (wrong password,
unknown user, bad database) is logged as an error naming the reply and is
retried with the same backoff, so fixing the credentials on the server heals
the node without a restart; the same failure repeated is logged again only
every ``LOG_REPEAT_INTERVAL`` seconds.

Blocking reads (``XREAD BLOCK``, ``BLPOP``) would stall every other caller
behind them on the shared connection, so they get a dedicated one:
:meth:`RedisClient.blocking` opens a :class:`BlockingConnection` with the
same address and credentials, one command at a time. A timeout or
cancellation there leaves a reply in flight, so that connection is closed
rather than reused.

Replies are what hiredis gives: ``bytes``, ``int``, ``list``, ``None``, and
:class:`ReplyError` for an error reply (hiredis builds our class directly, so
errors nested in ``EXEC`` replies are ours too). Nothing is decoded.

All of this runs on one trio thread; a client must not be shared between
``trio.run`` calls or threads.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import math
import random
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import hiredis
import outcome
import trio

from lbshared.redis_url import RedisAddress, parse_url

__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_MIN",
    "Backoff",
    "BlockingConnection",
    "RedisAddress",
    "RedisAuthError",
    "RedisClient",
    "RedisError",
    "RedisHandshakeError",
    "RedisStats",
    "RedisTimeout",
    "RedisUnavailable",
    "ReplyError",
    "Script",
    "StreamFactory",
    "parse_url",
]

logger = logging.getLogger("lbshared.redis")

#: First reconnect delay (before jitter); it doubles on each failed attempt...
BACKOFF_MIN: Final = 0.05
#: ...up to this cap.
BACKOFF_MAX: Final = 2.0
#: Bytes asked of the stream per receive; replies larger than this arrive in several.
RECEIVE_SIZE: Final = 65536
#: Default grace, beyond the oldest pending request's own deadline, before the
#: connection is declared stalled and rebuilt (see "poisoned" above).
STALL_TIMEOUT: Final = 10.0
#: The same connect failure is logged at most once per this many seconds.
LOG_REPEAT_INTERVAL: Final = 30.0
#: Reply codes of a handshake that mean "your credentials are wrong".
AUTH_ERROR_CODES: Final = frozenset({"WRONGPASS", "NOAUTH", "NOPERM"})

# hiredis returns this from gets() when the buffer holds no complete reply.
# (The default, False, would be ambiguous with RESP3 booleans.)
_NOT_ENOUGH: Final = object()

#: ``async (address) -> stream``: opens the transport (TLS is layered on top by
#: the client when the URL says ``rediss://``). The default opens TCP.
StreamFactory = Callable[[RedisAddress], Awaitable[trio.abc.Stream]]


_current_task = trio.lowlevel.current_task
_wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled
_reschedule = trio.lowlevel.reschedule


# -- errors ----------------------------------------------------------------------------------


class RedisError(Exception):
    """Base of every error this module raises."""


class ReplyError(RedisError):
    """Redis answered with an error reply (``-ERR ...``).

    ``message`` is the whole reply text; ``code`` its first word (``ERR``,
    ``WRONGTYPE``, ``NOSCRIPT``, ``NOPERM``...).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = message.split(" ", 1)[0]


class RedisUnavailable(RedisError):
    """No connection: not connected yet, connection lost, or a connect attempt failed."""


class RedisHandshakeError(RedisUnavailable):
    """The server refused a command of the connect handshake (``SELECT``, ``CLIENT SETNAME``...).

    Retrying will not help until someone changes the server or the URL, so
    the connection manager logs it as an error (and still retries).
    """


class RedisAuthError(RedisHandshakeError):
    """The server refused the credentials (wrong password, unknown user, password required)."""


class RedisTimeout(RedisError):
    """A call got no reply within its timeout."""


# -- small parts ------------------------------------------------------------------------------


class RedisStats:
    """Counters for metrics; the client only ever increments them.

    * ``calls``: commands sent through ``execute``/``pipeline`` (a pipeline counts each command);
    * ``errors``: calls that failed with ``ReplyError`` or ``RedisUnavailable``
      (in a pipeline, each in-place error reply);
    * ``timeouts``: calls that raised ``RedisTimeout``;
    * ``discarded``: replies that arrived after their caller had given up;
    * ``connects``/``reconnects``/``connect_failures``/``disconnects``: connection life;
    * ``writes``: ``send_all`` calls on the shared connection (pipelining shows as
      ``writes`` well below ``calls``);
    * ``latency_sum``/``latency_count``/``latency_max``: round trips in seconds,
      from queueing a call to its reply, for answered calls.
    """

    __slots__ = (
        "calls",
        "errors",
        "timeouts",
        "discarded",
        "connects",
        "reconnects",
        "connect_failures",
        "disconnects",
        "writes",
        "latency_sum",
        "latency_count",
        "latency_max",
    )

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.timeouts = 0
        self.discarded = 0
        self.connects = 0
        self.reconnects = 0
        self.connect_failures = 0
        self.disconnects = 0
        self.writes = 0
        self.latency_sum = 0.0
        self.latency_count = 0
        self.latency_max = 0.0

    @property
    def latency_avg(self) -> float:
        """Mean round trip in seconds (0.0 before the first reply)."""
        return self.latency_sum / self.latency_count if self.latency_count else 0.0

    def snapshot(self) -> dict[str, float]:
        """Every counter by name, plus ``latency_avg``."""
        out: dict[str, float] = {name: getattr(self, name) for name in self.__slots__}
        out["latency_avg"] = self.latency_avg
        return out

    def __repr__(self) -> str:
        return f"RedisStats({self.snapshot()!r})"


class Backoff:
    """Exponential backoff with jitter: ``minimum`` doubling to ``maximum``.

    Each delay is the current step scaled by a factor in [0.5, 1.0) drawn from
    ``rand`` ("equal jitter"), so nodes that lost Redis together do not
    reconnect in lockstep, yet no delay is shorter than half a step.
    """

    __slots__ = ("minimum", "maximum", "_rand", "_step")

    def __init__(self, minimum: float = BACKOFF_MIN, maximum: float = BACKOFF_MAX,
                 rand: Callable[[], float] = random.random) -> None:  # fmt: skip
        if not 0 < minimum <= maximum:
            raise ValueError("backoff needs 0 < minimum <= maximum")
        self.minimum = minimum
        self.maximum = maximum
        self._rand = rand
        self._step = minimum

    def next(self) -> float:
        """The delay before the next attempt; the step then doubles (up to ``maximum``)."""
        step = self._step
        self._step = min(self.maximum, step * 2)
        return step * (0.5 + 0.5 * self._rand())

    def reset(self) -> None:
        """Back to ``minimum`` (after a successful connect)."""
        self._step = self.minimum


class _Waiter:
    """One parked call: expects ``count`` replies, resolved by the reader, the timer or a drop.

    The caller parks with ``wait_task_rescheduled``. ``settled`` turns true
    once the call has its outcome (reply, timeout, drop) or its wait was
    aborted by the caller's own cancellation; an ``abandoned`` waiter's reply,
    when it comes, is thrown away by the reader.
    """

    __slots__ = ("count", "replies", "started", "deadline", "command", "task", "settled",
                 "abandoned")  # fmt: skip

    def __init__(self, count: int, started: float, deadline: float, command: Any) -> None:
        self.count = count
        self.replies: list[Any] | None = [] if count > 1 else None
        self.started = started
        self.deadline = deadline
        self.command = command  # the command's name (None: a pipeline), for messages
        self.task: trio.lowlevel.Task | None = None
        self.settled = False
        self.abandoned = False

    async def wait(self) -> Any:
        # Nothing can settle a waiter between submit() and here: no checkpoint in between.
        # (execute() inlines this: one coroutine frame less per call.)
        self.task = _current_task()
        return await _wait_task_rescheduled(self.abort)

    def abort(self, raise_cancel: object) -> trio.lowlevel.Abort:
        self.task = None
        self.settled = True
        self.abandoned = True
        return trio.lowlevel.Abort.SUCCEEDED

    def resolve(self, result: outcome.Outcome[Any]) -> None:
        self.settled = True
        task = self.task
        if task is not None:
            self.task = None
            _reschedule(task, result)


class _Connection:
    """One live connection's queues; owned by a RedisClient, served by its writer and reader.

    Timeouts are kept here too, without a cancel scope per call (registering a
    deadline with trio per call costs more than the rest of a call): waiters
    with the default timeout join ``timeouts`` in submission order, which is
    also deadline order; waiters with their own timeout join ``timeout_heap``.
    The timer task sleeps until the earliest deadline (``timer_deadline``,
    lowered by ``submit`` when a new waiter's is earlier).
    """

    __slots__ = ("stream", "now", "outbuf", "pending", "wake", "writer_idle", "closed",
                 "cancel_scope", "timeouts", "timeout_heap", "seq", "timer_scope",
                 "timer_deadline")  # fmt: skip

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        # The run's clock, called directly: cheaper than trio.current_time() per call.
        self.now: Callable[[], float] = trio.lowlevel.current_clock().current_time
        self.outbuf: list[bytes] = []
        self.pending: deque[_Waiter] = deque()
        self.wake = trio.Event()
        self.writer_idle = False
        self.closed = False
        self.cancel_scope: trio.CancelScope | None = None
        self.timeouts: deque[_Waiter] = deque()
        self.timeout_heap: list[tuple[float, int, _Waiter]] = []
        self.seq = itertools.count()
        self.timer_scope: trio.CancelScope | None = None
        self.timer_deadline = math.inf

    def submit(self, data: bytes, waiter: _Waiter, default_timeout: bool) -> None:
        # outbuf and pending are appended in one synchronous step: wire order == FIFO order.
        self.outbuf.append(data)
        self.pending.append(waiter)
        if self.writer_idle:
            self.writer_idle = False
            self.wake.set()
        deadline = waiter.deadline
        if default_timeout:
            self.timeouts.append(waiter)
        else:
            heapq.heappush(self.timeout_heap, (deadline, next(self.seq), waiter))
        if deadline < self.timer_deadline:
            self.lower_timer(deadline)

    def lower_timer(self, deadline: float) -> None:
        """Wake the timer at ``deadline``, earlier than it planned."""
        self.timer_deadline = deadline
        if self.timer_scope is not None:
            self.timer_scope.deadline = deadline


async def _tcp_connect(address: RedisAddress) -> trio.abc.Stream:
    """The default transport: TCP (trio sets TCP_NODELAY), with keepalive for dead peers."""
    stream = await trio.open_tcp_stream(address.host, address.port)
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return stream


def _new_reader() -> hiredis.Reader:
    return hiredis.Reader(replyError=ReplyError, notEnoughData=_NOT_ENOUGH)


async def _read_replies(stream: trio.abc.Stream, reader: hiredis.Reader, n: int) -> list[Any]:
    """Exactly ``n`` replies from ``stream`` (one at a time; for handshakes and blocking calls)."""
    out: list[Any] = []
    while len(out) < n:
        reply = reader.gets()
        if reply is _NOT_ENOUGH:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise RedisUnavailable("connection closed by the server")
            reader.feed(data)  # type: ignore[arg-type]  # hiredis takes any buffer
        else:
            out.append(reply)
    return out


def _command_name(name: Any) -> str:
    if isinstance(name, bytes | bytearray | memoryview):
        return bytes(name).decode("utf-8", "replace").upper()
    return str(name).upper()


def _describe(exc: BaseException) -> str:
    """A short reason for a transport failure (the SSL error behind a BrokenResourceError...)."""
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ else exc
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause) or type(cause).__name__


def _check_name(name: str) -> str:
    # CLIENT SETNAME refuses spaces, newlines and non-printable characters.
    if not name or not all(33 <= ord(c) <= 126 for c in name):
        raise ValueError(f"client name {name!r} must be non-empty printable ASCII without spaces")
    return name


# -- the client --------------------------------------------------------------------------------


class RedisClient:
    """A pipelined Redis client for trio; see the module's theory of operation.

    ``url``: ``redis://[user[:password]@]host[:port][/db]`` or ``rediss://`` (TLS).
    ``call_timeout``: default timeout of ``execute``/``pipeline``/blocking calls.
    ``connect_timeout``: bound of one connect attempt (TCP + TLS + handshake).
    ``ssl_context``: for ``rediss://`` (default: ``ssl.create_default_context()``).
    ``name``: sent as ``CLIENT SETNAME`` (shows in ``CLIENT LIST``).
    ``on_state_change``: called with ``True`` on every connect, ``False`` on every disconnect.
    ``stall_timeout``: grace beyond the oldest request's deadline before a silent
    connection is rebuilt (``None``: never).
    ``stream_factory``: opens the transport (tests pass in-memory streams).
    """

    def __init__(
        self,
        url: str,
        *,
        call_timeout: float = 1.0,
        connect_timeout: float = 1.0,
        ssl_context: ssl.SSLContext | None = None,
        name: str | None = None,
        on_state_change: Callable[[bool], None] | None = None,
        stall_timeout: float | None = STALL_TIMEOUT,
        stream_factory: StreamFactory | None = None,
    ) -> None:
        self.address = parse_url(url)
        if call_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("call_timeout and connect_timeout must be positive")
        if stall_timeout is not None and stall_timeout <= 0:
            raise ValueError("stall_timeout must be positive or None")
        if ssl_context is not None and not self.address.tls:
            raise ValueError(f"ssl_context given but {self.address} is not a rediss:// URL")
        self.call_timeout = call_timeout
        self.connect_timeout = connect_timeout
        self.name = _check_name(name) if name is not None else None
        self.stats = RedisStats()
        self._ssl_context = ssl_context
        self._on_state_change = on_state_change
        self._stall_timeout = stall_timeout
        self._stream_factory: StreamFactory = stream_factory or _tcp_connect
        self._handshake = self._handshake_commands()
        self._conn: _Connection | None = None
        self._connected_event = trio.Event()
        self._running = False
        self._last_error: str | None = None
        self._last_logged: tuple[str, float] | None = None

    def __repr__(self) -> str:
        state = "connected" if self._conn is not None else "disconnected"
        return f"<RedisClient {self.address} {state}>"

    def _handshake_commands(self) -> list[tuple[Any, ...]]:
        a = self.address
        commands: list[tuple[Any, ...]] = []
        if a.password is not None:
            if a.username is not None:
                commands.append(("AUTH", a.username, a.password))
            else:
                commands.append(("AUTH", a.password))
        if a.db:
            commands.append(("SELECT", a.db))
        if self.name is not None:
            commands.append(("CLIENT", "SETNAME", self.name))
        # Always at least one round trip: a missing password shows up here as NOAUTH,
        # not later on the first real call.
        commands.append(("PING",))
        return commands

    # -- state ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is up (calls are being sent)."""
        return self._conn is not None

    @property
    def last_error(self) -> str | None:
        """Why the last connect attempt failed or the last connection dropped (None: never)."""
        return self._last_error

    async def wait_connected(self, timeout: float) -> bool:  # noqa: ASYNC109 - the contract
        """Wait up to ``timeout`` seconds for a connection; True if connected."""
        with trio.move_on_after(timeout):
            while self._conn is None:
                await self._connected_event.wait()
        if self._conn is None:
            return False
        await trio.lowlevel.checkpoint()
        return self._conn is not None

    def _notify(self, up: bool) -> None:
        if self._on_state_change is None:
            return
        try:
            self._on_state_change(up)
        except Exception:
            logger.exception("redis %s: on_state_change(%s) raised", self.address, up)

    # -- connection manager ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection up until cancelled (reports ``started()`` before connecting)."""
        if self._running:
            raise RuntimeError("RedisClient.run() is already running")
        self._running = True
        backoff = Backoff()
        task_status.started()
        try:
            while True:
                try:
                    stream = await self._open()
                except RedisUnavailable as exc:
                    self.stats.connect_failures += 1
                    self._log_connect_failure(exc)
                    await trio.sleep(backoff.next())
                    continue
                backoff.reset()
                conn = _Connection(stream)
                try:
                    self._up(conn)
                    await self._serve(conn)
                finally:
                    self._drop(conn, "client stopped", quiet=True)
                    await trio.aclose_forcefully(stream)
                await trio.sleep(backoff.next())
        finally:
            self._running = False

    def _up(self, conn: _Connection) -> None:
        self.stats.connects += 1
        if self.stats.connects > 1:
            self.stats.reconnects += 1
        if self._last_error is not None:
            logger.info("redis %s: connected (after: %s)", self.address, self._last_error)
        else:
            logger.info("redis %s: connected", self.address)
        self._last_logged = None
        self._conn = conn
        self._connected_event.set()
        self._notify(True)

    def _log_connect_failure(self, exc: RedisUnavailable) -> None:
        message = str(exc)
        self._last_error = message
        now = trio.current_time()
        last = self._last_logged
        if last is None or last[0] != message or now - last[1] >= LOG_REPEAT_INTERVAL:
            self._last_logged = (message, now)
            level = logging.ERROR if isinstance(exc, RedisHandshakeError) else logging.WARNING
            logger.log(level, "redis %s: %s; retrying with backoff", self.address, message)
        else:
            logger.debug("redis %s: %s; retrying with backoff", self.address, message)

    async def _serve(self, conn: _Connection) -> None:
        async with trio.open_nursery() as nursery:
            conn.cancel_scope = nursery.cancel_scope
            nursery.start_soon(self._writer, conn)
            nursery.start_soon(self._reader, conn)
            nursery.start_soon(self._timer, conn)

    def _drop(self, conn: _Connection, reason: str, *, quiet: bool = False) -> None:
        """Poison ``conn``: fail everything pending, stop its tasks, report the disconnect."""
        if conn.closed:
            return
        conn.closed = True
        was_current = self._conn is conn
        if was_current:
            self._conn = None
            self._connected_event = trio.Event()
            self.stats.disconnects += 1
        if not quiet:
            self._last_error = reason
            logger.warning("redis %s: connection lost: %s", self.address, reason)
        pending = list(conn.pending)
        conn.pending.clear()
        conn.outbuf.clear()
        for waiter in pending:
            if not waiter.abandoned:
                waiter.resolve(outcome.Error(RedisUnavailable(f"redis {self.address}: {reason}")))
        if conn.cancel_scope is not None:
            conn.cancel_scope.cancel()
        if was_current:
            self._notify(False)

    async def _open(self) -> trio.abc.Stream:
        """A connected, authenticated stream, or RedisUnavailable saying why not."""
        address = self.address
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await self._stream_factory(address)
                if address.tls:
                    context = self._ssl_context or ssl.create_default_context()
                    stream = trio.SSLStream(stream, context, server_hostname=address.host)
                    await stream.do_handshake()
                await self._do_handshake(stream)
            return stream
        except BaseException as exc:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            if isinstance(exc, RedisUnavailable):
                raise
            if isinstance(exc, trio.TooSlowError):
                raise RedisUnavailable(
                    f"connect timed out after {self.connect_timeout:g}s"
                ) from None
            if isinstance(exc, OSError | trio.BrokenResourceError | hiredis.ProtocolError):
                raise RedisUnavailable(f"cannot connect: {_describe(exc)}") from exc
            raise

    async def _do_handshake(self, stream: trio.abc.Stream) -> None:
        commands = self._handshake
        await stream.send_all(b"".join(hiredis.pack_command(c) for c in commands))
        replies = await _read_replies(stream, _new_reader(), len(commands))
        for command, reply in zip(commands, replies, strict=True):
            if not isinstance(reply, ReplyError):
                continue
            if reply.code == "NOAUTH":
                raise RedisAuthError(
                    f"server requires a password and the URL has none ({reply.message})"
                )
            if command[0] == "AUTH" or reply.code in AUTH_ERROR_CODES:
                raise RedisAuthError(f"{command[0]} refused: {reply.message}")
            raise RedisHandshakeError(f"{command[0]} refused: {reply.message}")

    # -- connection tasks ------------------------------------------------------------------

    async def _writer(self, conn: _Connection) -> None:
        outbuf = conn.outbuf
        stats = self.stats
        try:
            while True:
                if not outbuf:
                    conn.wake = trio.Event()
                    conn.writer_idle = True
                    await conn.wake.wait()
                data = outbuf[0] if len(outbuf) == 1 else b"".join(outbuf)
                outbuf.clear()
                stats.writes += 1
                await conn.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._drop(conn, f"send failed: {_describe(exc)}")

    async def _reader(self, conn: _Connection) -> None:
        reader = _new_reader()
        pending = conn.pending
        stats = self.stats
        receive_some = conn.stream.receive_some
        clock = conn.now
        reschedule = _reschedule
        Value = outcome.Value
        timeouts = conn.timeouts
        heap = conn.timeout_heap
        try:
            while True:
                data = await receive_some(RECEIVE_SIZE)
                if not data:
                    self._drop(conn, "connection closed by the server")
                    return
                reader.feed(data)  # type: ignore[arg-type]  # hiredis takes any buffer
                now = clock()
                while (reply := reader.gets()) is not _NOT_ENOUGH:
                    if not pending:
                        self._drop(conn, "reply with no request pending (stream out of step)")
                        return
                    waiter = pending[0]
                    replies = waiter.replies
                    if replies is not None:
                        replies.append(reply)
                        if len(replies) < waiter.count:
                            continue
                        reply = replies
                        waiter.replies = None  # a heap entry may hold the waiter a while yet
                    pending.popleft()
                    if waiter.abandoned:
                        stats.discarded += 1
                        continue
                    rtt = now - waiter.started
                    stats.latency_sum += rtt
                    stats.latency_count += 1
                    if rtt > stats.latency_max:
                        stats.latency_max = rtt
                    # waiter.resolve(Value(reply)), inlined: this loop runs once per reply.
                    waiter.settled = True
                    task = waiter.task
                    if task is not None:
                        waiter.task = None
                        reschedule(task, Value(reply))
                # Forget answered waiters now rather than at the timer's next wake-up,
                # so the timeout queues hold about what is in flight, not a whole
                # call_timeout's worth of calls.
                while timeouts and timeouts[0].settled:
                    timeouts.popleft()
                while heap and heap[0][2].settled:
                    heapq.heappop(heap)
        except hiredis.ProtocolError as exc:
            self._drop(conn, f"protocol error: {exc}")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._drop(conn, f"receive failed: {_describe(exc)}")

    async def _timer(self, conn: _Connection) -> None:
        """Fail calls whose deadline passed; drop the connection when it stalls."""
        timeouts = conn.timeouts
        heap = conn.timeout_heap
        pending = conn.pending
        grace = self._stall_timeout
        while True:
            now = conn.now()
            # Settled waiters need no timer: pop them whatever their deadline.
            while timeouts and (timeouts[0].settled or timeouts[0].deadline <= now):
                self._expire(timeouts.popleft())
            while heap and (heap[0][2].settled or heap[0][0] <= now):
                self._expire(heapq.heappop(heap)[2])
            wake = math.inf
            if timeouts:
                wake = timeouts[0].deadline
            if heap:
                wake = min(wake, heap[0][0])
            if grace is not None and pending and pending[0].abandoned:
                # The oldest request got no answer: how long past its deadline?
                stall_at = pending[0].deadline + grace
                if now >= stall_at:
                    self._drop(conn, f"no reply for {grace:g}s past a request's deadline (stalled)")
                    return
                wake = min(wake, stall_at)
            conn.timer_deadline = wake
            with trio.CancelScope(deadline=wake) as scope:
                conn.timer_scope = scope
                await trio.sleep_forever()
            conn.timer_scope = None

    def _expire(self, waiter: _Waiter) -> None:
        if waiter.settled:
            return
        waiter.abandoned = True
        timeout = waiter.deadline - waiter.started
        what = (
            f"pipeline of {waiter.count}" if waiter.command is None
            else _command_name(waiter.command)
        )  # fmt: skip
        waiter.resolve(outcome.Error(RedisTimeout(
            f"redis {self.address}: {what} got no reply within {timeout:g}s"
        )))  # fmt: skip

    # -- calls -----------------------------------------------------------------------------

    async def _unavailable(self) -> RedisUnavailable:
        await trio.lowlevel.checkpoint()
        self.stats.errors += 1
        reason = f" ({self._last_error})" if self._last_error else ""
        return RedisUnavailable(f"redis {self.address}: not connected{reason}")

    async def execute(self, *args: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Send one command, return its reply; ``ReplyError`` for an error reply.

        Raises ``RedisUnavailable`` at once when not connected (or if the
        connection drops before the reply), ``RedisTimeout`` after
        ``timeout`` seconds (default ``call_timeout``).
        """
        conn = self._conn
        if conn is None:
            raise await self._unavailable()
        if not args:
            raise ValueError("execute() needs a command")
        data = hiredis.pack_command(args)
        now = conn.now()
        if timeout is None:
            # conn.submit(data, waiter, True), inlined: this is the hot path.
            deadline = now + self.call_timeout
            waiter = _Waiter(1, now, deadline, args[0])
            conn.outbuf.append(data)
            conn.pending.append(waiter)
            if conn.writer_idle:
                conn.writer_idle = False
                conn.wake.set()
            conn.timeouts.append(waiter)
            if deadline < conn.timer_deadline:
                conn.lower_timer(deadline)
        else:
            waiter = _Waiter(1, now, now + timeout, args[0])
            conn.submit(data, waiter, False)
        stats = self.stats
        stats.calls += 1
        try:
            waiter.task = _current_task()  # waiter.wait(), inlined
            reply = await _wait_task_rescheduled(waiter.abort)
        except RedisTimeout:
            stats.timeouts += 1
            raise
        except RedisUnavailable:
            stats.errors += 1
            raise
        if type(reply) is ReplyError:
            stats.errors += 1
            raise reply
        return reply

    async def pipeline(
        self,
        commands: Sequence[Sequence[Any]],
        timeout: float | None = None,  # noqa: ASYNC109 - a per-call timeout is the contract
    ) -> list[Any]:
        """Send ``commands`` together; their replies in order, error replies as
        ``ReplyError`` instances in place (not raised). Same timeouts and
        ``RedisUnavailable`` as :meth:`execute`, for the batch as a whole.
        """
        if not commands:
            await trio.lowlevel.checkpoint()
            return []
        conn = self._conn
        if conn is None:
            raise await self._unavailable()
        for command in commands:
            if not command:
                raise ValueError("pipeline() got an empty command")
        data = b"".join([hiredis.pack_command(tuple(command)) for command in commands])
        now = conn.now()
        count = len(commands)
        limit = self.call_timeout if timeout is None else timeout
        waiter = _Waiter(count, now, now + limit, None)
        if count == 1:
            waiter.replies = []  # a pipeline always answers with a list
        conn.submit(data, waiter, timeout is None)
        stats = self.stats
        stats.calls += count
        try:
            replies: list[Any] = await waiter.wait()
        except RedisTimeout:
            stats.timeouts += count
            raise
        except RedisUnavailable:
            stats.errors += count
            raise
        stats.errors += sum(1 for reply in replies if type(reply) is ReplyError)
        return replies

    @asynccontextmanager
    async def blocking(self) -> AsyncIterator[BlockingConnection]:
        """A dedicated connection (same address and credentials) for blocking commands.

        Raises ``RedisUnavailable`` if it cannot connect; closed on exit. It
        does not need ``run()`` to be running.
        """
        stream = await self._open()
        conn = BlockingConnection(stream, self.address, self.call_timeout)
        try:
            yield conn
        finally:
            await conn.aclose()

    async def script(self, source: str) -> Script:
        """A :class:`Script` for ``source``, loaded now if connected (else on first use)."""
        script = Script(self, source)
        if self._conn is not None:
            try:
                await script.load()
            except RedisError as exc:  # the first call falls back to EVAL anyway
                logger.debug("redis %s: SCRIPT LOAD failed: %s", self.address, exc)
        else:
            await trio.lowlevel.checkpoint()
        return script


class BlockingConnection:
    """A dedicated connection for blocking reads; one command at a time (calls queue on a lock).

    A timeout, a cancellation or a broken stream closes it for good (a reply
    may still be in flight); later calls raise ``RedisUnavailable``.
    """

    def __init__(self, stream: trio.abc.Stream, address: RedisAddress, call_timeout: float) -> None:
        self.address = address
        self.call_timeout = call_timeout
        self._stream = stream
        self._reader = _new_reader()
        self._lock = trio.Lock()
        self._closed_reason: str | None = None

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    async def execute(self, *args: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Send one command and wait (up to ``timeout``, default ``call_timeout``) for its reply.

        For ``XREAD BLOCK ms``/``BLPOP`` pass a ``timeout`` longer than the block.
        """
        if not args:
            raise ValueError("execute() needs a command")
        data = hiredis.pack_command(args)
        limit = self.call_timeout if timeout is None else timeout
        async with self._lock:
            if self._closed_reason is not None:
                raise RedisUnavailable(
                    f"redis {self.address}: blocking connection closed ({self._closed_reason})"
                )
            done = False
            try:
                with trio.fail_after(limit):
                    await self._stream.send_all(data)
                    (reply,) = await _read_replies(self._stream, self._reader, 1)
                done = True
            except trio.TooSlowError:
                await self._close(f"{_command_name(args[0])} timed out")
                raise RedisTimeout(
                    f"redis {self.address}: {_command_name(args[0])} got no reply within {limit:g}s"
                ) from None
            except RedisUnavailable as exc:
                await self._close(str(exc))
                raise RedisUnavailable(f"redis {self.address}: {exc}") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                await self._close(_describe(exc))
                raise RedisUnavailable(f"redis {self.address}: {_describe(exc)}") from exc
            except hiredis.ProtocolError as exc:
                await self._close(f"protocol error: {exc}")
                raise RedisUnavailable(f"redis {self.address}: protocol error: {exc}") from exc
            finally:
                if not done and self._closed_reason is None:  # cancelled mid-call
                    await self._close("cancelled during a call")
        if type(reply) is ReplyError:
            raise reply
        return reply

    async def _close(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        await trio.aclose_forcefully(self._stream)

    async def aclose(self) -> None:
        """Close the connection (idempotent)."""
        await self._close("closed")


class Script:
    """A Lua script run with ``EVALSHA``, falling back to ``EVAL`` on ``NOSCRIPT``.

    ``EVAL`` also caches the script on the server, so after a ``SCRIPT FLUSH``
    or a server restart one call pays for the source and the next are
    ``EVALSHA`` again.
    """

    __slots__ = ("client", "source", "sha")

    def __init__(self, client: RedisClient, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()

    async def load(self) -> None:
        """``SCRIPT LOAD`` the source now."""
        sha = await self.client.execute("SCRIPT", "LOAD", self.source)
        if sha != self.sha.encode("ascii"):  # pragma: no cover - Redis hashes what we hash
            raise RedisError(f"SCRIPT LOAD returned {sha!r}, expected {self.sha}")

    async def __call__(
        self,
        keys: Sequence[Any] = (),
        args: Sequence[Any] = (),
        timeout: float | None = None,  # noqa: ASYNC109 - a per-call timeout is the contract
    ) -> Any:
        """Run the script; the reply as ``execute`` gives it. ``timeout`` bounds both tries."""
        client = self.client
        limit = client.call_timeout if timeout is None else timeout
        deadline = trio.current_time() + limit
        try:
            return await client.execute("EVALSHA", self.sha, len(keys), *keys, *args, timeout=limit)
        except ReplyError as exc:
            if exc.code != "NOSCRIPT":
                raise
        remaining = max(0.0, deadline - trio.current_time())
        return await client.execute("EVAL", self.source, len(keys), *keys, *args, timeout=remaining)
