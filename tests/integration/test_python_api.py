"""The Python API on an in-process node: route(), set_rules/get_rules
(atomic for requests in flight), add_target/remove_target, the manager
(register, deregister, list, get), and refused changes that change nothing.

The node and the demo backends run in the test's trio run; requests go
through the real data path over in-memory streams (``route``) and real
sockets to the backends.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest
import trio
import trio.lowlevel

from lbnode.api import HttpRequest, HttpResponse, UnknownLoadBalancer
from lbnode.demo_backend import BackendState, serve_backend
from lbnode.node import Node, NodeOptions
from lbshared.config import (
    ConfigError,
    LoadBalancer,
    RateLimit,
    Rule,
    StickySession,
    Target,
    parse_config,
)

DEADLINE = 10.0  # any single API call or request


class World:
    def __init__(
        self, node: Node, addresses: dict[str, str], states: dict[str, BackendState]
    ) -> None:
        self.node = node
        self.addresses = addresses
        self.states = states

    def target(self, backend: str, target_id: str | None = None) -> dict[str, Any]:
        return {"id": target_id or backend, "address": self.addresses[backend]}

    async def get(self, path: str = "/", lb: str = "api", **kw: Any) -> HttpResponse:
        with trio.fail_after(DEADLINE):
            return await self.node.route(HttpRequest(path=path, **kw), lb)

    async def backends(
        self, n: int, path: str = "/", lb: str = "api", **kw: Any
    ) -> list[str | None]:
        out = []
        for _ in range(n):
            resp = await self.get(path, lb, **kw)
            assert resp.status == 200, resp
            out.append(resp.header("x-backend"))
        return out


@pytest.fixture
async def world() -> AsyncIterator[World]:
    states = {b: BackendState(b) for b in ("a", "b", "c")}
    async with trio.open_nursery() as backends:
        addresses = {}
        for b, state in states.items():
            port = await backends.start(partial(serve_backend, "127.0.0.1", 0, b, state=state))
            addresses[b] = f"127.0.0.1:{port}"
        config = parse_config(
            {
                "load_balancers": [
                    {
                        "name": "api",
                        "targets": [
                            {"id": "a", "address": addresses["a"]},
                            {"id": "b", "address": addresses["b"]},
                        ],
                    },
                    {"name": "other", "targets": [{"id": "c", "address": addresses["c"]}]},
                ]
            }
        )
        node = Node(config, NodeOptions(admin=None, access_log="off"))
        async with trio.open_nursery() as nodes:
            await nodes.start(node.run)
            yield World(node, addresses, states)
            node.stop()  # drains, closes pooled connections, returns
        backends.cancel_scope.cancel()


# -- route() ----------------------------------------------------------------------------------


async def test_route_goes_through_the_data_path(world: World) -> None:
    assert Counter(await world.backends(4)) == {"a": 2, "b": 2}
    resp = await world.get("/headers", headers={"X-Trace": "t1"}, client_ip="192.0.2.7")
    doc = resp.json()
    assert resp.status == 200 and doc["method"] == "GET"
    sent = {k.lower(): v for k, v in doc["headers"]}
    assert sent["x-trace"] == "t1" and sent["x-forwarded-for"] == "192.0.2.7"
    assert sent["host"] == "api"  # the load balancer's name stands in for a missing Host
    with trio.fail_after(DEADLINE):
        echo = await world.node.lb("api").route(HttpRequest("POST", "/echo", body=b"x" * 100_000))
    assert echo.status == 200 and echo.body == b"x" * 100_000
    assert (await world.get("/status/503")).status == 503  # upstream statuses pass through
    assert (await world.get("/", lb="other")).header("x-backend") == "c"


async def test_route_names_the_load_balancer(world: World) -> None:
    with pytest.raises(UnknownLoadBalancer, match="unknown load balancer 'nope'"):
        await world.node.route(HttpRequest(), "nope")
    with pytest.raises(ValueError, match="name the load balancer"):
        await world.node.route(HttpRequest())  # two are served
    await world.node.manager.deregister("other")
    with trio.fail_after(DEADLINE):
        assert (await world.node.route(HttpRequest())).status == 200  # now only one


# -- set_rules / get_rules ------------------------------------------------------------------------


async def test_set_rules_replaces_rules_in_order(world: World) -> None:
    api = world.node.lb("api")
    assert await api.get_rules() == []
    version = world.node.config_version
    await api.set_rules(
        [
            Rule(name="to_b", path="/b/*", targets=["b"]),
            {"name": "office", "client_cidr": ["10.9.0.0/16"], "targets": ["a"]},
            {
                "name": "canary_hdr",
                "header": {"name": "X-Canary", "value": "true"},
                "targets": ["b"],
                "weight": 100,
            },
        ]
    )
    assert world.node.config_version == version + 1  # one atomic change
    rules = await api.get_rules()
    assert [r.name for r in rules] == ["to_b", "office", "canary_hdr"]
    assert all(isinstance(r, Rule) for r in rules)
    assert rules[0].path == "/b/*" and rules[2].weight == 100
    assert await world.backends(3, "/b/x") == ["b"] * 3
    assert await world.backends(3, "/", client_ip="10.9.1.1") == ["a"] * 3
    assert await world.backends(3, "/", headers={"X-Canary": "true"}) == ["b"] * 3
    # A new list replaces the old one, whole.
    await api.set_rules([{"name": "only", "path": "/b/*", "targets": ["a"]}])
    assert [r.name for r in await api.get_rules()] == ["only"]
    assert await world.backends(2, "/b/x") == ["a", "a"]
    assert sorted(await world.backends(2, "/", client_ip="10.9.1.1")) == ["a", "b"]  # type: ignore[type-var]
    await api.set_rules([])
    assert await api.get_rules() == []
    # get() on the manager shows the same rules as the handle.
    assert (await world.node.manager.get("api")).rules == {}


SET_A = [
    Rule(name="r", path="/p/*", targets=["a"], rate_limit=RateLimit(limit=100_000)),
    Rule(name="s", path="/q/*", targets=["b"]),
]
SET_B = [
    Rule(name="s", path="/q/*", targets=["a"]),
    Rule(name="r", path="/p/*", targets=["b"], rate_limit=RateLimit(limit=200_000)),
]
# What one request to /p/... sees under each set: (target, RateLimit-Limit).
VIEW_A = ("a", "100000")
VIEW_B = ("b", "200000")


async def test_requests_in_flight_see_the_old_or_the_new_rules_never_a_mix(world: World) -> None:
    api = world.node.lb("api")
    await api.set_rules(SET_A)
    seen: Counter[tuple[str | None, str | None]] = Counter()
    rule_views: Counter[tuple[str, ...]] = Counter()
    flips_done = trio.Event()

    async def flipper() -> None:
        for i in range(40):
            await api.set_rules(SET_B if i % 2 == 0 else SET_A)
            rule_views[tuple(f"{r.name}:{r.targets[0]}" for r in await api.get_rules())] += 1
            await trio.lowlevel.checkpoint()
        flips_done.set()

    async def client() -> None:
        for _ in range(400):  # bounded; normally stops when the flips are done
            resp = await world.get("/p/x")
            assert resp.status == 200
            seen[(resp.header("x-backend"), resp.header("ratelimit-limit"))] += 1
            if flips_done.is_set():
                return

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flipper)
            for _ in range(4):
                nursery.start_soon(client)
    assert set(seen) <= {VIEW_A, VIEW_B}, seen
    assert seen[VIEW_A] > 0 and seen[VIEW_B] > 0  # the flips did overlap the traffic
    assert set(rule_views) == {("r:a", "s:b"), ("s:a", "r:b")}  # get_rules: one set or the other


# -- targets --------------------------------------------------------------------------------------


async def test_add_and_remove_targets(world: World) -> None:
    api = world.node.lb("api")
    await api.add_target(Target(id="c", address=world.addresses["c"]))
    assert [t.id for t in api.config().targets] == ["a", "b", "c"]
    assert Counter(await world.backends(6)) == {"a": 2, "b": 2, "c": 2}
    await api.remove_target("a")
    assert [t.id for t in api.config().targets] == ["b", "c"]
    assert Counter(await world.backends(4)) == {"b": 2, "c": 2}
    # add_target with an existing id replaces that target (here: moves it to backend a).
    await api.add_target(world.target("a", "b"))
    assert Counter(await world.backends(4)) == {"a": 2, "c": 2}
    version = world.node.config_version
    with pytest.raises(KeyError, match="has no target 'zzz'"):
        await api.remove_target("zzz")
    assert world.node.config_version == version


async def test_removing_a_rules_target_is_refused_while_a_rule_names_it(world: World) -> None:
    api = world.node.lb("api")
    await api.set_rules([{"name": "to_a", "path": "/a/*", "targets": ["a"]}])
    with pytest.raises(ConfigError, match=r"rules\.to_a\.targets\[0\]: 'a' is not a target"):
        await api.remove_target("a")
    assert [t.id for t in api.config().targets] == ["a", "b"]


async def test_remove_target_repins_its_sessions(world: World) -> None:
    api = world.node.lb("api")
    await api.add_target(world.target("c"))
    await api.set_rules(
        [
            Rule(
                name="app",
                path="/app/*",
                targets=["a", "b", "c"],
                sticky_session=StickySession(cookie="session_id", ttl=3600),
            )
        ]
    )
    learned = await world.get("/app/set-cookie?name=session_id&value=py1")
    owner = learned.header("x-backend")
    assert owner is not None
    cookie = {"Cookie": "session_id=py1"}
    assert await world.backends(3, "/app/x", headers=cookie) == [owner] * 3
    await api.set_rules(await api.get_rules())  # same rules again: the pin survives
    assert await world.backends(2, "/app/x", headers=cookie) == [owner] * 2
    remaining = [t for t in ("a", "b", "c") if t != owner]
    await api.set_rules(
        [
            Rule(
                name="app",
                path="/app/*",
                targets=remaining,
                sticky_session=StickySession(cookie="session_id"),
            )
        ]
    )
    await api.remove_target(owner)
    after = await world.backends(4, "/app/x", headers=cookie)
    assert len(set(after)) == 1 and after[0] in remaining
    status = world.node.status()["load_balancers"][0]
    assert status["name"] == "api"
    assert status["counters"] == [{"kind": "sticky_repin", "rule": "app", "count": 1}]


async def test_concurrent_edits_do_not_lose_each_other(world: World) -> None:
    api = world.node.lb("api")
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(api.add_target, world.target("c", f"extra-{i}"))
            nursery.start_soon(api.set_rules, [{"name": "x", "path": "/x/*", "targets": ["a"]}])
            nursery.start_soon(api.set_rate_limit, {"limit": 50})
            nursery.start_soon(
                world.node.manager.register, {"name": "third", "targets": [world.target("c")]}
            )
    cfg = api.config()
    assert sorted(t.id for t in cfg.targets) == [
        "a",
        "b",
        "extra-0",
        "extra-1",
        "extra-2",
        "extra-3",
    ]
    assert list(cfg.rules) == ["x"]
    assert cfg.rate_limit is not None and cfg.rate_limit.limit == 50
    assert [lb.name for lb in await world.node.manager.list()] == ["api", "other", "third"]


async def test_set_rate_limit(world: World) -> None:
    api = world.node.lb("api")
    await api.set_rate_limit(RateLimit(limit=2, interval=60))
    got = [await world.get() for _ in range(3)]
    assert [(r.status, r.header("ratelimit-remaining")) for r in got] == [
        (200, "1"),
        (200, "0"),
        (429, "0"),
    ]
    await api.set_rate_limit(None)
    resp = await world.get()
    assert resp.status == 200 and resp.header("ratelimit-limit") is None


# -- the manager -----------------------------------------------------------------------------------


async def test_register_list_get_deregister(world: World) -> None:
    manager = world.node.manager
    assert [lb.name for lb in await manager.list()] == ["api", "other"]
    await manager.register(
        LoadBalancer(name="web", targets=[Target(id="w", address=world.addresses["c"])])
    )
    await manager.register(
        {"name": "blog", "targets": [world.target("a", "blog-1")], "algorithm": "random"}
    )
    assert [lb.name for lb in await manager.list()] == ["api", "other", "web", "blog"]
    web = await manager.get("web")
    assert isinstance(web, LoadBalancer) and [t.id for t in web.targets] == ["w"]
    assert (await world.get("/", lb="web")).header("x-backend") == "c"
    assert (await world.get("/", lb="blog")).header("x-backend") == "a"
    # Registering an existing name replaces it, whole, where it stands.
    await manager.register({"name": "api", "targets": [world.target("c", "only")]})
    assert [lb.name for lb in await manager.list()] == ["api", "other", "web", "blog"]
    assert await world.backends(2) == ["c", "c"]
    await manager.deregister("web")
    assert [lb.name for lb in await manager.list()] == ["api", "other", "blog"]
    with pytest.raises(UnknownLoadBalancer):
        await manager.get("web")
    with pytest.raises(UnknownLoadBalancer):
        await world.get("/", lb="web")
    with pytest.raises(UnknownLoadBalancer):
        await manager.deregister("web")
    with pytest.raises(ConfigError, match=r"load_balancers\[3\]\.targets\[0\]\.address"):
        await manager.register({"name": "broken", "targets": [{"id": "x", "address": "nowhere"}]})
    assert [lb.name for lb in await manager.list()] == ["api", "other", "blog"]


# -- refused changes change nothing ---------------------------------------------------------------

BAD_RULES: list[tuple[list[Any], str]] = [
    (
        [{"name": "bad", "targets": ["nope"]}],
        "load_balancers[0].rules.bad.targets[0]: 'nope' is not a target of this load balancer",
    ),
    ([{"name": "w", "weight": 150}], "load_balancers[0].rules.w.weight: 150 must be <= 100"),
    (
        [{"name": "rx", "header": {"name": "X", "regex": "("}}],
        "load_balancers[0].rules.rx.header.regex: '(' is not a valid regular expression",
    ),
    (
        [{"name": "typo", "pth": "/x/*"}],
        "load_balancers[0].rules.typo.pth: unknown key (did you mean 'path'?)",
    ),
    (
        [{"name": "c", "client_cidr": ["10.0.0.300/8"]}],
        "load_balancers[0].rules.c.client_cidr[0]: ",
    ),
    (
        [{"name": "rl", "rate_limit": {"limit": 0}}],
        "load_balancers[0].rules.rl.rate_limit.limit: 0 must be > 0",
    ),
    ([{"name": "ok", "path": "/ok/*"}, {"path": "/x/*"}], "rules[1]: a rule needs a name"),
    (
        [{"name": "dup", "path": "/a/*"}, {"name": "dup", "path": "/b/*"}],
        "rules[1].name: duplicate rule name 'dup'",
    ),
    (
        [{"name": "fine", "path": "/f/*"}, {"name": "bad name!"}],
        "load_balancers[0].rules['bad name!']: ",
    ),
]


@pytest.mark.parametrize(("rules", "message"), BAD_RULES)
async def test_bad_rules_are_refused_with_field_paths_and_change_nothing(
    world: World, rules: list[Any], message: str
) -> None:
    api = world.node.lb("api")
    await api.set_rules([{"name": "keep", "path": "/k/*", "targets": ["b"]}])
    before = (world.node.config_version, world.node.config, world.node.runtimes["api"])
    with pytest.raises(ConfigError) as info:
        await api.set_rules(rules)
    assert message in str(info.value)
    assert (world.node.config_version, world.node.config, world.node.runtimes["api"]) == before
    assert [r.name for r in await api.get_rules()] == ["keep"]
    assert await world.backends(2, "/k/x") == ["b", "b"]
