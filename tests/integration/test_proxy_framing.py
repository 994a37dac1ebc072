"""Ambiguous framing is refused and never forwarded, in either direction.

The upstream is a raw socket that records every byte it receives, so "never
forwarded" is checked on the wire: after each refused request, a control
request goes through the same node and the recorder must hold the control's
marker but none of the attack's.
"""

from __future__ import annotations

import pytest

from .conftest import Launcher, Node, RawClient, RawUpstream, request, scripted, wait_for

SECRET = b"SMUGGLED-SECRET"

# Responses a broken or hostile upstream might send (the path picks one).
BAD_RESPONSES = {
    "/resp-cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"f\r\n" + SECRET + b"\r\n0\r\n\r\n",
    "/resp-dup-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\nContent-Length: 16\r\n\r\n" + SECRET,
    "/resp-xchunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n"
                      b"f\r\n" + SECRET + b"\r\n0\r\n\r\n",
    "/resp-chunked-identity": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
                              b"f\r\n" + SECRET + b"\r\n0\r\n\r\n",
    "/resp-te-space": b"HTTP/1.1 200 OK\r\nTransfer-Encoding : chunked\r\n\r\n"
                      b"f\r\n" + SECRET + b"\r\n0\r\n\r\n",
    "/resp-te-http10": b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"f\r\n" + SECRET + b"\r\n0\r\n\r\n",
    "/resp-bad-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n" + SECRET,
}  # fmt: skip


class Env:
    def __init__(self, node: Node, upstream: RawUpstream) -> None:
        self.node = node
        self.upstream = upstream
        self.port = node.port
        self._n = 0

    def control(self) -> None:
        """A valid request through the node; returns once the upstream has it."""
        self._n += 1
        marker = f"/control-{self._n}"
        resp = request(self.port, "GET", marker)
        assert resp.status == 200 and resp.body == b"ok"
        wait_for(lambda: marker.encode() in self.upstream.received, 5.0, "the control request")


@pytest.fixture(scope="module")
def env(module_launcher: Launcher) -> Env:
    upstream = module_launcher.raw_upstream(scripted(BAD_RESPONSES))
    config = {
        "load_balancer": {
            "listeners": [{"protocol": "http", "port": 0}],
            "targets": [{"id": "raw", "address": upstream.address}],
        }
    }
    return Env(module_launcher.node(config), upstream)


def H(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# Each attack's request path is unique: if any byte of it reached the
# upstream, its path would be in the recorder.
ATTACKS = {
    "cl-and-te": H("POST /atk-cl-te HTTP/1.1", "Host: x", "Content-Length: 4",
                   "Transfer-Encoding: chunked") + b"0\r\n\r\n",
    "te-and-cl": H("POST /atk-te-cl HTTP/1.1", "Host: x", "Transfer-Encoding: chunked",
                   "Content-Length: 4") + b"0\r\n\r\n",
    "duplicate-cl": H("POST /atk-dup-cl HTTP/1.1", "Host: x", "Content-Length: 4",
                      "Content-Length: 5") + b"hello",
    "cl-list": H("POST /atk-cl-list HTTP/1.1", "Host: x", "Content-Length: 4, 5") + b"hello",
    "cl-plus": H("POST /atk-cl-plus HTTP/1.1", "Host: x", "Content-Length: +5") + b"hello",
    "cl-negative": H("POST /atk-cl-neg HTTP/1.1", "Host: x", "Content-Length: -1"),
    "cl-hex": H("POST /atk-cl-hex HTTP/1.1", "Host: x", "Content-Length: 0x5") + b"hello",
    "xchunked": H("POST /atk-xchunked HTTP/1.1", "Host: x", "Transfer-Encoding: xchunked")
                + b"0\r\n\r\n",
    "chunked-identity": H("POST /atk-chunked-identity HTTP/1.1", "Host: x",
                          "Transfer-Encoding: chunked, identity") + b"0\r\n\r\n",
    "identity": H("POST /atk-identity HTTP/1.1", "Host: x", "Transfer-Encoding: identity")
                + b"hello",
    "space-before-colon": H("POST /atk-space HTTP/1.1", "Host: x", "Transfer-Encoding : chunked")
                          + b"0\r\n\r\n",
    "vertical-tab": H("POST /atk-vtab HTTP/1.1", "Host: x", "Transfer-Encoding:\x0bchunked")
                    + b"0\r\n\r\n",
    "duplicate-te": H("POST /atk-dup-te HTTP/1.1", "Host: x", "Transfer-Encoding: chunked",
                      "Transfer-Encoding: chunked") + b"0\r\n\r\n",
    "te-on-http10": H("POST /atk-te10 HTTP/1.0", "Host: x", "Transfer-Encoding: chunked")
                    + b"0\r\n\r\n",
    "leading-space-header": H("POST /atk-lead HTTP/1.1", " Transfer-Encoding: chunked",
                              "Host: x") + b"0\r\n\r\n",
    "bare-cr": H("POST /atk-cr HTTP/1.1", "Host: x", "X-A: a\rTransfer-Encoding: chunked")
               + b"0\r\n\r\n",
    "nul-in-value": H("GET /atk-nul HTTP/1.1", "Host: x", "X-A: a\x00b"),
    "http-2.0-in-text": H("GET /atk-h2 HTTP/2.0", "Host: x"),
    "long-bad-line": H("GET /atk-long HTTP/1.1", "Host: x", "X-A: " + "<b>" * 5000 + "\x00"),
}  # fmt: skip


@pytest.mark.parametrize("raw", list(ATTACKS.values()), ids=list(ATTACKS))
def test_ambiguous_request_framing_is_refused_and_not_forwarded(env: Env, raw: bytes) -> None:
    path = raw.split(b" ", 2)[1]
    with RawClient(env.port) as c:
        c.send(raw)
        resp = c.read_response()
        assert resp.status in (400, 501, 505), resp
        assert (resp.header("content-type") or "").startswith("text/plain")
        # A short cause, never an echo of the offending bytes.
        text = resp.body.decode()
        assert text.startswith(f"{resp.status} ") and len(text) < 160, text
        assert "bytearray" not in text and "<b>" not in text
        assert c.wait_closed()  # and the connection is closed
    env.control()
    assert path not in env.upstream.received


def test_smuggled_request_after_refusal_is_not_forwarded(env: Env) -> None:
    # The classic CL.TE payload: a second request hidden in the body.
    hidden = H("GET /atk-hidden HTTP/1.1", "Host: x")
    body = b"0\r\n\r\n" + hidden
    raw = H("POST /atk-outer HTTP/1.1", "Host: x", f"Content-Length: {len(body)}",
            "Transfer-Encoding: chunked") + body  # fmt: skip
    with RawClient(env.port) as c:
        c.send(raw)
        assert c.read_response().status == 400
        assert c.wait_closed()
    env.control()
    received = env.upstream.received
    assert b"/atk-outer" not in received and b"/atk-hidden" not in received


def test_valid_chunked_request_is_forwarded_rechunked(env: Env) -> None:
    # The positive control of the attacks: a well-framed body goes through,
    # framed by the proxy (chunked; no Content-Length was given).
    raw = H("GET /fine-chunked HTTP/1.1", "Host: x", "Transfer-Encoding: Chunked")
    with RawClient(env.port) as c:
        c.send(raw + b"3\r\nabc\r\n0\r\n\r\n")
        assert c.read_response().status == 200
    wait_for(lambda: b"/fine-chunked" in env.upstream.received, 5.0, "the chunked request")
    received = env.upstream.received
    head = received[received.index(b"GET /fine-chunked"):]
    assert b"transfer-encoding: chunked\r\n" in head.lower().split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n" in head


@pytest.mark.parametrize("path", list(BAD_RESPONSES))
def test_ambiguous_response_framing_is_502_and_not_forwarded(env: Env, path: str) -> None:
    with RawClient(env.port) as c:
        c.send(c.request_bytes("GET", path))
        resp = c.read_response()
        rest = b""
        if resp.header("connection") == "close":
            rest = c.read_until_close()
        else:  # the client connection stays usable
            assert c.get("/after").status == 200
    assert resp.status == 502, resp
    text = resp.body.decode()
    assert text.startswith("502 ") and "upstream" in text and len(text) < 200, text
    assert "bytearray" not in text
    assert SECRET not in resp.head + resp.body + rest
