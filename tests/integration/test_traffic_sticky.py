"""Sticky sessions through a running node: a session is learned from the
application's ``Set-Cookie`` and followed; a pin to a target that left the
rule's set (SIGHUP reload) is re-pinned and counted in ``/status``;
``sticky_sessions: false`` turns it off; a load-balancer-level block covers
requests no rule takes; and the TTL slides with use (in-process node, clock
passed in)."""

from __future__ import annotations

import copy
import signal
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import yaml

import lbnode.proxy
from lbnode.api import HttpRequest
from lbnode.demo_backend import serve_backend
from lbnode.node import Node as InProcessNode
from lbnode.node import NodeOptions
from lbshared.config import parse_config

from .conftest import Backend, Launcher, Node, RawClient, wait_for

STICKY = {"cookie": "session_id", "ttl": "1h"}


def counters(node: Node, lb: str) -> dict[tuple[str, str], int]:
    for entry in node.status()["load_balancers"]:
        if entry["name"] == lb:
            return {(c["kind"], c["rule"]): c["count"] for c in entry["counters"]}
    raise KeyError(lb)


class Env:
    def __init__(self, node: Node, backends: dict[str, Backend], config: dict[str, Any]) -> None:
        self.node = node
        self.backends = backends
        self.config = config  # as written to the node's file (ports assigned)

    def port(self, lb: str) -> int:
        return self.node.ports[lb][0]

    def reload(self, change: Any) -> None:
        """Edit the config file with ``change(config)``, SIGHUP, wait for the new version."""
        before = self.node.healthz()[1]["config_version"]
        change(self.config)
        self.node.write_config(self.config)
        self.node.signal(signal.SIGHUP)
        wait_for(lambda: self.node.healthz()[1]["config_version"] > before, 10.0, "the reload")


@pytest.fixture(scope="module")
def env(module_launcher: Launcher) -> Env:
    backends = {b: module_launcher.backend(b) for b in ("s1", "s2", "s3")}
    targets = [{"id": b, "address": be.address} for b, be in backends.items()]
    app_rule = {"path": "/app/*", "targets": ["s1", "s2", "s3"], "sticky_session": STICKY}
    config: dict[str, Any] = {
        "load_balancers": [
            {
                "name": "app",
                "listeners": [{"port": 0}],
                "targets": targets,
                "rules": {"app": app_rule},
            },
            {
                "name": "repin",
                "listeners": [{"port": 0}],
                "targets": targets,
                "rules": {"app": copy.deepcopy(app_rule)},
            },
            {
                "name": "off",
                "listeners": [{"port": 0}],
                "targets": targets[:2],
                "sticky_sessions": False,
                "sticky_session": STICKY,
                "rules": {"app": {**app_rule, "targets": ["s1", "s2"]}},
            },
            {
                "name": "lbwide",
                "listeners": [{"port": 0}],
                "targets": targets,
                "sticky_session": {"cookie": "sid", "ttl": "10m"},
                "rules": {"plain": {"path": "/plain/*", "targets": ["s1", "s2"]}},
            },
        ]
    }
    node = module_launcher.node(config)
    # The file as the node read it (spawn_node gave the listeners free ports).
    written = yaml.safe_load(node.config_path.read_text())
    return Env(node, backends, written)


def learn(c: RawClient, prefix: str, session: str, cookie: str = "session_id") -> str:
    resp = c.get(f"{prefix}/set-cookie?name={cookie}&value={session}")
    assert resp.status == 200
    assert resp.header("set-cookie") == f"{cookie}={session}; Path=/"
    backend = resp.header("x-backend")
    assert backend is not None
    return backend


def follow(
    c: RawClient, path: str, session: str, n: int = 4, cookie: str = "session_id"
) -> list[str | None]:
    return [
        c.get(path, [("Cookie", f"lang=en; {cookie}={session}")]).header("x-backend")
        for _ in range(n)
    ]


def test_session_learned_from_set_cookie_then_followed(env: Env) -> None:
    with RawClient(env.port("app")) as c:
        owners = {s: learn(c, "/app", s) for s in ("a1", "a2", "a3")}
        # Learning requests carry no cookie: they are balanced (round robin).
        assert sorted(owners.values()) == ["s1", "s2", "s3"]
        for s, owner in owners.items():
            assert follow(c, "/app/cart", s) == [owner] * 4
        # Without the cookie: balanced again.
        free = [c.get("/app/cart").header("x-backend") for _ in range(3)]
        assert sorted(free) == ["s1", "s2", "s3"]  # type: ignore[type-var]
        # A session the application never set: pinned to where it first went.
        first = c.get("/app/x", [("Cookie", "session_id=unknown-1")]).header("x-backend")
        assert follow(c, "/app/y", "unknown-1") == [first] * 4
        # Outside the rule (no sticky block for the LB itself): the cookie means nothing.
        seen = follow(c, "/elsewhere", "a1", n=6)
        assert len(set(seen)) == 3
    assert counters(env.node, "app").get(("sticky_repin", "app"), 0) == 0


def test_pin_to_a_removed_target_is_repinned_and_counted(env: Env) -> None:
    with RawClient(env.port("repin")) as c:
        first = learn(c, "/app", "r1")
        assert follow(c, "/app/x", "r1") == [first] * 4
    assert counters(env.node, "repin").get(("sticky_repin", "app"), 0) == 0

    def drop_from_rule(cfg: dict[str, Any]) -> None:
        lb = next(x for x in cfg["load_balancers"] if x["name"] == "repin")
        lb["rules"]["app"]["targets"].remove(first)

    # 1. Still a target of the LB, no longer of the rule's set.
    env.reload(drop_from_rule)
    with RawClient(env.port("repin")) as c:  # the listener was kept; a new connection anyway
        second = c.get("/app/x", [("Cookie", "session_id=r1")]).header("x-backend")
        assert second is not None and second != first
        assert follow(c, "/app/x", "r1") == [second] * 4  # re-pinned, then followed
    assert counters(env.node, "repin")[("sticky_repin", "app")] == 1

    def remove_target(cfg: dict[str, Any]) -> None:
        lb = next(x for x in cfg["load_balancers"] if x["name"] == "repin")
        lb["targets"] = [t for t in lb["targets"] if t["id"] != second]
        lb["rules"]["app"]["targets"].remove(second)

    # 2. Gone from the load balancer altogether.
    env.reload(remove_target)
    with RawClient(env.port("repin")) as c:
        third = follow(c, "/app/x", "r1", n=5)
        assert len(set(third)) == 1 and third[0] not in (first, second)
    assert counters(env.node, "repin")[("sticky_repin", "app")] == 2
    # Other load balancers' pins survived both reloads.
    with RawClient(env.port("app")) as c:
        owner = learn(c, "/app", "survivor")
    env.reload(lambda cfg: None)
    with RawClient(env.port("app")) as c:
        assert follow(c, "/app/x", "survivor") == [owner] * 4


def test_sticky_sessions_false_turns_every_block_off(env: Env) -> None:
    with RawClient(env.port("off")) as c:
        resp = c.get("/app/set-cookie?name=session_id&value=o1")
        assert resp.header("set-cookie") == "session_id=o1; Path=/"  # passed through untouched
        for path in ("/app/x", "/other"):  # the rule's block and the LB's block
            seen = follow(c, path, "o1", n=6)
            assert Counter(seen) == {"s1": 3, "s2": 3}
    assert counters(env.node, "off") == {}


def test_lb_level_sticky_session_for_requests_no_rule_takes(env: Env) -> None:
    with RawClient(env.port("lbwide")) as c:
        owners = {s: learn(c, "", s, cookie="sid") for s in ("w1", "w2", "w3")}
        assert sorted(owners.values()) == ["s1", "s2", "s3"]
        for s, owner in owners.items():
            assert follow(c, "/page", s, cookie="sid") == [owner] * 4
        # A rule without its own block is not sticky: the LB's block is for unmatched requests.
        seen = follow(c, "/plain/x", "w1", n=4, cookie="sid")
        assert Counter(seen) == {"s1": 2, "s2": 2}
        # The application's cookie name only: another cookie of the same value does nothing.
        assert len(set(follow(c, "/page", "w1", n=6, cookie="session_id"))) == 3


# -- TTL, with the clock passed in (in-process node) -------------------------------------------


class FakeTime:
    """Stands in for the ``time`` module inside lbnode.proxy."""

    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now


@pytest.fixture
async def inproc(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[InProcessNode, FakeTime]]:
    clock = FakeTime(1000.0)
    monkeypatch.setattr(lbnode.proxy, "time", clock)
    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(serve_backend, "127.0.0.1", 0, name) for name in ("t1", "t2")]
        config = parse_config(
            {
                "load_balancers": [
                    {
                        "name": "ttl",
                        "targets": [
                            {"id": f"t{i + 1}", "address": f"127.0.0.1:{p}"}
                            for i, p in enumerate(ports)
                        ],
                        "rules": {"app": {"path": "/app/*", "sticky_session": STICKY}},
                    }
                ]
            }
        )
        node = InProcessNode(config, NodeOptions(admin=None, access_log="off"))
        async with trio.open_nursery() as inner:
            await inner.start(node.run)
            yield node, clock
            node.stop()  # run() drains and closes its pooled connections, then returns
        nursery.cancel_scope.cancel()


async def test_ttl_slides_with_use_and_an_idle_session_expires(
    inproc: tuple[InProcessNode, FakeTime],
) -> None:
    node, clock = inproc

    async def get(path: str, session: str | None = None) -> str | None:
        headers = [("Cookie", f"session_id={session}")] if session else []
        with trio.fail_after(10):
            resp = await node.route(HttpRequest(path=path, headers=headers))
        assert resp.status == 200
        return resp.header("x-backend")

    owner = await get("/app/set-cookie?name=session_id&value=ttl1")
    other = "t2" if owner == "t1" else "t1"
    key = "app:ttl1"
    pins = node.runtimes["ttl"].pins.local  # the in-process store behind the async one
    assert pins.get(key, clock.now) == owner
    clock.now += 50 * 60
    assert await get("/app/x", "ttl1") == owner
    # 100 minutes after the pin, 50 after its last use: alive only because use refreshed it.
    clock.now += 50 * 60
    assert await get("/app/x", "ttl1") == owner
    assert pins.get(key, clock.now + 3599) == owner
    # Idle for longer than the TTL: the pin is gone; the next request is balanced
    # (round robin moves on to the other target) and pins the session there.
    clock.now += 3601
    assert await get("/app/x", "ttl1") == other
    assert await get("/app/x", "ttl1") == other
    assert node.status()["load_balancers"][0]["counters"] == []  # expiry is not a re-pin
