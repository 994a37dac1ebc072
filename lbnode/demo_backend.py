"""A small but real HTTP/1.1 backend for demos and tests (trio + h11).

Theory of operation
===================

``make demo`` and the integration tests need upstream servers that behave
like real ones: persistent connections, chunked and fixed-length bodies that
stream in both directions, ``Expect: 100-continue``, websocket upgrades,
deliberate failures. This module is that server, written the way h11's own
trio example is: one task per connection, an ``h11.Connection`` as the
protocol state machine, bytes moved by ``trio`` streams.

Per connection the loop is: wait (bounded by ``IDLE_TIMEOUT``) for a
``Request``, dispatch it to an endpoint handler, make sure the request body
has been consumed, then either ``start_next_cycle()`` (keep-alive) or close
(``Connection: close``, HTTP/1.0, a protocol error, or a client that asked for
100-continue and never got it). Handlers that do not care about the body read
and discard it *before* answering, so a client that waits for ``100 Continue``
gets it and the connection stays reusable.

``/echo`` answers first and then streams the body back while it arrives:
a client (or proxy) must read and write concurrently for bodies larger than
the socket buffers, which is exactly what a streaming proxy has to get right.

Websockets: h11 pauses after a request that proposes ``Upgrade``; the handler
answers ``101`` through h11, takes the bytes h11 read past the request
(``trailing_data``) and hands them to a frame-level ``wsproto`` connection
that echoes text/binary messages, answers pings and completes the close
handshake.

Endpoints (every response carries ``X-Backend: <id>``):

=================================  ==========================================
``GET /`` (and any unknown path)    200 JSON ``{"backend", "path", "method"}``
``GET /health``                     200 ``ok`` (503 ``down`` once flipped)
``POST /admin/health/down|up``      flip ``/health``
``/echo``                           stream the body back, same Content-Type
``/headers``                        JSON: method, target, http_version, headers
``/bytes/N[?chunked=1]``            N bytes in 64 KiB chunks
``/sink``                           discard the body, JSON ``{"received": n}``
``/status/N``                       answer status N
``/slow?delay=SECONDS``             wait, then answer
``/set-cookie?name=..&value=..``    ``Set-Cookie: name=value; Path=/``
``/close``                          answer with ``Connection: close``, close
``/ws``                             websocket echo
``GET /stats`` / ``DELETE /stats``  request counts per path / reset them
=================================  ==========================================

The byte pattern of ``/bytes/N`` is ``bytes(range(256))`` repeated, so a
client can verify integrity with :func:`expected_bytes`.
"""

from __future__ import annotations

import argparse
import http
import json
import secrets
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import parse_qsl

import h11
import trio
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import LocalProtocolError as WSLocalProtocolError
from wsproto.utilities import generate_accept_token

__all__ = ["BackendState", "expected_bytes", "main", "serve_backend"]

# Bytes asked of the socket per receive.
RECEIVE_SIZE = 65536
# Size of each body chunk /bytes/N sends.
CHUNK_SIZE = 65536
# A keep-alive connection idle this long is closed. Longer than the proxy's
# default upstream idle timeout (60 s), so the proxy, not the backend, is the
# side that normally retires idle pooled connections.
IDLE_TIMEOUT = 75.0
# The proxy forwards header blocks up to 32 KiB; accept twice that so its own
# 431 checks are what tests observe, not ours.
MAX_INCOMPLETE_EVENT_SIZE = 64 * 1024
# Upper bound for /slow?delay=.
MAX_SLOW_DELAY = 300.0

_PATTERN = bytes(range(256)) * (CHUNK_SIZE // 256)
_NO_BODY_STATUSES = frozenset({204, 304})
_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_COOKIE_FORBIDDEN = frozenset(' \t\r\n;,"\\')


def expected_bytes(n: int) -> bytes:
    """Return the body ``/bytes/n`` sends: ``bytes(range(256))`` repeated, cut to *n*."""
    full, rest = divmod(n, len(_PATTERN))
    return _PATTERN * full + _PATTERN[:rest]


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class BackendState:
    """Mutable state of one backend: its id, health flag and request counters."""

    __slots__ = ("backend_id", "healthy", "counts", "total", "_id_bytes")

    def __init__(self, backend_id: str) -> None:
        self.backend_id = backend_id
        self._id_bytes = backend_id.encode()
        self.healthy = True
        self.counts: Counter[str] = Counter()
        self.total = 0

    @property
    def id_bytes(self) -> bytes:
        """The id as the ``X-Backend`` header value."""
        return self._id_bytes

    def count(self, path: str) -> None:
        """Record one request for *path* (``/stats`` itself is not counted)."""
        self.counts[path] += 1
        self.total += 1

    def reset(self) -> None:
        """Forget every count."""
        self.counts.clear()
        self.total = 0

    def snapshot(self) -> dict[str, object]:
        """The ``GET /stats`` document."""
        return {"backend": self.backend_id, "total": self.total, "paths": dict(self.counts)}


class _Closing(Exception):
    """The connection must close after the current exchange."""


class _Exchange:
    """One request/response on a connection: the h11 plumbing handlers use."""

    __slots__ = (
        "stream",
        "conn",
        "state",
        "request",
        "path",
        "query",
        "expects_continue",
        "continued",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        state: BackendState,
        request: h11.Request,
    ) -> None:
        self.stream = stream
        self.conn = conn
        self.state = state
        self.request = request
        target = request.target.decode("latin-1")
        if "://" in target:  # absolute-form: keep the path only
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        path, _, query = target.partition("?")
        self.path = path or "/"
        self.query = dict(parse_qsl(query, keep_blank_values=True))
        self.expects_continue = conn.they_are_waiting_for_100_continue
        self.continued = False

    # -- plumbing -----------------------------------------------------------------

    async def send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        return await _next_event(self.stream, self.conn)

    def header(self, name: bytes) -> bytes | None:
        """The first value of request header *name* (lower-case), or None."""
        for key, value in self.request.headers:
            if key == name:
                return value
        return None

    async def send_continue(self) -> None:
        """Send ``100 Continue`` if the client is waiting for it."""
        if self.conn.they_are_waiting_for_100_continue:
            await self.send(
                h11.InformationalResponse(
                    status_code=100,
                    headers=[(b"x-backend", self.state.id_bytes)],
                    reason=b"Continue",
                )
            )
            self.continued = True

    async def read_chunk(self) -> bytes | None:
        """The next piece of the request body as it arrives, None at its end.

        Sends ``100 Continue`` first if the client waits for it.
        """
        await self.send_continue()
        while True:
            event = await self.next_event()
            if type(event) is h11.Data:
                return bytes(event.data)
            if type(event) is h11.EndOfMessage or event is h11.PAUSED:
                return None
            if type(event) is h11.ConnectionClosed:  # gone mid-body
                raise _Closing

    async def discard_body(self) -> int:
        """Read the request body to its end; return its length."""
        n = 0
        while (chunk := await self.read_chunk()) is not None:
            n += len(chunk)
        return n

    async def respond(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: bytes = _TEXT,
        headers: Iterable[tuple[bytes, bytes]] = (),
        close: bool = False,
    ) -> None:
        """Send a complete response with a fixed body."""
        hdrs = [(b"x-backend", self.state.id_bytes)]
        if status not in _NO_BODY_STATUSES:
            hdrs.append((b"content-type", content_type))
            hdrs.append((b"content-length", str(len(body)).encode()))
        hdrs.extend(headers)
        if close:
            hdrs.append((b"connection", b"close"))
        await self.send(h11.Response(status_code=status, headers=hdrs, reason=_reason(status)))
        if body and self.request.method != b"HEAD" and status not in _NO_BODY_STATUSES:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())

    async def respond_json(
        self, status: int, doc: object, *, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        """Send *doc* as a JSON response."""
        body = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        await self.respond(status, body, content_type=_JSON, headers=headers)


async def _next_event(
    stream: trio.abc.Stream, conn: h11.Connection
) -> h11.Event | type[h11.PAUSED]:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(RECEIVE_SIZE))
            continue
        return event  # type: ignore[return-value]


# -- endpoint handlers ----------------------------------------------------------------

Handler = Callable[[_Exchange], Awaitable[None]]


async def _root(ex: _Exchange) -> None:
    await ex.discard_body()
    doc = {
        "backend": ex.state.backend_id,
        "path": ex.path,
        "method": ex.request.method.decode("latin-1"),
    }
    await ex.respond_json(200, doc)


async def _health(ex: _Exchange) -> None:
    await ex.discard_body()
    if ex.state.healthy:
        await ex.respond(200, b"ok\n")
    else:
        await ex.respond(503, b"down\n")


async def _admin_health(ex: _Exchange) -> None:
    await ex.discard_body()
    action = ex.path.rsplit("/", 1)[1]
    if ex.request.method != b"POST" or action not in ("up", "down"):
        await ex.respond(404, b"use POST /admin/health/up or /admin/health/down\n")
        return
    ex.state.healthy = action == "up"
    await ex.respond_json(200, {"backend": ex.state.backend_id, "healthy": ex.state.healthy})


async def _echo(ex: _Exchange) -> None:
    content_type = ex.header(b"content-type") or b"application/octet-stream"
    hdrs = [(b"x-backend", ex.state.id_bytes), (b"content-type", content_type)]
    length = ex.header(b"content-length")
    if length is not None:
        hdrs.append((b"content-length", length))
    elif ex.header(b"transfer-encoding") is None:
        hdrs.append((b"content-length", b"0"))
    # else: no length; h11 frames the reply chunked (or close-delimited for 1.0).
    await ex.send_continue()
    await ex.send(h11.Response(status_code=200, headers=hdrs, reason=b"OK"))
    while (chunk := await ex.read_chunk()) is not None:
        if chunk and ex.request.method != b"HEAD":
            await ex.send(h11.Data(data=chunk))
    await ex.send(h11.EndOfMessage())


async def _headers(ex: _Exchange) -> None:
    await ex.discard_body()
    req = ex.request
    doc = {
        "backend": ex.state.backend_id,
        "method": req.method.decode("latin-1"),
        "target": req.target.decode("latin-1"),
        "http_version": req.http_version.decode("latin-1"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in req.headers.raw_items()],
    }
    await ex.respond_json(200, doc)


async def _bytes(ex: _Exchange) -> None:
    await ex.discard_body()
    try:
        n = int(ex.path[len("/bytes/") :])
        if n < 0:
            raise ValueError
    except ValueError:
        await ex.respond(400, b"usage: /bytes/N with N >= 0\n")
        return
    chunked = ex.query.get("chunked", "0") not in ("", "0", "false", "no")
    hdrs = [(b"x-backend", ex.state.id_bytes), (b"content-type", b"application/octet-stream")]
    if not chunked:
        hdrs.append((b"content-length", str(n).encode()))
    await ex.send(h11.Response(status_code=200, headers=hdrs, reason=b"OK"))
    if ex.request.method != b"HEAD":
        full, rest = divmod(n, CHUNK_SIZE)
        for _ in range(full):
            await ex.send(h11.Data(data=_PATTERN))
        if rest:
            await ex.send(h11.Data(data=_PATTERN[:rest]))
    await ex.send(h11.EndOfMessage())


async def _sink(ex: _Exchange) -> None:
    n = await ex.discard_body()
    await ex.respond_json(200, {"backend": ex.state.backend_id, "received": n})


async def _status(ex: _Exchange) -> None:
    await ex.discard_body()
    try:
        status = int(ex.path[len("/status/") :])
    except ValueError:
        status = 0
    if not 200 <= status <= 599:
        await ex.respond(400, b"usage: /status/N with 200 <= N <= 599\n")
        return
    await ex.respond(status, f"{status} {_reason(status).decode()}\n".encode())


async def _slow(ex: _Exchange) -> None:
    await ex.discard_body()
    try:
        delay = float(ex.query.get("delay", "1"))
    except ValueError:
        delay = -1.0
    if not 0.0 <= delay <= MAX_SLOW_DELAY:
        await ex.respond(400, f"usage: /slow?delay=SECONDS (0..{MAX_SLOW_DELAY:g})\n".encode())
        return
    await trio.sleep(delay)
    await ex.respond_json(200, {"backend": ex.state.backend_id, "delay": delay})


async def _set_cookie(ex: _Exchange) -> None:
    await ex.discard_body()
    name = ex.query.get("name", "session_id")
    value = ex.query.get("value") or secrets.token_hex(8)
    if not name or any(c in _COOKIE_FORBIDDEN or c == "=" for c in name) or any(
        c in _COOKIE_FORBIDDEN for c in value
    ):
        await ex.respond(400, b"bad cookie name or value\n")
        return
    cookie = f"{name}={value}; Path=/".encode("latin-1")
    doc = {"backend": ex.state.backend_id, "cookie": {"name": name, "value": value}}
    await ex.respond_json(200, doc, headers=[(b"set-cookie", cookie)])


async def _close(ex: _Exchange) -> None:
    await ex.discard_body()
    await ex.respond(200, b"closing\n", close=True)


async def _stats(ex: _Exchange) -> None:
    await ex.discard_body()
    if ex.request.method == b"DELETE":
        ex.state.reset()
    await ex.respond_json(200, ex.state.snapshot())


async def _ws(ex: _Exchange) -> None:
    upgrade = (ex.header(b"upgrade") or b"").lower()
    key = ex.header(b"sec-websocket-key")
    if upgrade != b"websocket" or key is None:
        await ex.discard_body()
        await ex.respond(426, b"websocket upgrade required\n", headers=[(b"upgrade", b"websocket")])
        return
    if ex.header(b"sec-websocket-version") != b"13":
        await ex.discard_body()
        await ex.respond(
            426, b"unsupported websocket version\n", headers=[(b"sec-websocket-version", b"13")]
        )
        return
    # Run h11 to the pause that follows an Upgrade request.
    while True:
        event = await ex.next_event()
        if event is h11.PAUSED:
            break
        if type(event) is h11.ConnectionClosed:
            raise _Closing
    await ex.send(
        h11.InformationalResponse(
            status_code=101,
            headers=[
                (b"upgrade", b"websocket"),
                (b"connection", b"Upgrade"),
                (b"sec-websocket-accept", generate_accept_token(key)),
                (b"x-backend", ex.state.id_bytes),
            ],
            reason=b"Switching Protocols",
        )
    )
    trailing, _closed = ex.conn.trailing_data
    await _websocket_echo(ex.stream, bytes(trailing))
    raise _Closing


async def _websocket_echo(stream: trio.abc.Stream, trailing: bytes) -> None:
    ws = WSConnection(ConnectionType.SERVER)
    if trailing:
        ws.receive_data(trailing)
    while True:
        out = bytearray()
        closing = False
        for event in ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                echo = type(event)(data=event.data, message_finished=event.message_finished)
                out += ws.send(echo)
            elif isinstance(event, Ping):
                out += ws.send(event.response())
            elif isinstance(event, CloseConnection):
                closing = True
                try:
                    out += ws.send(event.response())
                except WSLocalProtocolError:  # peer vanished without a close frame
                    pass
        if out:
            await stream.send_all(bytes(out))
        if closing or ws.state is ConnectionState.CLOSED:
            return
        data = await stream.receive_some(RECEIVE_SIZE)
        ws.receive_data(data or None)


_EXACT: dict[str, Handler] = {
    "/": _root,
    "/health": _health,
    "/echo": _echo,
    "/headers": _headers,
    "/sink": _sink,
    "/slow": _slow,
    "/set-cookie": _set_cookie,
    "/close": _close,
    "/ws": _ws,
}
_PREFIX: tuple[tuple[str, Handler], ...] = (
    ("/bytes/", _bytes),
    ("/status/", _status),
    ("/admin/health/", _admin_health),
)


def _route(path: str) -> Handler:
    handler = _EXACT.get(path)
    if handler is not None:
        return handler
    for prefix, handler in _PREFIX:
        if path.startswith(prefix):
            return handler
    if path.endswith("/set-cookie"):  # also under a prefix, e.g. /api/v2/set-cookie
        return _set_cookie
    return _root


# -- connections ------------------------------------------------------------------------


async def _finish(ex: _Exchange) -> None:
    """Consume what is left of the request body so the connection can be reused."""
    if ex.conn.their_state is not h11.SEND_BODY:
        return
    if ex.expects_continue and not ex.continued:
        # The client may still be waiting to send; its next bytes are ambiguous.
        raise _Closing
    await ex.discard_body()


async def _serve_connection(stream: trio.abc.Stream, state: BackendState) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_INCOMPLETE_EVENT_SIZE)
    try:
        while True:
            event: object = None
            with trio.move_on_after(IDLE_TIMEOUT):
                event = await _next_event(stream, conn)
            if type(event) is not h11.Request:
                return  # ConnectionClosed, or idle timeout (event still None)
            ex = _Exchange(stream, conn, state, event)
            if ex.path == "/stats":
                handler: Handler = _stats
            else:
                state.count(ex.path)
                handler = _route(ex.path)
            await handler(ex)
            await _finish(ex)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status = exc.error_status_hint
            body = f"{status} {_reason(status).decode()}: {exc}\n".encode()
            hdrs = [
                (b"x-backend", state.id_bytes),
                (b"content-type", _TEXT),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            try:
                response = h11.Response(status_code=status, headers=hdrs, reason=_reason(status))
                data = (conn.send(response) or b"") + (conn.send(h11.Data(data=body)) or b"")
                data += conn.send(h11.EndOfMessage()) or b""
                await stream.send_all(data)
            except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    except (_Closing, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def serve_backend(
    host: str,
    port: int,
    backend_id: str,
    *,
    state: BackendState | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the demo backend on *host*:*port* until cancelled.

    Calls ``task_status.started(port)`` with the bound port once listening
    (*port* 0 picks a free one). Pass *state* to observe or flip the backend
    from the same process.
    """
    state = state if state is not None else BackendState(backend_id)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        await _serve_connection(stream, state)

    task_status.started(bound)
    await trio.serve_listeners(handler, listeners)


async def _run(host: str, port: int, backend_id: str) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve_backend, host, port, backend_id)
            print(
                f"demo backend {backend_id} listening on {host}:{bound}",
                file=sys.stderr,
                flush=True,
            )
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    """``python -m lbnode.demo_backend --port 9001 --id api-1 [--host 127.0.0.1]``."""
    parser = argparse.ArgumentParser(
        prog="python -m lbnode.demo_backend",
        description="A small HTTP/1.1 backend for demos and tests.",
    )
    parser.add_argument("--port", type=int, default=9001, help="port (0: any free port)")
    parser.add_argument(
        "--id", dest="backend_id", default=None, help="X-Backend value (default backend-PORT)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    args = parser.parse_args(argv)
    backend_id = args.backend_id or f"backend-{args.port}"
    failed: list[BaseException] = []
    try:
        trio.run(_run, args.host, args.port, backend_id)
    except* OSError as group:
        failed.extend(group.exceptions)
    if failed:
        print(
            f"demo backend {backend_id}: cannot listen on {args.host}:{args.port}: {failed[0]}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
