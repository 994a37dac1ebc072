"""Errors users can act on: 502/503/504, 400/431 and the timeouts, end to end.

One node serves several load balancers, each built to fail one way: dead
targets, a blackholed address, upstreams that speak garbage or die after
reading a body, no targets at all, a slow backend, small limits and short
timeouts.
"""

from __future__ import annotations

import time

import pytest

from .conftest import (
    Backend,
    Launcher,
    Node,
    RawClient,
    RawConn,
    RawResponse,
    RawUpstream,
    closed_port,
    request,
)


def read_body_then_die(conn: RawConn) -> None:
    """Read one request with its Content-Length body, then close without answering."""
    head = conn.read_head()
    if head is None:
        return
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    conn.read_exact(length)


def close_after_head(conn: RawConn) -> None:
    conn.read_head()


def garbage(conn: RawConn) -> None:
    if conn.read_head() is not None:
        conn.send(b"SSH-2.0-OpenSSH_9.2\r\nthis is not HTTP\r\n\r\n")


PARTIAL = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"


def stall_mid_body(conn: RawConn) -> None:
    """Send a head and part of the body, then nothing until the proxy hangs up."""
    if conn.read_head() is not None:
        conn.send(PARTIAL)
        conn.read_head()  # returns when the proxy closes the connection


def truncate_body(conn: RawConn) -> None:
    if conn.read_head() is not None:
        conn.send(PARTIAL)


def one_response_per_connection(conn: RawConn) -> None:
    """Answer as if keep-alive, then close: what an upstream that reaps idle
    connections does to a pool."""
    if conn.read_head() is not None:
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nonce")


class Env:
    def __init__(self, node: Node, a: Backend, dies: RawUpstream, closer: RawUpstream) -> None:
        self.node = node
        self.a = a
        self.dies = dies
        self.closer = closer

    def port(self, lb: str) -> int:
        return self.node.ports[lb][0]


def lb(name: str, targets: list[tuple[str, str]], **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "listeners": [{"protocol": "http", "port": 0}],
        "targets": [{"id": i, "address": addr} for i, addr in targets],
        **extra,
    }


@pytest.fixture(scope="module")
def env(module_launcher: Launcher) -> Env:
    a = module_launcher.backend("a")
    dead = f"127.0.0.1:{closed_port()}"
    dead2 = f"127.0.0.1:{closed_port()}"
    hole = module_launcher.blackhole().address
    dies = module_launcher.raw_upstream(read_body_then_die)
    closer = module_launcher.raw_upstream(close_after_head)
    junk = module_launcher.raw_upstream(garbage).address
    stall = module_launcher.raw_upstream(stall_mid_body).address
    truncate = module_launcher.raw_upstream(truncate_body).address
    oneshot = module_launcher.raw_upstream(one_response_per_connection).address
    short = {"connect": "500ms", "request_headers": "1s", "upstream_response": "1s", "idle": "1s"}
    config = {
        "load_balancers": [
            lb("solo", [("a", a.address)]),
            lb("refused", [("dead-1", dead), ("dead-2", dead2)]),
            lb("retry", [("dead-1", dead), ("a", a.address)]),
            lb("blackhole", [("hole", hole)], timeouts={"connect": "500ms"}),
            lb("retry_hole", [("hole", hole), ("a", a.address)], timeouts={"connect": "500ms"}),
            lb("garbage", [("junk", junk)]),
            lb("empty", []),
            lb("slow", [("a", a.address)], timeouts={"upstream_response": "1s"}),
            lb("dies", [("dies", dies.address), ("a", a.address)]),
            lb("closer", [("closer", closer.address)]),
            lb("short", [("a", a.address)], timeouts=short),
            lb("limits", [("a", a.address)], limits={"max_header_bytes": 2048, "max_headers": 10}),
            lb("stall", [("stall", stall)], timeouts={"upstream_response": "1s"}),
            lb("truncate", [("truncate", truncate)]),
            lb("oneshot", [("oneshot", oneshot)]),
        ]
    }
    return Env(module_launcher.node(config), a, dies, closer)


def assert_error(resp: RawResponse, status: int, *words: str) -> None:
    """An error answer: the status, a short text/plain body naming the cause."""
    assert resp.status == status, resp
    assert (resp.header("content-type") or "").startswith("text/plain"), resp
    text = resp.body.decode()
    assert text.startswith(f"{status} ") and text.endswith("\n") and len(text) < 300, text
    for word in words:
        assert word in text, (word, text)


# -- 502 / 503 / 504 --------------------------------------------------------------------------


def test_all_targets_refuse_is_502(env: Env) -> None:
    with RawClient(env.port("refused")) as c:
        resp = c.get("/")
        assert_error(resp, 502, "bad gateway", "connection refused")
        assert c.get("/").status == 502  # the client connection is still usable


def test_connect_failure_is_retried_on_another_target(env: Env) -> None:
    with RawClient(env.port("retry")) as c:
        for _ in range(6):
            resp = c.get("/")
            assert resp.status == 200 and resp.json()["backend"] == "a"


def test_connect_timeout_on_a_blackholed_target(env: Env) -> None:
    t0 = time.monotonic()
    resp = request(env.port("blackhole"), "GET", "/")
    elapsed = time.monotonic() - t0
    assert_error(resp, 502, "connect timeout")
    assert 0.4 <= elapsed < 3.5, elapsed


def test_connect_timeout_is_retried_on_another_target(env: Env) -> None:
    with RawClient(env.port("retry_hole")) as c:
        for _ in range(2):
            resp = c.get("/")
            assert resp.status == 200 and resp.json()["backend"] == "a"


def test_garbage_from_upstream_is_502(env: Env) -> None:
    assert_error(request(env.port("garbage"), "GET", "/"), 502, "bad gateway")


def test_no_target_is_503(env: Env) -> None:
    with RawClient(env.port("empty")) as c:
        assert_error(c.get("/"), 503, "no healthy target")
        assert c.get("/").status == 503


def test_refusal_of_a_request_with_body_closes_and_says_so(env: Env) -> None:
    with RawClient(env.port("empty")) as c:
        c.send(c.request_bytes("POST", "/", [("Content-Length", "100000")], b"x" * 1000))
        resp = c.read_response()
        assert_error(resp, 503, "no healthy target")
        assert resp.header("connection") == "close"  # the body is not read
        assert c.wait_closed()


def test_upstream_response_timeout_is_504(env: Env) -> None:
    t0 = time.monotonic()
    resp = request(env.port("slow"), "GET", "/slow?delay=3")
    elapsed = time.monotonic() - t0
    assert_error(resp, 504, "gateway timeout")
    assert 0.9 <= elapsed < 3.5, elapsed
    # A response inside the limit passes.
    assert request(env.port("slow"), "GET", "/slow?delay=0.1").status == 200
    # The 504 says the connection closes, and it does; the node serves on.
    with RawClient(env.port("slow"), timeout=5.0) as c:
        resp = c.get("/slow?delay=3")
        assert resp.status == 504 and resp.header("connection") == "close", resp.head
        assert c.wait_closed()
    assert request(env.port("slow"), "GET", "/slow?delay=0.1").status == 200


def test_request_body_is_never_replayed(env: Env) -> None:
    before = env.a.count("/sink")
    heads_before = env.dies.received.count(b"POST /sink")
    statuses = []
    for i in range(4):
        resp = request(env.port("dies"), "POST", "/sink", body=b"payload-%d" % i)
        statuses.append(resp.status)
        if resp.status == 502:
            assert_error(resp, 502, "bad gateway")
    # Round robin: two requests went to the upstream that read the body and
    # died; they failed and the other target never saw them.
    assert sorted(statuses) == [200, 200, 502, 502]
    assert env.a.count("/sink") - before == 2
    assert env.dies.received.count(b"POST /sink") - heads_before == 2


def test_upstream_closing_without_answer_is_502_not_retried(env: Env) -> None:
    accepts = env.closer.accepts
    assert_error(request(env.port("closer"), "GET", "/once"), 502, "bad gateway")
    # A fresh connection failed: nothing says the request was not processed.
    assert env.closer.accepts - accepts == 1
    assert env.closer.received.count(b"GET /once ") == 1


def test_upstream_stalling_mid_body_closes_the_client_connection(env: Env) -> None:
    with RawClient(env.port("stall"), timeout=5.0) as c:
        t0 = time.monotonic()
        c.send(c.request_bytes("GET", "/"))
        head = c.read_head()  # the response had started: no 504 can follow
        assert head.status == 200 and head.header("content-length") == "100"
        assert c.read_until_close() == b"0123456789"
        elapsed = time.monotonic() - t0
    assert 0.9 <= elapsed < 3.5, elapsed


def test_truncated_upstream_body_closes_the_client_connection(env: Env) -> None:
    with RawClient(env.port("truncate"), timeout=5.0) as c:
        c.send(c.request_bytes("GET", "/"))
        assert c.read_head().status == 200
        # The client sees the same truncation (and can tell: 10 of 100 bytes).
        assert c.read_until_close() == b"0123456789"


def test_pooled_connections_closed_by_the_upstream_are_not_used(env: Env) -> None:
    with RawClient(env.port("oneshot")) as c:
        for _ in range(5):
            resp = c.get("/")
            assert resp.status == 200 and resp.body == b"once"


# -- 400 / 431 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nThis is not a header\r\n\r\n",
        b"HELLO\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad\x01Name: y\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ],
    ids=["no-colon", "no-request-line", "bad-name-byte", "no-host", "two-hosts"],
)
def test_malformed_request_is_400_then_close(env: Env, raw: bytes) -> None:
    with RawClient(env.port("solo")) as c:
        c.send(raw)
        assert_error(c.read_response(), 400)
        assert c.wait_closed()


def header_lines(n: int, size: int = 10) -> list[tuple[str, str]]:
    return [(f"X-H{i}", "v" * size) for i in range(n)]


@pytest.mark.parametrize(
    ("lb_name", "headers", "status"),
    [
        ("solo", [("X-Big", "a" * 30000)], 200),
        ("solo", [("X-Big", "a" * 33000)], 431),
        ("solo", [("X-Big", "a" * 70000)], 431),  # arrives in pieces
        ("solo", header_lines(99), 200),  # 100 fields with Host
        ("solo", header_lines(100), 431),
        ("limits", [("X-Big", "a" * 1500)], 200),
        ("limits", [("X-Big", "a" * 2500)], 431),
        ("limits", header_lines(9), 200),
        ("limits", header_lines(10), 431),
    ],
    ids=["30k", "33k", "70k", "100-fields", "101-fields",
         "limits-1500", "limits-2500", "limits-10-fields", "limits-11-fields"],  # fmt: skip
)
def test_header_limits(env: Env, lb_name: str, headers: list[tuple[str, str]], status: int) -> None:
    with RawClient(env.port(lb_name)) as c:
        resp = c.request("GET", "/", headers)
        if status == 200:
            assert resp.status == 200, resp
            assert c.get("/").status == 200
        else:
            assert_error(resp, 431, "header")
            assert c.wait_closed()


# -- timeouts --------------------------------------------------------------------------------------


def test_slowloris_gets_408_then_close(env: Env) -> None:
    with RawClient(env.port("short"), timeout=5.0) as c:
        t0 = time.monotonic()
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # half a head, then nothing
        resp = c.read_response()
        elapsed = time.monotonic() - t0
        assert_error(resp, 408, "timeout")
        assert c.wait_closed()
    assert 0.9 <= elapsed < 3.5, elapsed


def test_silent_connection_is_closed_after_header_timeout(env: Env) -> None:
    with RawClient(env.port("short"), timeout=5.0) as c:
        t0 = time.monotonic()
        assert c.wait_closed()
        elapsed = time.monotonic() - t0
    assert 0.9 <= elapsed < 3.5, elapsed


def test_idle_keep_alive_connection_is_closed(env: Env) -> None:
    with RawClient(env.port("short"), timeout=5.0) as c:
        assert c.get("/").status == 200
        t0 = time.monotonic()
        assert c.wait_closed()
        elapsed = time.monotonic() - t0
    assert 0.9 <= elapsed < 3.5, elapsed
