"""The httptools (llhttp) implementation of the HTTP/1.1 seam.

Theory of operation
-------------------
Same contract, same answers as ``h11_impl``, a fraction of the cost on the
common path. Three parts:

* **Heads go through llhttp, guarded, with h11 as the arbiter.** Bytes are
  buffered raw; a head is parsed only once it is complete (its blank line
  is in the buffer) and only the head's own bytes are fed to llhttp, so the
  parser never runs ahead into a pipelined request or a body. llhttp (strict
  mode) accepts a subset of what h11 accepts, and in a few places a little
  more (leading blank lines, ``RTSP/1.0``, duplicate ``Host``, any transfer
  coding ending in ``chunked``, 24-digit lengths...). So the llhttp result is
  used only when it is *plain*: the request or status line rebuilt from what
  llhttp reported equals the line received byte for byte, the version is
  1.0 or 1.1, ``Host`` appears once (HTTP/1.1), ``Transfer-Encoding`` is one
  ``chunked``, ``Content-Length`` has at most 20 digits. Any other head --
  refused by llhttp or not plain -- is handed, unchanged, to the reference
  implementation (``H11Server``/``H11Client``), whose event or error is
  final. Both implementations therefore accept the same heads and refuse
  them with the same status; only plain heads take the fast path.

* **Bodies are framed here, in Python, with h11's rules.** Content-Length
  bodies are slices of the receive buffer (a whole receive passes through
  uncopied). Chunked bodies use h11's chunk-line grammar, byte for byte, and
  all the complete chunks in the buffer are returned as one ``Data`` (the
  seam never promised chunk boundaries). Trailers (rare) are decoded by h11.
  A request body of more than ``FREE_CHUNKED_BYTES`` whose chunks average
  fewer than ``MIN_AVERAGE_CHUNK`` bytes on the wire is refused (400): a
  client cannot make the node do per-chunk work for a stream of 1-byte
  chunks. Response bodies are not capped (server-sent events are legitimately
  made of small chunks).

* **The connection state is h11's state machine**, ported as two integers
  (client state, server state) and the same transition tables, so
  ``can_reuse``, ``response_started``, ``PAUSED`` after a request carrying
  ``Upgrade`` or ``CONNECT``, and ``Connection: close`` handling follow h11
  exactly. Serialising is done here on bytes with h11's framing choices
  (chunked for an HTTP/1.1 peer without a length, close-delimited plus
  ``Connection: close`` for an HTTP/1.0 peer, no body for HEAD, 1xx, 204
  and 304) and h11's header order (``Host`` first).

Pipelining: bytes past the current request stay raw in the buffer, unparsed,
until ``start_next_cycle``; the proxy reads only when ``next_event`` says
``NEED_DATA``, so at most one receive (64 KiB) past the current request is
ever buffered per connection. A head larger than ``max_header_bytes`` is
refused (431) as soon as that many bytes are buffered without its end.

Where it differs from ``h11_impl``, deliberately: the small-chunk cap; on
sending, fields are checked for CR, LF and NUL only (h11 applies its whole
field grammar to what the proxy built from fields it had already parsed);
and what we are asked to send wrongly raises ``ProtocolError`` (500 on the
server side, 502 on the client side) where h11 raises its own
``LocalProtocolError``.
"""

from __future__ import annotations

import re

import h11
import httptools

from lbnode.http1 import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Data,
    EndOfMessage,
    HeaderList,
    Headers,
    InformationalResponse,
    NextEvent,
    ProtocolError,
    Request,
    Response,
)
from lbnode.http1.h11_impl import H11Client, H11Server

# A chunked request body may be made of small chunks for this many bytes...
FREE_CHUNKED_BYTES = 65536
# ...then its chunks must average at least this many bytes on the wire
# (size line and CRLF included): 1-byte chunks are 6 bytes each.
MIN_AVERAGE_CHUNK = 16
# h11's CONTENT_LENGTH_MAX_DIGITS.
_CL_MAX_DIGITS = 20

_HttpParserError = httptools.HttpParserError
_HttpParserUpgrade = httptools.HttpParserUpgrade
_RequestParser = httptools.HttpRequestParser
_ResponseParser = httptools.HttpResponseParser

# h11's grammar for what it decides byte by byte (h11/_abnf.py, _receivebuffer.py).
_BLANK_LINE = re.compile(rb"\n\r?\n")
_CHUNK_HEADER = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*\r\n")

# The two parties' states (h11/_state.py), as small integers.
IDLE, SEND_RESPONSE, SEND_BODY, DONE, MUST_CLOSE, CLOSED, MIGHT_SWITCH, SWITCHED, ERROR = range(9)
# Events, for the transition tables.
_REQ, _RESP, _INFO, _DATA, _EOM, _CLOSE = range(6)
# Pending switch proposals (bit mask).
_UPGRADE, _CONNECT = 1, 2

_CLIENT_T = {
    (IDLE, _REQ): SEND_BODY,
    (IDLE, _CLOSE): CLOSED,
    (SEND_BODY, _DATA): SEND_BODY,
    (SEND_BODY, _EOM): DONE,
    (DONE, _CLOSE): CLOSED,
    (MUST_CLOSE, _CLOSE): CLOSED,
    (CLOSED, _CLOSE): CLOSED,
}
_SERVER_T = {
    (IDLE, _CLOSE): CLOSED,
    (IDLE, _RESP): SEND_BODY,
    (SEND_RESPONSE, _INFO): SEND_RESPONSE,
    (SEND_RESPONSE, _RESP): SEND_BODY,
    (SEND_BODY, _DATA): SEND_BODY,
    (SEND_BODY, _EOM): DONE,
    (DONE, _CLOSE): CLOSED,
    (MUST_CLOSE, _CLOSE): CLOSED,
    (CLOSED, _CLOSE): CLOSED,
}
_STATE_NAMES = ("IDLE", "SEND_RESPONSE", "SEND_BODY", "DONE", "MUST_CLOSE", "CLOSED",
                "MIGHT_SWITCH_PROTOCOL", "SWITCHED_PROTOCOL", "ERROR")  # fmt: skip
_EVENT_NAMES = ("Request", "Response", "InformationalResponse", "Data", "EndOfMessage",
                "ConnectionClosed")  # fmt: skip

# Body framing of the message being read or written.
_LENGTH, _CHUNKED, _UNTIL_CLOSE = range(3)

_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
_NO_BODY_STATUS = (204, 304)
# The synthetic message whose last chunk carries the trailers h11 decodes.
_TRAILER_PREFIX = b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n"
_CRLF = b"\r\n"


class _LocalError(Exception):
    """We were asked to send something HTTP/1.1 does not allow (h11's
    LocalProtocolError); the roles turn it into a ProtocolError."""


class _Head:
    """llhttp's callbacks for one head; the fields are read after ``feed_data``."""

    __slots__ = ("headers", "url", "reason", "begun", "complete", "ended")

    def __init__(self) -> None:
        self.headers: HeaderList = []
        self.url = b""
        self.reason = b""
        self.begun = 0
        self.complete = False
        self.ended = False

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp drops leading whitespace and keeps trailing; h11 drops both.
        self.headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self.complete = True

    def on_message_complete(self) -> None:
        self.ended = True


def _comma_tokens(value: bytes) -> list[bytes]:
    return [t for t in (p.strip() for p in value.lower().split(b",")) if t]


def _says_close(value: bytes) -> bool:
    """A Connection value naming ``close`` (most say ``keep-alive``)."""
    value = value.lower()
    return b"close" in value and b"close" in _comma_tokens(value)


def _write_head(first: bytes, headers: Headers) -> bytes:
    """A start line and header fields, Host first (as h11 writes them)."""
    lines = [first]
    host_at = 1
    for name, value in headers:
        line = name + b": " + value
        if len(name) == 4 and name.lower() == b"host":
            lines.insert(host_at, line)
            host_at += 1
        else:
            lines.append(line)
    head = _CRLF.join(lines) + b"\r\n\r\n"
    n = len(lines) + 1
    # One scan each instead of a regex per field: a CR, LF or NUL inside a
    # name, value, target or reason would split the head.
    if head.count(b"\n") != n or head.count(b"\r") != n or b"\x00" in head:
        raise _LocalError("illegal character in a header field or start line")
    return head


class _Outgoing:
    """What one pass over the header fields we are about to send found."""

    __slots__ = ("fields", "length", "chunked", "close", "upgrade", "hosts")

    def __init__(self, headers: Headers) -> None:
        """h11's send-side checks of Content-Length and Transfer-Encoding;
        ``fields`` is the caller's list when nothing had to change, else a
        copy with the length deduplicated and stripped and the coding
        lower-cased, as h11 sends them."""
        out: list[tuple[bytes, bytes]] | None = None
        length: bytes | None = None
        chunked = close = upgrade = False
        hosts = 0
        for i, (name, value) in enumerate(headers):
            lname = name.lower()
            if lname == b"content-length":
                values = {v.strip() for v in value.split(b",")}
                if len(values) != 1:
                    raise _LocalError("conflicting Content-Length headers")
                v = values.pop()
                if not v.isdigit() or not v.isascii() or len(v) > _CL_MAX_DIGITS:
                    raise _LocalError("bad Content-Length")
                if length is None:
                    length = v
                    if v != value and out is None:
                        out = list(headers[:i])
                elif length != v:
                    raise _LocalError("conflicting Content-Length headers")
                else:  # an identical repeat: dropped
                    if out is None:
                        out = list(headers[:i])
                    continue
                value = v
            elif lname == b"transfer-encoding":
                if chunked:
                    raise _LocalError("multiple Transfer-Encoding headers")
                v = value.lower()
                if v != b"chunked":
                    raise _LocalError("Only Transfer-Encoding: chunked is supported")
                chunked = True
                if v != value and out is None:
                    out = list(headers[:i])
                value = v
            elif lname == b"host":
                hosts += 1
            elif lname == b"connection":
                close = close or _says_close(value)
            elif lname == b"upgrade":
                upgrade = upgrade or bool(_comma_tokens(value))
            if out is not None:
                out.append((name, value))
        self.fields = list(headers) if out is None else out
        self.length = None if length is None else int(length)
        self.chunked = chunked
        self.close = close
        self.upgrade = upgrade
        self.hosts = hosts


def _drop(headers: list[tuple[bytes, bytes]], lname: bytes) -> list[tuple[bytes, bytes]]:
    return [h for h in headers if h[0].lower() != lname]


class _Conn:
    """What both roles share: the two-party state machine, the receive
    buffer, the body readers and the body writer."""

    __slots__ = (
        "_cs",
        "_ss",
        "_keep_alive",
        "_pending",
        "_method",
        "_their_version",
        "_buf",
        "_pos",
        "_scan",
        "_closed",
        "_max_bytes",
        "_head",
        "_parser",
        "_parser_ready",
        "_rmode",
        "_rleft",
        "_rcrlf",
        "_rtrailer",
        "_rchunks",
        "_rwire",
        "_rcap",
        "_rerror",
        "_wmode",
        "_wleft",
    )

    _status = 400  # what a peer's protocol error maps to on this side

    def __init__(self, max_header_bytes: int) -> None:
        self._cs = IDLE
        self._ss = IDLE
        self._keep_alive = True
        self._pending = 0
        self._method: bytes | None = None
        self._their_version: bytes | None = None
        self._buf = b""
        self._pos = 0
        self._scan = 0  # where the search for the end of a head, chunk line or trailers resumes
        self._closed = False
        self._max_bytes = max_header_bytes
        self._head = _Head()
        self._parser: _RequestParser | _ResponseParser | None = None
        self._parser_ready = False
        self._rmode = _LENGTH
        self._rleft = 0
        self._rcrlf = b""
        self._rtrailer = False
        self._rchunks = 0
        self._rwire = 0
        self._rcap = False
        self._rerror: ProtocolError | None = None
        self._wmode = _LENGTH
        self._wleft = 0

    # -- the state machine (h11/_state.py) -------------------------------------------------

    def _settle(self) -> None:
        while True:
            c, s = self._cs, self._ss
            if self._pending:
                if c == DONE:
                    c = MIGHT_SWITCH
            elif c == MIGHT_SWITCH:
                c = DONE
            if not self._keep_alive:
                if c == DONE:
                    c = MUST_CLOSE
                if s == DONE:
                    s = MUST_CLOSE
            if c == MIGHT_SWITCH and s == SWITCHED:
                c = SWITCHED
            elif c == CLOSED and (s == DONE or s == IDLE):
                s = MUST_CLOSE
            elif c == ERROR and s == DONE:
                s = MUST_CLOSE
            elif s == CLOSED and (c == DONE or c == IDLE):
                c = MUST_CLOSE
            elif c == DONE and s == ERROR:
                c = MUST_CLOSE
            if c == self._cs and s == self._ss:
                return
            self._cs, self._ss = c, s

    def _client_event(self, event: int) -> None:
        new = _CLIENT_T.get((self._cs, event))
        if new is None:
            raise _LocalError(self._bad_event(event, "CLIENT", self._cs))
        if event == _REQ:
            if self._ss != IDLE:
                raise _LocalError(self._bad_event(event, "SERVER", self._ss))
            self._ss = SEND_RESPONSE
        self._cs = new
        self._settle()

    def _server_event(self, event: int, status: int = 0) -> None:
        switch = 0
        if event == _INFO and status == 101:
            switch = _UPGRADE
        elif event == _RESP and self._pending & _CONNECT and 200 <= status < 300:
            switch = _CONNECT
        if switch:
            if not self._pending & switch:
                raise _LocalError("switching protocols without a pending proposal")
            new = SWITCHED if self._ss == SEND_RESPONSE else None
        else:
            if event == _RESP:
                self._pending = 0
            new = _SERVER_T.get((self._ss, event))
        if new is None:
            raise _LocalError(self._bad_event(event, "SERVER", self._ss))
        self._ss = new
        self._settle()

    @staticmethod
    def _bad_event(event: int, role: str, state: int) -> str:
        return f"can't handle {_EVENT_NAMES[event]} when {role} is {_STATE_NAMES[state]}"

    # -- receiving ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._closed = True
            return
        if self._closed:
            raise ProtocolError("data received after the peer closed", self._status)
        if type(data) is not bytes:
            data = bytes(data)
        pos = self._pos
        if pos >= len(self._buf):
            self._buf = data
            self._scan = 0
        else:
            self._buf = self._buf[pos:] + data
            self._scan = max(0, self._scan - pos)
        self._pos = 0

    @property
    def trailing_data(self) -> bytes:
        return self._buf[self._pos :]

    @property
    def can_reuse(self) -> bool:
        return self._cs == DONE and self._ss == DONE

    def start_next_cycle(self) -> None:
        if self._cs != DONE or self._ss != DONE:
            raise self._local_error(
                f"not in a reusable state ({_STATE_NAMES[self._cs]}, {_STATE_NAMES[self._ss]})"
            )
        self._cs = self._ss = IDLE
        self._method = None

    def _local_error(self, message: str) -> ProtocolError:
        raise NotImplementedError

    def _find_head(self) -> int:
        """The end of a complete head in the buffer (past its blank line), 0 if
        it is incomplete, -1 if only h11 can say (bare LF, leading blank line,
        a first byte no start line begins with)."""
        buf = self._buf
        pos = self._pos
        if buf[pos] < 0x21:
            return -1
        end = buf.find(b"\r\n\r\n", max(pos, self._scan))
        if end >= 0:
            return end + 4
        if _BLANK_LINE.search(buf, max(pos, self._scan)):
            return -1
        self._scan = max(pos, len(buf) - 3)
        return 0

    def _feed_head(self, parser_class: type, end: int) -> _Head | None:
        """Feed the head (and only it) to llhttp; its fields, or None when
        llhttp refuses it."""
        head = self._head
        head.headers = []
        head.url = head.reason = b""
        head.begun = 0
        head.complete = head.ended = False
        parser = self._parser
        if parser is None or not self._parser_ready:
            parser = self._parser = parser_class(head)
        pos = self._pos
        buf = self._buf
        raw = buf if pos == 0 and end == len(buf) else buf[pos:end]
        upgraded = False
        try:
            parser.feed_data(raw)
        except _HttpParserUpgrade:
            upgraded = True
        except _HttpParserError:
            self._parser_ready = False
            # llhttp stops on a switch (CONNECT, 101) after the message ends.
            return head if head.ended and head.begun == 1 else None
        # A message without body ends with its head: the parser is at rest
        # and serves the next head. Otherwise it waits for a body it never gets.
        self._parser_ready = head.ended and not upgraded and parser.should_keep_alive()
        # One message, whole: llhttp saw the same head as we did.
        return head if head.complete and head.begun == 1 else None

    def _start_body(self, mode: int, length: int, capped: bool) -> None:
        self._rmode = mode
        self._rleft = length
        self._rcrlf = b""
        self._rtrailer = False
        self._rchunks = 0
        self._rwire = 0
        self._rcap = capped

    def _read_body(self) -> NextEvent:
        mode = self._rmode
        if mode == _LENGTH:
            left = self._rleft
            if left == 0:
                return self._end_of_message(None)
            buf = self._buf
            pos = self._pos
            avail = len(buf) - pos
            if avail == 0:
                if self._closed:
                    raise ProtocolError(
                        "peer closed connection without sending complete message body",
                        self._status,
                    )
                return NEED_DATA
            if avail <= left:
                data = buf if pos == 0 else buf[pos:]
                self._pos = len(buf)
                self._rleft = left - avail
            else:
                data = buf[pos : pos + left]
                self._pos = pos + left
                self._rleft = 0
            return Data(data)
        if mode == _CHUNKED:
            return self._read_chunked()
        buf = self._buf
        if self._pos < len(buf):
            data = buf[self._pos :] if self._pos else buf
            self._pos = len(buf)
            return Data(data)
        if self._closed:
            # A body delimited by the close: this connection is done.
            self._keep_alive = False
            return self._end_of_message(None)
        return NEED_DATA

    def _read_chunked(self) -> NextEvent:
        """h11's ChunkedReader, returning every complete chunk in the buffer at once."""
        if self._rerror is not None:
            exc, self._rerror = self._rerror, None
            raise exc
        buf = self._buf
        pos = start = self._pos
        n = len(buf)
        pieces: list[bytes] = []
        try:
            while True:
                if self._rtrailer:
                    if pieces:  # the data first, the end on the next call
                        break
                    trailers = self._read_trailers()
                    if trailers is None:
                        break
                    return self._end_of_message(trailers)
                crlf = self._rcrlf
                if crlf:
                    got = buf[pos : pos + len(crlf)]
                    if not got:
                        break
                    if got != crlf[: len(got)]:
                        raise ProtocolError("malformed chunk footer", self._status)
                    pos += len(got)
                    self._pos = pos
                    crlf = self._rcrlf = crlf[len(got) :]
                    if crlf:
                        break
                left = self._rleft
                if left == 0:
                    eol = buf.find(b"\r\n", max(pos, self._scan))
                    if eol < 0:
                        self._scan = max(pos, n - 1)  # resume there: no rescans
                        break
                    m = _CHUNK_HEADER.fullmatch(buf, pos, eol + 2)
                    if m is None:
                        raise ProtocolError("illegal chunk header", self._status)
                    if self._rcap:
                        # The chunks before this one, size lines and CRLFs included.
                        wire = self._rwire + pos - start
                        if wire > FREE_CHUNKED_BYTES and self._rchunks * MIN_AVERAGE_CHUNK > wire:
                            raise ProtocolError(
                                f"chunked body with chunks smaller than {MIN_AVERAGE_CHUNK} "
                                "bytes on average",
                                400,
                            )
                    self._rchunks += 1
                    pos = eol + 2
                    self._pos = pos
                    left = self._rleft = int(m.group(1), 16)
                    if left == 0:
                        self._rtrailer = True
                        continue
                take = n - pos
                if take <= 0:
                    break
                if take >= left:
                    take = left
                    self._rcrlf = b"\r\n"
                pieces.append(buf[pos : pos + take])
                pos += take
                self._pos = pos
                self._rleft = left - take
        except ProtocolError as exc:
            if not pieces:
                raise
            self._rerror = exc  # raised on the next call, after this data
        self._rwire += self._pos - start
        if pieces:
            return Data(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        if self._closed and self._pos >= n:
            raise ProtocolError(
                "peer closed connection without sending complete message body "
                "(incomplete chunked read)",
                self._status,
            )
        return NEED_DATA

    def _read_trailers(self) -> HeaderList | None:
        buf = self._buf
        pos = self._pos
        if buf.startswith(b"\r\n", pos):
            self._pos = pos + 2
            return []
        if buf.startswith(b"\n", pos):  # h11 takes a bare LF as the blank line
            self._pos = pos + 1
            return []
        m = _BLANK_LINE.search(buf, max(pos, self._scan))
        if m is None:
            self._scan = max(pos, len(buf) - 2)
            return None
        self._pos = m.end()
        return self._trailers_by_h11(buf[pos : m.end()])

    def _trailers_by_h11(self, block: bytes) -> HeaderList:
        """Trailer fields are rare: the reference decodes them (see the roles)."""
        raise NotImplementedError

    def _end_of_message(self, trailers: HeaderList | None) -> EndOfMessage:
        raise NotImplementedError

    # -- sending a body ------------------------------------------------------------------------

    def _set_writer(self, mode: int, length: int) -> None:
        self._wmode = mode
        self._wleft = length

    def _write_data(self, data: bytes) -> bytes:
        mode = self._wmode
        if mode == _LENGTH:
            left = self._wleft - len(data)
            if left < 0:
                raise _LocalError("Too much data for declared Content-Length")
            self._wleft = left
            return data
        if mode == _CHUNKED:
            if not data:
                return b""
            return b"%x\r\n%b\r\n" % (len(data), data)
        return data

    def _write_end(self, trailers: Headers) -> bytes:
        mode = self._wmode
        if mode == _LENGTH:
            if self._wleft != 0:
                raise _LocalError("Too little data for declared Content-Length")
            if trailers:
                raise _LocalError("Content-Length and trailers don't mix")
            return b""
        if mode == _CHUNKED:
            if not trailers:
                return b"0\r\n\r\n"
            return _write_head(b"0", _Outgoing(trailers).fields)
        if trailers:
            raise _LocalError("can't send trailers to HTTP/1.0 client")
        return b""


def _first_words(message: str) -> str:
    """h11 quotes the offending bytes in its messages; keep the cause only."""
    cut = message.find(": ")
    if cut >= 0 and ("b'" in message[cut:] or "bytearray(" in message[cut:]):
        message = message[:cut]
    return message if len(message) <= 120 else message[:117] + "..."


class HttptoolsServer(_Conn):
    """Server side of one downstream connection (``ServerProtocol``)."""

    __slots__ = ("_max_headers",)

    _status = 400

    def __init__(self, *, max_header_bytes: int = 32768, max_headers: int = 100) -> None:
        super().__init__(max_header_bytes)
        self._max_headers = max_headers

    def _local_error(self, message: str) -> ProtocolError:
        return ProtocolError(message, 500)

    # -- reading requests ----------------------------------------------------------------------

    def next_event(self) -> NextEvent:
        if self._cs == ERROR:
            raise ProtocolError("can't receive data when peer state is ERROR", 400)
        try:
            ev = self._next()
            if ev is NEED_DATA:
                if len(self._buf) - self._pos > self._max_bytes:
                    raise ProtocolError("request header block too large", 431)
                if self._closed:
                    raise ProtocolError("peer unexpectedly closed connection", 400)
            return ev
        except ProtocolError:
            self._cs = ERROR
            self._settle()
            raise
        except _LocalError as exc:
            self._cs = ERROR
            self._settle()
            raise ProtocolError(str(exc), 400) from None

    def _next(self) -> NextEvent:
        state = self._cs
        if state == SEND_BODY:
            return self._read_body()
        more = self._pos < len(self._buf)
        if state == IDLE:
            if more:
                return self._read_request()
        elif state == DONE:
            if more:
                return PAUSED
        elif state == MIGHT_SWITCH or state == SWITCHED:
            return PAUSED
        elif more:  # MUST_CLOSE, CLOSED
            raise ProtocolError("Got data when expecting EOF", 400)
        if self._closed:
            self._client_event(_CLOSE)
            return ConnectionClosed()
        return NEED_DATA

    def _read_request(self) -> NextEvent:
        end = self._find_head()
        if end == 0:
            return NEED_DATA
        req = self._plain_request(end) if end > 0 else None
        if req is None:
            return self._request_by_h11()
        return req

    def _plain_request(self, end: int) -> Request | None:
        head = self._feed_head(_RequestParser, end)
        if head is None:
            return None
        parser = self._parser
        assert parser is not None
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            return None
        method = parser.get_method()
        target = head.url
        # The request line as received must be exactly METHOD SP TARGET SP
        # HTTP/x.y CRLF: llhttp also takes several spaces, RTSP/ and ICE/.
        if not self._buf.startswith(
            method + b" " + target + b" HTTP/" + version + b"\r\n", self._pos
        ):
            return None
        headers = head.headers
        hosts = 0
        length: bytes | None = None
        chunked = False
        close = version == b"1.0"
        upgrade = False
        size = 0
        for i, (name, value) in enumerate(headers):
            size += len(name) + len(value) + 4
            if name == b"host":
                hosts += 1
            elif name == b"content-length":
                if len(value) > _CL_MAX_DIGITS:
                    return None
                length = value
            elif name == b"transfer-encoding":
                if chunked or value.lower() != b"chunked":
                    return None  # h11 answers 501
                chunked = True
                if value != b"chunked":
                    headers[i] = (name, b"chunked")  # as h11 reports it
            elif name == b"connection":
                if _says_close(value):
                    close = True
            elif name == b"upgrade":
                if value.translate(None, b", \t"):
                    upgrade = True
        if hosts > 1 or (hosts == 0 and version == b"1.1"):
            return None  # h11 refuses it, with its own words
        if len(headers) > self._max_headers:
            raise ProtocolError(f"more than {self._max_headers} header fields", 431)
        if size > self._max_bytes:
            raise ProtocolError("request header block too large", 431)
        if chunked:
            if length is not None:
                raise ProtocolError("both Content-Length and Transfer-Encoding", 400)
            if version == b"1.0":
                raise ProtocolError("Transfer-Encoding in an HTTP/1.0 message", 400)
        self._pos = end
        self._scan = end
        req = Request(method, target, headers, version)
        self._accept(req, length, chunked, close, upgrade)
        return req

    def _request_by_h11(self) -> NextEvent:
        """The reference implementation parses the heads the fast path does
        not take; its event or its error is the answer."""
        self._parser_ready = False
        ref = H11Server(max_header_bytes=self._max_bytes, max_headers=self._max_headers)
        data = self._buf[self._pos :]
        ref.receive_data(data)
        if self._closed:
            ref.receive_data(b"")
        ev = ref.next_event()
        if type(ev) is not Request:
            return NEED_DATA  # an incomplete head after all
        self._pos += len(data) - len(ref.trailing_data)
        self._scan = self._pos
        length: bytes | None = None
        chunked = False
        close = ev.http_version < b"1.1"
        upgrade = False
        for name, value in ev.headers:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"connection":
                if _says_close(value):
                    close = True
            elif name == b"upgrade":
                if _comma_tokens(value):
                    upgrade = True
        self._accept(ev, length, chunked, close, upgrade)
        return ev

    def _accept(
        self, req: Request, length: bytes | None, chunked: bool, close: bool, upgrade: bool
    ) -> None:
        if req.method == b"CONNECT":
            self._pending |= _CONNECT
        if upgrade:
            self._pending |= _UPGRADE
        self._client_event(_REQ)
        self._method = req.method
        self._their_version = req.http_version
        if close:
            self._keep_alive = False
            self._settle()
        if chunked:
            self._start_body(_CHUNKED, 0, True)
        else:
            self._start_body(_LENGTH, int(length) if length is not None else 0, False)

    def _end_of_message(self, trailers: HeaderList | None) -> EndOfMessage:
        self._client_event(_EOM)
        return EndOfMessage(trailers)

    def _trailers_by_h11(self, block: bytes) -> HeaderList:
        # The reference judges trailers as it judges them in its own body
        # reader: both implementations accept and refuse the same ones.
        ref = H11Server(max_header_bytes=self._max_bytes, max_headers=self._max_headers)
        ref.receive_data(_TRAILER_PREFIX + block)
        ref.next_event()  # the synthetic request
        ev = ref.next_event()
        assert type(ev) is EndOfMessage
        return ev.trailers

    # -- sending responses ------------------------------------------------------------------------

    def send_informational(self, status: int, headers: Headers, reason: bytes = b"") -> bytes:
        try:
            if not 100 <= status < 200:
                raise _LocalError(f"informational status {status} not in 100-199")
            head = _write_head(b"HTTP/1.1 %d %b" % (status, reason), _Outgoing(headers).fields)
            self._server_event(_INFO, status)
            return head
        except _LocalError as exc:
            raise self._send_error(str(exc)) from None

    def send_response(self, status: int, headers: Headers, reason: bytes = b"") -> bytes:
        try:
            if not 200 <= status < 1000:
                raise _LocalError(f"response status {status} not in 200-999")
            out = _Outgoing(headers)
            fields, length, chunked, close = out.fields, out.length, out.chunked, out.close
            method = self._method
            # h11's _clean_up_response_headers_for_sending: frame as for GET
            # even for HEAD, so a HEAD answer says what a GET would get.
            if status in _NO_BODY_STATUS or (method == b"CONNECT" and status < 300):
                framing = _LENGTH
            elif chunked:
                framing = _CHUNKED
            elif length is not None:
                framing = _LENGTH
            else:
                framing = _UNTIL_CLOSE
            need_close = False
            if framing != _LENGTH:
                fields = _drop(_drop(fields, b"content-length"), b"transfer-encoding")
                version = self._their_version
                if version is None or version < b"1.1":
                    chunked = False
                    need_close = method != b"HEAD"
                else:
                    fields.append((b"Transfer-Encoding", b"chunked"))
                    chunked = True
            if not self._keep_alive or need_close:
                tokens = set()
                for name, value in fields:
                    if name.lower() == b"connection":
                        tokens.update(_comma_tokens(value))
                tokens.discard(b"keep-alive")
                tokens.add(b"close")
                fields = _drop(fields, b"connection")
                fields.extend((b"Connection", t) for t in sorted(tokens))
                close = True
            head = _write_head(b"HTTP/1.1 %d %b" % (status, reason), fields)
            self._server_event(_RESP, status)
            if close and self._keep_alive:
                self._keep_alive = False
                self._settle()
            if self._ss == SEND_BODY:
                if status in _NO_BODY_STATUS or method == b"HEAD":
                    self._set_writer(_LENGTH, 0)
                elif chunked:
                    self._set_writer(_CHUNKED, 0)
                elif length is not None:
                    self._set_writer(_LENGTH, length)
                else:
                    self._set_writer(_UNTIL_CLOSE, 0)
            return head
        except _LocalError as exc:
            raise self._send_error(str(exc)) from None

    def send_data(self, data: bytes) -> bytes:
        if self._ss != SEND_BODY:
            raise self._send_error(self._bad_event(_DATA, "SERVER", self._ss))
        try:
            return self._write_data(data)
        except _LocalError as exc:
            raise self._send_error(str(exc)) from None

    def send_end(self, trailers: Headers = ()) -> bytes:
        try:
            if self._ss != SEND_BODY:
                raise _LocalError(self._bad_event(_EOM, "SERVER", self._ss))
            out = self._write_end(trailers)
            self._server_event(_EOM)
            return out
        except _LocalError as exc:
            raise self._send_error(str(exc)) from None

    def _send_error(self, message: str) -> ProtocolError:
        self._ss = ERROR
        self._settle()
        return ProtocolError(message, 500)

    def send_failed(self) -> None:
        self._ss = ERROR
        self._settle()

    @property
    def response_started(self) -> bool:
        return self._ss != IDLE and self._ss != SEND_RESPONSE

    @property
    def client_http_version(self) -> bytes:
        return self._their_version or b"1.1"


class HttptoolsClient(_Conn):
    """Client side of one upstream connection (``ClientProtocol``)."""

    __slots__ = ()

    _status = 502

    def __init__(self, *, max_header_bytes: int = 65536) -> None:
        super().__init__(max_header_bytes)

    def _local_error(self, message: str) -> ProtocolError:
        return ProtocolError(message, 502)

    # -- sending requests ------------------------------------------------------------------------

    def send_request(self, method: bytes, target: bytes, headers: Headers) -> bytes:
        try:
            out = _Outgoing(headers)
            if out.hosts == 0:
                raise _LocalError("Missing mandatory Host: header")
            if out.hosts > 1:
                raise _LocalError("Found multiple Host: headers")
            head = _write_head(method + b" " + target + b" HTTP/1.1", out.fields)
            if self._cs == IDLE:
                if method == b"CONNECT":
                    self._pending |= _CONNECT
                if out.upgrade:
                    self._pending |= _UPGRADE
            self._client_event(_REQ)
            self._method = method
            if out.close:
                self._keep_alive = False
                self._settle()
            if out.chunked:
                self._set_writer(_CHUNKED, 0)
            else:
                self._set_writer(_LENGTH, out.length or 0)
            return head
        except _LocalError as exc:
            raise self._send_error(f"cannot send request upstream: {exc}") from None

    def send_data(self, data: bytes) -> bytes:
        try:
            if self._cs != SEND_BODY:
                raise _LocalError(self._bad_event(_DATA, "CLIENT", self._cs))
            return self._write_data(data)
        except _LocalError as exc:
            raise self._send_error(f"cannot send body upstream: {exc}") from None

    def send_end(self, trailers: Headers = ()) -> bytes:
        try:
            if self._cs != SEND_BODY:
                raise _LocalError(self._bad_event(_EOM, "CLIENT", self._cs))
            out = self._write_end(trailers)
            self._client_event(_EOM)
            return out
        except _LocalError as exc:
            raise self._send_error(f"cannot send body upstream: {exc}") from None

    def _send_error(self, message: str) -> ProtocolError:
        self._cs = ERROR
        self._settle()
        return ProtocolError(message, 502)

    # -- reading responses ---------------------------------------------------------------------

    def next_event(self) -> NextEvent:
        if self._ss == ERROR:
            raise ProtocolError("invalid response from upstream: peer state is ERROR", 502)
        try:
            ev = self._next()
            if ev is NEED_DATA:
                if len(self._buf) - self._pos > self._max_bytes:
                    raise ProtocolError("response header block too large", 502)
                if self._closed:
                    raise ProtocolError("peer unexpectedly closed connection", 502)
            return ev
        except ProtocolError as exc:
            self._ss = ERROR
            self._settle()
            message = str(exc)
            if not message.startswith("invalid response from upstream"):
                message = f"invalid response from upstream: {message}"
            raise ProtocolError(message, 502) from None
        except _LocalError as exc:
            self._ss = ERROR
            self._settle()
            raise ProtocolError(f"invalid response from upstream: {exc}", 502) from None

    def _next(self) -> NextEvent:
        state = self._ss
        if state == SEND_BODY:
            return self._read_body()
        more = self._pos < len(self._buf)
        if state == IDLE or state == SEND_RESPONSE:
            if more:
                return self._read_response()
        elif state == DONE:
            if more:
                return PAUSED
        elif state == SWITCHED:
            return PAUSED
        elif more:  # MUST_CLOSE, CLOSED
            raise ProtocolError("Got data when expecting EOF", 502)
        if self._closed:
            self._server_event(_CLOSE)
            return ConnectionClosed()
        return NEED_DATA

    def _read_response(self) -> NextEvent:
        end = self._find_head()
        if end == 0:
            return NEED_DATA
        ev = self._plain_response(end) if end > 0 else None
        if ev is None:
            return self._response_by_h11()
        return ev

    def _plain_response(self, end: int) -> Response | None:
        head = self._feed_head(_ResponseParser, end)
        if head is None:
            return None
        parser = self._parser
        assert isinstance(parser, _ResponseParser)
        version = _VERSIONS.get(parser.get_http_version())
        status = parser.get_status_code()
        if version is None or status < 100:
            return None
        reason = head.reason
        buf = self._buf
        pos = self._pos
        prefix = b"HTTP/%b %d" % (version, status)
        # The status line exactly as h11 reads it: the reason may be absent,
        # and holds no NUL, VT or FF (llhttp takes them).
        if not buf.startswith(prefix + b" " + reason + b"\r\n", pos) and (
            reason or not buf.startswith(prefix + b"\r\n", pos)
        ):
            return None
        if reason and (b"\x00" in reason or b"\x0b" in reason or b"\x0c" in reason):
            return None
        headers = head.headers
        length: bytes | None = None
        chunked = False
        close = version == b"1.0"
        for i, (name, value) in enumerate(headers):
            if name == b"content-length":
                if len(value) > _CL_MAX_DIGITS:
                    return None
                length = value
            elif name == b"transfer-encoding":
                if chunked or value.lower() != b"chunked":
                    return None
                chunked = True
                if value != b"chunked":
                    headers[i] = (name, b"chunked")
            elif name == b"connection":
                if _says_close(value):
                    close = True
        if chunked:
            if length is not None:
                raise ProtocolError("both Content-Length and Transfer-Encoding", 502)
            if version == b"1.0":
                raise ProtocolError("Transfer-Encoding in an HTTP/1.0 message", 502)
        self._pos = end
        self._scan = end
        cls = InformationalResponse if status < 200 else Response
        ev = cls(status, headers, reason, version)
        self._accept(ev, length, chunked, close)
        return ev

    def _response_by_h11(self) -> NextEvent:
        self._parser_ready = False
        ref = H11Client(max_header_bytes=self._max_bytes)
        fields = [(b"host", b"x")]
        if self._pending & _UPGRADE:
            fields.append((b"upgrade", b"x"))
        ref.send_request(self._method or b"GET", b"/", fields)
        ref.send_end()
        data = self._buf[self._pos :]
        ref.receive_data(data)
        if self._closed:
            ref.receive_data(b"")
        ev = ref.next_event()
        if not isinstance(ev, Response):
            return NEED_DATA
        self._pos += len(data) - len(ref.trailing_data)
        self._scan = self._pos
        length: bytes | None = None
        chunked = False
        close = ev.http_version < b"1.1"
        for name, value in ev.headers:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"connection":
                if _says_close(value):
                    close = True
        self._accept(ev, length, chunked, close)
        return ev

    def _accept(self, ev: Response, length: bytes | None, chunked: bool, close: bool) -> None:
        status = ev.status
        if status < 200:
            self._server_event(_INFO, status)
            return
        self._server_event(_RESP, status)
        self._their_version = ev.http_version
        if close:
            self._keep_alive = False
            self._settle()
        method = self._method
        if status in _NO_BODY_STATUS or method == b"HEAD" or (
            method == b"CONNECT" and status < 300
        ):
            self._start_body(_LENGTH, 0, False)
        elif chunked:
            self._start_body(_CHUNKED, 0, False)
        elif length is not None:
            self._start_body(_LENGTH, int(length), False)
        else:
            self._start_body(_UNTIL_CLOSE, 0, False)

    def _end_of_message(self, trailers: HeaderList | None) -> EndOfMessage:
        self._server_event(_EOM)
        return EndOfMessage(trailers)

    def _trailers_by_h11(self, block: bytes) -> HeaderList:
        # As H11Client takes them: h11's own reading of the trailer section.
        c = h11.Connection(h11.SERVER)
        c.receive_data(_TRAILER_PREFIX + block)
        try:
            c.next_event()  # the synthetic request
            ev = c.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProtocolError(_first_words(str(exc)), 502) from None
        assert type(ev) is h11.EndOfMessage
        return [(name, value) for _, name, value in ev.headers._full_items]
