"""The HTTP/1.1 seam of the data path.

Theory of operation
-------------------
The proxy never talks to an HTTP/1.1 library directly. It talks to two small
sans-IO objects defined here, one per side of a hop:

* ``ServerProtocol`` parses what a downstream client sends (``Request``,
  ``Data``, ``EndOfMessage``) and serialises our answers to it;
* ``ClientProtocol`` serialises what we send upstream and parses the
  upstream's answers (``InformationalResponse``, ``Response``, ``Data``,
  ``EndOfMessage``).

Both are fed bytes with ``receive_data`` (``b""`` means the peer closed) and
drained with ``next_event``, which returns an event, ``NEED_DATA`` or
``PAUSED`` (after a protocol switch or while a finished message waits for
``start_next_cycle``). ``send_*`` methods return the bytes to write. This is
h11's model, kept small so that two implementations stand side by side and
pass the same tests: ``h11_impl`` (the portable reference) and
``httptools_impl`` (llhttp, several times faster on plain requests, the
reference's verdict on everything else); the proxy chooses one with
``make_server``/``make_client`` (``auto``: httptools when it imports).

Header lists are ``[(lower-case name, value), ...]`` of bytes, in wire order.

What the seam guarantees to the proxy, whatever the implementation:

* framing is unambiguous or the message is refused with ``ProtocolError``
  carrying the status to answer (400, 431, 501, 505): both ``Content-Length``
  and ``Transfer-Encoding``, differing duplicate ``Content-Length``, any
  transfer coding other than a single ``chunked``, ``Transfer-Encoding`` on
  HTTP/1.0, too many or too large header fields, an HTTP version other than
  1.x;
* what a request is accepted with can be forwarded as strict HTTP/1.1: no
  control character (but HTAB) in a field value or trailer (400);
* an upstream response with ambiguous framing raises ``ProtocolError`` too
  (the proxy answers 502 and never forwards it);
* nothing past the current request is parsed before ``start_next_cycle``
  (pipelined bytes wait, raw), and an upstream connection that has seen
  its peer close (a body delimited by the close) is never ``can_reuse``.

Both implementations accept and refuse exactly the same messages
(``tests/unit/test_http1_differential.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

Headers = Sequence[tuple[bytes, bytes]]
HeaderList = list[tuple[bytes, bytes]]


class Event:
    __slots__ = ()


class Request(Event):
    __slots__ = ("method", "target", "headers", "http_version")

    def __init__(
        self, method: bytes, target: bytes, headers: HeaderList, http_version: bytes = b"1.1"
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.http_version = http_version

    def __repr__(self) -> str:
        return f"Request({self.method!r}, {self.target!r}, {self.headers!r})"


class Response(Event):
    __slots__ = ("status", "headers", "reason", "http_version")

    def __init__(
        self, status: int, headers: HeaderList, reason: bytes = b"", http_version: bytes = b"1.1"
    ) -> None:
        self.status = status
        self.headers = headers
        self.reason = reason
        self.http_version = http_version

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.headers!r})"


class InformationalResponse(Response):
    """A 1xx response (100 Continue, 101 Switching Protocols)."""

    __slots__ = ()


class Data(Event):
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Data(<{len(self.data)} bytes>)"


class EndOfMessage(Event):
    __slots__ = ("trailers",)

    def __init__(self, trailers: HeaderList | None = None) -> None:
        self.trailers = trailers or []

    def __repr__(self) -> str:
        return "EndOfMessage()"


class ConnectionClosed(Event):
    """The peer closed the connection cleanly between messages."""

    __slots__ = ()


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
PAUSED = _Sentinel("PAUSED")

NextEvent = Event | _Sentinel


class ProtocolError(Exception):
    """The peer broke HTTP/1.1, or asked for something we refuse.

    ``status`` is what a server should answer (400, 431, 501); on the client
    side the proxy maps any ProtocolError to 502.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ServerProtocol(Protocol):
    """Server side of one downstream connection."""

    def receive_data(self, data: bytes) -> None: ...
    def next_event(self) -> NextEvent: ...
    def send_response(self, status: int, headers: Headers, reason: bytes = b"") -> bytes: ...
    def send_informational(self, status: int, headers: Headers, reason: bytes = b"") -> bytes: ...
    def send_data(self, data: bytes) -> bytes: ...
    def send_end(self, trailers: Headers = ()) -> bytes: ...
    def send_failed(self) -> None: ...
    def start_next_cycle(self) -> None: ...

    @property
    def can_reuse(self) -> bool:
        """Both sides finished the message and may start another."""

    @property
    def response_started(self) -> bool: ...

    @property
    def trailing_data(self) -> bytes:
        """Bytes received past the end of the current message (after a switch)."""

    @property
    def client_http_version(self) -> bytes: ...


class ClientProtocol(Protocol):
    """Client side of one upstream connection."""

    def receive_data(self, data: bytes) -> None: ...
    def next_event(self) -> NextEvent: ...
    def send_request(self, method: bytes, target: bytes, headers: Headers) -> bytes: ...
    def send_data(self, data: bytes) -> bytes: ...
    def send_end(self, trailers: Headers = ()) -> bytes: ...
    def start_next_cycle(self) -> None: ...

    @property
    def can_reuse(self) -> bool: ...

    @property
    def trailing_data(self) -> bytes: ...


# Hop-by-hop headers (RFC 9110 7.6.1) plus those that only make sense on one
# connection. Headers named by Connection are removed too (see headers.py).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

IMPLEMENTATIONS = ("h11", "httptools")
# What ``--http`` accepts: an implementation, or ``auto`` (httptools when it
# imports, as uvicorn chooses).
CHOICES = ("auto", *IMPLEMENTATIONS)


def resolve_impl(name: str) -> str:
    """The implementation ``name`` stands for: ``auto`` resolved, others checked."""
    if name == "auto":
        try:
            import httptools  # noqa: F401
        except ImportError:
            return "h11"
        return "httptools"
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown HTTP/1.1 implementation {name!r} (expected one of {CHOICES})"
        )
    return name


def make_server(
    impl: str = "h11", *, max_header_bytes: int = 32768, max_headers: int = 100
) -> ServerProtocol:
    """A server-side protocol object for a new downstream connection."""
    if impl == "httptools":
        from lbnode.http1.httptools_impl import HttptoolsServer

        return HttptoolsServer(max_header_bytes=max_header_bytes, max_headers=max_headers)
    if impl == "h11":
        from lbnode.http1.h11_impl import H11Server

        return H11Server(max_header_bytes=max_header_bytes, max_headers=max_headers)
    if impl == "auto":
        return make_server(
            resolve_impl(impl), max_header_bytes=max_header_bytes, max_headers=max_headers
        )
    raise ValueError(f"unknown HTTP/1.1 implementation {impl!r} (expected one of {CHOICES})")


def make_client(impl: str = "h11", *, max_header_bytes: int = 65536) -> ClientProtocol:
    """A client-side protocol object for a new upstream connection."""
    if impl == "httptools":
        from lbnode.http1.httptools_impl import HttptoolsClient

        return HttptoolsClient(max_header_bytes=max_header_bytes)
    if impl == "h11":
        from lbnode.http1.h11_impl import H11Client

        return H11Client(max_header_bytes=max_header_bytes)
    if impl == "auto":
        return make_client(resolve_impl(impl), max_header_bytes=max_header_bytes)
    raise ValueError(f"unknown HTTP/1.1 implementation {impl!r} (expected one of {CHOICES})")
