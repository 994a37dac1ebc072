"""Traffic rules through a running node: the reference document's example as
written, every matcher, first-match order, fall-through, per-rule algorithms,
and the canary split (share and per-client consistency).

Which rule took a request is read from the access log (``rule``, by the
``X-Request-Id`` the test sends); which target served it from the demo
backend's ``X-Backend`` header. Canary membership is also predicted exactly
with ``split_bucket``: the split is a pure function of (rule, key), so the
node must take precisely the predicted clients.
"""

from __future__ import annotations

import itertools
import socket
import ssl
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
import trustme

from lbnode.policy.split import split_bucket

from .conftest import (
    IO_TIMEOUT,
    Backend,
    Launcher,
    Node,
    RawClient,
    RawResponse,
    free_port,
    wait_for,
)

_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


def proxy_v1(src: str, dst_port: int = 80) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    dst = "::1" if family == "TCP6" else "127.0.0.1"
    return f"PROXY {family} {src} {dst} 40000 {dst_port}\r\n".encode()


def proxied_client(port: int, src: str) -> RawClient:
    """A client connection whose PROXY v1 header names ``src`` as the client."""
    c = RawClient(port)
    c.send(proxy_v1(src, port))
    return c


def pipelined(c: RawClient, requests: list[tuple[str, list[tuple[str, str]]]]) -> list[RawResponse]:
    """Send GET requests back to back on one connection, then read every answer."""
    c.send(b"".join(c.request_bytes("GET", path, headers) for path, headers in requests))
    return [c.read_response() for _ in requests]


def access_records(node: Node, request_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The access-log records of ``request_ids``, waiting (bounded) for the flush."""
    wanted = set(request_ids)

    def all_there() -> dict[str, dict[str, Any]] | None:
        found = {r["request_id"]: r for r in node.access_records() if r.get("request_id") in wanted}
        return found if len(found) == len(wanted) else None

    return wait_for(all_there, 10.0, f"{len(wanted)} access-log records")  # type: ignore[no-any-return]


# =====================================================================================
# The reference document's example, as written
# =====================================================================================

# REFERENCE.md "Core Configuration" + "Traffic Rules", verbatim but for the
# listener ports (free ones), the certificate paths (a trustme certificate),
# one extra listener whose clients are named by a PROXY protocol header (so
# the test can be many clients), and the three targets the rules name.
REFERENCE_YAML = """\
load_balancer:
  listeners:
    - protocol: http
      port: {http_port}
      ssl: false

    - protocol: https
      port: {https_port}
      ssl:
        certificate: {cert}
        private_key: {key}

    - protocol: http
      port: {proxy_port}
      proxy_protocol: true

  algorithm: round_robin
  sticky_sessions: true

  health_check:
    enabled: true
    interval: 10s
    timeout: 2s
    healthy_threshold: 2
    unhealthy_threshold: 3

  circuit_breaker:
    enabled: true
    threshold: 0.5
    min_requests: 100
    interval: 60s

  rate_limit:
    enabled: true
    limit: 1000
    interval: 60s

  targets:
    - {{id: api-v2-1, address: "{v2_1}"}}
    - {{id: api-v2-2, address: "{v2_2}"}}
    - {{id: api-canary-1, address: "{canary}"}}

rules:
  api_v2:
    path: /api/v2/*
    method: any
    targets:
      - api-v2-1
      - api-v2-2
    sticky_session:
      cookie: session_id
      ttl: 1h

  api_canary:
    header:
      name: X-Canary
      value: "true"
    targets:
      - api-canary-1
    weight: 10
"""


class RefEnv:
    def __init__(self, node: Node, ca: trustme.CA, ports: dict[str, int]) -> None:
        self.node = node
        self.ca = ca
        self.http = ports["http"]
        self.https = ports["https"]
        self.proxy = ports["proxy"]


@pytest.fixture(scope="module")
def ref(module_launcher: Launcher, tmp_path_factory: pytest.TempPathFactory) -> RefEnv:
    backends = {b: module_launcher.backend(b) for b in ("api-v2-1", "api-v2-2", "api-canary-1")}
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    d = tmp_path_factory.mktemp("tls")
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    ports = {"http": free_port(), "https": free_port(), "proxy": free_port()}
    text = REFERENCE_YAML.format(
        http_port=ports["http"],
        https_port=ports["https"],
        proxy_port=ports["proxy"],
        cert=d / "cert.pem",
        key=d / "key.pem",
        v2_1=backends["api-v2-1"].address,
        v2_2=backends["api-v2-2"].address,
        canary=backends["api-canary-1"].address,
    )
    return RefEnv(module_launcher.node(text), ca, ports)


def test_reference_api_v2_goes_to_its_targets_round_robin(ref: RefEnv) -> None:
    with RawClient(ref.http) as c:
        seen = [c.get(f"/api/v2/users/{i}").header("x-backend") for i in range(6)]
        assert Counter(seen) == {"api-v2-1": 3, "api-v2-2": 3}
        # method: any; and api_v2 is first, so it wins over the canary header.
        for method in ("POST", "DELETE", "PATCH"):
            resp = c.request(method, "/api/v2/x", [("X-Canary", "true")])
            assert resp.status == 200 and resp.header("x-backend") in ("api-v2-1", "api-v2-2")
            # The LB's own rate limit applies to rule traffic too (the rule has none).
            assert resp.header("ratelimit-limit") == "1000"


def test_reference_api_v2_sessions_stick_to_the_target_that_set_the_cookie(ref: RefEnv) -> None:
    pinned: dict[str, str] = {}
    with RawClient(ref.http) as c:
        for s in ("ref-s1", "ref-s2", "ref-s3", "ref-s4"):
            resp = c.get(f"/api/v2/set-cookie?name=session_id&value={s}")
            assert resp.status == 200
            assert resp.header("set-cookie") == f"session_id={s}; Path=/"
            pinned[s] = resp.header("x-backend")  # type: ignore[assignment]
        # Learned sessions were balanced (round robin): both targets own some.
        assert set(pinned.values()) == {"api-v2-1", "api-v2-2"}
        for _ in range(3):
            for s, target in pinned.items():
                resp = c.get("/api/v2/orders", [("Cookie", f"theme=dark; session_id={s}")])
                assert resp.header("x-backend") == target, s
    # Over HTTPS (the reference's second listener), the same pins hold.
    ctx = ssl.create_default_context()
    ref.ca.configure_trust(ctx)
    raw = socket.create_connection(("127.0.0.1", ref.https), timeout=IO_TIMEOUT)
    with RawClient(ref.https, sock=ctx.wrap_socket(raw, server_hostname="localhost")) as tls:
        for s, target in pinned.items():
            assert (
                tls.get("/api/v2/x", [("Cookie", f"session_id={s}")]).header("x-backend") == target
            )


def test_reference_canary_takes_about_ten_percent_of_clients_consistently(ref: RefEnv) -> None:
    clients = [f"10.{i // 250}.{i % 250}.{7 + i % 3}" for i in range(400)]
    by_client: dict[str, list[str]] = {}
    backend_of: dict[str, str | None] = {}
    for ip in clients:
        rids = [new_id("ref-canary") for _ in range(3)]
        with proxied_client(ref.proxy, ip) as c:
            # Twice with the header (consistency), once without (never the canary).
            resps = pipelined(
                c,
                [
                    ("/products", [("X-Canary", "true"), ("X-Request-Id", rids[0])]),
                    ("/products", [("X-Canary", "true"), ("X-Request-Id", rids[1])]),
                    ("/products", [("X-Request-Id", rids[2])]),
                ],
            )
        assert [r.status for r in resps] == [200, 200, 200]
        by_client[ip] = rids
        for rid, r in zip(rids, resps, strict=True):
            backend_of[rid] = r.header("x-backend")
    records = access_records(ref.node, backend_of)
    taken = set()
    for ip, (first, second, plain) in by_client.items():
        rules = [records[rid]["rule"] for rid in (first, second, plain)]
        assert all(records[rid]["client"] == ip for rid in (first, second, plain))
        assert rules[0] == rules[1], ip  # the same client, the same answer
        assert rules[2] is None  # no header: the canary rule does not match at all
        if rules[0] == "api_canary":
            taken.add(ip)
            assert backend_of[first] == backend_of[second] == "api-canary-1"
        else:
            assert rules[0] is None  # fell through to the load balancer's targets
    # Exactly the clients the split function puts under 10 %, and about 10 % of them.
    expected = {ip for ip in clients if split_bucket("api_canary", ip) < 1000}
    assert taken == expected
    assert 0.06 <= len(taken) / len(clients) <= 0.14
    # The rest fell through to all three LB targets, round robin.
    fell = [backend_of[by_client[ip][0]] for ip in clients if ip not in taken]
    assert set(fell) == {"api-v2-1", "api-v2-2", "api-canary-1"}


def test_reference_canary_needs_the_exact_header_value(ref: RefEnv) -> None:
    # A client the split takes (found with the pure function, checked through the node).
    ip = next(
        f"10.200.0.{i}" for i in range(1, 255) if split_bucket("api_canary", f"10.200.0.{i}") < 1000
    )
    rids = [new_id("ref-exact") for _ in range(3)]
    with proxied_client(ref.proxy, ip) as c:
        pipelined(
            c,
            [
                ("/x", [("X-Canary", "true"), ("X-Request-Id", rids[0])]),
                ("/x", [("X-Canary", "TRUE"), ("X-Request-Id", rids[1])]),
                ("/x", [("X-Canary", "true-ish"), ("X-Request-Id", rids[2])]),
            ],
        )
    records = access_records(ref.node, rids)
    assert [records[r]["rule"] for r in rids] == ["api_canary", None, None]


# =====================================================================================
# Every matcher, order, fall-through, per-rule algorithms
# =====================================================================================

MATCHER_RULES: dict[str, Any] = {
    "static": {"path": "/static/*", "targets": ["m1"]},
    "writes": {"path": "/items/*", "method": ["PUT", "DELETE"], "targets": ["m2"]},
    "admin_host": {"host": "*.admin.example", "targets": ["m3"]},
    "gold": {"header": {"name": "X-Tier", "value": "gold"}, "targets": ["m4"]},
    "curl": {"header": {"name": "User-Agent", "regex": "^curl/"}, "targets": ["m1"]},
    "anon": {
        "path": "/private/*",
        "header": {"name": "Authorization", "present": False},
        "targets": ["m2"],
    },
    "debug": {"header": {"name": "X-Debug", "present": True}, "targets": ["m3"]},
    "query_v2": {"query": {"name": "version", "value": "2"}, "targets": ["m4"]},
    "office": {"client_cidr": ["10.9.0.0/16"], "targets": ["m1"]},
    "both": {
        "path": "/both",
        "header": [{"name": "X-A", "value": "1"}, {"name": "X-B", "regex": "^[0-9]+$"}],
        "targets": ["m2"],
    },
    "hashed": {
        "path": "/hash/*",
        "targets": ["m2", "m3", "m4"],
        "algorithm": "consistent_hash",
        "hash_key": "header:X-User",
    },
    "pair": {"path": "/pair/*", "targets": ["m3", "m4"]},
}


class MatchEnv:
    def __init__(self, node: Node, backends: dict[str, Backend]) -> None:
        self.node = node
        self.backends = backends
        self.port = node.ports["rules"][0]
        self.canary_port = node.ports["canary"][0]


@pytest.fixture(scope="module")
def menv(module_launcher: Launcher) -> MatchEnv:
    backends = {b: module_launcher.backend(b) for b in ("m1", "m2", "m3", "m4")}
    targets = [{"id": b, "address": be.address} for b, be in backends.items()]
    canary_targets = [
        {"id": "new", "address": backends["m1"].address},
        {"id": "old", "address": backends["m2"].address},
    ]
    split = {}
    for name, n in (("ten", 10), ("fifty", 50)):
        split[name] = {"path": f"/{name}/*", "weight": n, "targets": ["new"]}
        split[f"{name}_rest"] = {"path": f"/{name}/*", "targets": ["old"]}
    split["by_cookie"] = {
        "path": "/ck/*",
        "weight": 30,
        "split_key": "cookie:uid",
        "targets": ["new"],
    }
    split["by_cookie_rest"] = {"path": "/ck/*", "targets": ["old"]}
    config = {
        "load_balancers": [
            {
                "name": "rules",
                "listeners": [{"port": 0}],
                "trusted_proxies": ["127.0.0.1/32"],
                "targets": targets,
                "rules": MATCHER_RULES,
            },
            {
                "name": "canary",
                "listeners": [{"port": 0}],
                "trusted_proxies": ["127.0.0.1/32"],
                "targets": canary_targets,
                "rules": split,
            },
        ]
    }
    return MatchEnv(module_launcher.node(config), backends)


# method, target, headers, expected rule (None: fell through), expected target(s)
MATCH_CASES: list[tuple[str, str, list[tuple[str, str]], str | None, set[str] | None]] = [
    ("GET", "/static/app.js", [], "static", {"m1"}),
    ("GET", "/static/a/b/c.css?v=1", [], "static", {"m1"}),
    ("GET", "/static", [], None, None),  # "/static/*" wants the slash
    ("PUT", "/items/7", [], "writes", {"m2"}),
    ("DELETE", "/items/7", [], "writes", {"m2"}),
    ("GET", "/items/7", [], None, None),
    ("GET", "/", [("Host", "api.admin.example")], "admin_host", {"m3"}),
    ("GET", "/", [("Host", "A.B.ADMIN.EXAMPLE:8443")], "admin_host", {"m3"}),
    ("GET", "/", [("Host", "admin.example")], None, None),
    ("GET", "/", [("X-Tier", "gold")], "gold", {"m4"}),
    ("GET", "/", [("x-tier", "gold")], "gold", {"m4"}),  # header names: any case
    ("GET", "/", [("X-Tier", "golden")], None, None),  # exact value
    ("GET", "/", [("User-Agent", "curl/8.5.0")], "curl", {"m1"}),
    ("GET", "/", [("User-Agent", "Mozilla/5.0 curl/8")], None, None),  # the regex anchors
    ("GET", "/private/doc", [], "anon", {"m2"}),
    ("GET", "/private/doc", [("Authorization", "Bearer x")], None, None),
    ("GET", "/", [("X-Debug", "1")], "debug", {"m3"}),
    ("GET", "/?version=2", [], "query_v2", {"m4"}),
    ("GET", "/?a=1&version=2", [], "query_v2", {"m4"}),
    ("GET", "/?version=20", [], None, None),
    ("GET", "/", [("X-Forwarded-For", "10.9.200.1")], "office", {"m1"}),
    ("GET", "/", [("X-Forwarded-For", "10.8.0.1")], None, None),
    ("GET", "/both", [("X-A", "1"), ("X-B", "42")], "both", {"m2"}),  # every condition holds
    ("GET", "/both", [("X-A", "1"), ("X-B", "4x")], None, None),
    ("GET", "/both", [("X-A", "1")], None, None),
    # First match wins, in file order.
    ("GET", "/static/x", [("X-Tier", "gold"), ("X-Debug", "1")], "static", {"m1"}),
    ("GET", "/", [("X-Debug", "1"), ("X-Tier", "gold")], "gold", {"m4"}),
    ("PUT", "/items/1?version=2", [("X-Debug", "1")], "writes", {"m2"}),
    ("GET", "/private/x", [("X-Debug", "1"), ("User-Agent", "curl/1")], "curl", {"m1"}),
    ("GET", "/nothing/here", [], None, None),
]


def test_each_matcher_and_first_match_order(menv: MatchEnv) -> None:
    rids = []
    with RawClient(menv.port) as c:
        for method, target, headers, _, expected in MATCH_CASES:
            rid = new_id("match")
            rids.append(rid)
            resp = c.request(method, target, [*headers, ("X-Request-Id", rid)])
            assert resp.status == 200, (target, headers, resp)
            if expected is not None:
                assert resp.header("x-backend") in expected, (method, target, headers)
    records = access_records(menv.node, rids)
    got = [records[rid]["rule"] for rid in rids]
    assert got == [case[3] for case in MATCH_CASES]
    # The access log's target is the backend that answered.
    for rid, (_, _, _, _, expected) in zip(rids, MATCH_CASES, strict=True):
        if expected is not None:
            assert records[rid]["target"] in expected


def test_unmatched_requests_fall_through_to_all_lb_targets_round_robin(menv: MatchEnv) -> None:
    with RawClient(menv.port) as c:
        resps = pipelined(c, [(f"/unmatched/{i}", []) for i in range(8)])
    seen = [r.header("x-backend") for r in resps]
    assert Counter(seen) == {"m1": 2, "m2": 2, "m3": 2, "m4": 2}
    assert seen[:4] == seen[4:]  # a strict rotation over the LB's targets


def test_per_rule_algorithms(menv: MatchEnv) -> None:
    with RawClient(menv.port) as c:
        # consistent_hash on X-User within the rule's three targets.
        owner: dict[str, set[str]] = {}
        for user in (f"user-{i}" for i in range(24)):
            resps = pipelined(c, [("/hash/profile", [("X-User", user)])] * 4)
            owner[user] = {r.header("x-backend") for r in resps}  # type: ignore[misc]
        assert all(len(t) == 1 for t in owner.values()), owner
        assert set().union(*owner.values()) == {"m2", "m3", "m4"}
        # round robin (the LB's algorithm) over the rule's own two targets.
        pair = [r.header("x-backend") for r in pipelined(c, [("/pair/x", [])] * 6)]
        assert Counter(pair) == {"m3": 3, "m4": 3}
        assert all(a != b for a, b in itertools.pairwise(pair))


# -- canary share ------------------------------------------------------------------------------


def split_through_node(
    port: int, path: str, keys: list[tuple[str, str]], batch: int = 250
) -> list[str | None]:
    """X-Backend for each (client ip, uid cookie) over one keep-alive connection."""
    out: list[str | None] = []
    with RawClient(port) as c:
        for start in range(0, len(keys), batch):
            reqs = []
            for ip, uid in keys[start : start + batch]:
                headers = [("X-Forwarded-For", ip)]
                if uid:
                    headers.append(("Cookie", f"uid={uid}"))
                reqs.append((path, headers))
            resps = pipelined(c, reqs)
            assert all(r.status == 200 for r in resps)
            out.extend(r.header("x-backend") for r in resps)
    return out


def distinct_clients(n: int, salt: int) -> Iterator[str]:
    for i in range(n):
        yield f"172.{16 + salt}.{i // 250}.{1 + i % 250}"


@pytest.mark.parametrize(("rule", "weight"), [("ten", 10), ("fifty", 50)])
def test_canary_share_over_two_thousand_clients(menv: MatchEnv, rule: str, weight: int) -> None:
    clients = list(distinct_clients(2000, weight))
    got = split_through_node(menv.canary_port, f"/{rule}/page", [(ip, "") for ip in clients])
    assert set(got) <= {"m1", "m2"}  # m1 serves "new" (the canary), m2 "old" (the rule after it)
    taken = [ip for ip, b in zip(clients, got, strict=True) if b == "m1"]
    share = 100.0 * len(taken) / len(clients)
    assert abs(share - weight) <= 2.5, share
    assert set(taken) == {ip for ip in clients if split_bucket(rule, ip) < weight * 100}
    # Same client, same answer: ask again, in another order.
    again_clients = clients[::-7]
    again = split_through_node(
        menv.canary_port, f"/{rule}/other", [(ip, "") for ip in again_clients]
    )
    first = dict(zip(clients, got, strict=True))
    assert again == [first[ip] for ip in again_clients]


def test_canary_split_key_cookie(menv: MatchEnv) -> None:
    # One client address, many users: the cookie decides, not the address.
    uids = [f"u{i:04d}" for i in range(600)]
    got = split_through_node(menv.canary_port, "/ck/x", [("192.0.2.50", u) for u in uids])
    taken = {u for u, b in zip(uids, got, strict=True) if b == "m1"}
    assert taken == {u for u in uids if split_bucket("by_cookie", u) < 3000}
    assert 20 <= 100 * len(taken) / len(uids) <= 40
    # The same user from other addresses gets the same answer.
    again = split_through_node(
        menv.canary_port, "/ck/y", [(f"192.0.2.{1 + i % 200}", u) for i, u in enumerate(uids[:100])]
    )
    assert again == got[:100]
    # Without the cookie the client address is the key.
    ips = [f"198.18.0.{i}" for i in range(1, 201)]
    by_ip = split_through_node(menv.canary_port, "/ck/z", [(ip, "") for ip in ips])
    assert {ip for ip, b in zip(ips, by_ip, strict=True) if b == "m1"} == {
        ip for ip in ips if split_bucket("by_cookie", ip) < 3000
    }
