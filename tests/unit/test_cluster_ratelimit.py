"""lbnode.cluster.ratelimit: cluster mode, delta sync, strict mode (fake clock, fake Redis)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from lbnode.cluster.ratelimit import (
    ClusterRateLimiter,
    RateSync,
    StrictRateLimiter,
    default_cap,
)
from lbnode.cluster.view import ClusterView
from lbnode.policy.ratelimit import Decision, RateLimiter
from lbshared.config import RateLimit
from lbshared.events import RateDelta, decode
from lbshared.redis_trio import RedisTimeout, RedisUnavailable

STATE = "lb:{api}:state"


def cfg(limit: int, interval: float = 60.0, **kw: Any) -> RateLimit:
    return RateLimit(limit=limit, interval=interval, **kw)


def view(node: str = "n1", live: int = 1, degraded: bool = False) -> ClusterView:
    return ClusterView(node, degraded=degraded, live_nodes=live, clock_offset=0.0)


def limiter(
    limit: int, interval: float = 60.0, v: ClusterView | None = None,
    on_cap: Callable[[], None] = lambda: None, **kw: Any,
) -> ClusterRateLimiter:  # fmt: skip
    return ClusterRateLimiter(cfg(limit, interval, **kw), None, v or view(), on_cap)


class FakeRedis:
    """Just enough of RedisClient for RateSync and StrictRateLimiter, in memory.

    XADD appends to ``streams``; EVALSHA/EVAL run the strict script's logic
    in Python on ``server_us`` (the fake server clock, microseconds).
    ``fail`` makes every call raise that exception.
    """

    call_timeout = 1.0

    def __init__(self) -> None:
        self.streams: dict[str, list[dict[str, str]]] = {}
        self.zsets: dict[str, dict[str, int]] = {}
        self.server_us = 1_700_000_000_000_000
        self.fail: type[Exception] | None = None
        self.calls: list[str] = []

    async def execute(self, *args: Any, timeout: float | None = None) -> Any:
        await trio.lowlevel.checkpoint()
        self.calls.append(str(args[0]))
        if self.fail is not None:
            raise self.fail("fake failure")
        cmd = str(args[0]).upper()
        if cmd == "XADD":
            star = args.index("*")
            assert args[2:star][:2] == ("MINID", "~")  # trimmed per the contract
            flat = [str(a) for a in args[star + 1 :]]
            self.streams.setdefault(str(args[1]), []).append(dict(zip(flat[::2], flat[1::2])))
            return b"1-1"
        if cmd == "XREVRANGE":
            return []
        if cmd in ("EVALSHA", "EVAL"):
            key, limit, window, member = args[3], int(args[4]), int(args[5]), str(args[6])
            return self._strict(key, limit, window, member)
        raise AssertionError(f"unexpected command {args!r}")

    def _strict(self, key: str, limit: int, window: int, member: str) -> list[int]:
        now = self.server_us
        zset = self.zsets.setdefault(key, {})
        for m in [m for m, s in zset.items() if s <= now - window]:
            del zset[m]
        count = len(zset)
        if count < limit:
            assert member not in zset
            zset[member] = now
            return [1, count + 1, now, now]
        scores = sorted(zset.values())
        return [0, count, scores[count - limit], now]

    @asynccontextmanager
    async def blocking(self) -> AsyncIterator[Any]:
        await trio.lowlevel.checkpoint()
        raise RedisUnavailable("no blocking connections in this fake")
        yield  # pragma: no cover

    def events(self, stream: str = STATE) -> list[RateDelta]:
        out = []
        for fields in self.streams.get(stream, []):
            ev = decode(fields)
            assert isinstance(ev, RateDelta)
            out.append(ev)
        return out


# ------------------------------------------------------------- cluster mode, one node


def test_alone_it_decides_exactly_like_the_policy_limiter() -> None:
    plain = RateLimiter(cfg(5, 10.0))
    clustered = limiter(5, 10.0)
    times = [100.0 + 0.37 * i for i in range(60)]
    assert [clustered.check("c", t) for t in times] == [plain.check("c", t) for t in times]
    assert clustered.is_async is False


def test_the_store_runs_on_cluster_time() -> None:
    v = ClusterView("n1", clock_offset=1_000_000.0)
    lim = ClusterRateLimiter(cfg(3, 10.0), None, v, lambda: None)
    lim.check("c", 5.0)  # monotonic 5.0 = cluster time 1_000_005.0
    ((key, n, start),) = lim.store.drain_unsynced()
    assert (key, n, start) == ("c", 1, 1_000_005.0)  # bucket width 1 s


CAPS = [
    # (limit, live nodes, explicit cap, admissions before on_cap fires)
    (100, 1, None, 10),  # 100 // 10
    (100, 5, None, 2),  # 100 // 50
    (600, 3, None, 20),
    (5, 3, None, 1),  # never below 1
    (100, 1, 3, 3),  # explicit
]


@pytest.mark.parametrize("limit, live, cap, fires_at", CAPS)
def test_on_cap_fires_when_a_key_reaches_the_unsynced_cap(
    limit: int, live: int, cap: int | None, fires_at: int
) -> None:
    calls: list[int] = []
    lim = ClusterRateLimiter(cfg(limit), None, view(live=live), lambda: calls.append(1), cap=cap)
    for i in range(fires_at - 1):
        assert lim.check("c", 100.0 + i * 0.01).allowed
    assert calls == []
    assert lim.check("c", 101.0).allowed
    assert calls == [1]
    lim.store.drain_unsynced()  # the sync shipped them: the count starts again
    calls.clear()
    for i in range(fires_at - 1):
        lim.check("c", 102.0 + i * 0.01)
    assert calls == []


def test_the_cap_counts_per_key() -> None:
    calls: list[int] = []
    lim = ClusterRateLimiter(cfg(100), None, view(), lambda: calls.append(1), cap=3)
    for key in ("a", "b", "a", "b", "c"):
        lim.check(key, 100.0)
    assert calls == []
    lim.check("b", 100.0)
    assert calls == [1]


def test_default_cap_formula() -> None:
    assert [default_cap(600, n) for n in (0, 1, 2, 3, 10)] == [60, 60, 30, 20, 6]
    assert default_cap(5, 3) == 1


def test_remote_admissions_count_against_the_limit() -> None:
    lim = limiter(10, 60.0)
    lim.fold_remote("c", 7, 96.0)  # bucket [96, 102) of another node
    got = [lim.check("c", 100.0 + i).allowed for i in range(5)]
    assert got == [True, True, True, False, False]


# ---------------------------------------------------------------- degraded (Redis down)


def test_degraded_allow_decides_on_a_local_share_counting_local_admissions_only() -> None:
    v = view(live=3)
    lim = ClusterRateLimiter(cfg(10, 60.0), None, v, lambda: None)
    lim.fold_remote("c", 9, 96.0)  # the cluster had nearly used the limit before the outage
    v.degraded = True
    got = [lim.check("c", 100.0 + i * 0.1) for i in range(6)]
    assert [d.allowed for d in got] == [True, True, True, True, False, False]  # ceil(10/3) = 4
    assert [d.limit for d in got] == [4] * 6
    assert [d.remaining for d in got[:4]] == [3, 2, 1, 0]
    assert got[4].retry_after == 60
    # admissions made while degraded are shipped once Redis is back
    assert sum(n for _, n, _ in lim.store.drain_unsynced()) == 4
    v.degraded = False
    assert lim.store.count("c", 101.0) == 13  # 9 remote + 4 local
    assert not lim.check("c", 101.0).allowed


def test_degraded_share_follows_live_nodes() -> None:
    v = view(live=2, degraded=True)
    lim = ClusterRateLimiter(cfg(9, 60.0), None, v, lambda: None)
    assert lim.share() == 5
    v.live_nodes = 0  # an empty heartbeat table never divides by zero
    assert lim.share() == 9


def test_degraded_deny_refuses_with_retry_after_one() -> None:
    v = view(degraded=True)
    lim = ClusterRateLimiter(cfg(10, on_store_error="deny"), None, v, lambda: None)
    d = lim.check("c", 100.0)
    assert d == Decision(False, 10, 0, 1, 1)
    assert (b"Retry-After", b"1") in d.headers()
    v.degraded = False
    assert lim.check("c", 100.0).allowed


def test_degraded_never_calls_on_cap() -> None:
    calls: list[int] = []
    lim = ClusterRateLimiter(cfg(10), None, view(degraded=True), lambda: calls.append(1), cap=1)
    lim.check("c", 100.0)
    assert calls == []


# ------------------------------------------------------------------------- RateSync


def make_sync(
    client: FakeRedis, node: str, lims: dict[str, RateLimiter], now: list[float], **kw: Any
) -> RateSync:
    return RateSync(
        client, "api", node, lambda: lims, clock=lambda: now[0], **kw  # type: ignore[arg-type]
    )


async def test_flush_ships_one_event_with_every_limiters_deltas() -> None:
    client, now = FakeRedis(), [100.0]
    a, b = limiter(10, 60.0), limiter(5, 10.0)
    sync = make_sync(client, "n1", {"": a, "api_v2": b}, now)
    a.check("x", 100.0)
    a.check("x", 100.1)
    a.check("y", 100.2)
    b.check("x", 100.3)
    assert sync.collect() == 3
    assert await sync.flush() == 3
    (ev,) = client.events()
    assert (ev.lb, ev.origin, ev.node) == ("api", "n1", "n1")
    assert sorted(ev.deltas) == [("", "x", 2, 96.0), ("", "y", 1, 96.0), ("api_v2", "x", 1, 100.0)]
    assert sync.pending == 0
    sync.collect()
    assert await sync.flush() == 0  # nothing new: nothing sent
    assert len(client.events()) == 1


async def exchange(syncs: list[RateSync], client: FakeRedis) -> None:
    """One round: everyone ships, everyone folds what the others shipped."""
    seen = len(client.streams.get(STATE, []))
    for s in syncs:
        s.collect()
        await s.flush()
    for ev in client.events()[seen:]:
        for s in syncs:
            s.fold(ev)


async def test_two_nodes_exchanging_deltas_converge() -> None:
    client, now = FakeRedis(), [100.0]
    a, b = limiter(100, 60.0), limiter(100, 60.0)
    sa = make_sync(client, "a", {"": a}, now)
    sb = make_sync(client, "b", {"": b}, now)
    for i in range(30):
        a.check("k", 100.0 + i * 0.1)
    for i in range(12):
        b.check("k", 101.0 + i * 0.1)
    await exchange([sa, sb], client)
    assert a.store.count("k", 110.0) == b.store.count("k", 110.0) == 42
    assert sa.stats.events_received == 1 and sb.stats.events_received == 1
    # own events are not folded twice
    assert sa.fold(client.events()[0]) == 0


@given(
    plan=st.lists(
        st.tuples(st.sampled_from("ab"), st.sampled_from(["k1", "k2"]), st.floats(0.0, 50.0)),
        max_size=60,
    )
)
@settings(max_examples=60, deadline=None)
def test_exchanged_totals_converge_property(plan: list[tuple[str, str, float]]) -> None:
    async def main() -> None:
        client, now = FakeRedis(), [160.0]
        lims = {"a": limiter(1000, 60.0), "b": limiter(1000, 60.0)}
        syncs = [make_sync(client, n, {"": lims[n]}, now) for n in "ab"]
        admitted = {"k1": 0, "k2": 0}
        for node, key, t in sorted(plan, key=lambda p: p[2]):
            if lims[node].check(key, 100.0 + t).allowed:
                admitted[key] += 1
            if t > 25.0:  # exchange mid-way too
                await exchange(syncs, client)
        await exchange(syncs, client)
        for key, n in admitted.items():
            # all admissions are within one window at 155.0 (started at >= 96.0)
            assert lims["a"].store.count(key, 155.0) == n
            assert lims["b"].store.count(key, 155.0) == n

    trio.run(main)


async def test_deltas_for_unknown_limiters_are_dropped_and_counted() -> None:
    client, now = FakeRedis(), [100.0]
    a = limiter(10)
    sync = make_sync(client, "n1", {"": a}, now)
    ev = RateDelta(lb="api", origin="n2", at=100.0, node="n2",
                   deltas=(("gone", "k", 3, 96.0), ("", "k", 2, 96.0)))  # fmt: skip
    assert sync.fold(ev) == 1
    assert sync.stats.deltas_unknown_limiter == 1
    assert a.store.count("k", 100.0) == 2


async def test_a_failed_send_keeps_deltas_within_a_budget() -> None:
    client, now = FakeRedis(), [100.0]
    a = limiter(1000)
    sync = make_sync(client, "n1", {"": a}, now, max_pending=5)
    client.fail = RedisUnavailable
    for i in range(8):
        a.check(f"k{i}", 100.0)
        sync.collect()  # one delta per period, as the ship loop drains them
    assert sync.pending == 5
    assert sync.stats.deltas_dropped == 3
    with pytest.raises(RedisUnavailable):
        await sync.flush()
    assert sync.pending == 5  # kept for the next try
    client.fail = RedisTimeout
    with pytest.raises(RedisTimeout):
        await sync.flush()
    client.fail = None
    assert await sync.flush() == 5
    (ev,) = client.events()
    assert sorted(k for _, k, _, _ in ev.deltas) == ["k3", "k4", "k5", "k6", "k7"]  # oldest dropped


async def test_deltas_older_than_their_window_are_not_sent() -> None:
    client, now = FakeRedis(), [100.0]
    a = limiter(1000, 10.0)
    sync = make_sync(client, "n1", {"": a}, now)
    a.check("k", 100.0)  # bucket [100, 101): all gone from every window by 111
    sync.collect()
    now[0] = 111.0
    sync.collect()
    assert sync.pending == 0 and sync.stats.deltas_stale == 1


async def test_sync_cap_overrides_the_limiters_cap() -> None:
    client, now = FakeRedis(), [100.0]
    a = limiter(1000)
    make_sync(client, "n1", {"": a}, now, cap=7).collect()
    assert a.cap == 7


async def test_on_cap_wakes_the_sync_before_the_period_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, now = FakeRedis(), [100.0]
    lims: dict[str, RateLimiter] = {}
    sync = make_sync(client, "n1", lims, now, sync_period=30.0)
    a = ClusterRateLimiter(cfg(100), None, view(), sync.wake, cap=3)
    lims[""] = a
    async with trio.open_nursery() as nursery:
        await nursery.start(sync.run)
        start = trio.current_time()
        for i in range(3):
            assert a.check("k", 100.0 + i * 0.5).allowed
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() - start < 30.0
        (ev,) = client.events()
        assert ev.deltas == (("", "k", 3, 96.0),)
        # without a wake, the next batch waits for the period
        a.check("k", 104.0)
        await trio.sleep(29.0)
        assert len(client.events()) == 1
        await trio.sleep(1.5)
        assert len(client.events()) == 2
        nursery.cancel_scope.cancel()


async def test_the_ship_loop_survives_an_outage(autojump_clock: trio.testing.MockClock) -> None:
    client, now = FakeRedis(), [100.0]
    a = limiter(1000)
    sync = make_sync(client, "n1", {"": a}, now, sync_period=0.05)
    client.fail = RedisUnavailable
    async with trio.open_nursery() as nursery:
        await nursery.start(sync.run)
        a.check("k", 100.0)
        await trio.sleep(5.0)
        assert sync.stats.send_errors >= 2 and sync.pending == 1
        client.fail = None
        await trio.sleep(3.0)  # at most one backoff (2 s) later
        assert sync.pending == 0
        assert [ev.deltas for ev in client.events()] == [(("", "k", 1, 96.0),)]
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------ strict mode


def strict(
    client: FakeRedis, limit: int, interval: float = 10.0, v: ClusterView | None = None, **kw: Any
) -> StrictRateLimiter:
    v = v or view()
    config = cfg(limit, interval, mode="strict", **kw)
    fallback = ClusterRateLimiter(config, None, v, lambda: None)
    return StrictRateLimiter(config, client, "api", v, fallback)  # type: ignore[arg-type]


async def test_strict_admits_exactly_the_limit_with_policy_headers() -> None:
    client = FakeRedis()
    rl = strict(client, 3, 10.0)
    assert rl.is_async is True
    got = []
    for _ in range(5):
        got.append(await rl.acheck("c", 0.0))
        client.server_us += 200_000  # 0.2 s between requests
    assert [d.allowed for d in got] == [True, True, True, False, False]
    assert [d.remaining for d in got] == [2, 1, 0, 0, 0]
    assert got[0].headers() == [
        (b"RateLimit-Limit", b"3"), (b"RateLimit-Remaining", b"2"), (b"RateLimit-Reset", b"10"),
    ]  # fmt: skip
    # refused at +0.6 s: the first admission (at 0) leaves at 10 s -> 9.4 s -> 10
    assert (got[3].retry_after, got[3].reset) == (10, 10)
    assert got[4].retry_after == 10  # 9.2 s
    (zset,) = client.zsets.values()
    assert len(zset) == 3 and len(set(zset)) == 3  # unique members
    assert list(client.zsets) == ["lb:{api}:rl::c"]


async def test_strict_frees_a_slot_exactly_one_interval_later() -> None:
    client = FakeRedis()
    rl = strict(client, 1, 10.0)
    assert (await rl.acheck("c", 0.0)).allowed
    client.server_us += 9_999_999
    d = await rl.acheck("c", 0.0)
    assert not d.allowed and d.retry_after == 1
    client.server_us += 1
    assert (await rl.acheck("c", 0.0)).allowed


@pytest.mark.parametrize("error", [RedisUnavailable, RedisTimeout])
async def test_strict_falls_back_on_the_local_share_when_redis_fails(
    error: type[Exception],
) -> None:
    client = FakeRedis()
    rl = strict(client, 10, 60.0, v=view(live=2))
    client.fail = error
    got = [await rl.acheck("c", 100.0 + i) for i in range(7)]
    assert [d.allowed for d in got] == [True] * 5 + [False] * 2  # ceil(10 / 2)
    assert got[0].limit == 5
    assert rl.stats_errors == 7


async def test_strict_deny_refuses_when_redis_fails() -> None:
    client = FakeRedis()
    rl = strict(client, 10, on_store_error="deny")
    client.fail = RedisUnavailable
    assert await rl.acheck("c", 100.0) == Decision(False, 10, 0, 1, 1)


async def test_strict_does_not_try_redis_while_degraded() -> None:
    client = FakeRedis()
    v = view(degraded=True)
    rl = strict(client, 10, v=v)
    assert (await rl.acheck("c", 100.0)).allowed
    assert client.calls == []


MISSING = [
    ("allow", Decision(True, 4, 4, 0, None, limited=False)),
    ("deny", Decision(False, 4, 0, 10, 10)),
]


@pytest.mark.parametrize("on_missing, expected", MISSING)
async def test_strict_missing_key_follows_on_missing_key(
    on_missing: str, expected: Decision
) -> None:
    client = FakeRedis()
    rl = strict(client, 4, 10.0, on_missing_key=on_missing)
    assert await rl.acheck(None, 0.0) == expected
    assert client.calls == []


async def test_strict_missing_key_shared_uses_one_bucket() -> None:
    client = FakeRedis()
    rl = strict(client, 4, 10.0, on_missing_key="shared")
    assert (await rl.acheck(None, 0.0)).remaining == 3
    assert list(client.zsets) == ["lb:{api}:rl::"]
