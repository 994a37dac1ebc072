"""lbnode.cluster.pins: the async pin stores (fake clock, an in-memory fake Redis)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from lbnode.cluster.pins import LocalPinStore, SharedPinStore
from lbnode.cluster.view import ClusterView
from lbnode.policy.sticky import MemoryPinStore
from lbshared.events import Pin, Unpin, decode
from lbshared.redis_trio import RedisTimeout, RedisUnavailable, ReplyError

STATE = "lb:{api}:state"


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeRedis:
    """Strings with millisecond TTLs, DEL, PEXPIRE and XADD, on the shared fake clock.

    ``fail`` makes every call raise it; ``calls`` records command names.
    """

    call_timeout = 1.0

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.data: dict[str, tuple[str, float | None]] = {}  # key -> (value, expires_at)
        self.streams: dict[str, list[dict[str, str]]] = {}
        self.fail: type[Exception] | None = None
        self.calls: list[str] = []

    def _live(self, key: str) -> tuple[str, float | None] | None:
        entry = self.data.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= self.clock.t:
            del self.data[key]
            return None
        return entry

    def _do(self, args: Any) -> Any:
        cmd, *rest = (str(a) for a in args)
        self.calls.append(cmd)
        if cmd == "GET":
            entry = self._live(rest[0])
            return None if entry is None else entry[0].encode()
        if cmd == "PTTL":
            entry = self._live(rest[0])
            if entry is None:
                return -2
            return -1 if entry[1] is None else round((entry[1] - self.clock.t) * 1000)
        if cmd == "SET":
            key, value, *opts = rest
            opts_u = [o.upper() for o in opts]
            old = self._live(key)
            px = int(opts[opts_u.index("PX") + 1]) if "PX" in opts_u else None
            if "NX" not in opts_u or old is None:
                self.data[key] = (value, None if px is None else self.clock.t + px / 1000)
                done = True
            else:
                done = False
            if "GET" in opts_u:
                return None if old is None else old[0].encode()
            return b"OK" if done else None
        if cmd == "DEL":
            return sum(1 for k in rest if self.data.pop(k, None) is not None)
        if cmd == "PEXPIRE":
            entry = self._live(rest[0])
            if entry is None:
                return 0
            self.data[rest[0]] = (entry[0], self.clock.t + int(rest[1]) / 1000)
            return 1
        if cmd == "XADD":
            star = rest.index("*")
            assert rest[1:3] == ["MINID", "~"]
            flat = rest[star + 1 :]
            self.streams.setdefault(rest[0], []).append(dict(zip(flat[::2], flat[1::2])))
            return b"1-1"
        if cmd == "XREVRANGE":
            return []
        return ReplyError(f"ERR unknown command {cmd}")

    async def execute(self, *args: Any, timeout: float | None = None) -> Any:
        await trio.lowlevel.checkpoint()
        if self.fail is not None:
            raise self.fail("fake failure")
        reply = self._do(args)
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    async def pipeline(self, commands: Any, timeout: float | None = None) -> list[Any]:
        await trio.lowlevel.checkpoint()
        if self.fail is not None:
            raise self.fail("fake failure")
        return [self._do(c) for c in commands]

    @asynccontextmanager
    async def blocking(self) -> AsyncIterator[Any]:
        await trio.lowlevel.checkpoint()
        raise RedisUnavailable("no blocking connections in this fake")
        yield  # pragma: no cover

    def notices(self) -> list[Any]:
        return [decode(f) for f in self.streams.get(STATE, [])]


def shared(client: FakeRedis, clock: Clock, node: str = "a", **kw: Any) -> SharedPinStore:
    v = ClusterView(node, clock_offset=0.0)
    return SharedPinStore(client, "api", v, MemoryPinStore(), clock=clock, wall_clock=clock,
                          **kw)  # type: ignore[arg-type]  # fmt: skip


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def redis(clock: Clock) -> FakeRedis:
    return FakeRedis(clock)


# ------------------------------------------------------------------------ LocalPinStore


async def test_local_pin_store_is_the_memory_store_behind_async_calls() -> None:
    s = LocalPinStore()
    assert await s.pin_if_absent("r:s", "t1", 10.0, 0.0) == "t1"
    assert await s.pin_if_absent("r:s", "t2", 10.0, 1.0) == "t1"
    assert await s.get("r:s", 9.0) == "t1"
    await s.refresh("r:s", 10.0, 9.0)
    assert await s.get("r:s", 18.0) == "t1"
    await s.unpin("r:s")
    assert await s.get("r:s", 18.0) is None


# ----------------------------------------------------------------------- SharedPinStore


async def test_first_writer_wins_across_nodes(redis: FakeRedis, clock: Clock) -> None:
    a, b = shared(redis, clock, "a"), shared(redis, clock, "b")
    assert await a.pin_if_absent("r:s1", "t1", 60.0, clock.t) == "t1"
    assert await b.pin_if_absent("r:s1", "t2", 60.0, clock.t) == "t1"
    assert redis.data["lb:{api}:sticky:r:s1"][0] == "t1"
    assert (a.stats.pins_won, b.stats.pins_lost) == (1, 1)
    # b cached the winner with the pin's remaining ttl
    assert b.local.get("r:s1", clock.t + 59.0) == "t1"
    assert b.local.get("r:s1", clock.t + 60.0) is None


async def test_read_through_then_cache(redis: FakeRedis, clock: Clock) -> None:
    a, b = shared(redis, clock, "a"), shared(redis, clock, "b")
    await a.pin_if_absent("r:s", "t1", 30.0, clock.t)
    clock.t += 10.0
    redis.calls.clear()
    assert await b.get("r:s", clock.t) == "t1"
    assert redis.calls == ["GET", "PTTL"]
    assert await b.get("r:s", clock.t + 5.0) == "t1"
    assert redis.calls == ["GET", "PTTL"]  # the second one came from the cache
    assert b.stats.cache_hits == 1
    # cached for the remaining 20 s only, as Redis holds it
    assert b.local.get("r:s", clock.t + 19.9) == "t1"
    assert b.local.get("r:s", clock.t + 20.0) is None


async def test_a_miss_everywhere_is_none(redis: FakeRedis, clock: Clock) -> None:
    s = shared(redis, clock)
    assert await s.get("r:nobody", clock.t) is None
    assert s.stats.read_misses == 1
    assert len(s.local) == 0


async def test_refresh_is_local_at_once_and_batched_to_redis(
    redis: FakeRedis, clock: Clock
) -> None:
    s = shared(redis, clock, notices=False)
    await s.pin_if_absent("r:s", "t1", 10.0, clock.t)
    redis.calls.clear()
    for dt in (5.0, 6.0, 7.0):
        await s.refresh("r:s", 10.0, clock.t + dt)
    assert redis.calls == []  # nothing on the request path
    assert s.local.get("r:s", clock.t + 16.9) == "t1"
    clock.t += 7.0
    assert await s.flush() == 1  # three refreshes, one PEXPIRE
    assert redis.calls == ["PEXPIRE"]
    assert redis.data["lb:{api}:sticky:r:s"][1] == pytest.approx(clock.t + 10.0)


async def test_a_refresh_of_a_key_redis_lost_recreates_it(redis: FakeRedis, clock: Clock) -> None:
    s = shared(redis, clock)
    await s.pin_if_absent("r:s", "t1", 10.0, clock.t)
    redis.data.clear()  # e.g. a restart
    await s.refresh("r:s", 10.0, clock.t + 1.0)
    clock.t += 2.0
    await s.flush()
    assert redis.data["lb:{api}:sticky:r:s"] == ("t1", pytest.approx(clock.t + 9.0))
    assert s.stats.recreated == 1


async def test_unpin_deletes_and_tells_the_others(redis: FakeRedis, clock: Clock) -> None:
    a, b = shared(redis, clock, "a"), shared(redis, clock, "b")
    await a.pin_if_absent("r:s", "t1", 60.0, clock.t)
    assert await b.get("r:s", clock.t) == "t1"
    await a.unpin("r:s")
    assert "lb:{api}:sticky:r:s" not in redis.data
    assert await a.get("r:s", clock.t) is None
    await a.flush()
    pin, unpin = redis.notices()
    assert isinstance(pin, Pin)
    assert (pin.rule, pin.session, pin.target, pin.ttl) == ("r", "s", "t1", 60.0)
    assert isinstance(unpin, Unpin) and (unpin.origin, unpin.rule, unpin.session) == ("a", "r", "s")
    assert b.apply(unpin)
    assert len(b.local) == 0
    assert not a.apply(unpin)  # its own notice


async def test_pin_notices_warm_the_other_caches(redis: FakeRedis, clock: Clock) -> None:
    a, b = shared(redis, clock, "a"), shared(redis, clock, "b")
    await a.pin_if_absent(":s", "t1", 60.0, clock.t)  # LB-level block: rule ""
    await a.flush()
    (notice,) = redis.notices()
    assert (notice.rule, notice.session) == ("", "s")
    assert b.apply(notice)
    redis.calls.clear()
    assert await b.get(":s", clock.t) == "t1"
    assert redis.calls == []


async def test_no_notices_when_disabled(redis: FakeRedis, clock: Clock) -> None:
    s = shared(redis, clock, notices=False)
    await s.pin_if_absent("r:s", "t1", 60.0, clock.t)
    await s.unpin("r:s")
    await s.flush()
    assert redis.notices() == []


@pytest.mark.parametrize("error", [RedisUnavailable, RedisTimeout])
async def test_redis_errors_fall_back_on_the_cache(
    redis: FakeRedis, clock: Clock, error: type[Exception]
) -> None:
    s = shared(redis, clock)
    await s.pin_if_absent("r:old", "t1", 60.0, clock.t)
    redis.fail = error
    assert await s.get("r:old", clock.t) == "t1"  # cached
    assert await s.get("r:new", clock.t) is None  # never raises
    assert await s.pin_if_absent("r:new", "t2", 60.0, clock.t) == "t2"
    assert await s.get("r:new", clock.t) == "t2"
    await s.refresh("r:new", 60.0, clock.t)
    await s.unpin("r:old")
    assert await s.get("r:old", clock.t) is None
    with pytest.raises(error):
        await s.flush()
    assert s.stats.fallbacks >= 3
    # Redis back: the failed DEL is retried by the next flush
    redis.fail = None
    assert "lb:{api}:sticky:r:old" in redis.data
    await s.flush()
    assert "lb:{api}:sticky:r:old" not in redis.data


async def test_degraded_never_calls_redis(redis: FakeRedis, clock: Clock) -> None:
    s = shared(redis, clock)
    s.view.degraded = True
    assert await s.get("r:s", clock.t) is None
    assert await s.pin_if_absent("r:s", "t1", 60.0, clock.t) == "t1"
    assert await s.get("r:s", clock.t) == "t1"
    await s.refresh("r:s", 60.0, clock.t)
    await s.unpin("r:s")
    assert redis.calls == []


async def test_republish_restores_live_pins_after_redis_comes_back_empty(
    redis: FakeRedis, clock: Clock
) -> None:
    s = shared(redis, clock)
    await s.pin_if_absent("r:a", "t1", 60.0, clock.t)
    await s.pin_if_absent("r:b", "t2", 5.0, clock.t)
    await s.pin_if_absent("r:c", "t3", 60.0, clock.t)
    redis.data.clear()
    redis.data["lb:{api}:sticky:r:c"] = ("t9", None)  # re-pinned elsewhere meanwhile
    clock.t += 10.0  # r:b has expired
    assert await s.republish() == 1
    assert redis.data["lb:{api}:sticky:r:a"] == ("t1", pytest.approx(clock.t + 50.0))
    assert "lb:{api}:sticky:r:b" not in redis.data
    assert redis.data["lb:{api}:sticky:r:c"][0] == "t9"
    assert s.local.get("r:c", clock.t) == "t9"  # the cache adopts Redis's pin


async def test_republish_never_raises(redis: FakeRedis, clock: Clock) -> None:
    s = shared(redis, clock)
    await s.pin_if_absent("r:a", "t1", 60.0, clock.t)
    redis.fail = RedisUnavailable
    assert await s.republish() == 0


async def test_the_flusher_sends_in_the_background(
    redis: FakeRedis, clock: Clock, autojump_clock: trio.testing.MockClock
) -> None:
    s = shared(redis, clock, flush_period=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        await s.pin_if_absent("r:s", "t1", 10.0, clock.t)
        clock.t += 5.0
        await s.refresh("r:s", 10.0, clock.t)
        redis.calls.clear()
        await trio.sleep(0.5)
        assert "PEXPIRE" in redis.calls and "XADD" in redis.calls
        assert redis.data["lb:{api}:sticky:r:s"][1] == pytest.approx(clock.t + 10.0)
        nursery.cancel_scope.cancel()


async def test_republish_sends_deletes_queued_during_the_outage_first(
    redis: FakeRedis, clock: Clock
) -> None:
    s = shared(redis, clock)
    await s.pin_if_absent("r:s", "t1", 60.0, clock.t)
    s.view.degraded = True
    await s.unpin("r:s")  # the target went away during the outage
    assert await s.pin_if_absent("r:s", "t2", 60.0, clock.t) == "t2"
    s.view.degraded = False
    assert await s.republish() == 1
    assert redis.data["lb:{api}:sticky:r:s"][0] == "t2"  # not the stale t1
    assert s.local.get("r:s", clock.t) == "t2"
