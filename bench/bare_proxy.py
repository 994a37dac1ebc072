"""A bare trio reverse proxy: the floor lbnode is measured against.

One upstream, keep-alive on both sides with one pooled upstream connection
per client connection, no header rewriting beyond dropping hop-by-hop
headers, no policy, no logging. Two parsers, one process each:

* ``--parser h11`` (the default): h11 on both hops. It is what "a bare trio +
  h11 proxy" means in docs/performance.md. Requests with a body are not
  forwarded (the connection is closed).
* ``--parser httptools``: httptools (llhttp) on both hops,
  ``HttpRequestParser`` and ``HttpResponseParser`` callbacks turned into a
  queue of events (a head, body pieces, the end). Bodies are forwarded with
  the framing they arrived with (``Content-Length`` as is, chunked
  re-chunked piece by piece), in bounded memory: what is parsed is sent on
  whenever the proxy has to wait for more input. A ``HEAD`` response ends
  at its head; a response without a length ends when the upstream closes,
  and so does the client connection. Upgrades and interim (1xx) responses
  are not handled (the connection is closed); the benchmark sends plain GETs.

    python bench/bare_proxy.py --port 8000 --upstream 127.0.0.1:9000 [--parser httptools]
"""

from __future__ import annotations

import argparse
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import trio

try:
    import httptools
except ImportError:  # --parser h11 needs only h11
    HAVE_HTTPTOOLS = False
else:
    HAVE_HTTPTOOLS = True

HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te"}
#: Hop-by-hop headers the httptools variant drops; it keeps Transfer-Encoding,
#: because it forwards a body with the framing it arrived with.
HOP_HTTPTOOLS = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}
)
RECEIVE_SIZE = 65536


# -- h11 ---------------------------------------------------------------------------------


async def _next(conn: h11.Connection, stream: trio.SocketStream) -> object:
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(RECEIVE_SIZE))
            continue
        return ev


async def handle_h11(client: trio.SocketStream, host: str, port: int) -> None:
    down = h11.Connection(h11.SERVER)
    upstream: trio.SocketStream | None = None
    up: h11.Connection | None = None
    try:
        while True:
            req = await _next(down, client)
            if not isinstance(req, h11.Request):
                return
            assert isinstance(await _next(down, client), h11.EndOfMessage)
            if upstream is None:
                upstream = await trio.open_tcp_stream(host, port)
                up = h11.Connection(h11.CLIENT)
            assert up is not None
            headers = [(k, v) for k, v in req.headers if k not in HOP]
            await upstream.send_all(
                up.send(h11.Request(method=req.method, target=req.target, headers=headers))
                + up.send(h11.EndOfMessage())
            )
            resp = await _next(up, upstream)
            assert isinstance(resp, h11.Response)
            out = down.send(
                h11.Response(
                    status_code=resp.status_code,
                    headers=[(k, v) for k, v in resp.headers if k not in HOP],
                )
            )
            while True:
                ev = await _next(up, upstream)
                if isinstance(ev, h11.Data):
                    out += down.send(h11.Data(data=ev.data))
                elif isinstance(ev, h11.EndOfMessage):
                    out += down.send(h11.EndOfMessage())
                    break
            await client.send_all(out)
            up.start_next_cycle()
            down.start_next_cycle()
    except (trio.BrokenResourceError, h11.ProtocolError, AssertionError):
        pass
    finally:
        if upstream is not None:
            await trio.aclose_forcefully(upstream)
        await trio.aclose_forcefully(client)


# -- httptools ---------------------------------------------------------------------------


class _Closed(Exception):
    """The peer closed its side (or sent something this proxy does not forward)."""


@dataclass(slots=True)
class _Head:
    """A parsed head: the start line, the headers to forward, and how the body is framed."""

    method: bytes  # the request's method; b"" for a response
    line: bytes  # "GET / HTTP/1.1\r\n" or "HTTP/1.1 200 OK\r\n"
    headers: list[tuple[bytes, bytes]]
    chunked: bool
    keep_alive: bool

    def encode(self, close: bool) -> list[bytes]:
        """The head as sent on, with ``Connection: close`` when ``close``."""
        out = [self.line]
        out += [b"%s: %s\r\n" % kv for kv in self.headers]
        out.append(b"Connection: close\r\n\r\n" if close else b"\r\n")
        return out


_END = object()  # the message is complete


class _Parsed:
    """httptools callbacks queued as events, in order: a _Head, body bytes, _END."""

    def __init__(self, response: bool) -> None:
        self.events: deque[object] = deque()
        self.parser: httptools.HttpRequestParser | httptools.HttpResponseParser
        if response:
            self.parser = httptools.HttpResponseParser(self)
        else:
            self.parser = httptools.HttpRequestParser(self)
        self._start = b""  # the URL, or the reason phrase
        self._headers: list[tuple[bytes, bytes]] = []

    def on_message_begin(self) -> None:
        self._start = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._start += url

    def on_status(self, reason: bytes) -> None:
        self._start += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self.parser
        version = p.get_http_version().encode()
        if isinstance(p, httptools.HttpRequestParser):
            method = p.get_method()
            line = b"%s %s HTTP/%s\r\n" % (method, self._start, version)
        else:
            method = b""
            line = b"HTTP/%s %d %s\r\n" % (version, p.get_status_code(), self._start)
        chunked = False
        headers = []
        for name, value in self._headers:
            lower = name.lower()
            if lower == b"transfer-encoding":
                chunked = value.lower().rstrip().endswith(b"chunked")
            if lower not in HOP_HTTPTOOLS:
                headers.append((name, value))
        self.events.append(_Head(method, line, headers, chunked, p.should_keep_alive()))

    def on_body(self, body: bytes) -> None:
        self.events.append(body)

    def on_message_complete(self) -> None:
        self.events.append(_END)

    async def next(
        self, source: trio.SocketStream, flush: Callable[[], Awaitable[None]]
    ) -> object:
        """The next event, reading ``source`` when none is queued (after ``flush``)."""
        while not self.events:
            await flush()
            data = await source.receive_some(RECEIVE_SIZE)
            if not data:
                raise _Closed
            try:
                self.parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
                raise _Closed from exc
        return self.events.popleft()


def _frame(data: bytes, chunked: bool) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if chunked else data


class _Outbox:
    """Bytes for one stream, sent in one write when the proxy is about to wait."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parts: list[bytes] = []

    async def flush(self) -> None:
        if self.parts:
            data = b"".join(self.parts)
            self.parts.clear()
            await self.stream.send_all(data)


async def _relay(head: _Head, parsed: _Parsed, source: trio.SocketStream, out: _Outbox) -> None:
    """Queue ``head`` and the body that follows it on ``out``, up to its end, then flush."""
    while (ev := await parsed.next(source, out.flush)) is not _END:
        assert isinstance(ev, bytes)
        out.parts.append(_frame(ev, head.chunked))
    if head.chunked:
        out.parts.append(b"0\r\n\r\n")
    await out.flush()


async def handle_httptools(client: trio.SocketStream, host: str, port: int) -> None:
    down = _Parsed(response=False)
    to_client = _Outbox(client)
    upstream: trio.SocketStream | None = None
    try:
        while True:
            try:
                req = await down.next(client, to_client.flush)
            except _Closed:
                return
            assert isinstance(req, _Head)
            if upstream is None:
                upstream = await trio.open_tcp_stream(host, port)
                up = _Parsed(response=True)
                to_upstream = _Outbox(upstream)
            to_upstream.parts += req.encode(close=False)
            await _relay(req, down, client, to_upstream)
            resp = await up.next(upstream, to_upstream.flush)
            assert isinstance(resp, _Head)
            to_client.parts += resp.encode(close=not req.keep_alive)
            if req.method == b"HEAD":
                await to_client.flush()
                up = _Parsed(response=True)  # llhttp would wait for the announced body
            else:
                await _relay(resp, up, upstream, to_client)
            if not req.keep_alive:
                return
            if not resp.keep_alive:
                await trio.aclose_forcefully(upstream)
                upstream = None
    except (trio.BrokenResourceError, _Closed, AssertionError, OSError):
        pass
    finally:
        if upstream is not None:
            await trio.aclose_forcefully(upstream)
        await trio.aclose_forcefully(client)


HANDLERS = {"h11": handle_h11}
if HAVE_HTTPTOOLS:
    HANDLERS["httptools"] = handle_httptools


async def main(port: int, upstream: str, parser: str) -> None:
    host, _, uport = upstream.rpartition(":")
    handle = HANDLERS[parser]

    async def handler(stream: trio.SocketStream) -> None:
        await handle(stream, host, int(uport))

    await trio.serve_tcp(handler, port, host="127.0.0.1")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--parser", choices=sorted(HANDLERS), default="h11")
    a = p.parse_args()
    trio.run(main, a.port, a.upstream, a.parser)
