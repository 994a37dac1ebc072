from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbnode.policy.request import RequestView
from lbnode.policy.rules import CompiledRules, compile_glob, glob_to_regex
from lbnode.policy.split import Split
from lbshared.config import Access, LoadBalancer, RateLimit, Rule, StickySession, ValueMatch


def rule(name: str = "r", **kw: Any) -> Rule:
    return Rule(name=name, **kw)


def req(
    target: str = "/",
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    client_ip: str = "192.0.2.10",
) -> RequestView:
    return RequestView(method.encode(), target.encode("latin-1"), headers or [], client_ip)


def matches(r: Rule, request: RequestView) -> bool:
    m = CompiledRules([r]).match(request)
    return m is not None


# ------------------------------------------------------------------ paths

PATHS = [
    # glob, request target, expected
    ("/api/v2/*", "/api/v2/users", True),
    ("/api/v2/*", "/api/v2/a/b/c", True),  # '*' crosses '/'
    ("/api/v2/*", "/api/v2/", True),  # '*' matches the empty run
    ("/api/v2/*", "/api/v2", False),
    ("/api/v2/*", "/api/v3/x", False),
    ("/api/v2/*", "/API/v2/x", False),  # paths are case-sensitive
    ("/api/v2/*", "/api/v2/x?y=1", True),  # the query is not part of the path
    ("/api/v2/*", "/api/v2?next=/api/v2/x", False),
    ("/api/v2", "/api/v2", True),
    ("/api/v2", "/api/v2/", False),
    ("/api/v2", "/api/v2x", False),
    ("/files/?.txt", "/files/a.txt", True),
    ("/files/?.txt", "/files/ab.txt", False),
    ("/files/?.txt", "/files/.txt", False),
    ("/files/?.txt", "/files//.txt", True),  # '?' is any one character, '/' too
    ("/static/*.css", "/static/a/b/c.css", True),
    ("/static/*.css", "/static/a.css.map", False),
    ("/a.b", "/a.b", True),
    ("/a.b", "/aXb", False),  # '.' is literal
    ("/[abc]", "/[abc]", True),
    ("/[abc]", "/a", False),  # brackets are literal
    ("/a+b", "/a+b", True),
    ("/a+b", "/aab", False),
    ("/x(y)|z", "/x(y)|z", True),
    ("/x(y)|z", "/z", False),
    ("/a\\d", "/a\\d", True),
    ("/a\\d", "/a1", False),
    ("/price$", "/price$", True),
    ("/^top", "/^top", True),
    ("/*", "/", True),
    ("/*", "/anything/at/all", True),
    ("*", "/x", True),
    ("/api/*/users", "/api/v1/users", True),
    ("/api/*/users", "/api/v1/x/users", True),
    ("/api/*/users", "/api/users", False),
    ("/*/admin", "/x/admin", True),
    ("/*/admin", "/admin", False),
    ("/ap*", "/api/v2", True),
    ("/ap*", "/ap", True),
    ("/ap*", "/a", False),
    ("/a**b", "/ab", True),
    ("/a**b", "/a/x/b", True),
    ("/a*b*c", "/abc", True),
    ("/a*b*c", "/a-b-x", False),
    ("/%7Euser/*", "/%7Euser/x", True),
    ("/%7Euser/*", "/~user/x", False),  # no percent-decoding
    ("/", "/", True),
    ("/", "/x", False),
    ("/a/", "/a/", True),
    ("/a/", "/a", False),
    ("/a/b*", "/a/bc/d", True),
    ("/a/b*", "/a/x", False),
    ("/caf\xe9/*", "/caf\xe9/x", True),  # latin-1 bytes, undecoded
]


@pytest.mark.parametrize("glob, target, expected", PATHS)
def test_path_glob(glob: str, target: str, expected: bool) -> None:
    assert matches(rule(path=glob), req(target)) is expected
    # the same answer from a big, indexed rule set around it
    decoys = [rule(f"d{i}", path=f"/decoy{i}/*", method=["PUT"]) for i in range(50)]
    cr = CompiledRules([*decoys, rule("target", path=glob)])
    m = cr.match(req(target))
    assert (m is not None and m.name == "target") is expected


@pytest.mark.parametrize(
    "glob, regex",
    [
        ("/api/*", "/api/.*"),
        ("/a?c", "/a.c"),
        ("/a**b", "/a.*b"),
        ("/a.b[c]", "/a\\.b\\[c\\]"),
    ],
)
def test_glob_to_regex(glob: str, regex: str) -> None:
    assert glob_to_regex(glob) == regex


def test_compile_glob_cheapest_forms() -> None:
    exact = compile_glob("/a/b")
    prefix = compile_glob("/a/*")
    general = compile_glob("/a/*/b")
    assert exact("/a/b") and not exact("/a/b/")
    assert prefix("/a/x/y") and not prefix("/b")
    assert general("/a/x/y/b") and not general("/a/x/y/c")
    host = compile_glob("*.Example.com", ignore_case=True)
    assert host("a.example.com") and not host("example.com")


# ---------------------------------------------------------------- methods

METHODS = [
    ("any", "DELETE", True),
    ("ANY", "PATCH", True),
    (["GET", "HEAD"], "HEAD", True),
    (["GET", "HEAD"], "POST", False),
    ("post", "POST", True),  # normalised to upper case
    ("GET", "get", False),  # the request method is case-sensitive (RFC 9110)
    (["get", "any"], "OPTIONS", True),
]


@pytest.mark.parametrize("method, request_method, expected", METHODS)
def test_method(method: str | list[str], request_method: str, expected: bool) -> None:
    assert matches(rule(method=method), req(method=request_method)) is expected


# ------------------------------------------------------------------ hosts

HOSTS = [
    # rule host, Host header (None: absent), expected
    ("example.com", "example.com", True),
    ("example.com", "EXAMPLE.com", True),
    ("Example.COM", "example.com:8080", True),
    ("example.com", "www.example.com", False),
    ("example.com", None, False),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "a.b.example.com", True),
    ("*.example.com", "A.Example.Com:443", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "badexample.com", False),
    ("*.example.com", "a.example.com.evil.org", False),
    ("api.*", "api.example.org", True),
    ("api.*", "www.api.example.org", False),
    ("ap?.example.com", "api.example.com", True),
    ("[::1]", "[::1]:8080", True),
]


@pytest.mark.parametrize("host, header, expected", HOSTS)
def test_host(host: str, header: str | None, expected: bool) -> None:
    headers = [(b"host", header.encode())] if header is not None else []
    assert matches(rule(host=host), req(headers=headers)) is expected


# ---------------------------------------------------------------- headers

HEADERS = [
    # match, request headers, expected
    (ValueMatch(name="X-Canary", value="true"), [(b"x-canary", b"true")], True),
    (ValueMatch(name="X-Canary", value="true"), [(b"x-canary", b"TRUE")], False),
    (ValueMatch(name="X-Canary", value="true"), [(b"x-canary", b"true1")], False),
    (ValueMatch(name="X-Canary", value="true"), [], False),
    (ValueMatch(name="x-CANARY", value="true"), [(b"x-canary", b"true")], True),
    # a repeated header matches if any of its values does
    (ValueMatch(name="X-Tag", value="b"), [(b"x-tag", b"a"), (b"x-tag", b"b")], True),
    (ValueMatch(name="X-Tag", regex="^(beta|canary)$"), [(b"x-tag", b"beta")], True),
    (ValueMatch(name="X-Tag", regex="^(beta|canary)$"), [(b"x-tag", b"betamax")], False),
    (ValueMatch(name="User-Agent", regex="Mobile"), [(b"user-agent", b"X Mobile Y")], True),
    (ValueMatch(name="User-Agent", regex="Mobile"), [], False),
    (ValueMatch(name="X-Debug", present=True), [(b"x-debug", b"")], True),
    (ValueMatch(name="X-Debug", present=True), [], False),
    (ValueMatch(name="X-Debug"), [(b"x-debug", b"1")], True),  # default: present
    (ValueMatch(name="X-Debug"), [(b"x-other", b"1")], False),
    (ValueMatch(name="X-Debug", present=False), [], True),
    (ValueMatch(name="X-Debug", present=False), [(b"x-debug", b"1")], False),
    (ValueMatch(name="X-Lang", value="caf\xe9"), [(b"x-lang", "caf\xe9".encode("latin-1"))], True),
]


@pytest.mark.parametrize("match, headers, expected", HEADERS)
def test_header(match: ValueMatch, headers: list[tuple[bytes, bytes]], expected: bool) -> None:
    assert matches(rule(header=match), req(headers=headers)) is expected


def test_header_list_is_and() -> None:
    r = rule(
        header=[
            ValueMatch(name="X-A", value="1"),
            ValueMatch(name="X-B", present=False),
        ]
    )
    assert matches(r, req(headers=[(b"x-a", b"1")]))
    assert not matches(r, req(headers=[(b"x-a", b"1"), (b"x-b", b"1")]))
    assert not matches(r, req(headers=[(b"x-a", b"2")]))


# ------------------------------------------------------------------ query

QUERY = [
    (ValueMatch(name="version", value="2"), "/?version=2", True),
    (ValueMatch(name="version", value="2"), "/?version=3", False),
    (ValueMatch(name="version", value="2"), "/?a=1&version=2", True),
    (ValueMatch(name="version", value="2"), "/?version=2&version=3", True),  # first wins
    (ValueMatch(name="version", value="2"), "/?version=3&version=2", False),
    (ValueMatch(name="version", value="2"), "/?Version=2", False),  # names are case-sensitive
    (ValueMatch(name="version", value="2"), "/", False),
    (ValueMatch(name="q", value="a b"), "/?q=a+b", True),  # form-decoded
    (ValueMatch(name="q", value="a/b"), "/?q=a%2Fb", True),
    (ValueMatch(name="v", regex="^[0-9]+$"), "/?v=123", True),
    (ValueMatch(name="v", regex="^[0-9]+$"), "/?v=12a", False),
    (ValueMatch(name="v", regex="^[0-9]+$"), "/", False),
    (ValueMatch(name="debug"), "/?debug", True),  # blank values count as present
    (ValueMatch(name="debug", present=True), "/?debug=", True),
    (ValueMatch(name="debug", present=True), "/?x=debug", False),
    (ValueMatch(name="debug", present=False), "/?x=1", True),
    (ValueMatch(name="debug", present=False), "/?debug=0", False),
]


@pytest.mark.parametrize("match, target, expected", QUERY)
def test_query(match: ValueMatch, target: str, expected: bool) -> None:
    assert matches(rule(query=match), req(target)) is expected


def test_query_list_is_and() -> None:
    r = rule(query=[ValueMatch(name="a", value="1"), ValueMatch(name="b", regex="x")])
    assert matches(r, req("/?a=1&b=yxy"))
    assert not matches(r, req("/?a=1&b=y"))
    assert not matches(r, req("/?b=x"))


# ------------------------------------------------------------------- CIDR

CIDRS = [
    (["10.0.0.0/8"], "10.1.2.3", True),
    (["10.0.0.0/8"], "11.1.2.3", False),
    (["10.0.0.0/8", "192.168.0.0/16"], "192.168.4.4", True),
    (["2001:db8::/32"], "2001:db8::1", True),
    (["2001:db8::/32"], "10.0.0.1", False),
    (["10.0.0.0/8"], "::ffff:10.0.0.1", True),
    (["10.0.0.5"], "10.0.0.5", True),
    (["10.0.0.0/8"], "not-an-ip", False),
]


@pytest.mark.parametrize("cidrs, client_ip, expected", CIDRS)
def test_client_cidr(cidrs: list[str], client_ip: str, expected: bool) -> None:
    assert matches(rule(client_cidr=cidrs), req(client_ip=client_ip)) is expected


# ------------------------------------------------------------------- AND

FULL: dict[str, Any] = dict(
    path="/api/*",
    method=["POST"],
    host="*.example.com",
    header=ValueMatch(name="X-Beta", value="1"),
    query=ValueMatch(name="v", value="2"),
    client_cidr=["10.0.0.0/8"],
)
GOOD: dict[str, Any] = dict(
    target="/api/x?v=2",
    method="POST",
    headers=[(b"host", b"a.example.com"), (b"x-beta", b"1")],
    client_ip="10.9.9.9",
)


@pytest.mark.parametrize(
    "change",
    [
        {"target": "/web/x?v=2"},
        {"method": "GET"},
        {"headers": [(b"host", b"a.example.org"), (b"x-beta", b"1")]},
        {"headers": [(b"host", b"a.example.com")]},
        {"target": "/api/x?v=3"},
        {"client_ip": "192.0.2.1"},
    ],
)
def test_all_conditions_must_hold(change: dict[str, Any]) -> None:
    r = rule(**FULL)
    assert matches(r, req(**GOOD))
    assert not matches(r, req(**{**GOOD, **change}))


def test_a_rule_without_conditions_takes_everything() -> None:
    assert matches(rule(), req("/whatever", "DELETE"))


# ----------------------------------------------------- order and weights


def test_first_matching_rule_wins_in_file_order() -> None:
    cr = CompiledRules(
        {
            "broad": rule("broad", path="/api/*"),
            "narrow": rule("narrow", path="/api/v2/*"),
            "other": rule("other", path="/web/*"),
        }
    )
    m = cr.match(req("/api/v2/x"))
    assert m is not None and (m.name, m.index) == ("broad", 0)
    m = cr.match(req("/web/x"))
    assert m is not None and (m.name, m.index) == ("other", 2)
    assert cr.match(req("/nothing")) is None  # -> the load balancer's own targets


def test_order_preserved_across_index_buckets() -> None:
    # A root-level rule (no path) placed between indexed ones keeps its place.
    cr = CompiledRules(
        [
            rule("a", path="/api/v1/*"),
            rule("hdr", header=ValueMatch(name="X-Canary", value="true")),
            rule("b", path="/api/v2/*"),
            rule("glob", path="/*/v2/*"),
        ]
    )
    canary = [(b"x-canary", b"true")]
    assert cr.match(req("/api/v1/x", headers=canary)).name == "a"  # type: ignore[union-attr]
    assert cr.match(req("/api/v2/x", headers=canary)).name == "hdr"  # type: ignore[union-attr]
    assert cr.match(req("/api/v2/x")).name == "b"  # type: ignore[union-attr]
    assert cr.match(req("/web/v2/x")).name == "glob"  # type: ignore[union-attr]


def test_weight_zero_always_falls_through() -> None:
    cr = CompiledRules([rule("canary", weight=0), rule("main")])
    for i in range(100):
        m = cr.match(req(client_ip=f"10.0.0.{i}"))
        assert m is not None and m.name == "main"


def test_weight_100_and_none_always_take() -> None:
    for weight in (100, None):
        cr = CompiledRules([rule("r", weight=weight)])
        assert all(cr.match(req(client_ip=f"10.0.0.{i}")) for i in range(100))


def test_weight_falls_through_to_later_rules_then_the_lb() -> None:
    cr = CompiledRules(
        [
            rule("canary", path="/api/*", weight=10),
            rule("beta", path="/api/*", weight=50),
        ]
    )
    counts = {"canary": 0, "beta": 0, None: 0}
    canary, beta = Split("canary", 10), Split("beta", 50)
    n = 20_000
    for i in range(n):
        client = f"10.{i >> 8 & 255}.{i & 255}.7"
        m = cr.match(req("/api/x", client_ip=client))
        name = m.name if m is not None else None
        counts[name] += 1
        # exactly what the splits say, request by request
        expected = (
            "canary" if canary.takes_key(client) else "beta" if beta.takes_key(client) else None
        )
        assert name == expected
    assert abs(counts["canary"] / n - 0.10) < 0.01
    assert abs(counts["beta"] / n - 0.45) < 0.015  # half of the remaining 90 %
    assert abs(counts[None] / n - 0.45) < 0.015


def test_weight_split_is_sticky_per_client() -> None:
    cr = CompiledRules([rule("canary", weight=30), rule("main")])
    for i in range(50):
        client = f"10.1.1.{i}"
        names = {cr.match(req(f"/p{j}", client_ip=client)).name for j in range(5)}  # type: ignore[union-attr]
        assert len(names) == 1


def test_split_key_cookie_with_ip_fallback() -> None:
    cr = CompiledRules([rule("canary", weight=50, split_key="cookie:uid"), rule("main")])
    split = Split("canary", 50)
    user = [(b"cookie", b"uid=alice")]
    first = cr.match(req(headers=user, client_ip="10.0.0.1"))
    assert all(cr.match(req(headers=user, client_ip=f"10.0.0.{i}")) is first for i in range(50))
    # without the cookie, the client IP decides
    for i in range(50):
        client = f"10.0.1.{i}"
        m = cr.match(req(client_ip=client))
        assert (m is not None and m.name == "canary") is split.takes_key(client)


# --------------------------------------------------------- compiled extras


def test_match_carries_prebuilt_policies() -> None:
    r = rule(
        "api",
        path="/api/*",
        targets=[],
        sticky_session=StickySession(cookie="sid", ttl="10m"),
        access=Access(deny=["10.0.0.0/8"]),
        rate_limit=RateLimit(limit=5),
        weight=40,
    )
    cr = CompiledRules({"api": r})
    m = cr.matches[0]
    assert m.rule is r and m.index == 0 and m.name == "api"
    assert m.sticky is not None and (m.sticky.cookie, m.sticky.ttl) == ("sid", 600.0)
    assert m.access is not None and not m.access.allows("10.1.1.1")
    assert m.split is not None and m.split.weight == 40
    # the same object every time: no allocation per request
    hits = [cr.match(req("/api/x", client_ip=f"10.0.0.{i}")) for i in range(200)]
    taken = [h for h in hits if h is not None]
    assert 40 < len(taken) < 120  # weight 40 of 200 clients
    assert all(h is m for h in taken)


def test_sticky_sessions_off_for_the_load_balancer() -> None:
    lb = LoadBalancer(
        name="lb",
        sticky_sessions=False,
        rules={"api": {"path": "/api/*", "sticky_session": {"cookie": "sid"}}},
    )
    cr = CompiledRules.for_load_balancer(lb)
    m = cr.match(req("/api/x"))
    assert m is not None and m.name == "api" and m.sticky is None
    lb_on = LoadBalancer(
        name="lb", rules={"api": {"path": "/api/*", "sticky_session": {"cookie": "sid"}}}
    )
    m = CompiledRules.for_load_balancer(lb_on).match(req("/api/x"))
    assert m is not None and m.sticky is not None and m.sticky.key("s") == "api:s"


def test_compiled_rules_are_immutable() -> None:
    cr = CompiledRules([rule("a")])
    with pytest.raises(AttributeError):
        cr.rules = ()
    with pytest.raises(AttributeError):
        cr.matches[0].name = "b"
    assert isinstance(cr.matches, tuple) and isinstance(cr.rules, tuple)
    assert len(cr) == 1 and "a" in repr(cr)


def test_empty_rule_set() -> None:
    cr = CompiledRules()
    assert cr.match(req("/x")) is None
    assert len(cr) == 0


# ------------------------------------------------------------------ index


def test_index_limits_candidates() -> None:
    rules = [rule(f"svc{i}", path=f"/svc{i}/*") for i in range(500)]
    rules += [rule("hdr", header=ValueMatch(name="X-A")), rule("glob", path="/*.php")]
    cr = CompiledRules(rules)
    names = [m.name for m in cr.candidates("/svc42/x/y")]
    assert names == ["svc42", "hdr", "glob"]
    assert [m.name for m in cr.candidates("/unknown")] == ["hdr", "glob"]
    m = cr.match(req("/svc42/x"))
    assert m is not None and m.name == "svc42"


def test_index_nested_prefixes() -> None:
    cr = CompiledRules(
        [
            rule("deep", path="/a/b/c/*"),
            rule("exact", path="/a/b"),
            rule("mid", path="/a/*"),
        ]
    )
    assert [m.name for m in cr.candidates("/a/b/c/d")] == ["deep", "exact", "mid"]
    assert [m.name for m in cr.candidates("/a/b")] == ["exact", "mid"]
    assert [m.name for m in cr.candidates("/a/x")] == ["mid"]
    assert cr.match(req("/a/b")).name == "exact"  # type: ignore[union-attr]
    assert cr.match(req("/a/b/c/d")).name == "deep"  # type: ignore[union-attr]
    assert cr.match(req("/a/b/x")).name == "mid"  # type: ignore[union-attr]


# A reference matcher: a plain linear scan with its own glob translation.
def reference_match(rules: list[Rule], request: RequestView) -> str | None:
    for r in rules:
        if r.path is not None:
            pattern = "".join(
                ".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in r.path
            )
            if not re.fullmatch(pattern, request.path, re.DOTALL):
                continue
        if r.method != "any" and request.method.decode() not in (
            r.method if isinstance(r.method, list) else [r.method]
        ):
            continue
        return r.name
    return None


segment = st.sampled_from(["a", "b", "api", "v2", "x.y", ""])
glob_part = st.sampled_from(["a", "b", "api", "v2", "x.y", "*", "?", "", "a*", "?b"])


@st.composite
def globs(draw: st.DrawFn) -> str:
    parts = draw(st.lists(glob_part, min_size=1, max_size=4))
    return "/" + "/".join(parts)


@st.composite
def paths(draw: st.DrawFn) -> str:
    return "/" + "/".join(draw(st.lists(segment, min_size=0, max_size=5)))


@given(
    rule_specs=st.lists(
        st.tuples(st.one_of(st.none(), globs()), st.sampled_from(["any", ["GET"], ["POST"]])),
        max_size=12,
    ),
    probes=st.lists(st.tuples(paths(), st.sampled_from(["GET", "POST"])), min_size=1, max_size=8),
)
@settings(max_examples=300, deadline=None)
def test_index_agrees_with_a_linear_scan(
    rule_specs: list[tuple[str | None, Any]], probes: list[tuple[str, str]]
) -> None:
    rules = [rule(f"r{i}", path=p, method=m) for i, (p, m) in enumerate(rule_specs)]
    cr = CompiledRules(rules)
    for path, method in probes:
        request = req(path, method)
        m = cr.match(request)
        assert (m.name if m is not None else None) == reference_match(rules, request)
