"""The HTTP/1.1 data path end to end: one lbnode process, demo backends and a
raw upstream, driven by a raw-socket client (exact bytes)."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from lbnode.demo_backend import expected_bytes

from .conftest import (
    Backend,
    Launcher,
    Node,
    RawClient,
    RawConn,
    RawUpstream,
    request,
)


class Env:
    def __init__(self, node: Node, a: Backend, b: Backend, counter: RawUpstream) -> None:
        self.node = node
        self.a = a
        self.b = b
        self.counter = counter

    @property
    def port(self) -> int:
        return self.node.ports["main"][0]

    @property
    def solo_port(self) -> int:
        return self.node.ports["solo"][0]

    @property
    def pool_port(self) -> int:
        return self.node.ports["pooled"][0]


def keepalive_counter(conn: RawConn) -> None:
    """A keep-alive upstream answering body-less requests; accepts are counted."""
    n = 0
    while True:
        head = conn.read_head()
        if head is None:
            return
        n += 1
        body = b"%d" % n
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


@pytest.fixture(scope="module")
def env(module_launcher: Launcher) -> Env:
    a = module_launcher.backend("a")
    b = module_launcher.backend("b")
    counter = module_launcher.raw_upstream(keepalive_counter)
    config = {
        "load_balancers": [
            {
                "name": "main",
                "listeners": [{"protocol": "http", "port": 0}],
                "algorithm": "round_robin",
                "targets": [{"id": "a", "address": a.address}, {"id": "b", "address": b.address}],
            },
            {
                "name": "solo",
                "listeners": [{"protocol": "http", "port": 0}],
                "targets": [{"id": "a", "address": a.address}],
            },
            {
                "name": "pooled",
                "listeners": [{"protocol": "http", "port": 0}],
                "targets": [{"id": "counter", "address": counter.address}],
            },
        ]
    }
    node = module_launcher.node(config)
    return Env(node, a, b, counter)


def backend_headers(resp: Any) -> dict[str, list[str]]:
    """The headers the demo backend's /headers saw, by lower-case name."""
    out: dict[str, list[str]] = {}
    for name, value in resp.json()["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


# -- keep-alive -----------------------------------------------------------------------------


def test_several_requests_on_one_client_connection(env: Env) -> None:
    with RawClient(env.port) as c:
        seen = []
        for _ in range(6):
            resp = c.get("/")
            assert resp.status == 200
            assert resp.header("connection") is None  # nothing says close
            seen.append(resp.json()["backend"])
    # Balanced per request, not per connection.
    assert sorted(set(seen)) == ["a", "b"]
    assert seen.count("a") == 3


def test_pipelined_requests_answered_in_order(env: Env) -> None:
    with RawClient(env.solo_port) as c:
        c.send(b"".join(c.request_bytes("GET", f"/p{i}") for i in range(4)))
        paths = [c.read_response().json()["path"] for _ in range(4)]
    assert paths == ["/p0", "/p1", "/p2", "/p3"]


def test_upstream_connections_are_pooled(env: Env) -> None:
    before = env.counter.accepts
    for _ in range(8):  # a new client connection each time
        resp = request(env.pool_port, "GET", "/")
        assert resp.status == 200
    with RawClient(env.pool_port) as c:
        for _ in range(8):
            assert c.get("/").status == 200
    # 16 requests, one upstream connection (opened once, then reused).
    assert env.counter.accepts - before <= 1
    t = env.node.target("pooled", "counter")
    assert t["pool_open"] == 1 and t["pool_idle"] == 1
    assert t["requests_total"] >= 16


def test_upstream_connection_close_does_not_close_the_client(env: Env) -> None:
    with RawClient(env.solo_port) as c:
        resp = c.get("/close")
        assert resp.status == 200 and resp.body == b"closing\n"
        assert resp.header("connection") is None  # hop-by-hop: not forwarded
        assert c.get("/").status == 200  # same client connection, new upstream one


def test_client_connection_close_is_honoured(env: Env) -> None:
    with RawClient(env.solo_port) as c:
        resp = c.request("GET", "/", [("Connection", "close")])
        assert resp.status == 200 and resp.header("connection") == "close"
        assert c.wait_closed()


# -- bodies -----------------------------------------------------------------------------------


def test_request_and_response_bodies_stream_both_ways(env: Env) -> None:
    body = expected_bytes(3 * 1024 * 1024 + 17)  # larger than any socket buffer
    with RawClient(env.solo_port) as c:
        resp = c.request("POST", "/echo", [("Content-Type", "application/x-test")], body)
        assert resp.status == 200
        assert resp.header("content-length") == str(len(body))
        assert resp.header("content-type") == "application/x-test"
        assert resp.body == body
        # The connection is still good for another request.
        assert c.request("POST", "/sink", body=b"x" * 1000).json()["received"] == 1000


def test_keep_alive_survives_requests_with_bodies(env: Env) -> None:
    # Regression: the proxy closed a kept-alive client connection (without
    # saying so) when the upstream's answer was processed before the body
    # pump task had noted that it was done: a scheduling race, hit by a few
    # percent of small requests while the node is busy with other clients.
    chunked = b"5\r\nhello\r\n0\r\n\r\n"
    failures: list[tuple[int, int, BaseException]] = []

    def client(k: int) -> None:
        i = -1
        try:
            with RawClient(env.solo_port) as c:
                for i in range(20):
                    if i % 2:
                        head = c.request_bytes("POST", "/sink", [("Transfer-Encoding", "chunked")])
                        c.send(head + chunked)
                        assert c.read_response().json()["received"] == 5
                    else:
                        body = b"%d" % i * 100
                        assert c.request("POST", "/echo", body=body).body == body
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append((k, i, exc))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert failures == []


def test_chunked_request_body_is_forwarded_chunked(env: Env) -> None:
    pieces = [b"hello ", b"chunked ", b"x" * 70000, b"world"]
    raw = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    with RawClient(env.solo_port) as c:
        c.send(c.request_bytes("POST", "/echo", [("Transfer-Encoding", "chunked")]) + raw)
        resp = c.read_response()
        assert resp.status == 200
        assert resp.chunked  # no length known in advance: chunked downstream too
        assert resp.body == b"".join(pieces)
        c.send(c.request_bytes("POST", "/headers", [("Transfer-Encoding", "chunked")]) + raw)
        seen = backend_headers(c.read_response())
    assert seen["transfer-encoding"] == ["chunked"]
    assert "content-length" not in seen


def test_chunked_response_is_forwarded_chunked(env: Env) -> None:
    with RawClient(env.solo_port) as c:
        resp = c.get("/bytes/300001?chunked=1")
        assert resp.status == 200
        assert resp.chunked and resp.header("content-length") is None
        assert resp.body == expected_bytes(300001)
        resp = c.get("/bytes/300001")
        assert resp.header("content-length") == "300001" and not resp.chunked
        assert resp.body == expected_bytes(300001)


def test_head_and_no_body_responses_keep_the_connection(env: Env) -> None:
    with RawClient(env.solo_port) as c:
        resp = c.request("HEAD", "/bytes/5000")
        assert resp.status == 200 and resp.header("content-length") == "5000"
        assert c.buf == b""  # no body bytes followed the head
        assert c.get("/status/204").status == 204
        assert c.get("/status/404").status == 404
        assert c.get("/").status == 200


def test_expect_100_continue(env: Env) -> None:
    body = b"x" * 5000
    with RawClient(env.solo_port, timeout=5.0) as c:
        expect = [("Expect", "100-continue"), ("Content-Length", str(len(body)))]
        c.send(c.request_bytes("POST", "/echo", expect))
        interim = c.read_response()  # before any body byte was sent
        assert interim.status == 100
        assert interim.head == b"HTTP/1.1 100 \r\n\r\n" or interim.head.startswith(b"HTTP/1.1 100")
        c.send(body)
        final = c.read_response()
        assert final.status == 200 and final.body == body
        # Expect is answered by the proxy and never forwarded.
        c.send(c.request_bytes("POST", "/headers",
                               [("Expect", "100-continue"), ("Content-Length", "3")]))  # fmt: skip
        assert c.read_response().status == 100
        c.send(b"abc")
        seen = backend_headers(c.read_response())
    assert "expect" not in seen


# -- headers ------------------------------------------------------------------------------------


def test_hop_by_hop_headers_never_reach_the_backend(env: Env) -> None:
    headers = [
        ("Connection", "keep-alive, X-Private-Hop, x-other-hop"),
        ("X-Private-Hop", "secret"),
        ("X-Other-Hop", "secret"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Proxy-Authorization", "Basic c2VjcmV0"),
        ("Proxy-Connection", "keep-alive"),
        ("Upgrade", "h2c"),  # not named by Connection: no protocol switch
        ("X-End-To-End", "kept"),
    ]
    resp = request(env.solo_port, "GET", "/headers", headers)
    assert resp.status == 200
    seen = backend_headers(resp)
    for name in ("connection", "x-private-hop", "x-other-hop", "keep-alive", "te", "trailer",
                 "proxy-authorization", "proxy-connection", "upgrade"):  # fmt: skip
        assert name not in seen, name
    assert seen["x-end-to-end"] == ["kept"]


def test_forwarded_headers_are_added(env: Env) -> None:
    resp = request(env.solo_port, "GET", "/headers", [
        ("Host", "shop.example"),
        ("X-Forwarded-For", "203.0.113.9, 198.51.100.2"),
        ("X-Forwarded-Proto", "https"),  # a client's claim: replaced
        ("X-Forwarded-Host", "evil.example"),
    ])  # fmt: skip
    seen = backend_headers(resp)
    assert seen["x-forwarded-for"] == ["203.0.113.9, 198.51.100.2, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["shop.example"]
    assert seen["host"] == ["shop.example"]


def test_forwarded_for_is_created_when_absent(env: Env) -> None:
    seen = backend_headers(request(env.solo_port, "GET", "/headers"))
    assert seen["x-forwarded-for"] == ["127.0.0.1"]


def test_request_id_kept_or_generated(env: Env) -> None:
    seen = backend_headers(request(env.solo_port, "GET", "/headers", [("X-Request-Id", "abc-123")]))
    assert seen["x-request-id"] == ["abc-123"]
    ids = set()
    for _ in range(3):
        seen = backend_headers(request(env.solo_port, "GET", "/headers"))
        assert len(seen["x-request-id"]) == 1 and len(seen["x-request-id"][0]) >= 8
        ids.add(seen["x-request-id"][0])
    assert len(ids) == 3


# -- HTTP/1.0 --------------------------------------------------------------------------------------


def test_http10_client(env: Env) -> None:
    with RawClient(env.solo_port) as c:
        c.send(b"GET /headers HTTP/1.0\r\n\r\n")  # no Host, no keep-alive
        resp = c.read_response()
        assert resp.status == 200
        seen = backend_headers(resp)
        assert c.read_until_close() == b""  # then the proxy closes
    assert seen["host"] == [env.a.address]  # a Host is supplied for the upstream hop
    assert resp.json()["http_version"] == "1.1"
    with RawClient(env.solo_port) as c:
        c.send(b"POST /echo HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello")
        resp = c.read_response()
        assert resp.status == 200 and resp.body == b"hello"
        assert c.wait_closed()


def test_http10_keep_alive_response_is_not_chunked(env: Env) -> None:
    # An HTTP/1.0 client cannot read chunked: a body of unknown length is
    # delimited by closing the connection.
    with RawClient(env.solo_port) as c:
        c.send(b"GET /bytes/70000?chunked=1 HTTP/1.0\r\n\r\n")
        resp = c.read_response()
        assert resp.status == 200 and not resp.chunked
        assert resp.body == expected_bytes(70000)


# -- concurrency -------------------------------------------------------------------------------


def test_concurrent_clients(env: Env) -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with RawClient(env.port) as c:
                for _ in range(5):
                    resp = c.request("POST", "/echo", body=b"%d" % i * 1000)
                    assert resp.body == b"%d" % i * 1000
                    results.append(resp.status)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert results == [200] * 40


def test_status_counts_requests(env: Env) -> None:
    before = env.node.status()
    request(env.solo_port, "GET", "/")
    after = env.node.status()
    assert after["requests_total"] == before["requests_total"] + 1
    assert json.dumps(after)  # plain JSON
