"""Access control, the client address (trusted X-Forwarded-For, PROXY protocol
v1/v2) and rate limits through a running node, with exact status codes and
headers; refused requests must never reach the backend."""

from __future__ import annotations

import ipaddress
import itertools
import re
import socket
import ssl
import struct
from typing import Any

import pytest
import trustme

from .conftest import Backend, Launcher, Node, RawClient, RawResponse, closed_port

_paths = itertools.count(1)


def fresh(prefix: str = "") -> str:
    """A path no other request used, so the backend's /stats count for it starts at 0."""
    return f"{prefix}/p{next(_paths)}"


# -- PROXY protocol headers, built by hand (independent of the parser under test) ----------

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v1(src: str) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    dst = "::1" if family == "TCP6" else "127.0.0.1"
    return f"PROXY {family} {src} {dst} 51000 443\r\n".encode()


def proxy_v2(src: str | None, *, local: bool = False) -> bytes:
    """PROXY (or LOCAL) over TCP; ``src`` None: AF_UNSPEC."""
    ver_cmd = 0x20 if local else 0x21
    if src is None:
        return V2_SIGNATURE + bytes([ver_cmd, 0x00]) + struct.pack("!H", 0)
    addr = ipaddress.ip_address(src)
    if addr.version == 4:
        body = (
            addr.packed + ipaddress.IPv4Address("127.0.0.1").packed + struct.pack("!HH", 51000, 443)
        )
        fam = 0x11
    else:
        body = addr.packed + ipaddress.IPv6Address("::1").packed + struct.pack("!HH", 51000, 443)
        fam = 0x21
    tlv = b"\x04" + struct.pack("!H", 3) + b"abc"  # a NOOP TLV: skipped
    body += tlv
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", len(body)) + body


def backend_xff(resp: RawResponse) -> list[str]:
    return [v for k, v in resp.json()["headers"] if k.lower() == "x-forwarded-for"]


def counters(node: Node, lb: str) -> dict[tuple[str, str], int]:
    for entry in node.status()["load_balancers"]:
        if entry["name"] == lb:
            return {(c["kind"], c["rule"]): c["count"] for c in entry["counters"]}
    raise KeyError(lb)


# -- the node ---------------------------------------------------------------------------------


class Env:
    def __init__(self, node: Node, backend: Backend) -> None:
        self.node = node
        self.backend = backend
        self.ca: trustme.CA | None = None

    def port(self, lb: str) -> int:
        return self.node.ports[lb][0]

    def get(self, lb: str, path: str, headers: list[tuple[str, str]] | None = None) -> RawResponse:
        with RawClient(self.port(lb)) as c:
            return c.get(path, headers)


def limit(n: int, interval: str = "60s", **kw: Any) -> dict[str, Any]:
    return {"limit": n, "interval": interval, **kw}


@pytest.fixture(scope="module")
def env(module_launcher: Launcher, tmp_path_factory: pytest.TempPathFactory) -> Env:
    backend = module_launcher.backend("acc")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    tls_dir = tmp_path_factory.mktemp("tls")
    cert.private_key_pem.write_to_path(str(tls_dir / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tls_dir / "cert.pem"))
    ssl_files = {"certificate": str(tls_dir / "cert.pem"), "private_key": str(tls_dir / "key.pem")}
    target = [{"id": "acc", "address": backend.address}]

    def lb(name: str, **kw: Any) -> dict[str, Any]:
        return {"name": name, "listeners": [{"port": 0}], "targets": target, **kw}

    config = {
        "load_balancers": [
            lb("deny_lb", access={"deny": ["127.0.0.0/8"]}, rate_limit=limit(1)),
            lb(
                "allow_lb",
                access={"allow": ["10.0.0.0/8"], "deny": ["10.6.6.0/24"]},
                trusted_proxies=["127.0.0.1/32"],
            ),
            lb(
                "rule_acl",
                rate_limit=limit(1000),
                rules={
                    "admin": {
                        "path": "/admin/*",
                        "access": {"deny": ["127.0.0.0/8"]},
                        "rate_limit": limit(1),
                    },
                    "tens": {"path": "/tens/*", "access": {"allow": ["10.0.0.0/8"]}},
                    "both": {
                        "path": "/both/*",
                        "access": {"allow": ["127.0.0.0/8"], "deny": ["127.0.0.1/32"]},
                    },
                    "lan": {"path": "/lan/*", "access": {"allow": ["127.0.0.0/8"]}},
                },
            ),
            lb(
                "untrusted",
                trusted_proxies=["192.0.2.0/24"],
                access={"deny": ["10.66.0.0/16"]},
                rate_limit=limit(4),
            ),
            {
                **lb("pp", access={"deny": ["198.51.100.0/24", "2001:db8:bad::/48"]}),
                "listeners": [{"port": 0, "proxy_protocol": True}],
            },
            lb("limit5", rate_limit=limit(5, "10s")),
            lb("keyed", rate_limit=limit(2, key="header:X-Api-Key")),
            lb("keyed_deny", rate_limit=limit(2, key="header:X-Api-Key", on_missing_key="deny")),
            lb(
                "keyed_shared", rate_limit=limit(2, key="header:X-Api-Key", on_missing_key="shared")
            ),
            lb(
                "rule_limit",
                rate_limit=limit(100),
                rules={
                    "tight": {"path": "/tight/*", "rate_limit": limit(2)},
                },
            ),
            {
                **lb("pp_tls", access={"deny": ["198.51.100.0/24"]}),
                "listeners": [
                    {"protocol": "https", "port": 0, "proxy_protocol": True, "ssl": ssl_files}
                ],
            },
            lb("xff_limit", trusted_proxies=["127.0.0.1/32"], rate_limit=limit(2)),
            {
                **lb("pp_untrusted", trusted_proxies=["192.0.2.0/24"]),
                "listeners": [{"port": 0, "proxy_protocol": True}],
            },
            # Admitted, then failed by the proxy itself: 502, 503, 504.
            {
                **lb("limit_dead", rate_limit=limit(3)),
                "targets": [{"id": "dead", "address": f"127.0.0.1:{closed_port()}"}],
            },
            {**lb("limit_empty", rate_limit=limit(3)), "targets": []},
            lb("limit_slow", rate_limit=limit(3), timeouts={"upstream_response": "300ms"}),
        ]
    }
    env = Env(module_launcher.node(config), backend)
    env.ca = ca
    return env


def assert_forbidden(resp: RawResponse) -> None:
    assert resp.status == 403, resp
    assert resp.body == b"403 access denied\n"
    assert resp.header("content-type") == "text/plain; charset=utf-8"
    assert resp.header("x-backend") is None
    # Refused before the rate limit is looked at.
    assert resp.header("ratelimit-limit") is None and resp.header("retry-after") is None


# -- access control -----------------------------------------------------------------------------


def test_lb_deny_answers_403_before_rate_limit_and_upstream(env: Env) -> None:
    path = fresh("/deny")
    with RawClient(env.port("deny_lb")) as c:
        for _ in range(4):  # limit 1: a rate-limited request would be a 429
            assert_forbidden(c.get(path))  # and the connection stays usable
    assert env.backend.count(path) == 0
    assert counters(env.node, "deny_lb") == {("access_denied", ""): 4}


@pytest.mark.parametrize(
    ("xff", "status"),
    [
        (None, 403),  # the peer 127.0.0.1 is not in the allow list
        ("10.1.2.3", 200),  # a trusted peer: X-Forwarded-For names the client
        ("10.6.6.6", 403),  # in allow and in deny: deny wins
        ("10.1.2.3, 203.0.113.9", 403),  # the right-most untrusted entry is the client
        ("203.0.113.9, 10.1.2.3", 200),  # what the client wrote to the left does not count
        ("not-an-ip", 403),  # garbage: the peer is the client
    ],
)
def test_allow_list_and_trusted_forwarded_for(env: Env, xff: str | None, status: int) -> None:
    path = fresh("/allow")
    resp = env.get("allow_lb", path, [("X-Forwarded-For", xff)] if xff else [])
    if status == 403:
        assert_forbidden(resp)
        assert env.backend.count(path) == 0
    else:
        assert resp.status == 200 and resp.header("x-backend") == "acc"
        assert env.backend.count(path) == 1


@pytest.mark.parametrize(
    ("prefix", "status"),
    [("/admin", 403), ("/tens", 403), ("/both", 403), ("/lan", 200), ("/public", 200)],
)
def test_rule_access(env: Env, prefix: str, status: int) -> None:
    path = fresh(prefix)
    resp = env.get("rule_acl", path)
    if status == 403:
        assert_forbidden(resp)
    else:
        assert resp.status == 200 and resp.header("ratelimit-limit") == "1000"
    assert env.backend.count(path) == (1 if status == 200 else 0)


def test_rule_access_denials_are_counted_per_rule(env: Env) -> None:
    before = counters(env.node, "rule_acl").get(("access_denied", "admin"), 0)
    with RawClient(env.port("rule_acl")) as c:
        for _ in range(3):  # the rule's limit of 1 is never reached: access comes first
            assert_forbidden(c.get("/admin/x"))
    after = counters(env.node, "rule_acl")
    assert after[("access_denied", "admin")] == before + 3
    assert ("rate_limited", "admin") not in after


def test_forwarded_for_from_an_untrusted_peer_changes_nothing(env: Env) -> None:
    with RawClient(env.port("untrusted")) as c:
        # In the deny list, but only as a claim: the peer (127.0.0.1) is the client.
        resp = c.get("/headers", [("X-Forwarded-For", "10.66.0.1")])
        assert resp.status == 200
        # Passed on with the real peer appended, never replaced.
        assert backend_xff(resp) == ["10.66.0.1, 127.0.0.1"]
        assert resp.header("ratelimit-remaining") == "3"
        # A new made-up address per request does not buy a new rate-limit budget.
        got = [c.get("/", [("X-Forwarded-For", f"10.1.1.{i}")]) for i in range(1, 5)]
        assert [r.status for r in got] == [200, 200, 200, 429]
        assert [r.header("ratelimit-remaining") for r in got] == ["2", "1", "0", "0"]


# -- PROXY protocol -------------------------------------------------------------------------------


def pp_request(
    env: Env, header: bytes, path: str = "/headers", together: bool = False
) -> RawResponse:
    with RawClient(env.port("pp")) as c:
        req = c.request_bytes("GET", path)
        if together:
            c.send(header + req)  # one segment: the request follows the header in the same read
        else:
            c.send(header)
            c.send(req)
        return c.read_response()


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (proxy_v1("192.0.2.10"), "192.0.2.10"),
        (proxy_v1("2001:db8:1::5"), "2001:db8:1::5"),
        (proxy_v2("192.0.2.11"), "192.0.2.11"),
        (proxy_v2("2001:db8:1::6"), "2001:db8:1::6"),
        (b"PROXY UNKNOWN\r\n", "127.0.0.1"),  # no client named: the socket peer
        (proxy_v2("192.0.2.12", local=True), "127.0.0.1"),  # LOCAL: the proxy's own check
        (proxy_v2(None), "127.0.0.1"),  # AF_UNSPEC
    ],
)
@pytest.mark.parametrize("together", [False, True])
def test_proxy_protocol_names_the_client(
    env: Env, header: bytes, client: str, together: bool
) -> None:
    resp = pp_request(env, header, together=together)
    assert resp.status == 200, resp
    assert backend_xff(resp) == [client]


@pytest.mark.parametrize(
    "header",
    [
        proxy_v1("198.51.100.7"),
        proxy_v2("198.51.100.8"),
        proxy_v1("2001:db8:bad::1"),
        proxy_v2("2001:db8:bad::2"),
    ],
)
def test_proxy_protocol_client_is_subject_to_access_control(env: Env, header: bytes) -> None:
    path = fresh("/pp")
    assert_forbidden(pp_request(env, header, path))
    assert env.backend.count(path) == 0


def test_proxy_protocol_client_holds_for_every_request_of_the_connection(env: Env) -> None:
    with RawClient(env.port("pp")) as c:
        c.send(proxy_v2("192.0.2.33"))
        for _ in range(3):
            assert backend_xff(c.get("/headers")) == ["192.0.2.33"]


@pytest.mark.parametrize(
    "first_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # no PROXY header at all
        b"PROXY TCP4 300.1.1.1 127.0.0.1 1 2\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",  # a bad one
        V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12) + b"GET / HTTP/1.1\r\n\r\n",  # v2 over UDP
    ],
)
def test_listener_with_proxy_protocol_closes_connections_without_a_valid_header(
    env: Env, first_bytes: bytes
) -> None:
    path = fresh("/nopp")
    with RawClient(env.port("pp")) as c:
        c.send(first_bytes.replace(b"GET / ", f"GET {path} ".encode()))
        assert c.wait_closed()  # closed, not a byte answered
    assert env.backend.count(path) == 0


def test_plain_listeners_do_not_read_proxy_headers(env: Env) -> None:
    with RawClient(env.port("rule_acl")) as c:
        c.send(proxy_v1("192.0.2.10") + c.request_bytes("GET", "/"))
        resp = c.read_response()
    assert resp.status == 400  # "PROXY ..." is not an HTTP request line


def test_proxy_header_from_a_peer_outside_trusted_proxies_is_read_but_not_believed(
    env: Env,
) -> None:
    with RawClient(env.port("pp_untrusted")) as c:
        c.send(proxy_v1("192.0.2.10"))
        resp = c.get("/headers")
    assert resp.status == 200
    assert backend_xff(resp) == ["127.0.0.1"]  # the socket peer, not the header's claim


def tls_after_proxy_header(env: Env, header: bytes) -> RawClient:
    """A TLS client on the ``pp_tls`` listener that sent ``header`` before its handshake."""
    assert env.ca is not None
    ctx = ssl.create_default_context()
    env.ca.configure_trust(ctx)
    raw = socket.create_connection(("127.0.0.1", env.port("pp_tls")), timeout=10)
    try:
        if header:
            raw.sendall(header)
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise
    return RawClient(env.port("pp_tls"), sock=tls)


@pytest.mark.parametrize("header", [proxy_v1("192.0.2.44"), proxy_v2("192.0.2.44")])
def test_proxy_protocol_header_before_the_tls_handshake(env: Env, header: bytes) -> None:
    with tls_after_proxy_header(env, header) as c:
        for _ in range(2):  # and for every request of the connection
            resp = c.get("/headers")
            assert resp.status == 200
            assert backend_xff(resp) == ["192.0.2.44"]
            assert {k.lower(): v for k, v in resp.json()["headers"]}["x-forwarded-proto"] == "https"
    with tls_after_proxy_header(env, proxy_v2("198.51.100.9")) as c:
        assert_forbidden(c.get("/"))


def test_tls_listener_with_proxy_protocol_refuses_a_bare_handshake(env: Env) -> None:
    with pytest.raises((ssl.SSLError, OSError)):
        with tls_after_proxy_header(env, b"") as c:
            c.get("/")


# -- rate limits ---------------------------------------------------------------------------------

INT = re.compile(r"^[0-9]+$")


def test_limit_five_per_ten_seconds_exact_headers(env: Env) -> None:
    path = fresh("/limit")
    with RawClient(env.port("limit5")) as c:
        got = [c.get(path) for _ in range(6)]
    for resp, remaining in zip(got[:5], ["4", "3", "2", "1", "0"], strict=True):
        assert resp.status == 200 and resp.header("x-backend") == "acc"
        assert resp.header("ratelimit-limit") == "5"
        assert resp.header("ratelimit-remaining") == remaining
        reset = resp.header("ratelimit-reset")
        assert reset is not None and INT.match(reset) and 1 <= int(reset) <= 10
        assert resp.header("retry-after") is None
    refused = got[5]
    assert refused.status == 429
    assert refused.body == b"429 rate limit exceeded\n"
    retry = refused.header("retry-after")
    assert retry is not None and INT.match(retry) and 1 <= int(retry) <= 10
    assert refused.header("ratelimit-limit") == "5"
    assert refused.header("ratelimit-remaining") == "0"
    reset = refused.header("ratelimit-reset")
    assert reset is not None and INT.match(reset) and 1 <= int(reset) <= 10
    assert refused.header("x-backend") is None
    assert env.backend.count(path) == 5  # the refused one never went upstream
    assert counters(env.node, "limit5") == {("rate_limited", ""): 1}


def statuses(env: Env, lb: str, key: str | None, n: int) -> list[tuple[int, str | None]]:
    headers = [("X-Api-Key", key)] if key is not None else []
    with RawClient(env.port(lb)) as c:
        return [
            (r.status, r.header("ratelimit-remaining"))
            for r in (c.get("/", headers) for _ in range(n))
        ]


def test_keyed_limits_are_independent_per_key(env: Env) -> None:
    assert statuses(env, "keyed", "key-a", 3) == [(200, "1"), (200, "0"), (429, "0")]
    assert statuses(env, "keyed", "key-b", 3) == [(200, "1"), (200, "0"), (429, "0")]
    assert statuses(env, "keyed", "key-a", 1) == [(429, "0")]


@pytest.mark.parametrize(
    ("lb", "expected"),
    [
        # allow: not limited at all, and no RateLimit headers
        ("keyed", [(200, None)] * 5),
        # deny: refused outright
        ("keyed_deny", [(429, "0")] * 2),
        # shared: every keyless request shares one budget
        ("keyed_shared", [(200, "1"), (200, "0"), (429, "0")]),
    ],
)
def test_requests_without_a_key_follow_on_missing_key(
    env: Env, lb: str, expected: list[Any]
) -> None:
    assert statuses(env, lb, None, len(expected)) == expected
    # An empty header value is a missing key, too.
    assert statuses(env, lb, "", 1) == expected[-1:]
    # Keyed requests are not affected by the keyless ones.
    assert statuses(env, lb, "k-" + lb, 1) == [(200, "1")]


def test_missing_key_deny_says_when_to_retry(env: Env) -> None:
    with RawClient(env.port("keyed_deny")) as c:
        resp = c.get("/")
    assert resp.status == 429
    assert resp.header("retry-after") == "60"  # one interval
    assert resp.header("ratelimit-limit") == "2"


def test_rule_limit_applies_instead_of_the_lbs(env: Env) -> None:
    with RawClient(env.port("rule_limit")) as c:
        tight = [c.get("/tight/x") for _ in range(3)]
        assert [
            (r.status, r.header("ratelimit-limit"), r.header("ratelimit-remaining")) for r in tight
        ] == [
            (200, "2", "1"),
            (200, "2", "0"),
            (429, "2", "0"),
        ]
        # The LB's budget was not touched by the rule's requests.
        loose = c.get("/loose")
        assert (
            loose.status,
            loose.header("ratelimit-limit"),
            loose.header("ratelimit-remaining"),
        ) == (
            200,
            "100",
            "99",
        )
    assert counters(env.node, "rule_limit") == {("rate_limited", "tight"): 1}


def test_client_ip_key_uses_trusted_forwarded_for(env: Env) -> None:
    def run(xff: str, n: int) -> list[int]:
        with RawClient(env.port("xff_limit")) as c:
            return [c.get("/", [("X-Forwarded-For", xff)]).status for _ in range(n)]

    assert run("10.0.0.1", 3) == [200, 200, 429]
    assert run("10.0.0.2", 2) == [200, 200]  # another client behind the same proxy
    assert run("192.0.2.1, 10.0.0.1", 1) == [429]  # right-most untrusted: still 10.0.0.1


def test_socket_peer_is_the_key_without_trusted_proxies(env: Env) -> None:
    # A different source address (127.0.0.2) is a different client: its own budget.
    sock = socket.socket()
    sock.bind(("127.0.0.2", 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", env.port("limit5")))
    with RawClient(env.port("limit5"), sock=sock) as c:
        resp = c.get(fresh("/limit"))
    assert resp.status == 200 and resp.header("ratelimit-remaining") == "4"


@pytest.mark.parametrize(
    ("lb", "path", "status"),
    [
        ("limit_dead", "/", 502),  # connect refused
        ("limit_empty", "/", 503),  # no target at all
        ("limit_slow", "/slow?delay=2", 504),  # no answer in time
    ],
)
def test_admitted_requests_failed_by_the_proxy_still_carry_ratelimit_headers(
    env: Env, lb: str, path: str, status: int
) -> None:
    with RawClient(env.port(lb)) as c:
        resp = c.get(path)
    assert resp.status == status, resp
    # The request was admitted and counted: the client is told what is left.
    assert resp.header("ratelimit-limit") == "3"
    assert resp.header("ratelimit-remaining") == "2"
    assert resp.header("retry-after") is None
