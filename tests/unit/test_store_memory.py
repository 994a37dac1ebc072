"""Tests for lbshared.store's in-process MemoryEventLog (ids, reads, blocking reads on the fake
clock, retention) and the key layout helpers."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from lbshared import store
from lbshared.events import LbDeleted, Pin
from lbshared.store import MemoryEventLog, format_id, parse_id


def ev(n: int, lb: str = "a") -> LbDeleted:
    return LbDeleted(lb=lb, origin="t", at=float(n), version=n)


class Clock:
    """Epoch seconds under the test's control (for the ids)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- keys and ids ------------------------------------------------------------------------------


def test_key_layout() -> None:
    assert store.meta_key("api-lb") == "lb:{api-lb}:meta"
    assert store.config_stream("api-lb") == "lb:{api-lb}:config"
    assert store.snapshot_key("api-lb") == "lb:{api-lb}:snapshot"
    assert store.state_stream("api-lb") == "lb:{api-lb}:state"
    assert store.health_stream("api-lb") == "lb:{api-lb}:health"
    assert store.sticky_key("api-lb", "", "s1") == "lb:{api-lb}:sticky::s1"
    assert store.ratelimit_key("api-lb", "v2", "10.0.0.1") == "lb:{api-lb}:rl:v2:10.0.0.1"
    assert (store.SEQ_KEY, store.REGISTRY_KEY, store.REGISTRY_EVENTS_KEY, store.NODES_KEY) == (
        "lb:seq", "lb:registry", "lb:registry:events", "lb:nodes")  # fmt: skip


@pytest.mark.parametrize(
    ("text", "pair"), [("0", (0, 0)), ("0-0", (0, 0)), ("1700-3", (1700, 3)), ("12", (12, 0))]
)
def test_parse_id(text: str, pair: tuple[int, int]) -> None:
    assert parse_id(text) == pair


@pytest.mark.parametrize("text", ["", "$", "-1", "1-", "a-1", "1-2-3", "1.5", "١٢"])
def test_parse_id_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_id(text)


def test_format_id() -> None:
    assert format_id((1700, 3)) == "1700-3"


# -- append and read ---------------------------------------------------------------------------


async def test_ids_are_ms_seq_and_only_grow() -> None:
    clock = Clock(1000.0)
    log = MemoryEventLog(clock=clock)
    ids = [await log.append("s", ev(1)), await log.append("s", ev(2))]
    clock.now = 1000.5
    ids.append(await log.append("s", ev(3)))
    clock.now = 999.0  # the wall clock stepped back
    ids.append(await log.append("s", ev(4)))
    assert ids == ["1000000-0", "1000000-1", "1000500-0", "1000500-1"]
    assert await log.append("other", ev(5)) == "999000-0"  # each stream has its own sequence


async def test_read_after_positions_and_advance_in_place() -> None:
    log = MemoryEventLog(clock=Clock())
    a = [await log.append("a", ev(i)) for i in range(1, 4)]
    b = [await log.append("b", ev(i, "b")) for i in range(10, 12)]
    positions = {"a": "0", "b": b[0], "missing": "0"}
    out = await log.read(positions)
    assert [(s, i, e.version) for s, i, e in out] == [
        ("a", a[0], 1), ("a", a[1], 2), ("a", a[2], 3), ("b", b[1], 11)]  # fmt: skip
    assert positions == {"a": a[2], "b": b[1], "missing": "0"}
    assert await log.read(positions) == []


async def test_count_limits_each_stream() -> None:
    log = MemoryEventLog(clock=Clock())
    for i in range(5):
        await log.append("a", ev(i + 1))
        await log.append("b", ev(i + 1, "b"))
    positions = {"a": "0", "b": "0"}
    first = await log.read(positions, count=2)
    assert [(s, e.version) for s, _, e in first] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    rest = await log.read(positions, count=10)
    assert [(s, e.version) for s, _, e in rest] == [("a", 3), ("a", 4), ("a", 5),
                                                    ("b", 3), ("b", 4), ("b", 5)]  # fmt: skip


async def test_dollar_means_only_new_entries() -> None:
    clock = Clock()
    log = MemoryEventLog(clock=clock)
    old = await log.append("a", ev(1))
    positions = {"a": "$", "empty": "$"}
    assert await log.read(positions) == []
    assert positions == {"a": old, "empty": "0-0"}  # resolved: nothing in between can be missed
    new = await log.append("a", ev(2))
    later = await log.append("empty", ev(3, "e"))
    out = await log.read(positions)
    assert [(s, i) for s, i, _ in out] == [("a", new), ("empty", later)]


async def test_bad_arguments() -> None:
    log = MemoryEventLog()
    with pytest.raises(ValueError):
        await log.read({"a": "nope"})
    with pytest.raises(ValueError):
        await log.read({"a": "0"}, block=-1)
    with pytest.raises(ValueError):
        await log.read({"a": "0"}, count=0)
    with pytest.raises(ValueError):
        MemoryEventLog(maxlen=0)


# -- blocking reads (fake clock: no real waiting) ----------------------------------------------


async def test_blocking_read_wakes_on_append(autojump_clock: trio.testing.MockClock) -> None:
    log = MemoryEventLog(clock=Clock())
    got: list[tuple[float, list[int]]] = []

    async def reader() -> None:
        positions = {"a": "$"}
        out = await log.read(positions, block=10)
        got.append((trio.current_time(), [e.version for _, _, e in out]))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(2)
        await log.append("other", ev(1, "o"))  # wakes the reader, which waits on
        await trio.sleep(1)
        await log.append("a", ev(7))
    assert got == [(start + 3, [7])]


async def test_blocking_read_times_out_empty(autojump_clock: trio.testing.MockClock) -> None:
    log = MemoryEventLog(clock=Clock())
    start = trio.current_time()
    assert await log.read({"a": "0"}, block=5) == []
    assert trio.current_time() - start == pytest.approx(5)


async def test_non_blocking_read_returns_at_once(autojump_clock: trio.testing.MockClock) -> None:
    log = MemoryEventLog(clock=Clock())
    start = trio.current_time()
    assert await log.read({"a": "0"}) == []
    assert await log.read({"a": "0"}, block=0) == []
    assert trio.current_time() == start


async def test_ready_entries_do_not_wait(autojump_clock: trio.testing.MockClock) -> None:
    log = MemoryEventLog(clock=Clock())
    await log.append("a", ev(1))
    start = trio.current_time()
    assert len(await log.read({"a": "0"}, block=math.inf)) == 1
    assert trio.current_time() == start


async def test_many_blocked_readers_all_wake(autojump_clock: trio.testing.MockClock) -> None:
    log = MemoryEventLog(clock=Clock())
    woke: list[int] = []

    async def reader(n: int) -> None:
        out = await log.read({"a": "$"}, block=math.inf)
        woke.append(len(out))

    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(reader, n)
        await trio.sleep(1)
        await log.append("a", ev(1))
    assert woke == [1] * 5


# -- retention ---------------------------------------------------------------------------------


async def test_retention_keeps_the_last_maxlen_entries() -> None:
    log = MemoryEventLog(maxlen=3, clock=Clock())
    ids = [await log.append("a", ev(i + 1)) for i in range(5)]
    assert await log.first_id("a") == ids[2]
    out = await log.read({"a": "0"})
    assert [i for _, i, _ in out] == ids[2:]
    # A reader whose position was trimmed away sees first_id past it: it must reload.
    assert parse_id(ids[0]) < parse_id(await log.first_id("a") or "0")


async def test_retention_compacts_storage() -> None:
    log = MemoryEventLog(maxlen=10, clock=Clock())
    for i in range(5000):
        last = await log.append("a", ev(i + 1))
    kept = log._streams["a"]
    assert len(kept.entries) < 2100  # trimmed entries are really dropped, not just skipped
    out = await log.read({"a": "0"})
    assert len(out) == 10 and out[-1][1] == last
    assert [e.version for _, _, e in out] == list(range(4991, 5001))


async def test_maxlen_per_stream() -> None:
    log = MemoryEventLog(maxlen=100, maxlen_for=lambda s: 2 if s.endswith(":state") else None,
                         clock=Clock())  # fmt: skip
    for i in range(5):
        await log.append("lb:{a}:state", Pin(lb="a", origin="n", at=0, rule="", session=str(i),
                                             target="t", ttl=1))  # fmt: skip
        await log.append("lb:{a}:config", ev(i + 1))
    assert len(await log.read({"lb:{a}:state": "0"})) == 2
    assert len(await log.read({"lb:{a}:config": "0"})) == 5


async def test_first_id() -> None:
    log = MemoryEventLog(clock=Clock())
    assert await log.first_id("a") is None
    first = await log.append("a", ev(1))
    await log.append("a", ev(2))
    assert await log.first_id("a") == first
    assert log.skipped.total == 0


async def test_matches_the_event_log_protocol() -> None:
    log: store.EventLog = MemoryEventLog()
    assert await log.first_id("x") is None
