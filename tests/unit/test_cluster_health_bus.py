"""lbnode.cluster.health: the Redis health bus, with two (or three) nodes' managers on one
fake Redis (the Lua scripts' logic in Python; the real scripts run in
tests/integration/test_cluster_health.py). Entries a node appends are handed to the
other nodes' ``handle`` by the test, so every interleaving is explicit."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from lbnode.cluster.health import (
    COMMIT_SCRIPT,
    LEASE_SCRIPT,
    RedisHealthBus,
    healthstate_key,
    overrides_key,
    trial_key,
)
from lbnode.cluster.view import ClusterView
from lbnode.feed import HealthFeed
from lbnode.health import HealthManager
from lbnode.runtime import LbRuntime, PoolRegistry
from lbshared import lbctl
from lbshared.events import decode
from lbshared.redis_trio import RedisUnavailable
from lbshared.store import health_stream, state_stream

LB = "api"
STATE, HEALTH = state_stream(LB), health_stream(LB)
_SHA = {hashlib.sha1(s.encode()).hexdigest(): s for s in (COMMIT_SCRIPT, LEASE_SCRIPT)}


class FakeRedis:
    """The commands the bus sends, on plain dicts; ``fail`` makes every call raise."""

    call_timeout = 1.0

    def __init__(self) -> None:
        self.streams: dict[str, list[tuple[str, dict[str, str]]]] = {}
        self.hashes: dict[str, dict[str, str]] = {}
        self.strings: dict[str, str] = {}
        self.ms = 1_700_000_000_000
        self.fail = False

    def _xadd(self, stream: str, fields: list[str]) -> str:
        self.ms += 1
        entry_id = f"{self.ms}-0"
        self.streams.setdefault(stream, []).append(
            (entry_id, dict(zip(fields[::2], fields[1::2], strict=True))))  # fmt: skip
        return entry_id

    def _run(self, args: tuple[Any, ...]) -> Any:
        cmd = str(args[0]).upper()
        a = [str(x) for x in args]
        if cmd == "XADD":
            star = a.index("*")
            assert a[2:star][:1] in ([], ["MINID"])  # state entries are trimmed by time
            return self._xadd(a[1], a[star + 1 :]).encode()
        if cmd in ("XREVRANGE", "XRANGE"):
            entries = self.streams.get(a[1], [])
            if cmd == "XREVRANGE":
                return [(i.encode(), f) for i, f in entries[-1:]]
            start = a[2]
            if start.startswith("("):
                key = tuple(int(p) for p in start[1:].split("-"))
                entries = [e for e in entries if tuple(int(p) for p in e[0].split("-")) > key]
            return [(i.encode(), [x for kv in f.items() for x in kv]) for i, f in entries]
        if cmd == "HGETALL":
            return [x.encode() for kv in self.hashes.get(a[1], {}).items() for x in kv]
        if cmd == "HSET":
            self.hashes.setdefault(a[1], {}).update(dict(zip(a[2::2], a[3::2], strict=True)))
            return 1
        if cmd == "HDEL":
            self.hashes.get(a[1], {}).pop(a[2], None)
            return 1
        if cmd in ("EVALSHA", "EVAL"):
            source = _SHA[a[1]] if cmd == "EVALSHA" else a[1]
            n = int(a[2])
            keys, argv = a[3 : 3 + n], a[3 + n :]
            return self._commit(keys, argv) if source == COMMIT_SCRIPT else self._lease(keys, argv)
        raise AssertionError(f"unexpected command {args!r}")

    def _commit(self, keys: list[str], argv: list[str]) -> Any:
        h = self.hashes.setdefault(keys[0], {})
        cur = int(h.get(argv[0], "0"))
        if cur >= int(argv[1]):
            return [0, cur, h.get(argv[2], "").encode()]
        h[argv[0]], h[argv[2]] = argv[1], argv[3]
        assert argv[4] == "10000"  # MAXLEN ~
        return [1, self._xadd(keys[1], argv[5:]).encode()]

    def _lease(self, keys: list[str], argv: list[str]) -> int:
        cur = self.strings.get(keys[0])
        if argv[2] == "release":
            if cur == argv[0]:
                del self.strings[keys[0]]
            return 0
        if cur is None or cur == argv[0]:
            self.strings[keys[0]] = argv[0]
            return 1
        return 0

    async def execute(self, *args: Any, timeout: float | None = None) -> Any:
        await trio.lowlevel.checkpoint()
        if self.fail:
            raise RedisUnavailable("fake outage")
        return self._run(args)

    async def pipeline(self, commands: Any, timeout: float | None = None) -> list[Any]:
        await trio.lowlevel.checkpoint()
        if self.fail:
            raise RedisUnavailable("fake outage")
        return [self._run(tuple(c)) for c in commands]

    @asynccontextmanager
    async def blocking(self) -> AsyncIterator[Any]:
        await trio.lowlevel.checkpoint()
        raise RedisUnavailable("no blocking connections in this fake")
        yield  # pragma: no cover

    def entries(self, stream: str) -> list[tuple[str, Any]]:
        return [(i, decode(f)) for i, f in self.streams.get(stream, [])]


def lb_config(**extra: Any) -> Any:
    from lbshared.config import parse_config

    return parse_config({"load_balancers": [{
        "name": LB, "targets": [{"id": "t1", "address": "127.0.0.1:1"},
                                {"id": "t2", "address": "127.0.0.1:2"}], **extra}]})  # fmt: skip


class FakeNode:
    """What HealthManager and the bus use of a Node: id, runtimes, feed."""

    def __init__(self, node_id: str, cfg: Any) -> None:
        self.node_id = node_id
        self.feed = HealthFeed(node_id)
        self.runtimes = {lb.name: LbRuntime(lb, PoolRegistry()) for lb in cfg.load_balancers}


class Peer:
    def __init__(self, node_id: str, redis: FakeRedis, cfg: Any, live: list[str],
                 offset: float = 0.0) -> None:  # fmt: skip
        self.node = FakeNode(node_id, cfg)
        self.manager = HealthManager(self.node)  # type: ignore[arg-type]
        self.view = ClusterView(node_id, clock_offset=offset)
        self.bus = RedisHealthBus(redis, self.manager, self.view, lambda: live,  # type: ignore[arg-type]
                                  clock=lambda: 1_700_000_000.0)  # fmt: skip
        self.manager.bus = self.bus
        self.manager.sync(self.node.runtimes)  # type: ignore[arg-type]
        self.seen: dict[str, int] = {STATE: 0, HEALTH: 0}

    @property
    def h(self) -> Any:
        return self.manager.lbs[LB]

    def target(self, tid: str) -> Any:
        return self.node.runtimes[LB].by_id[tid]

    async def catch_up(self, redis: FakeRedis) -> list[Any]:
        """Handle every entry appended since the last call (what the follower does)."""
        handled = []
        for stream in (STATE, HEALTH):
            entries = redis.entries(stream)
            for entry_id, event in entries[self.seen[stream] :]:
                await self.bus.handle(LB, stream, entry_id, event)
                handled.append(event)
            self.seen[stream] = len(entries)
        return handled


def peers(redis: FakeRedis, cfg: Any, *ids: str) -> list[Peer]:
    live = list(ids)
    return [Peer(i, redis, cfg, live) for i in ids]


HC = {"health_check": {"interval": "1s", "probers": 2}}
CB = {"circuit_breaker": {"threshold": 0.5, "min_requests": 4, "interval": "10s",
                          "half_open_timeout": "1s"}}  # fmt: skip


# -- membership -----------------------------------------------------------------------------------


def test_live_nodes_are_sorted_include_this_node_and_shrink_to_it_when_degraded() -> None:
    redis = FakeRedis()
    live = ["n3", "n1"]
    p = Peer("n2", redis, lb_config(**HC), live)
    assert p.bus.live_nodes() == ["n1", "n2", "n3"]
    live.clear()
    assert p.bus.live_nodes() == ["n2"]  # before the first heartbeat table
    live += ["n1", "n3"]
    p.view.degraded = True
    assert p.bus.live_nodes() == ["n2"]  # alone: it probes everything and decides itself


def test_key_layout_is_shared_with_lbctl() -> None:
    assert healthstate_key("x") == lbctl.healthstate_key("x") == "lb:{x}:healthstate"
    assert overrides_key("x") == lbctl.overrides_key("x") == "lb:{x}:overrides"
    assert trial_key("x", "t") == "lb:{x}:trial:t"


# -- verdicts and the vote ------------------------------------------------------------------------


async def test_own_verdicts_fold_once_and_two_probers_commit_exactly_one_event() -> None:
    redis = FakeRedis()
    a, b, c = peers(redis, lb_config(**HC), "a", "b", "c")
    for p in (a, b, c):
        p.h.cluster.set_probers("t1", ["a", "b"], 0.0)
    await a.bus.publish_verdict(LB, "t1", "unhealthy", "connect refused")
    # a folded its own verdict directly; following the stream does not fold it again.
    assert a.h.cluster.view("t1").verdicts == {"a": "unhealthy"}
    for p in (a, b, c):
        await p.catch_up(redis)
    assert all(p.h.cluster.state("t1") == "healthy" for p in (a, b, c))  # 1 of 2: a tie
    await b.bus.publish_verdict(LB, "t1", "unhealthy", "connect refused")
    # b's fold changed its view, it proposed generation 1 and won.
    assert b.target("t1").healthy is False
    for p in (a, c):
        await p.catch_up(redis)  # they fold b's verdict, compute the same change, lose the CAS
    assert b.bus.stats.commits_won == 1
    assert a.bus.stats.commits_lost == c.bus.stats.commits_lost == 1
    for p in (a, b, c):
        await p.catch_up(redis)
    events = redis.entries(HEALTH)
    assert [(e.type, e.target, e.generation, e.node) for _, e in events] == [
        ("unhealthy", "t1", 1, "b")]  # fmt: skip
    assert events[0][1].reason.startswith("connect refused")
    assert all(not p.target("t1").healthy for p in (a, b, c))
    assert all(p.h.generations["t1"] == 1 for p in (a, b, c))
    stored = redis.hashes[healthstate_key(LB)]
    assert stored["health:t1"] == "1"
    assert json.loads(stored["hstate:t1"])["state"] == "unhealthy"
    # Every node's feed got the one event, with its stream id.
    for p in (a, b, c):
        (fed,) = p.node.feed._history
        assert fed == {"id": events[0][0], "type": "unhealthy", "lb": LB, "target": "t1",
                       "reason": events[0][1].reason, "at": 1_700_000_000.0, "node": "b"}  # fmt: skip


async def test_a_lost_commit_keeps_the_generation_and_older_events_are_not_adopted() -> None:
    redis = FakeRedis()
    a, b = peers(redis, lb_config(**HC), "a", "b")
    redis.hashes[healthstate_key(LB)] = {"health:t1": "5", "hstate:t1": "{}"}
    b.h.generations["t1"] = 4
    assert not await b.bus.commit(LB, "t1", "unhealthy", "x", 4)
    assert b.h.generations["t1"] == 4 and redis.entries(HEALTH) == []
    # A stale committed event (generation 3 < 5) is shown but not adopted.
    await b.bus.handle(LB, HEALTH, "1-0", decode_fields("unhealthy", generation=3))
    assert b.h.cluster.state("t1") == "healthy" and b.node.feed._history[-1]["id"] == "1-0"
    await b.bus.handle(LB, HEALTH, "2-0", decode_fields("unhealthy", generation=5))
    assert b.h.cluster.state("t1") == "unhealthy" and not b.target("t1").healthy


def decode_fields(kind: str, *, target: str = "t1", generation: int = 1, node: str = "x",
                  **extra: Any) -> Any:  # fmt: skip
    from lbshared.events import validate_event

    return validate_event({"type": kind, "lb": LB, "origin": node, "at": 1.0, "target": target,
                           "reason": "r", "generation": generation, "node": node, **extra})  # fmt: skip


async def test_overrides_apply_here_once_are_stored_and_reach_the_others() -> None:
    redis = FakeRedis()
    a, b = peers(redis, lb_config(), "a", "b")
    await a.manager.set_health(LB, "t2", "down")
    assert redis.hashes[overrides_key(LB)] == {"t2": "down"}
    assert not a.target("t2").healthy
    await a.catch_up(redis)  # its own override entry is skipped; its commit is adopted as is
    await b.catch_up(redis)
    assert not b.target("t2").healthy
    assert [(e.type, e.reason) for _, e in redis.entries(HEALTH)] == [("unhealthy", "override down")]
    await a.manager.set_health(LB, "t2", "auto")
    await b.catch_up(redis)
    await a.catch_up(redis)
    assert redis.hashes[overrides_key(LB)] == {}
    assert a.target("t2").healthy and b.target("t2").healthy
    assert [e.type for _, e in redis.entries(HEALTH)] == ["unhealthy", "healthy"]
    # lbctl's override (origin "lbctl") is applied by every node.
    lbctl_entry = [("HSET", overrides_key(LB), "t1", "down")]
    await redis.pipeline(lbctl_entry)
    from lbshared.events import HealthOverride, encode

    ev = HealthOverride(lb=LB, origin="lbctl", at=2.0, target="t1", mode="down")
    redis._xadd(STATE, [x for kv in encode(ev).items() for x in kv])
    await a.catch_up(redis)
    await b.catch_up(redis)
    assert not a.target("t1").healthy and not b.target("t1").healthy


# -- breakers -------------------------------------------------------------------------------------


async def test_outcomes_are_batched_per_slice_and_fold_into_the_other_breakers() -> None:
    redis = FakeRedis()
    cfg = lb_config(**CB)
    a = Peer("a", redis, cfg, ["a", "b"], offset=1_699_999_950.0)
    b = Peer("b", redis, cfg, ["a", "b"], offset=1_699_000_000.0)  # another monotonic origin
    now_a = 50.0  # cluster time 1_700_000_000.0 = b's monotonic 1_000_000.0
    for i in range(3):
        a.h.breakers["t1"].record(False, now_a)  # what HealthManager.record does, and:
        a.bus.outcome(LB, "t1", False, now_a + 0.01 * i)
    a.bus.outcome(LB, "t1", True, now_a + 0.15)  # the next 100 ms slice
    a.bus.outcome(LB, "t2", True, now_a)
    assert a.bus.take_batches(1_700_000_000.0) == {LB: [
        ("t1", 0, 3, 1_700_000_000.0), ("t1", 1, 0, 1_700_000_000.1),
        ("t2", 1, 0, 1_700_000_000.0)]}  # fmt: skip
    for i in range(4):
        a.bus.outcome(LB, "t1", i % 2 == 0, now_a)
    assert await a.bus.flush() == 1
    ((_id, event),) = redis.entries(STATE)
    assert event.type == "outcome_delta" and event.deltas == (("t1", 2, 2, 1_700_000_000.0),)
    await a.catch_up(redis)  # a's own outcomes are already in its breaker: not again
    assert a.h.breakers["t1"].counts(now_a) == (0, 3)
    await b.catch_up(redis)
    assert b.h.breakers["t1"].counts(1_000_000.5) == (2, 2)


async def test_outcomes_wait_while_redis_is_down_bounded() -> None:
    redis = FakeRedis()
    p = Peer("a", redis, lb_config(**CB), ["a"])
    p.bus.max_pending = 3
    for i in range(5):
        p.bus.outcome(LB, "t1", True, 1_700_000_000.0 - i)  # five slices: two over the bound
    assert p.bus.stats.outcomes_dropped == 2
    redis.fail = True
    assert await p.bus.flush() == 0
    redis.fail = False
    assert await p.bus.flush() == 1
    ((_id, event),) = redis.entries(STATE)
    assert [d[1] for d in event.deltas] == [1, 1, 1]


async def test_breaker_commit_cas_and_the_committed_state_wins_at_an_equal_generation() -> None:
    redis = FakeRedis()
    a, b = peers(redis, lb_config(**CB), "a", "b")
    ba, bb = a.h.breakers["t1"], b.h.breakers["t1"]
    ea, eb = ba.open(10.0, "errors"), bb.open(10.0, "errors")
    assert await a.bus.commit_breaker(LB, "t1", ea)
    assert not await b.bus.commit_breaker(LB, "t1", eb)  # the same change, committed by a
    await b.catch_up(redis)
    assert (bb.state, bb.generation) == ("open", 1)
    # Both go half-open; a's trials succeed (close), b saw one fail (reopen): generation 3.
    for br in (ba, bb):
        br.half_open(11.0)
    for _ in range(ba.trials):
        assert ba.allow_trial()
        ba.record(True, 11.5, trial=True)
    assert bb.allow_trial()
    bb.record(False, 11.5, trial=True)
    closed, reopened = ba.step(12.0), bb.step(12.0)
    assert closed is not None and reopened is not None
    assert (closed.type, closed.generation, reopened.type, reopened.generation) == (
        "circuit_closed", 3, "circuit_open", 3)  # fmt: skip
    assert await a.bus.commit_breaker(LB, "t1", closed)
    assert not await b.bus.commit_breaker(LB, "t1", reopened)
    await b.catch_up(redis)
    assert (bb.state, bb.generation) == ("closed", 3)  # the committed close won
    await a.catch_up(redis)
    assert (ba.state, ba.generation) == ("closed", 3)
    assert [e.type for _, e in redis.entries(HEALTH)] == ["circuit_open", "circuit_closed"]


async def test_a_recreated_breaker_continues_the_stored_numbering() -> None:
    redis = FakeRedis()
    (a,) = peers(redis, lb_config(**CB), "a")
    redis.hashes[healthstate_key(LB)] = {"breaker:t1": "7", "bstate:t1": "{}"}
    ev = a.h.breakers["t1"].open(1.0, "errors")  # generation 1: the breaker was re-created
    assert await a.bus.commit_breaker(LB, "t1", ev)
    ((_id, event),) = redis.entries(HEALTH)
    assert (event.type, event.generation) == ("circuit_open", 8)
    assert a.h.breakers["t1"].generation == 8


async def test_trial_lease_one_holder_handed_over_when_idle() -> None:
    redis = FakeRedis()
    a, b = peers(redis, lb_config(**CB), "a", "b")
    for p in (a, b):
        br = p.h.breakers["t1"]
        br.open(0.0, "errors")
        br.half_open(1.0)
    assert await a.bus.acquire_trial(LB, "t1", 1.0)
    assert not await b.bus.acquire_trial(LB, "t1", 1.0)
    assert redis.strings == {trial_key(LB, "t1"): "a"}
    # a sends a trial: it keeps the lease at its next check.
    assert a.h.breakers["t1"].allow_trial()
    now = time.monotonic()
    await a.bus.check_leases(now + 1)
    assert a.target("t1").trial_lease and redis.strings[trial_key(LB, "t1")] == "a"
    await a.bus.check_leases(now + 1.2)  # not yet due: half a lease between checks
    # No more trial traffic on a: it gives the lease up at its next check, b takes it.
    a.h.breakers["t1"].record(True, 1.1, trial=True)
    await a.bus.check_leases(now + 2)
    assert not a.target("t1").trial_lease and redis.strings == {}
    await b.bus.check_leases(now + 2)
    assert b.target("t1").trial_lease and redis.strings[trial_key(LB, "t1")] == "b"
    redis.fail = True  # degraded: each node decides its own trials
    assert await a.bus.acquire_trial(LB, "t1", 1.0)


# -- Redis unreachable, reloads, history -----------------------------------------------------------


async def test_redis_down_never_raises_into_the_manager_and_held_verdicts_are_resent() -> None:
    redis = FakeRedis()
    (a,) = peers(redis, lb_config(**HC), "a")
    a.h.cluster.set_probers("t1", ["a"], 0.0)
    redis.fail = True
    await a.bus.publish_verdict(LB, "t1", "unhealthy", "timeout after 1s")
    assert not a.target("t1").healthy  # decided locally
    assert redis.entries(HEALTH) == [] and a.bus.stats.commit_errors == 1
    await a.manager.set_health(LB, "t2", "down")  # applies here, logged, no exception
    assert not a.target("t2").healthy
    await a.bus.flush()
    redis.fail = False
    await a.bus.flush()
    ((_id, verdict),) = redis.entries(STATE)
    assert (verdict.type, verdict.target, verdict.state) == ("probe_verdict", "t1", "unhealthy")


async def test_reload_takes_redis_word_for_states_overrides_generations_and_open_waits() -> None:
    redis = FakeRedis()
    a, b = peers(redis, lb_config(**HC, **CB), "a", "b")
    a.h.cluster.set_probers("t1", ["a"], 0.0)
    await a.bus.publish_verdict(LB, "t1", "unhealthy", "connect refused")
    await a.manager.set_health(LB, "t2", "down")
    ev = a.h.breakers["t2"].open(5.0, "errors")
    assert await a.bus.commit_breaker(LB, "t2", ev)
    # b never saw any of it (it was not running): its reload restores everything.
    await b.bus.reload(LB)
    assert not b.target("t1").healthy and not b.target("t2").healthy
    assert b.h.generations == a.h.generations
    assert b.h.cluster.view("t2").override == "down"
    assert b.h.cluster.view("t2").voted == "healthy"  # the vote under the override
    bt2 = b.h.breakers["t2"]
    assert (bt2.state, bt2.generation) == ("open", 1)
    # The open wait ran from the commit (its "at"), not from the reload.
    stored = json.loads(redis.hashes[healthstate_key(LB)]["bstate:t2"])
    assert stored["wait"] == 1.0
    assert bt2.open_until - trio_monotonic() <= 1.0 + 0.5


def trio_monotonic() -> float:
    import time

    return time.monotonic()


async def test_history_from_the_streams_and_from_memory_while_redis_is_down() -> None:
    redis = FakeRedis()
    a, b = peers(redis, lb_config(), "a", "b")
    await a.manager.set_health(LB, "t1", "down")
    await a.manager.set_health(LB, "t1", "auto")
    ids = [i for i, _ in redis.entries(HEALTH)]
    assert [e["id"] for e in await b.bus.history("0")] == ids
    assert [e["id"] for e in await b.bus.history(ids[0])] == ids[1:]
    assert await b.bus.history("0", lb="other") == []
    assert set((await b.bus.history("0"))[0]) == {"id", "type", "lb", "target", "reason", "at",
                                                   "node"}  # fmt: skip
    await b.catch_up(redis)
    redis.fail = True
    assert [e["id"] for e in await b.bus.history(ids[0])] == ids[1:]


@pytest.mark.parametrize("kind", ["probe_verdict", "outcome_delta", "health_override"])
async def test_entries_about_unknown_targets_are_ignored(kind: str) -> None:
    from lbshared.events import validate_event

    redis = FakeRedis()
    (a,) = peers(redis, lb_config(**CB, **HC), "a")
    event = validate_event({
        "probe_verdict": {"type": kind, "lb": LB, "origin": "z", "at": 1.0, "target": "gone",
                          "prober": "z", "state": "unhealthy"},
        "outcome_delta": {"type": kind, "lb": LB, "origin": "z", "at": 1.0, "node": "z",
                          "deltas": [["gone", 1, 1, 1.0]]},
        "health_override": {"type": kind, "lb": LB, "origin": "z", "at": 1.0, "target": "gone",
                            "mode": "down"},
    }[kind])  # fmt: skip
    await a.bus.handle(LB, STATE, "1-0", event)
    assert redis.entries(HEALTH) == [] and all(t.healthy for t in a.node.runtimes[LB].targets)


async def test_forget_drops_pending_work_of_a_deleted_load_balancer() -> None:
    redis = FakeRedis()
    (a,) = peers(redis, lb_config(**CB), "a")
    a.bus.outcome(LB, "t1", True, 1.0)
    a.bus.forget(LB)
    assert await a.bus.flush() == 0


async def test_run_ships_on_its_own(autojump_clock: trio.testing.MockClock) -> None:
    redis = FakeRedis()
    (a,) = peers(redis, lb_config(**CB), "a")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.bus.run)
        a.bus.outcome(LB, "t1", False, 1_700_000_000.0)
        await trio.sleep(0.25)
        nursery.cancel_scope.cancel()
    assert [e.type for _, e in redis.entries(STATE)] == ["outcome_delta"]
