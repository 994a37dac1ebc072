"""LbRuntime built from configs: per-rule groups, what survives a rebuild
(targets, rate-limit windows, pins, counters), and the client address."""

from __future__ import annotations

from typing import Any

import pytest

from lbnode.policy.balancing import ConsistentHash, LeastConnections, RoundRobin
from lbnode.policy.request import RequestView
from lbnode.runtime import LbRuntime, PoolRegistry, TargetState
from lbshared.config import LoadBalancer, parse_config

TARGETS = [
    {"id": "a", "address": "127.0.0.1:9101"},
    {"id": "b", "address": "127.0.0.1:9102"},
    {"id": "c", "address": "127.0.0.1:9103"},
]


def lb(**kw: Any) -> LoadBalancer:
    data: dict[str, Any] = {"name": "web", "targets": TARGETS}
    data.update(kw)
    return parse_config({"load_balancers": [data]}).load_balancers[0]


def build(
    cfg: LoadBalancer, previous: LbRuntime | None = None, pools: PoolRegistry | None = None
) -> LbRuntime:
    return LbRuntime(
        cfg, pools or PoolRegistry(), previous, version=(previous.version + 1) if previous else 1
    )


def view(
    path: str = "/", headers: list[tuple[bytes, bytes]] | None = None, client_ip: str = "192.0.2.1"
) -> RequestView:
    return RequestView(b"GET", path.encode(), headers or [], client_ip)


def ids(targets: list[TargetState]) -> list[str]:
    return [t.id for t in targets]


# -- target groups -------------------------------------------------------------------------


def test_each_rule_gets_its_own_group_over_its_targets() -> None:
    rt = build(
        lb(
            algorithm="round_robin",
            rules={
                "two": {"path": "/two/*", "targets": ["a", "c"]},
                "all": {"path": "/all/*"},
                "hashed": {
                    "path": "/h/*",
                    "targets": ["b", "c"],
                    "algorithm": "consistent_hash",
                    "hash_key": "header:X-User",
                },
                "least": {"path": "/l/*", "targets": ["b"], "algorithm": "least_connections"},
            },
        )
    )
    assert [m.name for m in rt.rules.matches] == ["two", "all", "hashed", "least"]
    groups = [rt.rule_groups[m.index] for m in rt.rules.matches]
    assert [ids(g.targets) for g in groups] == [["a", "c"], ["a", "b", "c"], ["b", "c"], ["b"]]
    # A rule's group holds the runtime's own TargetState objects (one in-flight count each).
    assert groups[0].targets[1] is rt.by_id["c"]
    assert [type(g.algorithm) for g in groups] == [
        RoundRobin,
        RoundRobin,
        ConsistentHash,
        LeastConnections,
    ]
    assert groups[0].key_spec is None
    assert groups[2].key_spec is not None and str(groups[2].key_spec) == "header:X-User"
    # Every group has its own algorithm state: rotating one does not move another.
    assert groups[0].algorithm is not groups[1].algorithm is not rt.default_group.algorithm
    assert ids(rt.default_group.targets) == ["a", "b", "c"]
    assert type(rt.default_group.algorithm) is RoundRobin


def test_rule_hash_key_falls_back_to_the_load_balancers() -> None:
    rt = build(
        lb(
            hash_key="cookie:uid",
            rules={"h": {"targets": ["a", "b"], "algorithm": "consistent_hash"}},
        )
    )
    assert str(rt.rule_groups[0].key_spec) == "cookie:uid"


def test_group_pick_skips_unhealthy_and_excluded_targets() -> None:
    rt = build(lb(rules={"r": {"path": "/r/*", "targets": ["a", "b"]}}))
    group = rt.rule_groups[0]
    picked = [group.pick(view("/r/x")) for _ in range(4)]
    assert ids([t for t in picked if t is not None]) == ["a", "b", "a", "b"]
    rt.by_id["a"].healthy = False
    assert ids([group.pick(view("/r/x")) for _ in range(3)]) == ["b", "b", "b"]  # type: ignore[misc]
    assert group.pick(view("/r/x"), exclude=rt.by_id["b"]) is None
    rt.by_id["a"].healthy = True
    assert group.pick(view("/r/x"), exclude=rt.by_id["b"]) is rt.by_id["a"]


def test_consistent_hash_group_uses_the_rule_key() -> None:
    rt = build(
        lb(
            rules={
                "h": {
                    "targets": ["a", "b", "c"],
                    "algorithm": "consistent_hash",
                    "hash_key": "header:X-User",
                }
            }
        )
    )
    group = rt.rule_groups[0]
    for user in ("u1", "u2", "u3", "u4"):
        picks = {group.pick(view(headers=[(b"x-user", user.encode())])) for _ in range(5)}
        assert len(picks) == 1, user


# -- what a rebuild keeps ----------------------------------------------------------------------


def test_targets_are_carried_over_by_id_and_address() -> None:
    pools = PoolRegistry()
    old = build(lb(), pools=pools)
    old.by_id["a"].active = 3
    moved = [
        dict(TARGETS[0]),
        {**TARGETS[1], "address": "127.0.0.1:9999"},
        {**TARGETS[2], "weight": 7},
    ]
    new = build(lb(targets=moved), old, pools)
    assert new.by_id["a"] is old.by_id["a"] and new.by_id["a"].active == 3
    assert new.by_id["b"] is not old.by_id["b"]  # a new address is a new target
    assert new.by_id["b"].pool is not old.by_id["b"].pool
    assert new.by_id["c"] is old.by_id["c"] and new.by_id["c"].weight == 7
    # Pools are shared by address: the same address in another runtime gets the same pool.
    again = build(lb(name="other"), None, pools)
    assert again.by_id["a"].pool is old.by_id["a"].pool


def admit(rt: LbRuntime, n: int, now: float, path: str = "/") -> list[bool]:
    out = []
    for _ in range(n):
        match = rt.rules.match(view(path)) if rt.has_rules else None
        limiter = rt.rule_limiters.get(match.index, rt.limiter) if match else rt.limiter
        assert limiter is not None
        out.append(limiter.check_request(view(path), now).allowed)
    return out


LIMIT = {"limit": 3, "interval": "60s"}


@pytest.mark.parametrize(
    ("change", "kept"),
    [
        ({}, True),  # same config rebuilt (a reload)
        ({"targets": TARGETS[:2]}, True),  # something else changed
        ({"rules": {"x": {"path": "/x/*"}}}, True),
        ({"rate_limit": {**LIMIT, "limit": 4}}, False),  # the limit itself changed
        ({"rate_limit": {**LIMIT, "interval": "30s"}}, False),
        ({"rate_limit": {**LIMIT, "key": "header:X-Key"}}, False),
    ],
)
def test_lb_limiter_is_carried_over_only_when_its_config_is_unchanged(
    change: dict[str, Any], kept: bool
) -> None:
    old = build(lb(rate_limit=LIMIT))
    assert admit(old, 4, 100.0) == [True, True, True, False]
    new = build(lb(**{"rate_limit": LIMIT, **change}), old)
    assert (new.limiter is old.limiter) is kept
    if kept:
        assert admit(new, 1, 101.0) == [False]  # the window came along
    else:
        assert admit(new, 1, 101.0) == [True]  # a fresh window


def test_rule_limiter_is_carried_over_by_rule_name() -> None:
    rules = {"tight": {"path": "/t/*", "rate_limit": {"limit": 2, "interval": "60s"}}}
    old = build(lb(rate_limit={"limit": 100}, rules=rules))
    assert admit(old, 3, 10.0, "/t/x") == [True, True, False]
    assert old.limiter is not None and old.rule_limiters[0] is not old.limiter
    # Another rule inserted before it: its index moves, its name does not.
    moved = {"first": {"path": "/f/*"}, **rules}
    new = build(lb(rate_limit={"limit": 100}, rules=moved), old)
    assert new.rule_limiters[1] is old.rule_limiters[0]
    assert admit(new, 1, 11.0, "/t/x") == [False]
    assert new.limiter is old.limiter
    # Renamed: a different rule, a fresh window.
    renamed = build(lb(rate_limit={"limit": 100}, rules={"other": rules["tight"]}), new)
    assert admit(renamed, 1, 12.0, "/t/x") == [True]
    # A disabled limit builds no limiter at all.
    off = build(lb(rate_limit={"limit": 1, "enabled": False}))
    assert off.limiter is None


def test_pins_and_counters_survive_rebuilds() -> None:
    sticky = {"cookie": "sid", "ttl": "1h"}
    old = build(
        lb(rules={"app": {"path": "/app/*", "targets": ["a", "b"], "sticky_session": sticky}})
    )
    old.pins.local.pin_if_absent("app:s1", "a", 3600.0, 0.0)
    old.count("sticky_repin", "app")
    old.count("access_denied", None)
    new = build(
        lb(
            targets=TARGETS[:2],
            rules={"app": {"path": "/app/*", "targets": ["b"], "sticky_session": sticky}},
        ),
        old,
    )
    assert new.pins is old.pins and new.pins.local.get("app:s1", 1.0) == "a"
    new.count("sticky_repin", "app")
    assert new.counters == {("sticky_repin", "app"): 2, ("access_denied", ""): 1}
    fresh = build(lb())
    assert fresh.counters == {} and fresh.pins.local.get("app:s1", 1.0) is None


@pytest.mark.parametrize(
    ("lb_kw", "lb_sticky", "rule_sticky"),
    [
        ({}, False, True),
        ({"sticky_session": {"cookie": "sid"}}, True, True),
        ({"sticky_session": {"cookie": "sid"}, "sticky_sessions": False}, False, False),
        ({"sticky_sessions": False}, False, False),
    ],
)
def test_sticky_policies_follow_sticky_sessions(
    lb_kw: dict[str, Any], lb_sticky: bool, rule_sticky: bool
) -> None:
    rt = build(
        lb(rules={"app": {"sticky_session": {"cookie": "session_id", "ttl": "10m"}}}, **lb_kw)
    )
    assert (rt.sticky is not None) is lb_sticky
    match = rt.rules.matches[0]
    assert (match.sticky is not None) is rule_sticky
    if match.sticky is not None:
        assert (match.sticky.cookie, match.sticky.ttl, match.sticky.key("s")) == (
            "session_id",
            600.0,
            "app:s",
        )
    if rt.sticky is not None:
        assert rt.sticky.key("s") == ":s"


def test_access_policies_of_the_lb_and_its_rules() -> None:
    rt = build(
        lb(
            access={"allow": ["10.0.0.0/8"], "deny": ["10.1.0.0/16"]},
            rules={"r": {"access": {"deny": ["192.0.2.0/24"]}}},
        )
    )
    assert rt.access is not None
    assert [rt.access.allows(ip) for ip in ("10.2.3.4", "10.1.2.3", "192.0.2.1")] == [
        True,
        False,
        False,
    ]
    rule_access = rt.rules.matches[0].access
    assert rule_access is not None
    assert [rule_access.allows(ip) for ip in ("10.2.3.4", "192.0.2.1")] == [True, False]
    assert build(lb()).access is None


# -- the client address --------------------------------------------------------------------------

XFF = b"x-forwarded-for"

CLIENT_IP = [
    # trusted_proxies, peer, X-Forwarded-For values, expected client
    ([], "127.0.0.1", [b"203.0.113.5"], "127.0.0.1"),  # nobody is trusted
    (["127.0.0.1/32"], "127.0.0.1", [], "127.0.0.1"),  # no header
    (["127.0.0.1/32"], "127.0.0.1", [b"203.0.113.5"], "203.0.113.5"),
    (["127.0.0.1/32"], "192.0.2.9", [b"203.0.113.5"], "192.0.2.9"),  # spoof from an untrusted peer
    # right-most untrusted: the left entries were written by the client itself
    (["127.0.0.1/32"], "127.0.0.1", [b"198.51.100.1, 203.0.113.5"], "203.0.113.5"),
    (
        ["127.0.0.1/32", "10.0.0.0/8"],
        "127.0.0.1",
        [b"198.51.100.1, 203.0.113.5, 10.0.0.7"],
        "203.0.113.5",
    ),
    (
        ["127.0.0.1/32", "10.0.0.0/8"],
        "127.0.0.1",
        [b"198.51.100.1", b"203.0.113.5, 10.0.0.7"],
        "203.0.113.5",
    ),
    (
        ["127.0.0.1/32", "10.0.0.0/8"],
        "127.0.0.1",
        [b"10.0.0.1, 10.0.0.7"],
        "10.0.0.1",
    ),  # all trusted
    (["127.0.0.1/32"], "127.0.0.1", [b"garbage, 203.0.113.5"], "203.0.113.5"),
    (["127.0.0.1/32"], "127.0.0.1", [b"203.0.113.5, garbage"], "127.0.0.1"),
    (["::1/128"], "::1", [b"[2001:db8::7]:443"], "2001:db8::7"),
]


@pytest.mark.parametrize(("trusted", "peer", "xff", "expected"), CLIENT_IP)
def test_client_ip(trusted: list[str], peer: str, xff: list[bytes], expected: str) -> None:
    rt = build(lb(trusted_proxies=trusted))
    headers = [(b"host", b"x")] + [(XFF, v) for v in xff] + [(b"accept", b"*/*")]
    assert rt.client_ip(peer, headers) == expected


@pytest.mark.parametrize(
    ("trusted", "peer", "believed"),
    [
        ([], "192.0.2.1", True),  # no trusted_proxies: the listener's setting is the trust
        (["10.0.0.0/8"], "10.1.2.3", True),
        (["10.0.0.0/8"], "192.0.2.1", False),
        (["10.0.0.0/8"], "::ffff:10.1.2.3", True),  # v4-mapped peer of a dual-stack socket
        (["10.0.0.0/8"], "not-an-ip", False),
    ],
)
def test_believes_proxy_header(trusted: list[str], peer: str, believed: bool) -> None:
    assert build(lb(trusted_proxies=trusted)).believes_proxy_header(peer) is believed


def test_count_keys_by_kind_and_rule() -> None:
    rt = build(lb())
    for kind, rule in [
        ("rate_limited", None),
        ("rate_limited", None),
        ("rate_limited", "r"),
        ("access_denied", ""),
    ]:
        rt.count(kind, rule)
    assert rt.counters == {
        ("rate_limited", ""): 2,
        ("rate_limited", "r"): 1,
        ("access_denied", ""): 1,
    }
