"""The HTTP/1.1 seam (lbnode.http1), sans-IO, with exact bytes.

Every test runs once per implementation of the seam that constructs
(``make_server``/``make_client`` accept its name): today h11; httptools joins
by itself once ``make_server("httptools")`` stops raising ValueError.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbnode.http1 import (
    IMPLEMENTATIONS,
    NEED_DATA,
    PAUSED,
    ClientProtocol,
    ConnectionClosed,
    Data,
    EndOfMessage,
    InformationalResponse,
    NextEvent,
    ProtocolError,
    Request,
    Response,
    ServerProtocol,
    make_client,
    make_server,
)


def _constructible() -> list[str]:
    out = []
    for name in IMPLEMENTATIONS:
        try:
            make_server(name)
            make_client(name)
        except ValueError:
            continue
        out.append(name)
    return out


IMPLS = _constructible()


def test_h11_is_always_available() -> None:
    assert "h11" in IMPLS


def test_unknown_implementation_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown HTTP/1.1 implementation"):
        make_server("nope")
    with pytest.raises(ValueError, match="unknown HTTP/1.1 implementation"):
        make_client("nope")


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


def drain(p: ServerProtocol | ClientProtocol) -> list[NextEvent]:
    """Every event available now, ending with NEED_DATA or PAUSED."""
    out: list[NextEvent] = []
    for _ in range(1000):
        ev = p.next_event()
        out.append(ev)
        if ev is NEED_DATA or ev is PAUSED or type(ev) is ConnectionClosed:
            return out
    raise AssertionError("no end to the events")


def body_of(events: list[NextEvent]) -> bytes:
    return b"".join(ev.data for ev in events if type(ev) is Data)  # type: ignore[union-attr]


def server_with(impl: str, data: bytes, **limits: int) -> ServerProtocol:
    s = make_server(impl, **limits)
    s.receive_data(data)
    return s


def refusal(impl: str, data: bytes, **limits: int) -> ProtocolError:
    s = make_server(impl, **limits)
    with pytest.raises(ProtocolError) as info:
        s.receive_data(data)
        drain(s)
    return info.value


# -- requests in --------------------------------------------------------------------------------


def test_request_head_is_parsed_in_wire_order(impl: str) -> None:
    s = server_with(impl, b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Two: 2\r\nx-one: 1\r\n\r\n")
    req, end, more = drain(s)
    assert type(req) is Request
    assert (req.method, req.target, req.http_version) == (b"GET", b"/a?b=1", b"1.1")
    assert req.headers == [(b"host", b"x"), (b"x-two", b"2"), (b"x-one", b"1")]
    assert type(end) is EndOfMessage and more is NEED_DATA
    assert s.client_http_version == b"1.1"
    assert not s.response_started


def test_head_arriving_byte_by_byte(impl: str) -> None:
    s = make_server(impl)
    raw = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    for i in range(len(raw) - 1):
        s.receive_data(raw[i : i + 1])
        assert s.next_event() is NEED_DATA
    s.receive_data(raw[-1:])
    assert type(s.next_event()) is Request


def test_content_length_body_in_pieces(impl: str) -> None:
    s = server_with(impl, b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello")
    first = drain(s)
    assert type(first[0]) is Request and body_of(first) == b"hello" and first[-1] is NEED_DATA
    s.receive_data(b" world")
    rest = drain(s)
    assert body_of(rest) == b" world" and type(rest[-2]) is EndOfMessage


def test_chunked_body_in_with_trailers(impl: str) -> None:
    raw = (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Sum: 9\r\n\r\n")  # fmt: skip
    events = drain(server_with(impl, raw))
    assert body_of(events) == b"hello world"
    end = events[-2]
    assert type(end) is EndOfMessage and end.trailers == [(b"x-sum", b"9")]


@given(body=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 4000), max_size=8),
       chunk=st.integers(1, 700))  # fmt: skip
@settings(max_examples=60, deadline=None)
def test_chunked_body_survives_any_split(body: bytes, cuts: list[int], chunk: int) -> None:
    for impl in IMPLS:
        enc = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + chunk]), body[i : i + chunk])
                       for i in range(0, len(body), chunk))  # fmt: skip
        head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        raw = head + enc + b"0\r\n\r\n"
        s = make_server(impl)
        events: list[NextEvent] = []
        points = sorted({min(c, len(raw)) for c in cuts} | {0, len(raw)})
        for a, b in zip(points, points[1:], strict=False):
            s.receive_data(raw[a:b])
            events.extend(e for e in drain(s) if e is not NEED_DATA)
        assert body_of(events) == body
        assert type(events[-1]) is EndOfMessage


# -- responses out ---------------------------------------------------------------------------------


def test_fixed_length_response_bytes(impl: str) -> None:
    s = server_with(impl, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    drain(s)
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
    head = s.send_response(200, headers, b"OK")
    assert head == b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\n"
    assert s.response_started
    assert s.send_data(b"hi") == b"hi"
    assert s.send_end() == b""
    assert s.can_reuse


def test_response_without_length_is_chunked_for_http11(impl: str) -> None:
    s = server_with(impl, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    drain(s)
    head = s.send_response(200, [(b"x-a", b"1")], b"OK")
    assert head == b"HTTP/1.1 200 OK\r\nx-a: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert s.send_data(b"hello") == b"5\r\nhello\r\n"
    assert s.send_data(b"x" * 300) == b"12c\r\n" + b"x" * 300 + b"\r\n"
    assert s.send_end([(b"x-sum", b"1")]) == b"0\r\nx-sum: 1\r\n\r\n"
    assert s.can_reuse


def test_response_to_http10_is_close_delimited(impl: str) -> None:
    s = server_with(impl, b"GET / HTTP/1.0\r\n\r\n")
    req = drain(s)[0]
    assert type(req) is Request and req.http_version == b"1.0"
    assert s.client_http_version == b"1.0"
    head = s.send_response(200, [], b"OK")
    assert b"chunked" not in head.lower()
    assert b"connection: close" in head.lower()
    assert s.send_data(b"abc") == b"abc"
    assert s.send_end() == b""
    assert not s.can_reuse


def test_head_response_has_no_body(impl: str) -> None:
    s = server_with(impl, b"HEAD /f HTTP/1.1\r\nHost: x\r\n\r\n")
    drain(s)
    assert s.send_response(200, [(b"content-length", b"10")], b"OK") == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"
    )
    assert s.send_end() == b""
    assert s.can_reuse
    s.start_next_cycle()
    s.receive_data(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert drain(s)[0].target == b"/next"  # type: ignore[union-attr]


def test_expect_100_continue(impl: str) -> None:
    s = server_with(impl, b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                          b"Content-Length: 2\r\n\r\n")  # fmt: skip
    req, more = drain(s)
    assert type(req) is Request and (b"expect", b"100-continue") in req.headers
    assert more is NEED_DATA
    assert s.send_informational(100, []) == b"HTTP/1.1 100 \r\n\r\n"
    assert not s.response_started  # the final response is still to come
    s.receive_data(b"hi")
    events = drain(s)
    assert body_of(events) == b"hi" and type(events[-2]) is EndOfMessage
    s.send_response(200, [(b"content-length", b"0")])
    s.send_end()
    assert s.can_reuse


def test_upgrade_pauses_and_keeps_the_trailing_bytes(impl: str) -> None:
    s = server_with(impl, b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                          b"Upgrade: websocket\r\n\r\n\x81\x02hi")  # fmt: skip
    req, end, paused = drain(s)
    assert type(req) is Request and type(end) is EndOfMessage and paused is PAUSED
    assert s.trailing_data == b"\x81\x02hi"
    assert s.send_informational(101, [(b"upgrade", b"websocket"), (b"connection", b"upgrade")]) == (
        b"HTTP/1.1 101 \r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    )
    assert s.next_event() is PAUSED


def test_upgrade_declined_keeps_http(impl: str) -> None:
    s = server_with(impl, b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                          b"Upgrade: websocket\r\n\r\n")  # fmt: skip
    drain(s)
    s.send_response(426, [(b"content-length", b"0")])
    s.send_end()
    assert s.can_reuse


# -- connection reuse ------------------------------------------------------------------------


def answer(s: ServerProtocol, body: bytes = b"ok") -> bytes:
    return (s.send_response(200, [(b"content-length", b"%d" % len(body))], b"OK")
            + s.send_data(body) + s.send_end())  # fmt: skip


def test_keep_alive_cycles(impl: str) -> None:
    s = make_server(impl)
    for i in range(3):
        assert not s.can_reuse
        s.receive_data(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
        req = drain(s)[0]
        assert req.target == b"/%d" % i  # type: ignore[union-attr]
        answer(s)
        assert s.can_reuse
        s.start_next_cycle()


def test_connection_close_ends_reuse(impl: str) -> None:
    s = server_with(impl, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    drain(s)
    answer(s)
    assert not s.can_reuse


def test_response_before_request_end_is_not_reusable(impl: str) -> None:
    s = server_with(impl, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    drain(s)
    answer(s)
    assert not s.can_reuse  # the rest of the body was never read


def test_pipelined_requests(impl: str) -> None:
    s = server_with(impl, b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                          b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\n")  # fmt: skip
    seen = []
    for _ in range(3):
        events = drain(s)
        assert events[-1] is PAUSED or events[-1] is NEED_DATA
        req = events[0]
        assert type(req) is Request
        seen.append((req.target, body_of(events)))
        answer(s)
        s.start_next_cycle()
    assert seen == [(b"/1", b""), (b"/2", b"abc"), (b"/3", b"")]
    assert s.next_event() is NEED_DATA


def test_peer_close_between_requests(impl: str) -> None:
    s = make_server(impl)
    s.receive_data(b"")
    assert type(s.next_event()) is ConnectionClosed


def test_peer_close_inside_a_body_is_an_error(impl: str) -> None:
    s = server_with(impl, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
    drain(s)
    s.receive_data(b"")
    with pytest.raises(ProtocolError) as info:
        s.next_event()
    assert info.value.status == 400


# -- framing attacks and limits ----------------------------------------------------------------


def H(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


ATTACKS = [
    ("cl-and-te", H("POST / HTTP/1.1", "Host: x", "Content-Length: 4",
                    "Transfer-Encoding: chunked"), 400),
    ("te-and-cl", H("POST / HTTP/1.1", "Host: x", "Transfer-Encoding: chunked",
                    "Content-Length: 4"), 400),
    ("duplicate-cl", H("POST / HTTP/1.1", "Host: x", "Content-Length: 4",
                       "Content-Length: 5"), 400),
    ("cl-list", H("POST / HTTP/1.1", "Host: x", "Content-Length: 4, 5"), 400),
    ("cl-sign", H("POST / HTTP/1.1", "Host: x", "Content-Length: +4"), 400),
    ("cl-negative", H("POST / HTTP/1.1", "Host: x", "Content-Length: -1"), 400),
    ("xchunked", H("POST / HTTP/1.1", "Host: x", "Transfer-Encoding: xchunked"), 501),
    ("chunked-identity", H("POST / HTTP/1.1", "Host: x",
                           "Transfer-Encoding: chunked, identity"), 501),
    ("identity", H("POST / HTTP/1.1", "Host: x", "Transfer-Encoding: identity"), 501),
    ("gzip-chunked", H("POST / HTTP/1.1", "Host: x", "Transfer-Encoding: gzip, chunked"), 501),
    ("space-before-colon", H("POST / HTTP/1.1", "Host: x", "Transfer-Encoding : chunked"), 400),
    ("vertical-tab", H("POST / HTTP/1.1", "Host: x", "Transfer-Encoding:\x0bchunked"), 400),
    ("duplicate-te", H("POST / HTTP/1.1", "Host: x", "Transfer-Encoding: chunked",
                       "Transfer-Encoding: chunked"), 501),
    ("te-on-http10", H("POST / HTTP/1.0", "Transfer-Encoding: chunked"), 400),
    ("leading-space", H("POST / HTTP/1.1", " Transfer-Encoding: chunked", "Host: x"), 400),
    ("bare-cr", H("POST / HTTP/1.1", "Host: x", "X-A: a\rTransfer-Encoding: chunked"), 400),
    ("nul", H("GET / HTTP/1.1", "Host: x", "X-A: a\x00b"), 400),
    ("no-host", H("GET / HTTP/1.1"), 400),
    ("http-2.0-in-text", H("GET / HTTP/2.0", "Host: x"), 505),
    ("http-0.9", H("GET / HTTP/0.9", "Host: x"), 505),
    ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "status"), [(r, s) for _, r, s in ATTACKS],
                         ids=[n for n, _, _ in ATTACKS])  # fmt: skip
def test_ambiguous_or_malformed_request_is_refused(impl: str, raw: bytes, status: int) -> None:
    exc = refusal(impl, raw + b"0\r\n\r\n")
    assert exc.status == status
    assert str(exc) and len(str(exc)) <= 120 and "bytearray" not in str(exc)


def test_error_message_never_echoes_the_offending_line(impl: str) -> None:
    exc = refusal(impl, H("GET / HTTP/1.1", "Host: x", "X-A: " + "<script>" * 3000 + "\x00"))
    assert exc.status == 400 and "<script>" not in str(exc)


def fields(n: int) -> list[str]:
    return [f"X-F{i}: v" for i in range(n)]


@pytest.mark.parametrize(
    ("max_headers", "count", "ok"),
    [(100, 100, True), (100, 101, False), (10, 10, True), (10, 11, False)],
)
def test_header_count_limit(impl: str, max_headers: int, count: int, ok: bool) -> None:
    raw = H("GET / HTTP/1.1", "Host: x", *fields(count - 1))
    if ok:
        req = drain(server_with(impl, raw, max_headers=max_headers))[0]
        assert len(req.headers) == count  # type: ignore[union-attr]
    else:
        exc = refusal(impl, raw, max_headers=max_headers)
        assert exc.status == 431 and "header" in str(exc)


@pytest.mark.parametrize(
    ("max_bytes", "size", "ok"),
    [(32768, 30000, True), (32768, 33000, False), (2048, 1500, True), (2048, 2500, False)],
)
def test_header_size_limit_whole_head(impl: str, max_bytes: int, size: int, ok: bool) -> None:
    raw = H("GET / HTTP/1.1", "Host: x", "X-Big: " + "a" * size)
    if ok:
        assert type(drain(server_with(impl, raw, max_header_bytes=max_bytes))[0]) is Request
    else:
        exc = refusal(impl, raw, max_header_bytes=max_bytes)
        assert exc.status == 431


def test_header_size_limit_head_in_pieces(impl: str) -> None:
    s = make_server(impl, max_header_bytes=4096)
    s.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
    assert s.next_event() is NEED_DATA
    with pytest.raises(ProtocolError) as info:
        for _ in range(10):  # 10 KiB of a header that never ends
            s.receive_data(b"a" * 1024)
            assert s.next_event() is NEED_DATA
    assert info.value.status == 431


# -- the client side ---------------------------------------------------------------------------


def test_request_bytes(impl: str) -> None:
    c = make_client(impl)
    head = c.send_request(b"POST", b"/u?x=1", [(b"host", b"h"), (b"content-length", b"3")])
    assert head == b"POST /u?x=1 HTTP/1.1\r\nhost: h\r\ncontent-length: 3\r\n\r\n"
    assert c.send_data(b"abc") == b"abc"
    assert c.send_end() == b""


def test_chunked_request_bytes(impl: str) -> None:
    c = make_client(impl)
    head = c.send_request(b"POST", b"/", [(b"host", b"h"), (b"transfer-encoding", b"chunked")])
    assert head == b"POST / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
    assert c.send_data(b"abc") == b"3\r\nabc\r\n"
    assert c.send_end() == b"0\r\n\r\n"


def test_sending_more_than_content_length_is_refused(impl: str) -> None:
    c = make_client(impl)
    c.send_request(b"POST", b"/", [(b"host", b"h"), (b"content-length", b"2")])
    with pytest.raises(ProtocolError) as info:
        c.send_data(b"abc")
    assert info.value.status == 502


def client_after_get(impl: str) -> ClientProtocol:
    c = make_client(impl)
    c.send_request(b"GET", b"/", [(b"host", b"h")])
    c.send_end()
    return c


def test_response_parsing_and_reuse(impl: str) -> None:
    c = client_after_get(impl)
    c.receive_data(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                   b"X-A: 1\r\n\r\nok")  # fmt: skip
    info, resp, data, end, more = drain(c)
    assert type(info) is InformationalResponse and info.status == 100
    assert type(resp) is Response and resp.status == 200 and resp.reason == b"OK"
    assert resp.headers == [(b"content-length", b"2"), (b"x-a", b"1")]
    assert body_of([data]) == b"ok" and type(end) is EndOfMessage and more is NEED_DATA
    assert c.can_reuse
    c.start_next_cycle()
    c.send_request(b"GET", b"/2", [(b"host", b"h")])


def test_chunked_response_parsing(impl: str) -> None:
    c = client_after_get(impl)
    c.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    events = drain(c)
    assert body_of(events) == b"abc" and c.can_reuse


def test_close_delimited_response(impl: str) -> None:
    c = client_after_get(impl)
    c.receive_data(b"HTTP/1.1 200 OK\r\n\r\nsome")
    assert body_of(drain(c)) == b"some"
    c.receive_data(b"")
    events = drain(c)
    assert type(events[0]) is EndOfMessage
    assert not c.can_reuse


def test_response_to_head_has_no_body(impl: str) -> None:
    c = make_client(impl)
    c.send_request(b"HEAD", b"/", [(b"host", b"h")])
    c.send_end()
    c.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    resp, end, more = drain(c)
    assert type(resp) is Response and type(end) is EndOfMessage and c.can_reuse


def test_switching_protocols_on_the_client(impl: str) -> None:
    c = make_client(impl)
    c.send_request(b"GET", b"/ws", [(b"host", b"h"), (b"connection", b"upgrade"),
                                    (b"upgrade", b"websocket")])  # fmt: skip
    c.send_end()
    c.receive_data(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\n\r\n\x81\x02hi")  # fmt: skip
    info, paused = drain(c)
    assert type(info) is InformationalResponse and info.status == 101 and paused is PAUSED
    assert c.trailing_data == b"\x81\x02hi"


BAD_RESPONSES = [
    ("cl-and-te", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("duplicate-cl", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
    ("xchunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n"),
    ("chunked-identity", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n"),
    ("space-before-colon", b"HTTP/1.1 200 OK\r\nTransfer-Encoding : chunked\r\n\r\n"),
    ("te-on-http10", b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("bad-cl", b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n"),
    ("garbage", b"SSH-2.0-OpenSSH_9.2\r\n\r\n"),
    ("bad-chunk", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
]


@pytest.mark.parametrize("raw", [r for _, r in BAD_RESPONSES], ids=[n for n, _ in BAD_RESPONSES])
def test_ambiguous_or_malformed_response_is_refused(impl: str, raw: bytes) -> None:
    c = client_after_get(impl)
    with pytest.raises(ProtocolError) as info:
        c.receive_data(raw)
        drain(c)
    assert info.value.status == 502
    assert "bytearray" not in str(info.value)
