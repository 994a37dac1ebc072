"""The h11 implementation of the HTTP/1.1 seam.

h11 already refuses most ambiguous framing (differing duplicate
Content-Length, any transfer coding but a single ``chunked``); what it lets
through and a proxy must not forward (a message with both Content-Length and
Transfer-Encoding, Transfer-Encoding on HTTP/1.0, too many header fields) is
checked here on the parsed head, once per message.
"""

from __future__ import annotations

import re

import h11

from lbnode.http1 import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Headers,
    HeaderList,
    InformationalResponse,
    NextEvent,
    ProtocolError,
    Request,
    Response,
)

_h11_Request = h11.Request
_h11_Response = h11.Response
_h11_InformationalResponse = h11.InformationalResponse
_h11_Data = h11.Data
_h11_EndOfMessage = h11.EndOfMessage
_h11_NEED_DATA = h11.NEED_DATA
_h11_PAUSED = h11.PAUSED
_DONE = h11.DONE
_NOT_STARTED = (h11.IDLE, h11.SEND_RESPONSE)


def _short(message: str) -> str:
    """h11 quotes the offending bytes (up to a whole header line) in its
    messages; an answer names the cause without echoing them."""
    cut = message.find(": bytearray(")
    if cut >= 0:
        message = message[:cut]
    return message if len(message) <= 120 else message[:117] + "..."


def _lower_headers(headers: h11._headers.Headers) -> HeaderList:
    # h11 keeps (raw name, lower-case name, value) triples; reading them
    # directly avoids the per-item __getitem__ of its Sequence interface.
    return [(name, value) for _, name, value in headers._full_items]


# A field value holds VCHAR, obs-text, SP and HTAB (RFC 9110 5.5). h11 lets
# the other control characters through; no strict recipient takes them, so
# a request carrying one is refused rather than forwarded.
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _check_values(headers: HeaderList) -> None:
    for _, value in headers:
        if _CTL.search(value) is not None:
            raise ProtocolError("control character in a header field value", 400)


def _check_framing(headers: HeaderList, http_version: bytes, max_bytes: int = 0) -> None:
    has_cl = has_te = False
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + 4
        if name == b"content-length":
            has_cl = True
        elif name == b"transfer-encoding":
            has_te = True
    if max_bytes and size > max_bytes:
        raise ProtocolError("request header block too large", 431)
    if has_te:
        if has_cl:
            raise ProtocolError("both Content-Length and Transfer-Encoding", 400)
        if http_version == b"1.0":
            raise ProtocolError("Transfer-Encoding in an HTTP/1.0 message", 400)


class H11Server:
    __slots__ = ("_c", "_max_headers", "_max_bytes")

    def __init__(self, *, max_header_bytes: int = 32768, max_headers: int = 100) -> None:
        # h11 only bounds a head that arrives in pieces; one that arrives
        # whole is measured in _check_framing.
        self._c = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._max_headers = max_headers
        self._max_bytes = max_header_bytes

    def receive_data(self, data: bytes) -> None:
        try:
            self._c.receive_data(data)
        except h11.RemoteProtocolError as exc:  # data after close
            raise ProtocolError(_short(str(exc)), exc.error_status_hint) from None

    def next_event(self) -> NextEvent:
        try:
            ev = self._c.next_event()
        except h11.RemoteProtocolError as exc:
            msg = _short(str(exc))
            status = exc.error_status_hint
            if status == 431 or "too long" in msg:
                status, msg = 431, "request header block too large"
            raise ProtocolError(msg, status) from None
        t = type(ev)
        if t is _h11_Data:
            return Data(ev.data)
        if t is _h11_Request:
            if ev.http_version[:2] != b"1.":  # h11 takes any d.d, e.g. "HTTP/2.0" in text
                raise ProtocolError("HTTP version not supported", 505)
            headers = _lower_headers(ev.headers)
            if len(headers) > self._max_headers:
                raise ProtocolError(f"more than {self._max_headers} header fields", 431)
            _check_framing(headers, ev.http_version, self._max_bytes)
            _check_values(headers)
            return Request(ev.method, ev.target, headers, ev.http_version)
        if t is _h11_EndOfMessage:
            if not ev.headers:
                return EndOfMessage()
            trailers = _lower_headers(ev.headers)
            _check_values(trailers)
            return EndOfMessage(trailers)
        if ev is _h11_NEED_DATA:
            return NEED_DATA
        if ev is _h11_PAUSED:
            return PAUSED
        return ConnectionClosed()

    def send_response(self, status: int, headers: Headers, reason: bytes = b"") -> bytes:
        return self._c.send(_h11_Response(status_code=status, headers=headers, reason=reason))

    def send_informational(self, status: int, headers: Headers, reason: bytes = b"") -> bytes:
        return self._c.send(
            _h11_InformationalResponse(status_code=status, headers=headers, reason=reason)
        )

    def send_data(self, data: bytes) -> bytes:
        return self._c.send(_h11_Data(data=data))

    def send_end(self, trailers: Headers = ()) -> bytes:
        try:
            return self._c.send(_h11_EndOfMessage(headers=trailers))
        except h11.LocalProtocolError:
            if not trailers:
                raise
            # Trailers cannot reach this client (HTTP/1.0 or a Content-Length
            # body): they are dropped, as RFC 9110 allows.
            return self._c.send(_h11_EndOfMessage())

    def send_failed(self) -> None:
        self._c.send_failed()

    def start_next_cycle(self) -> None:
        self._c.start_next_cycle()

    @property
    def can_reuse(self) -> bool:
        c = self._c
        return c.our_state is _DONE and c.their_state is _DONE

    @property
    def response_started(self) -> bool:
        return self._c.our_state not in _NOT_STARTED

    @property
    def trailing_data(self) -> bytes:
        return bytes(self._c.trailing_data[0])

    @property
    def client_http_version(self) -> bytes:
        return self._c.their_http_version or b"1.1"


class H11Client:
    __slots__ = ("_c",)

    def __init__(self, *, max_header_bytes: int = 65536) -> None:
        self._c = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)

    def receive_data(self, data: bytes) -> None:
        try:
            self._c.receive_data(data)
        except h11.RemoteProtocolError as exc:
            raise ProtocolError(str(exc), 502) from None

    def next_event(self) -> NextEvent:
        try:
            ev = self._c.next_event()
        except h11.RemoteProtocolError as exc:
            message = f"invalid response from upstream: {_short(str(exc))}"
            raise ProtocolError(message, 502) from None
        t = type(ev)
        if t is _h11_Data:
            return Data(ev.data)
        if t is _h11_Response:
            headers = _lower_headers(ev.headers)
            try:
                _check_framing(headers, ev.http_version)
            except ProtocolError as exc:
                raise ProtocolError(f"invalid response from upstream: {exc}", 502) from None
            return Response(ev.status_code, headers, ev.reason, ev.http_version)
        if t is _h11_InformationalResponse:
            return InformationalResponse(
                ev.status_code, _lower_headers(ev.headers), ev.reason, ev.http_version
            )
        if t is _h11_EndOfMessage:
            return EndOfMessage(_lower_headers(ev.headers) if ev.headers else None)
        if ev is _h11_NEED_DATA:
            return NEED_DATA
        if ev is _h11_PAUSED:
            return PAUSED
        return ConnectionClosed()

    def send_request(self, method: bytes, target: bytes, headers: Headers) -> bytes:
        try:
            return self._c.send(_h11_Request(method=method, target=target, headers=headers))
        except h11.LocalProtocolError as exc:
            raise ProtocolError(f"cannot send request upstream: {exc}", 502) from None

    def send_data(self, data: bytes) -> bytes:
        try:
            return self._c.send(_h11_Data(data=data))
        except h11.LocalProtocolError as exc:
            raise ProtocolError(f"cannot send body upstream: {exc}", 502) from None

    def send_end(self, trailers: Headers = ()) -> bytes:
        try:
            return self._c.send(_h11_EndOfMessage(headers=trailers))
        except h11.LocalProtocolError as exc:
            raise ProtocolError(f"cannot send body upstream: {exc}", 502) from None

    def start_next_cycle(self) -> None:
        self._c.start_next_cycle()

    @property
    def can_reuse(self) -> bool:
        c = self._c
        # A body delimited by the close ends with the upstream gone: h11 says
        # DONE until it has returned ConnectionClosed, but the proxy asks
        # right after EndOfMessage, and must not pool a closed connection.
        return c.our_state is _DONE and c.their_state is _DONE and not c._receive_buffer_closed

    @property
    def trailing_data(self) -> bytes:
        return bytes(self._c.trailing_data[0])
