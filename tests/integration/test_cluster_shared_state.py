"""Cluster-wide rate limits and sticky pins against a real redis-server (tests/redisproc.py).

Several "nodes" run in one trio process: each has its own ClusterView,
RedisClient, limiters/pin stores and background tasks, all against one
private redis-server. Every wait is bounded; the servers are stopped by PID
(fixture teardown).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from lbnode.cluster.pins import SharedPinStore
from lbnode.cluster.ratelimit import ClusterRateLimiter, RateSync, StrictRateLimiter
from lbnode.cluster.view import ClusterView
from lbnode.policy.ratelimit import RateLimiter
from lbnode.policy.sticky import MemoryPinStore
from lbshared.config import RateLimit
from lbshared.redis_trio import RedisClient
from tests.redisproc import RedisProc, redis_proc  # noqa: F401 - a fixture

LB = "acc"
# The acceptance scenario: 600 per 60 s for one client, 300 requests/s over 3 nodes for 10 s.
LIMIT, INTERVAL = 600, 60.0
NODES, RATE, DURATION = 3, 300, 10.0
# Bound of every wait for a connection or a follower.
READY_TIMEOUT = 5.0


@dataclass
class Node:
    view: ClusterView
    client: RedisClient
    limiters: dict[str, RateLimiter] = field(default_factory=dict)


@asynccontextmanager
async def cluster(url: str, n: int) -> AsyncIterator[tuple[trio.Nursery, list[Node]]]:
    """``n`` nodes' clients, connected; views follow their client's connection."""
    async with trio.open_nursery() as nursery:
        nodes = []
        for i in range(n):
            view = ClusterView(f"node-{i}", live_nodes=n)

            def track(up: bool, view: ClusterView = view) -> None:
                view.degraded = not up  # what the node's connection watcher does

            client = RedisClient(url, name=f"node-{i}", on_state_change=track)
            await nursery.start(client.run)
            nodes.append(Node(view, client))
        for node in nodes:
            assert await node.client.wait_connected(READY_TIMEOUT)
        yield nursery, nodes
        nursery.cancel_scope.cancel()


def strict_limiter(config: RateLimit, node: Node) -> StrictRateLimiter:
    fallback = ClusterRateLimiter(config, None, node.view, lambda: None)
    return StrictRateLimiter(config, node.client, LB, node.view, fallback)


async def drive(check: Callable[[int], object]) -> None:
    """RATE requests/s for DURATION s, round-robin over the nodes, on an absolute schedule."""
    start = trio.current_time()
    tick = NODES / RATE  # one request to each node per tick
    for i in range(int(DURATION / tick)):
        await trio.sleep_until(start + i * tick)
        async with trio.open_nursery() as nursery:
            for node_index in range(NODES):
                nursery.start_soon(check, node_index)


async def test_acceptance_cluster_mode_admits_600_to_630(redis_proc: RedisProc) -> None:
    config = RateLimit(limit=LIMIT, interval=INTERVAL, key="client_ip", mode="cluster")
    async with cluster(redis_proc.url, NODES) as (nursery, nodes):
        syncs = []
        for node in nodes:
            sync = RateSync(node.client, LB, node.view.node_id, lambda node=node: node.limiters)
            node.limiters[""] = ClusterRateLimiter(config, None, node.view, sync.wake)
            await nursery.start(sync.run)
            syncs.append(sync)
        for sync in syncs:
            with trio.fail_after(READY_TIMEOUT):
                await sync.ready.wait()
        admitted = [0] * NODES
        slowest = 0.0

        async def check(i: int) -> None:
            nonlocal slowest
            lim = nodes[i].limiters[""]
            t0 = time.perf_counter()
            allowed = lim.check("203.0.113.7", time.monotonic()).allowed
            slowest = max(slowest, time.perf_counter() - t0)
            admitted[i] += allowed
            await trio.lowlevel.checkpoint()

        await drive(check)
        total = sum(admitted)
        print(f"\ncluster mode: admitted {total} of {int(RATE * DURATION)} "
              f"(per node {admitted}); slowest decision {slowest * 1e3:.2f} ms; "
              f"events sent {[s.stats.events_sent for s in syncs]}")  # fmt: skip
        assert 600 <= total <= 630, admitted
        assert all(s.stats.deltas_unknown_limiter == 0 for s in syncs)


async def test_acceptance_strict_mode_admits_exactly_600(redis_proc: RedisProc) -> None:
    config = RateLimit(limit=LIMIT, interval=INTERVAL, key="client_ip", mode="strict")
    async with cluster(redis_proc.url, NODES) as (_nursery, nodes):
        limiters = [strict_limiter(config, node) for node in nodes]
        admitted = [0] * NODES

        async def check(i: int) -> None:
            decision = await limiters[i].acheck("203.0.113.7", time.monotonic())
            admitted[i] += decision.allowed

        await drive(check)
        total = sum(admitted)
        errors = sum(lim.stats_errors for lim in limiters)
        print(f"\nstrict mode: admitted {total} of {int(RATE * DURATION)} "
              f"(per node {admitted}); Redis errors {errors}")  # fmt: skip
        assert errors == 0
        assert total == 600, admitted
        card = await nodes[0].client.execute("ZCARD", "lb:{acc}:rl::203.0.113.7")
        assert card == 600
        ttl = await nodes[0].client.execute("PTTL", "lb:{acc}:rl::203.0.113.7")
        assert 0 < ttl <= 60_000


async def test_pins_made_on_one_node_hold_on_another(redis_proc: RedisProc) -> None:
    async with cluster(redis_proc.url, 3) as (nursery, (a, b, c)):
        store_a = SharedPinStore(a.client, LB, a.view, MemoryPinStore())
        store_b = SharedPinStore(b.client, LB, b.view, MemoryPinStore(), notices=False)
        store_c = SharedPinStore(c.client, LB, c.view, MemoryPinStore())
        await nursery.start(store_a.run)
        await nursery.start(store_c.run)  # c follows the notices; b only reads through
        with trio.fail_after(READY_TIMEOUT):
            await store_c.ready.wait()
        sessions = [f"api:sess-{i}" for i in range(1000)]
        targets = {s: f"t{i % 7}" for i, s in enumerate(sessions)}
        now = time.monotonic()
        for s in sessions:
            assert await store_a.pin_if_absent(s, targets[s], 600.0, now) == targets[s]
        now = time.monotonic()
        seen = {s: await store_b.get(s, now) for s in sessions}
        same = sum(seen[s] == targets[s] for s in sessions)
        print(f"\npins: {same}/1000 read through on another node got the same target")
        assert same == 1000
        assert store_b.stats.reads == 1000 and store_b.stats.fallbacks == 0
        # a second writer loses everywhere
        assert await store_b.pin_if_absent(sessions[0], "other", 600.0, now) == targets[sessions[0]]
        # c's cache was warmed by a's pin notices: no read-through needed
        with trio.fail_after(READY_TIMEOUT):
            while len(store_c.local) < 1000:
                await trio.sleep(0.01)
        assert all(store_c.local.get(s, time.monotonic()) == targets[s] for s in sessions)
        assert store_c.stats.reads == 0
        # an unpin on a clears c's cache too
        await store_a.unpin(sessions[1])
        with trio.fail_after(READY_TIMEOUT):
            while store_c.local.get(sessions[1], time.monotonic()) is not None:
                await trio.sleep(0.01)
        assert await b.client.execute("GET", "lb:{acc}:sticky:" + sessions[1]) is None


async def test_redis_down_then_back_empty(redis_proc: RedisProc) -> None:
    config = RateLimit(limit=10, interval=60.0, key="client_ip")
    strict_config = RateLimit(limit=10, interval=60.0, key="client_ip", mode="strict")
    async with cluster(redis_proc.url, 2) as (nursery, (a, b)):
        sync = RateSync(a.client, LB, a.view.node_id, lambda: a.limiters)
        lim = ClusterRateLimiter(config, None, a.view, sync.wake)
        a.limiters[""] = lim
        strict = strict_limiter(strict_config, a)
        pins = SharedPinStore(a.client, LB, a.view, MemoryPinStore())
        await nursery.start(sync.run)
        await nursery.start(pins.run)
        now = time.monotonic()
        sessions = [f"api:s{i}" for i in range(50)]
        for i, s in enumerate(sessions):
            await pins.pin_if_absent(s, f"t{i % 3}", 600.0, now)
        assert (await strict.acheck("c1", now)).allowed

        redis_proc.kill()
        with trio.fail_after(READY_TIMEOUT):
            while not a.view.degraded:
                await trio.sleep(0.01)

        # Limiters answer at once, on the local share ceil(10 / 2) = 5.
        t0 = time.perf_counter()
        got = [lim.check("c2", time.monotonic()) for _ in range(8)]
        strict_got = [await strict.acheck("c3", time.monotonic()) for _ in range(8)]
        elapsed = time.perf_counter() - t0
        assert [d.allowed for d in got] == [True] * 5 + [False] * 3
        assert [d.allowed for d in strict_got] == [True] * 5 + [False] * 3
        assert elapsed < 0.5, elapsed  # no Redis round trip, no timeout waited
        # Pins fall back on the cache; new ones pin locally; nothing raises.
        now = time.monotonic()
        assert [await pins.get(s, now) for s in sessions] == [f"t{i % 3}" for i in range(50)]
        assert await pins.get("api:unknown", now) is None
        assert await pins.pin_if_absent("api:new", "t9", 600.0, now) == "t9"
        await pins.refresh(sessions[0], 600.0, now)

        redis_proc.restart()  # same port, empty
        with trio.fail_after(READY_TIMEOUT):
            while a.view.degraded or not a.client.connected:
                await trio.sleep(0.01)
        restored = await pins.republish()  # what the node calls on reconnect
        assert restored == 51
        now = time.monotonic()
        fresh = SharedPinStore(b.client, LB, b.view, MemoryPinStore(), notices=False)
        with trio.fail_after(READY_TIMEOUT):
            while not b.client.connected:
                await trio.sleep(0.01)
        assert [await fresh.get(s, now) for s in sessions] == [f"t{i % 3}" for i in range(50)]
        assert await fresh.get("api:new", now) == "t9"
        ttl = await b.client.execute("PTTL", "lb:{acc}:sticky:api:s1")
        assert 590_000 < ttl <= 600_000
        # strict mode is back on Redis
        assert (await strict.acheck("c4", time.monotonic())).remaining == 9


async def test_a_hung_redis_costs_strict_decisions_one_short_timeout(
    redis_proc: RedisProc,
) -> None:
    config = RateLimit(limit=10, interval=60.0, key="client_ip", mode="strict")
    async with cluster(redis_proc.url, 1) as (_nursery, (a,)):
        strict = strict_limiter(config, a)
        assert (await strict.acheck("c", time.monotonic())).allowed
        redis_proc.pause()
        try:
            t0 = trio.current_time()
            decision = await strict.acheck("c", time.monotonic())
            waited = trio.current_time() - t0
        finally:
            redis_proc.resume()
        assert decision.allowed and decision.limit == 10  # fallback share (one live node)
        assert strict.stats_errors == 1
        assert 0.09 <= waited < 0.5, waited  # STRICT_TIMEOUT is 0.1 s
