"""The two HTTP/1.1 implementations side by side, on hostile and borderline input.

A corpus of malformed and borderline requests (``CORPUS``) goes through both
server implementations, sans-IO, the way the proxy drives them: each request
read whole, answered, the cycle restarted while the connection is reusable,
then the client's end of stream. Both must accept the same requests, with
the same method, target, headers, body and trailers, and refuse the same
ones with the same status, whether the bytes arrive at once or one by one.

The same corpus then goes end to end, through a node started with each
implementation, to a raw backend that records every byte it receives. What
reaches the backend must parse *strictly* (RFC 9112, no leniency at all:
CRLF only, no obs-fold, no control characters, one Host, one framing) as
exactly the requests the proxy accepted, rewritten as the proxy rewrites
them (``upstream_request_headers``), and nothing of a refused request may
arrive whole. Both nodes must answer each entry with the same statuses.

Plus: a sweep of every byte value through each position of a request head
(both implementations must agree on each), and the caps (header count and
bytes, pipelined bytes, small chunks).
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.integration.conftest import IO_TIMEOUT, Launcher, Node, wait_for

from lbnode.headers import upstream_request_headers, wants_upgrade
from lbnode.http1 import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Data,
    EndOfMessage,
    ProtocolError,
    Request,
    Response,
    ServerProtocol,
    make_client,
    make_server,
)

IMPLS = ("h11", "httptools")
# Bound on the events of one corpus entry (h11 returns one Data per chunk).
MAX_EVENTS = 1000


def H(*lines: str, end: str = "\r\n") -> bytes:
    """A head: lines joined by ``end``, then the blank line."""
    return (end.join(lines) + end + end).encode("latin-1")


def chunked(*lines: str) -> bytes:
    return H("POST / HTTP/1.1", "Host: x", "Transfer-Encoding: chunked", *lines)


CHUNKED = chunked()
_G = "GET / HTTP/1.1"
_P = "POST / HTTP/1.1"

# name -> raw bytes the client sends (then it half-closes).
CORPUS: dict[str, bytes] = {
    # -- Content-Length / Transfer-Encoding conflicts --------------------------------------
    "cl-and-te": H(_P, "Host: x", "Content-Length: 4", "Transfer-Encoding: chunked") + b"0\r\n\r\n",
    "te-and-cl": H(_P, "Host: x", "Transfer-Encoding: chunked", "Content-Length: 4") + b"0\r\n\r\n",
    "cl-twice-differing": H(_P, "Host: x", "Content-Length: 4", "Content-Length: 5") + b"hello",
    "cl-twice-same": H(_P, "Host: x", "Content-Length: 5", "Content-Length: 5") + b"hello",
    "cl-list-differing": H(_P, "Host: x", "Content-Length: 4, 5") + b"hello",
    "cl-list-same": H(_P, "Host: x", "Content-Length: 5, 5") + b"hello",
    "cl-plus": H(_P, "Host: x", "Content-Length: +5") + b"hello",
    "cl-negative": H(_P, "Host: x", "Content-Length: -1"),
    "cl-hex": H(_P, "Host: x", "Content-Length: 0x5") + b"hello",
    "cl-inner-space": H(_P, "Host: x", "Content-Length: 1 2") + b"hello",
    "cl-empty": H(_P, "Host: x", "Content-Length:") + b"hello",
    "cl-21-digits": H(_P, "Host: x", "Content-Length: 000000000000000000005") + b"hello",
    "cl-leading-zeros": H(_P, "Host: x", "Content-Length: 0005") + b"hello",
    "cl-trailing-space": H(_P, "Host: x", "Content-Length: 5 \t") + b"hello",
    "cl-short-body-then-eof": H(_P, "Host: x", "Content-Length: 10") + b"hello",
    "cl-body-then-pipelined": H(_P, "Host: x", "Content-Length: 5") + b"hello"
    + H("GET /second HTTP/1.1", "Host: x"),
    "cl-smuggles-prefix": H(_P, "Host: x", "Content-Length: 6")
    + b"0\r\n\r\nGPOST / HTTP/1.1\r\n\r\n",
    # -- obfuscated Transfer-Encoding ------------------------------------------------------
    "te-xchunked": chunked().replace(b"chunked", b"xchunked") + b"0\r\n\r\n",
    "te-chunked-identity": H(_P, "Host: x", "Transfer-Encoding: chunked, identity") + b"0\r\n\r\n",
    "te-identity": H(_P, "Host: x", "Transfer-Encoding: identity") + b"hello",
    "te-gzip-chunked": H(_P, "Host: x", "Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n",
    "te-upper-case": H(_P, "Host: x", "Transfer-Encoding: CHUNKED") + b"5\r\nhello\r\n0\r\n\r\n",
    "te-space-before-colon": H(_P, "Host: x", "Transfer-Encoding : chunked") + b"0\r\n\r\n",
    "te-vertical-tab": H(_P, "Host: x", "Transfer-Encoding:\x0bchunked") + b"0\r\n\r\n",
    "te-tab-ows": H(_P, "Host: x", "Transfer-Encoding:\tchunked\t") + b"5\r\nhello\r\n0\r\n\r\n",
    "te-twice": H(_P, "Host: x", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked")
    + b"0\r\n\r\n",
    "te-quoted": H(_P, "Host: x", 'Transfer-Encoding: "chunked"') + b"0\r\n\r\n",
    "te-with-params": H(_P, "Host: x", "Transfer-Encoding: chunked;q=1") + b"0\r\n\r\n",
    "te-trailing-comma": H(_P, "Host: x", "Transfer-Encoding: chunked,") + b"0\r\n\r\n",
    "te-empty": H(_P, "Host: x", "Transfer-Encoding:") + b"0\r\n\r\n",
    "te-underscore-name": H(_P, "Host: x", "Transfer_Encoding: chunked") + b"0\r\n\r\n",
    "te-on-http10": H("POST / HTTP/1.0", "Transfer-Encoding: chunked") + b"0\r\n\r\n",
    "te-leading-space-line": H(_P, " Transfer-Encoding: chunked", "Host: x") + b"0\r\n\r\n",
    # -- obs-fold --------------------------------------------------------------------------
    "obs-fold-value": H(_G, "Host: x", "X-Long: a", " b", "\tc"),
    "obs-fold-into-te": H(_P, "Host: x", "Transfer-Encoding: chunked", " , identity")
    + b"0\r\n\r\n",
    "obs-fold-into-cl": H(_P, "Host: x", "Content-Length: 1", " 0") + b"0123456789",
    "obs-fold-first-line": H(_G, " Host: x"),
    # -- line endings ------------------------------------------------------------------------
    "bare-lf-everywhere": H(_G, "Host: x", "X-A: 1", end="\n"),
    "bare-lf-one-line": b"GET / HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n",
    "bare-lf-ends-head-early": b"GET / HTTP/1.1\r\nHost: x\n\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n",
    "bare-cr-in-value": H(_P, "Host: x", "X-A: a\rTransfer-Encoding: chunked") + b"0\r\n\r\n",
    "cr-cr-lf": b"GET / HTTP/1.1\r\nHost: x\r\r\n\r\n",
    "leading-blank-line": b"\r\n" + H(_G, "Host: x"),
    "leading-space": b" " + H(_G, "Host: x"),
    # -- control characters and bytes outside ASCII ---------------------------------------------
    "nul-in-value": H(_G, "Host: x", "X-A: a\x00b"),
    "ctl-01-in-value": H(_G, "Host: x", "X-A: a\x01b"),
    "ctl-1f-in-value": H(_G, "Host: x", "X-A: a\x1fb"),
    "del-in-value": H(_G, "Host: x", "X-A: a\x7fb"),
    "form-feed-in-value": H(_G, "Host: x", "X-A: a\x0cb"),
    "ctl-in-name": H(_G, "Host: x", "X-\x01A: v"),
    "ctl-in-target": H("GET /a\x01b HTTP/1.1", "Host: x"),
    "del-in-target": H("GET /a\x7fb HTTP/1.1", "Host: x"),
    "tab-in-target": H("GET /a\tb HTTP/1.1", "Host: x"),
    "obs-text-in-value": H(_G, "Host: x", "X-A: caf\xe9"),
    "obs-text-in-target": H("GET /caf\xe9 HTTP/1.1", "Host: x"),
    "tab-inside-value": H(_G, "Host: x", "X-A: a\tb"),
    "tls-client-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    # -- chunk sizes and extensions -------------------------------------------------------------
    "chunk-size-negative": CHUNKED + b"-1\r\nhello\r\n0\r\n\r\n",
    "chunk-size-0x": CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-plus": CHUNKED + b"+5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-empty": CHUNKED + b"\r\nhello\r\n0\r\n\r\n",
    "chunk-size-trailing-space": CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n",
    "chunk-size-leading-space": CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-21-hex-digits": CHUNKED + b"000000000000000000005\r\nhello\r\n0\r\n\r\n",
    "chunk-size-20-hex-digits": CHUNKED + b"00000000000000000005\r\nhello\r\n0\r\n\r\n",
    "chunk-size-overflow": CHUNKED + b"fffffffffffffffffff\r\nhello",
    "chunk-size-bare-lf": CHUNKED + b"5\nhello\r\n0\r\n\r\n",
    "chunk-ext": CHUNKED + b"5;name=value;q=\"x\"\r\nhello\r\n0;last\r\n\r\n",
    "chunk-ext-junk": CHUNKED + b"5;a b\x01c\r\nhello\r\n0\r\n\r\n",
    "chunk-ext-bare-cr": CHUNKED + b"5;a\rb\r\nhello\r\n0\r\n\r\n",
    "chunk-data-too-long": CHUNKED + b"5\r\nhelloXX\r\n0\r\n\r\n",
    "chunk-data-bare-lf": CHUNKED + b"5\r\nhello\n0\r\n\r\n",
    "chunk-missing-last": CHUNKED + b"5\r\nhello\r\n",
    "chunk-last-without-blank-line": CHUNKED + b"5\r\nhello\r\n0\r\n",
    "chunk-last-bare-lf-end": CHUNKED + b"5\r\nhello\r\n0\r\n\n",
    "chunk-many-small": CHUNKED + b"1\r\na\r\n" * 200 + b"0\r\n\r\n",
    # -- trailers ---------------------------------------------------------------------------------
    "trailer-plain": CHUNKED + b"5\r\nhello\r\n0\r\nX-Sum: 5\r\n\r\n",
    "trailer-content-length": CHUNKED + b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n",
    "trailer-transfer-encoding": CHUNKED + b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n",
    "trailer-te-gzip": CHUNKED + b"5\r\nhello\r\n0\r\nTransfer-Encoding: gzip\r\n\r\n",
    "trailer-host": CHUNKED + b"5\r\nhello\r\n0\r\nHost: evil.example\r\n\r\n",
    "trailer-smuggled-request": CHUNKED + b"5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    "trailer-bad-name": CHUNKED + b"5\r\nhello\r\n0\r\nX Y: 1\r\n\r\n",
    "trailer-nul": CHUNKED + b"5\r\nhello\r\n0\r\nX-A: a\x00\r\n\r\n",
    "trailer-ctl": CHUNKED + b"5\r\nhello\r\n0\r\nX-A: a\x01\r\n\r\n",
    "trailer-obs-fold": CHUNKED + b"5\r\nhello\r\n0\r\nX-A: a\r\n b\r\n\r\n",
    "trailer-bare-lf": CHUNKED + b"5\r\nhello\r\n0\r\nX-A: 1\n\n",
    # -- request lines ----------------------------------------------------------------------------
    "two-spaces": H("GET  / HTTP/1.1", "Host: x"),
    "space-after-version": H("GET / HTTP/1.1 ", "Host: x"),
    "tab-separator": H("GET\t/ HTTP/1.1", "Host: x"),
    "no-version": H("GET /", "Host: x"),
    "lower-case-http": H("GET / http/1.1", "Host: x"),
    "rtsp-version": H("GET / RTSP/1.0", "Host: x"),
    "http-1.2": H("GET / HTTP/1.2", "Host: x"),
    "http-2.0": H("GET / HTTP/2.0", "Host: x"),
    "http-0.9": H("GET / HTTP/0.9", "Host: x"),
    "http-10.0": H("GET / HTTP/10.0", "Host: x"),
    "h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "lower-case-method": H("get / HTTP/1.1", "Host: x"),
    "custom-method": H("BREW /pot HTTP/1.1", "Host: x"),
    "method-with-slash": H("GE/T / HTTP/1.1", "Host: x"),
    "absolute-form": H("GET http://x/y?z HTTP/1.1", "Host: x"),
    "asterisk-form": H("OPTIONS * HTTP/1.1", "Host: x"),
    "empty-target": H("GET  HTTP/1.1", "Host: x"),
    "head-method": H("HEAD /h HTTP/1.1", "Host: x"),
    # -- Host -------------------------------------------------------------------------------------
    "no-host": H(_G),
    "two-hosts": H(_G, "Host: x", "Host: y"),
    "two-hosts-differing-case": H(_G, "Host: x", "HOST: x"),
    "empty-host": H(_G, "Host:"),
    "http10-without-host": H("GET /old HTTP/1.0"),
    "http10-two-hosts": H("GET / HTTP/1.0", "Host: x", "Host: y"),
    # -- header lines ------------------------------------------------------------------------------
    "no-colon": H(_G, "Host: x", "X-A"),
    "empty-name": H(_G, "Host: x", ": v"),
    "colon-in-value": H(_G, "Host: x", "X-A: b: c"),
    "empty-value": H(_G, "Host: x", "X-A:"),
    # -- connection handling ---------------------------------------------------------------------
    "pipelined-three": H("GET /1 HTTP/1.1", "Host: x") + H("GET /2 HTTP/1.1", "Host: x")
    + H("GET /3 HTTP/1.1", "Host: x"),
    "pipelined-then-garbage": H("GET /1 HTTP/1.1", "Host: x") + b"NOT HTTP\r\n\r\n",
    "close-then-pipelined": H("GET /1 HTTP/1.1", "Host: x", "Connection: close")
    + H("GET /2 HTTP/1.1", "Host: x"),
    "http10-keep-alive": H("GET /1 HTTP/1.0", "Connection: keep-alive")
    + H("GET /2 HTTP/1.0"),
    "expect-100-continue": H(_P, "Host: x", "Expect: 100-continue", "Content-Length: 5") + b"hello",
    "upgrade-without-connection": H(_G, "Host: x", "Upgrade: websocket"),
    "connection-names-a-header": H(_G, "Host: x", "Connection: x-secret", "X-Secret: 1"),
    "partial-head-then-eof": b"GET / HTTP/1.1\r\nHost: x\r\n",
    # -- limits (the defaults: 100 fields, 32 KiB) ------------------------------------------------
    "headers-100": H(_G, "Host: x", *(f"X-F{i}: v" for i in range(99))),
    "headers-101": H(_G, "Host: x", *(f"X-F{i}: v" for i in range(100))),
    "header-bytes-over-limit": H(_G, "Host: x", "X-Big: " + "a" * 33000),
    "header-never-ends": b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000,
}


# -- sans-IO -----------------------------------------------------------------------------------


@dataclass
class Accepted:
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)


@dataclass
class Outcome:
    accepted: list[Accepted]
    refused: int | None  # the status, if a request was refused
    refused_in_body: bool  # after its head was accepted (the proxy then just closes)
    end: str


OK_HEADERS = [(b"content-length", b"2")]


def run_server(impl: str, pieces: list[bytes], **limits: int) -> Outcome:
    """Drive a server protocol as the proxy does: read a whole request,
    answer it, cycle while reusable; the pieces, then the end of stream."""
    s: ServerProtocol = make_server(impl, **limits)
    feed = iter([*pieces, b""])
    accepted: list[Accepted] = []
    current: Accepted | None = None
    for _ in range(MAX_EVENTS + len(pieces)):
        try:
            ev = s.next_event()
        except ProtocolError as exc:
            assert str(exc) and len(str(exc)) <= 120
            return Outcome(accepted, exc.status, current is not None, "refused")
        if ev is NEED_DATA:
            try:
                s.receive_data(next(feed))
            except StopIteration:
                raise AssertionError("NEED_DATA after the end of stream") from None
            continue
        if type(ev) is Request:
            current = Accepted(ev.method, ev.target, ev.http_version, list(ev.headers))
        elif type(ev) is Data:
            assert current is not None
            current.body += ev.data
        elif type(ev) is EndOfMessage:
            assert current is not None
            current.trailers = list(ev.trailers)
            accepted.append(current)
            s.send_response(200, OK_HEADERS, b"OK")
            if current.method != b"HEAD":
                s.send_data(b"ok")
            s.send_end()
            if not s.can_reuse:
                return Outcome(accepted, None, False, "not-reusable")
            s.start_next_cycle()
            current = None
        elif type(ev) is ConnectionClosed:
            return Outcome(accepted, None, False, "closed")
        elif ev is PAUSED:  # an Upgrade we decline by answering 200
            assert current is None
            raise AssertionError("PAUSED with no request to answer")
    raise AssertionError("no end to the events")


def outcome(impl: str, raw: bytes, **limits: int) -> Outcome:
    return run_server(impl, [raw], **limits)


def byte_by_byte(impl: str, raw: bytes, **limits: int) -> Outcome:
    return run_server(impl, [raw[i : i + 1] for i in range(len(raw))], **limits)


def test_the_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 60
    verdicts = [outcome("h11", raw) for raw in CORPUS.values()]
    refused = sum(1 for v in verdicts if v.refused is not None)
    assert refused >= 40 and len(verdicts) - refused >= 20  # both sides are exercised


@pytest.mark.parametrize("name", list(CORPUS))
def test_both_implementations_agree(name: str) -> None:
    raw = CORPUS[name]
    reference = outcome("h11", raw)
    assert outcome("httptools", raw) == reference
    assert byte_by_byte("httptools", raw) == reference
    assert byte_by_byte("h11", raw) == reference


# -- every byte, in every position of a message --------------------------------------------------

# Each template has one ``{}``: each of the 256 byte values goes there in turn.
POSITIONS = {
    "method-first": b"{}ET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "method-middle": b"G{}T / HTTP/1.1\r\nHost: x\r\n\r\n",
    "after-method": b"GET{}/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "target": b"GET /a{}b HTTP/1.1\r\nHost: x\r\n\r\n",
    "version-dot": b"GET / HTTP/1{}1\r\nHost: x\r\n\r\n",
    "version-minor": b"GET / HTTP/1.{}\r\nHost: x\r\n\r\n",
    "end-of-request-line": b"GET / HTTP/1.1{}\r\nHost: x\r\n\r\n",
    "line-start": b"GET / HTTP/1.1\r\nHost: x\r\n{}X-A: v\r\n\r\n",
    "field-name": b"GET / HTTP/1.1\r\nHost: x\r\nX-{}A: v\r\n\r\n",
    "before-colon": b"GET / HTTP/1.1\r\nHost: x\r\nX-A{}: v\r\n\r\n",
    "value-start": b"GET / HTTP/1.1\r\nHost: x\r\nX-A:{}v\r\n\r\n",
    "value-middle": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a{}b\r\n\r\n",
    "value-end": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a{}\r\n\r\n",
    "host-value": b"GET / HTTP/1.1\r\nHost: x{}y\r\n\r\n",
    "content-length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1{}\r\n\r\nab",
    "transfer-coding": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunke{}\r\n\r\n"
    b"0\r\n\r\n",
    "chunk-size": CHUNKED + b"5{}\r\nhello\r\n0\r\n\r\n",
    "chunk-ext": CHUNKED + b"5;{}\r\nhello\r\n0\r\n\r\n",
    "chunk-footer": CHUNKED + b"5\r\nhello{}\n0\r\n\r\n",
    "last-chunk": CHUNKED + b"5\r\nhello\r\n0{}\r\n\r\n",
    "trailer-name": CHUNKED + b"0\r\nX{}Y: 1\r\n\r\n",
    "trailer-value": CHUNKED + b"0\r\nX-Y: a{}b\r\n\r\n",
    "after-message": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n{}",
}


@pytest.mark.parametrize("position", list(POSITIONS))
def test_every_byte_in_every_position(position: str) -> None:
    template = POSITIONS[position]
    for value in range(256):
        raw = template.replace(b"{}", bytes([value]))
        reference = outcome("h11", raw)
        assert outcome("httptools", raw) == reference, (position, hex(value))


# -- mutations of valid requests ------------------------------------------------------------------

SEEDS = [
    H("GET /a?b=c HTTP/1.1", "Host: x", "Accept: */*", "Connection: keep-alive"),
    H(_P, "Host: x", "Content-Length: 5") + b"hello" + H("GET /2 HTTP/1.1", "Host: x"),
    CHUNKED + b"5;e=1\r\nhello\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
    H("GET / HTTP/1.0", "Connection: close"),
    H(_G, "Host: x", "Connection: Upgrade", "Upgrade: websocket") + b"\x81\x00",
]
MUTATION_BYTES = list(b"\r\n \t:;,0aZ-+=\"\x00\x01\x0b\x7f\xff")


@given(seed=st.sampled_from(SEEDS),
       edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 2),
                                st.sampled_from(MUTATION_BYTES)), min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 200), max_size=4))  # fmt: skip
@settings(max_examples=400, deadline=None)
def test_mutated_requests_get_the_same_verdict(
    seed: bytes, edits: list[tuple[int, int, int]], cuts: list[int]
) -> None:
    raw = bytearray(seed)
    for at, op, value in edits:
        at = min(at, len(raw))
        if op == 0:
            raw[at:at] = bytes([value])
        elif op == 1:
            del raw[at : at + 1]
        else:
            raw[at : at + 1] = bytes([value])
    data = bytes(raw)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]
    reference = run_server("h11", pieces)
    assert run_server("httptools", pieces) == reference
    assert outcome("httptools", data) == outcome("h11", data)


# -- the client side: responses from an upstream ------------------------------------------------

R200 = "HTTP/1.1 200 OK"
# name -> (request method, the request proposes an upgrade, response bytes)
RESPONSES: dict[str, tuple[bytes, bool, bytes]] = {
    "length": (b"GET", False, H(R200, "Content-Length: 5") + b"hello"),
    "length-then-extra-bytes": (b"GET", False, H(R200, "Content-Length: 2") + b"okEXTRA"),
    "chunked": (b"GET", False, H(R200, "Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n\r\n"),
    "chunked-trailers": (b"GET", False, H(R200, "Transfer-Encoding: chunked")
                         + b"2\r\nok\r\n0\r\nX-Sum: 1\r\nX-Ctl: a\x01\r\n\r\n"),
    "chunked-ext-junk": (b"GET", False, H(R200, "Transfer-Encoding: chunked")
                         + b"2;a b\r\nok\r\n0\r\n\r\n"),
    "close-delimited": (b"GET", False, H(R200) + b"until the end"),
    "http10-close-delimited": (b"GET", False, H("HTTP/1.0 200 OK") + b"old"),
    "http10-keep-alive": (b"GET", False, H("HTTP/1.0 200 OK", "Connection: keep-alive",
                                          "Content-Length: 2") + b"ok"),
    "connection-close": (b"GET", False, H(R200, "Connection: close", "Content-Length: 2") + b"ok"),
    "head-with-length": (b"HEAD", False, H(R200, "Content-Length: 100")),
    "no-content-with-length": (b"GET", False, H("HTTP/1.1 204 No Content", "Content-Length: 5")),
    "not-modified": (b"GET", False, H("HTTP/1.1 304 Not Modified", "Content-Length: 5")),
    "continue-then-ok": (b"POST", False, H("HTTP/1.1 100 Continue") + H(R200, "Content-Length: 0")),
    "early-hints": (b"GET", False, H("HTTP/1.1 103 Early Hints", "Link: </a.css>")
                    + H(R200, "Content-Length: 0")),
    "switching": (b"GET", True, H("HTTP/1.1 101 Switching Protocols", "Upgrade: websocket",
                                  "Connection: Upgrade") + b"\x81\x02hi"),
    "switching-without-headers": (b"GET", True, H("HTTP/1.1 101 Switching Protocols") + b"xy"),
    "switching-unasked": (b"GET", False, H("HTTP/1.1 101 Switching Protocols", "Upgrade: x",
                                           "Connection: Upgrade")),
    "connect-established": (b"CONNECT", False, H("HTTP/1.1 200 Connection established") + b"tls"),
    "cl-and-te": (b"GET", False, H(R200, "Content-Length: 3", "Transfer-Encoding: chunked")
                  + b"0\r\n\r\n"),
    "cl-twice-same": (b"GET", False, H(R200, "Content-Length: 2", "Content-Length: 2") + b"ok"),
    "cl-twice-differing": (b"GET", False, H(R200, "Content-Length: 2", "Content-Length: 3")
                           + b"ok"),
    "te-gzip": (b"GET", False, H(R200, "Transfer-Encoding: gzip") + b"zz"),
    "te-twice": (b"GET", False, H(R200, "Transfer-Encoding: chunked", "Transfer-Encoding: chunked")
                 + b"0\r\n\r\n"),
    "te-on-http10": (b"GET", False, H("HTTP/1.0 200 OK", "Transfer-Encoding: chunked")
                     + b"0\r\n\r\n"),
    "no-reason": (b"GET", False, b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n"),
    "empty-reason": (b"GET", False, b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n"),
    "reason-obs-text": (b"GET", False, H("HTTP/1.1 200 D\xe9j\xe0 vu\tok", "Content-Length: 0")),
    "reason-nul": (b"GET", False, H("HTTP/1.1 200 O\x00K", "Content-Length: 0")),
    "status-two-digits": (b"GET", False, H("HTTP/1.1 20 OK", "Content-Length: 0")),
    "status-099": (b"GET", False, H("HTTP/1.1 099 Odd", "Content-Length: 0")),
    "status-999": (b"GET", False, H("HTTP/1.1 999 Odd", "Content-Length: 0")),
    "two-spaces": (b"GET", False, H("HTTP/1.1  200 OK", "Content-Length: 0")),
    "http-1.2": (b"GET", False, H("HTTP/1.2 200 OK", "Content-Length: 0")),
    "http-2.0": (b"GET", False, H("HTTP/2.0 200 OK", "Content-Length: 0")),
    "bare-lf": (b"GET", False, H(R200, "Content-Length: 2", end="\n") + b"ok"),
    "obs-fold": (b"GET", False, H(R200, "X-A: a", " b", "Content-Length: 0")),
    "ctl-in-value": (b"GET", False, H(R200, "X-A: a\x01b", "Content-Length: 0")),
    "leading-blank-line": (b"GET", False, b"\r\n" + H(R200, "Content-Length: 0")),
    "ssh-banner": (b"GET", False, b"SSH-2.0-OpenSSH_9.2\r\n\r\n"),
    "bad-chunk": (b"GET", False, H(R200, "Transfer-Encoding: chunked") + b"zz\r\n"),
    "short-body": (b"GET", False, H(R200, "Content-Length: 10") + b"short"),
    "head-never-ends": (b"GET", False, b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000),
}  # fmt: skip


def run_client(impl: str, method: bytes, upgrade: bool, pieces: list[bytes]) -> list[object]:
    """What a client protocol makes of a response to ``method``, as a list
    of plain values (events, the bytes after a switch, the end state)."""
    c = make_client(impl)
    headers = [(b"host", b"x")]
    if upgrade:
        headers += [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    c.send_request(method, b"/" if method != b"CONNECT" else b"x:443", headers)
    c.send_end()
    feed = iter([*pieces, b""])
    out: list[object] = []
    for _ in range(MAX_EVENTS + len(pieces)):
        try:
            ev = c.next_event()
        except ProtocolError as exc:
            return [*out, ("refused", exc.status)]
        if ev is NEED_DATA:
            try:
                c.receive_data(next(feed))
            except StopIteration:
                return [*out, "NEED_DATA after the end"]
            continue
        if ev is PAUSED:
            return [*out, ("paused", c.trailing_data)]
        if type(ev) is Data:  # the seam does not promise where a body is cut
            if out and type(out[-1]) is bytes:
                out[-1] += bytes(ev.data)  # type: ignore[operator]
            else:
                out.append(bytes(ev.data))
            continue
        if type(ev) is ConnectionClosed:
            return [*out, "closed", c.can_reuse]
        if type(ev) is EndOfMessage:
            out.append(("end", list(ev.trailers), c.can_reuse))
        else:
            assert isinstance(ev, Response)  # InformationalResponse is one too
            out.append((type(ev).__name__, ev.status, list(ev.headers), ev.reason, ev.http_version))
    raise AssertionError("no end to the events")


@pytest.mark.parametrize("name", list(RESPONSES))
def test_both_clients_agree(name: str) -> None:
    method, upgrade, raw = RESPONSES[name]
    # Byte by byte too (a switch is then seen before the bytes after it arrive).
    for pieces in ([raw], [raw[i : i + 1] for i in range(len(raw))]):
        reference = run_client("h11", method, upgrade, pieces)
        assert run_client("httptools", method, upgrade, pieces) == reference


def test_a_body_delimited_by_the_close_leaves_nothing_to_reuse() -> None:
    # Asked right after EndOfMessage, as the proxy asks before pooling.
    for impl in IMPLS:
        c = make_client(impl)
        c.send_request(b"GET", b"/", [(b"host", b"x")])
        c.send_end()
        c.receive_data(b"HTTP/1.1 200 OK\r\n\r\nbody")
        assert type(c.next_event()) is Response and type(c.next_event()) is Data
        c.receive_data(b"")
        assert type(c.next_event()) is EndOfMessage
        assert not c.can_reuse, impl


RESPONSE_POSITIONS = {
    "version": b"HTTP/1{}1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "after-version": b"HTTP/1.1{}200 OK\r\nContent-Length: 0\r\n\r\n",
    "status": b"HTTP/1.1 2{}0 OK\r\nContent-Length: 0\r\n\r\n",
    "after-status": b"HTTP/1.1 200{}OK\r\nContent-Length: 0\r\n\r\n",
    "reason": b"HTTP/1.1 200 O{}K\r\nContent-Length: 0\r\n\r\n",
    "field-name": b"HTTP/1.1 200 OK\r\nX-{}A: v\r\nContent-Length: 0\r\n\r\n",
    "field-value": b"HTTP/1.1 200 OK\r\nX-A: a{}b\r\nContent-Length: 0\r\n\r\n",
    "content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 2{}\r\n\r\nok",
    "transfer-coding": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunke{}\r\n\r\n0\r\n\r\n",
    "chunk-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2{}\r\nok\r\n0\r\n\r\n",
    "after-body": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok{}",
}


@pytest.mark.parametrize("position", list(RESPONSE_POSITIONS))
def test_every_byte_in_every_response_position(position: str) -> None:
    template = RESPONSE_POSITIONS[position]
    for value in range(256):
        raw = template.replace(b"{}", bytes([value]))
        reference = run_client("h11", b"GET", False, [raw])
        assert run_client("httptools", b"GET", False, [raw]) == reference, (position, hex(value))


# -- caps ------------------------------------------------------------------------------------------


def test_pipelined_requests_are_not_parsed_ahead() -> None:
    # 200 requests in one receive, the last one malformed: nothing past the
    # current request is parsed, so the error surfaces only when it is reached.
    raw = b"".join(H(f"GET /{i} HTTP/1.1", "Host: x") for i in range(199)) + b"BAD\x00\r\n\r\n"
    for impl in IMPLS:
        s = make_server(impl)
        s.receive_data(raw)
        for i in range(199):
            req, end, more = s.next_event(), s.next_event(), s.next_event()
            assert type(req) is Request and req.target == b"/%d" % i
            assert type(end) is EndOfMessage and more is PAUSED
            s.send_response(200, OK_HEADERS)
            s.send_data(b"ok")
            s.send_end()
            s.start_next_cycle()
        with pytest.raises(ProtocolError) as info:
            s.next_event()
        assert info.value.status == 400


def small_chunks(n: int) -> bytes:
    return CHUNKED + b"1\r\na\r\n" * n + b"0\r\n\r\n"


def test_small_chunks_are_refused_past_the_free_allowance() -> None:
    """httptools only: h11 has no such cap (see the module docstring of
    httptools_impl); a client cannot make the node work per byte."""
    from lbnode.http1.httptools_impl import FREE_CHUNKED_BYTES, MIN_AVERAGE_CHUNK

    free = FREE_CHUNKED_BYTES // 6  # 1-byte chunks are 6 bytes on the wire
    ok = run_server("httptools", [small_chunks(free - 10)])
    assert ok.refused is None and ok.accepted[0].body == b"a" * (free - 10)
    capped = run_server("httptools", [small_chunks(free + 100)])
    assert capped.refused == 400 and capped.refused_in_body
    # Chunks of the minimum average size go through however long the body.
    size = MIN_AVERAGE_CHUNK - 5  # + "b\r\n" + "\r\n" = MIN_AVERAGE_CHUNK bytes
    body = CHUNKED + (b"%x\r\n" % size + b"z" * size + b"\r\n") * 20000 + b"0\r\n\r\n"
    big = run_server("httptools", [body[i : i + 65536] for i in range(0, len(body), 65536)])
    assert big.refused is None and len(big.accepted[0].body) == size * 20000


def test_chunks_arriving_together_come_out_as_one_data_event() -> None:
    s = make_server("httptools")
    s.receive_data(small_chunks(100))
    events = [s.next_event() for _ in range(3)]
    assert type(events[1]) is Data and events[1].data == b"a" * 100  # type: ignore[union-attr]
    assert type(events[2]) is EndOfMessage


# -- end to end: a node per implementation, a backend that records every byte ------------------

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.1")
# RFC 9110 5.5: field-vchar is VCHAR or obs-text; SP and HTAB only inside.
_FIELD_LINE = re.compile(
    rb"(" + _TOKEN + rb"):[ \t]*((?:[\x21-\x7e\x80-\xff](?:[ \t]*[\x21-\x7e\x80-\xff])*)?)[ \t]*"
)
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class NotStrict(Exception):
    """What the backend received does not parse under RFC 9112 without leniency."""


@dataclass
class Received:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    trailers: list[tuple[bytes, bytes]]


def _fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    out = []
    for line in lines:
        m = _FIELD_LINE.fullmatch(line)
        if m is None:
            raise NotStrict(f"field line {line!r}")
        out.append((m.group(1).lower(), m.group(2)))
    return out


def _lines(block: bytes) -> list[bytes]:
    lines = block.split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        raise NotStrict("a bare CR or LF")
    return lines


def strict_parse(raw: bytes) -> tuple[list[Received], bytes]:
    """The complete requests at the start of ``raw`` (strictly), and what is
    left: nothing, or the beginning of one request."""
    out: list[Received] = []
    pos = 0
    while pos < len(raw):
        start = pos
        end = raw.find(b"\r\n\r\n", pos)
        if end < 0:
            return out, raw[start:]
        lines = _lines(raw[pos:end])
        m = _REQUEST_LINE.fullmatch(lines[0])
        if m is None:
            raise NotStrict(f"request line {lines[0]!r}")
        headers = _fields(lines[1:])
        names = [n for n, _ in headers]
        if names.count(b"host") != 1:
            raise NotStrict("not exactly one Host")
        lengths = [v for n, v in headers if n == b"content-length"]
        codings = [v for n, v in headers if n == b"transfer-encoding"]
        if (lengths and codings) or len(lengths) > 1 or codings not in ([], [b"chunked"]):
            raise NotStrict(f"framing {lengths} {codings}")
        pos = end + 4
        body = b""
        trailers: list[tuple[bytes, bytes]] = []
        if codings:
            pieces = []
            while True:
                eol = raw.find(b"\r\n", pos)
                if eol < 0:
                    return out, raw[start:]
                if _CHUNK_SIZE.fullmatch(raw, pos, eol) is None:
                    raise NotStrict(f"chunk size line {raw[pos:eol]!r}")
                size = int(raw[pos:eol], 16)
                pos = eol + 2
                if size == 0:
                    tend = raw.find(b"\r\n", pos) if raw.startswith(b"\r\n", pos) else raw.find(
                        b"\r\n\r\n", pos)  # fmt: skip
                    if tend < 0:
                        return out, raw[start:]
                    if tend == pos:
                        pos += 2
                    else:
                        trailers = _fields(_lines(raw[pos:tend]))
                        pos = tend + 4
                    break
                if len(raw) < pos + size + 2:
                    return out, raw[start:]
                pieces.append(raw[pos : pos + size])
                if raw[pos + size : pos + size + 2] != b"\r\n":
                    raise NotStrict("chunk data not followed by CRLF")
                pos += size + 2
            body = b"".join(pieces)
        elif lengths:
            if not lengths[0].isdigit():
                raise NotStrict(f"Content-Length {lengths[0]!r}")
            n = int(lengths[0])
            if len(raw) < pos + n:
                return out, raw[start:]
            body = raw[pos : pos + n]
            pos += n
        out.append(Received(m.group(1), m.group(2), headers, body, trailers))
    return out, b""


class Recorder:
    """A backend that reads one request per connection, strictly, answers
    200 with ``Connection: close`` (so the node never pools: one upstream
    connection per forwarded request) and keeps every byte it got."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.connections: list[bytearray] = []
        self.problems: list[str] = []
        self.busy = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            record = bytearray()
            with self._lock:
                self.connections.append(record)
                self.busy += 1
            t = threading.Thread(target=self._serve, args=(conn, record), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket, record: bytearray) -> None:
        conn.settimeout(IO_TIMEOUT)
        try:
            for _ in range(100000):  # receives of one request (bounded)
                try:
                    done, _ = strict_parse(bytes(record))
                except NotStrict as exc:
                    self.problems.append(str(exc))
                    conn.sendall(b"HTTP/1.1 500 Not Strict\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")  # fmt: skip
                    return
                if done:
                    body = b"" if done[0].method == b"HEAD" else b"ok"
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                 b"Connection: close\r\n\r\n" + body)  # fmt: skip
                    return
                data = conn.recv(65536)
                if not data:
                    return
                record += data
        except OSError:
            pass
        finally:
            conn.close()
            with self._lock:
                self.busy -= 1

    def idle(self) -> bool:
        with self._lock:
            return self.busy == 0

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        for t in self._threads:
            t.join(IO_TIMEOUT)
        self._acceptor.join(IO_TIMEOUT)


@dataclass
class Through:
    """One entry sent through one node."""

    statuses: list[int]
    received: list[Received]
    leftovers: list[bytes]


class NodeUnderTest:
    def __init__(self, node: Node, recorder: Recorder) -> None:
        self.node = node
        self.recorder = recorder

    def send(self, raw: bytes, heads: list[bool]) -> Through:
        """Send ``raw``, half-close, read every response until the node closes.
        ``heads[i]``: the i-th response answers a HEAD (it has no body)."""
        before = len(self.recorder.connections)
        problems = len(self.recorder.problems)
        with socket.create_connection(("127.0.0.1", self.node.port), timeout=IO_TIMEOUT) as sock:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            data = bytearray()
            for _ in range(100000):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        wait_for(self.recorder.idle, IO_TIMEOUT, "the backend to finish")
        received: list[Received] = []
        leftovers: list[bytes] = []
        for record in self.recorder.connections[before:]:
            done, rest = strict_parse(bytes(record))
            received.extend(done)
            if rest:
                leftovers.append(rest)
        assert self.recorder.problems[problems:] == []
        return Through(read_statuses(bytes(data), heads), received, leftovers)


def read_statuses(data: bytes, heads: list[bool]) -> list[int]:
    """The final statuses of the responses in ``data`` (1xx skipped)."""
    statuses: list[int] = []
    pos = 0
    while pos < len(data):
        end = data.index(b"\r\n\r\n", pos)
        lines = data[pos:end].split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        pos = end + 4
        if status < 200:
            continue
        fields = dict(line.lower().split(b": ", 1) for line in lines[1:])
        head = heads[len(statuses)] if len(statuses) < len(heads) else False
        statuses.append(status)
        if not head:
            pos += int(fields.get(b"content-length", b"0"))
    return statuses


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeUnderTest]]:
    """A node per implementation, each with its own recording backend."""
    launcher = Launcher(tmp_path_factory.mktemp("procs"))
    out: dict[str, NodeUnderTest] = {}
    recorders = []
    try:
        for impl in IMPLS:
            recorder = Recorder()
            recorders.append(recorder)
            config = {
                "load_balancer": {
                    "listeners": [{"protocol": "http", "port": 0}],
                    "targets": [{"id": "recorder", "address": recorder.address}],
                }
            }
            node = launcher.node(config, "--http", impl, access_log="off")
            out[impl] = NodeUnderTest(node, recorder)
        yield out
    finally:
        launcher.close()
        for recorder in recorders:
            recorder.close()


def upstream_form(a: Accepted, backend: str) -> Received:
    """What the proxy sends upstream for the request it accepted."""
    headers, _ = upstream_request_headers(
        a.headers, client_ip=b"127.0.0.1", scheme=b"http", upgrade=wants_upgrade(a.headers),
        default_host=backend.encode(),
    )  # fmt: skip
    # Written Host first; the request id is generated per request.
    ordered = [h for h in headers if h[0] == b"host"] + [h for h in headers if h[0] != b"host"]
    return Received(a.method, a.target, ordered, a.body, a.trailers)


def without_request_id(r: Received) -> Received:
    headers = [h for h in r.headers if h[0] != b"x-request-id"]
    return Received(r.method, r.target, headers, r.body, r.trailers)


@pytest.mark.parametrize("name", list(CORPUS))
def test_end_to_end_through_each_implementation(name: str, nodes: dict[str, NodeUnderTest]) -> None:
    raw = CORPUS[name]
    seen: dict[str, Through] = {}
    for impl, under_test in nodes.items():
        verdict = outcome(impl, raw)
        through = under_test.send(raw, [a.method == b"HEAD" for a in verdict.accepted])
        backend = under_test.recorder.address
        # Exactly the accepted requests reached the backend, strictly parsed...
        expected = [without_request_id(upstream_form(a, backend)) for a in verdict.accepted]
        assert [without_request_id(r) for r in through.received] == expected
        # ...and of a request refused inside its body, never its end.
        assert len(through.leftovers) <= int(verdict.refused_in_body)
        # Each accepted request answered by the backend, then the refusal.
        statuses = [200] * len(verdict.accepted)
        if verdict.refused is not None and not verdict.refused_in_body:
            statuses.append(verdict.refused)
        assert through.statuses == statuses
        seen[impl] = through
    # The two nodes answered alike and forwarded alike (each backend's own
    # address, the default Host of an HTTP/1.0 request, aside).
    assert seen["httptools"].statuses == seen["h11"].statuses
    forwarded = {
        impl: [
            [(n, b"BACKEND" if v == nodes[impl].recorder.address.encode() else v)
             for n, v in without_request_id(r).headers] + [(r.method, r.target, r.body)]
            for r in run.received
        ]
        for impl, run in seen.items()
    }  # fmt: skip
    assert forwarded["httptools"] == forwarded["h11"]
