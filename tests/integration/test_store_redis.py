"""RedisEventLog, the snapshot/registry loaders and the config publish protocol against a real
redis-server (a private one on a free port, never the system Redis)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import redis
import trio

from lbshared.config import ConfigError, LoadBalancer
from lbshared.events import LbConfig, LbDeleted, Pin, RegistryNotice, decode, encode
from lbshared.publish import (
    VersionConflict,
    _sync_registry,
    adelete_lb,
    apublish_config,
    delete_lb,
    publish_config,
)
from lbshared.redis_trio import RedisClient
from lbshared.store import (
    NODES_KEY,
    REGISTRY_EVENTS_KEY,
    REGISTRY_KEY,
    SEQ_KEY,
    RedisEventLog,
    config_stream,
    health_stream,
    load_config_state,
    load_heartbeats,
    load_registry,
    load_snapshot,
    meta_key,
    parse_id,
    snapshot_key,
    state_stream,
)
from tests.redisproc import RedisProc, redis_proc_module  # noqa: F401 - a fixture

WAIT = 5.0  # bound of every wait for a condition


def pin(n: int, lb: str = "a") -> Pin:
    return Pin(lb=lb, origin="node-a", at=float(n), rule="", session=f"s{n}", target="t", ttl=60)


def lb_dict(name: str, port: int = 8080, targets: int = 1) -> dict[str, Any]:
    return {
        "name": name,
        "listeners": [{"port": port}],
        "targets": [{"id": f"t{i}", "address": f"127.0.0.1:{9000 + i}"} for i in range(targets)],
    }


@pytest.fixture
async def client(redis_proc_module: RedisProc, nursery: trio.Nursery) -> RedisClient:  # noqa: F811
    redis_proc_module.command("FLUSHALL")
    c = RedisClient(redis_proc_module.url)
    await nursery.start(c.run)
    assert await c.wait_connected(WAIT)
    return c


@pytest.fixture
def sync_redis(redis_proc_module: RedisProc) -> Any:  # noqa: F811
    r = redis.Redis.from_url(redis_proc_module.url, socket_timeout=WAIT)
    yield r
    r.close()


async def blocked_clients(client: RedisClient) -> int:
    info = (await client.execute("INFO", "clients")).decode()
    return int(info.split("blocked_clients:")[1].split()[0])


async def wait_blocked(client: RedisClient, n: int = 1) -> None:
    """Wait (bounded) until ``n`` connections sit in a blocking command."""
    with trio.fail_after(WAIT):
        while await blocked_clients(client) < n:  # noqa: ASYNC110 - the state is in Redis
            await trio.sleep(0.005)


# -- RedisEventLog ------------------------------------------------------------------------------


async def test_append_read_round_trip(client: RedisClient) -> None:
    log = RedisEventLog(client)
    ids = [await log.append(state_stream("a"), pin(i)) for i in range(3)]
    other = await log.append(health_stream("b"), pin(9, "b"))
    raw = await client.execute("XRANGE", state_stream("a"), "-", "+")
    assert [r[0].decode() for r in raw] == ids
    assert decode(dict(zip(raw[0][1][::2], raw[0][1][1::2], strict=True))) == pin(0)
    positions = {state_stream("a"): "0", health_stream("b"): "0", state_stream("none"): "0"}
    out = await log.read(positions)
    assert [(s, i, e) for s, i, e in out] == [
        (state_stream("a"), ids[0], pin(0)), (state_stream("a"), ids[1], pin(1)),
        (state_stream("a"), ids[2], pin(2)), (health_stream("b"), other, pin(9, "b"))]  # fmt: skip
    assert positions == {state_stream("a"): ids[2], health_stream("b"): other,
                         state_stream("none"): "0"}  # fmt: skip
    assert await log.read(positions) == []
    assert await log.read({state_stream("a"): ids[0]}, count=1) == [
        (state_stream("a"), ids[1], pin(1))
    ]
    assert await log.first_id(state_stream("a")) == ids[0]
    assert await log.first_id(state_stream("none")) is None


async def test_registry_notices_come_out_of_the_same_read(client: RedisClient) -> None:
    log = RedisEventLog(client)
    positions = {REGISTRY_EVENTS_KEY: "$", config_stream("a"): "$"}
    assert await log.read(positions) == []
    version, stream_id = await apublish_config(client, "a", lb_dict("a"), 0, "t")
    await client.execute("XADD", REGISTRY_EVENTS_KEY, "*", "type", "bogus")
    out = await log.read(positions)
    assert [(s, type(e).__name__) for s, _, e in out] == [
        (REGISTRY_EVENTS_KEY, "RegistryNotice"),
        (config_stream("a"), "LbConfig"),
    ]
    assert out[0][2] == RegistryNotice(type="lb_config", lb="a", version=version)
    assert out[1][1] == stream_id
    assert log.skipped.by_reason == {"missing field": 1}


async def test_blocking_read_gets_a_later_append(client: RedisClient) -> None:
    log = RedisEventLog(client)
    await log.append(state_stream("a"), pin(0))
    positions = {state_stream("a"): "$"}
    got: list[Any] = []

    async def reader() -> None:
        got.extend(await log.read(positions, block=WAIT))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await wait_blocked(client)
        new_id = await log.append(state_stream("a"), pin(1))
    assert got == [(state_stream("a"), new_id, pin(1))]
    assert positions == {state_stream("a"): new_id}
    # The dedicated connection went back to the pool and serves the next blocking read.
    assert len(log._idle) == 1
    await log.aclose()
    assert log._idle == []


async def test_blocking_read_times_out_empty(client: RedisClient) -> None:
    log = RedisEventLog(client)
    start = time.monotonic()
    assert await log.read({state_stream("a"): "0"}, block=0.2) == []
    assert 0.19 <= time.monotonic() - start < WAIT
    await log.aclose()


async def test_malformed_entries_are_skipped_and_counted(client: RedisClient) -> None:
    log = RedisEventLog(client)
    stream = state_stream("a")
    good1 = await log.append(stream, pin(1))
    bad_ids = [
        await client.execute("XADD", stream, "*", "v", "2", "type", "pin", "lb", "a",
                             "origin", "x", "at", "1", "data", "{}"),
        await client.execute("XADD", stream, "*", "v", "1", "type", "node_rebooted", "lb", "a",
                             "origin", "x", "at", "1", "data", "{}"),
        await client.execute("XADD", stream, "*", "just", "junk"),
        await client.execute("XADD", stream, "*", *sum(encode(pin(2)).items(), ())[:-1], "{"),
    ]  # fmt: skip
    good2 = await log.append(stream, pin(3))
    positions = {stream: "0"}
    out = await log.read(positions)
    assert [(i, e) for _, i, e in out] == [(good1, pin(1)), (good2, pin(3))]
    assert log.skipped.total == 4
    assert log.skipped.by_reason == {"unknown version": 1, "unknown type": 1, "missing field": 1,
                                     "bad JSON": 1}  # fmt: skip
    assert positions[stream] == good2 and all(b.decode() != good2 for b in bad_ids)


async def test_a_batch_of_only_bad_entries_advances_and_waits_on(client: RedisClient) -> None:
    log = RedisEventLog(client)
    stream = state_stream("a")
    bad = (await client.execute("XADD", stream, "*", "junk", "1")).decode()
    positions = {stream: "0"}
    got: list[Any] = []

    async def reader() -> None:
        got.extend(await log.read(positions, block=WAIT))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await wait_blocked(client)  # it read the bad entry and blocks for more
        good = await log.append(stream, pin(1))
    assert got == [(stream, good, pin(1))]
    assert log.skipped.total == 1 and parse_id(bad) < parse_id(good)
    await log.aclose()


async def test_trim_args_per_stream_kind(client: RedisClient) -> None:
    log = RedisEventLog(client, config_retention=100, state_retention=10, maxlen=50)
    assert log.trim_args(config_stream("a")) == []  # the server's time is not known yet
    assert log.trim_args(health_stream("a")) == ["MAXLEN", "~", "50"]
    first = await log.append(health_stream("a"), pin(0))
    ms = parse_id(first)[0]  # the server's clock, as the id tells it
    assert log.trim_args(config_stream("a")) == ["MINID", "~", f"{ms - 100_000}-0"]
    assert log.trim_args(state_stream("a")) == ["MINID", "~", f"{ms - 10_000}-0"]


async def test_trimmed_stream_shows_in_first_id(client: RedisClient) -> None:
    log = RedisEventLog(client, state_retention=0.001, maxlen=100)
    # MAXLEN ~: whole macro nodes (100 entries each by default) go.
    health = [await log.append(health_stream("a"), pin(i)) for i in range(350)]
    first = await log.first_id(health_stream("a"))
    assert first is not None and parse_id(health[0]) < parse_id(first)
    assert await client.execute("XLEN", health_stream("a")) < 350
    # MINID ~ by the server's time: entries older than the retention go, the new ones stay.
    state = [await log.append(state_stream("a"), pin(i)) for i in range(250)]
    with trio.fail_after(WAIT):  # until the server's clock passed the first node's entries
        while True:
            last = await log.append(state_stream("a"), pin(999))
            first = await log.first_id(state_stream("a"))
            assert first is not None
            if parse_id(state[0]) < parse_id(first):
                break
            await trio.sleep(0.002)
    assert parse_id(first) <= parse_id(last)
    # A reader resuming from a trimmed id can tell it must reload from the snapshot.
    assert parse_id(state[0]) < parse_id(first)


# -- publish protocol ---------------------------------------------------------------------------


async def test_publish_writes_stream_snapshot_meta_and_registry(client: RedisClient) -> None:
    version, stream_id = await apublish_config(client, "a", lb_dict("a"), 0, "node-1", now=1234.5)
    raw = await client.execute("XRANGE", config_stream("a"), "-", "+")
    assert [r[0].decode() for r in raw] == [stream_id]
    event = decode(dict(zip(raw[0][1][::2], raw[0][1][1::2], strict=True)))
    assert event == LbConfig(lb="a", origin="node-1", at=1234.5, version=version,
                             config=LoadBalancer.model_validate(lb_dict("a")))  # fmt: skip
    snap = await load_snapshot(client, "a")
    assert snap is not None
    assert (snap.version, snap.stream_id, snap.config) == (version, stream_id, event.config)
    meta = await client.execute("HGETALL", meta_key("a"))
    assert dict(zip(meta[::2], meta[1::2], strict=True)) == {
        b"version": str(version).encode(),
        b"updated_at": b"1234.5",
        b"updated_by": b"node-1",
    }
    assert await load_registry(client) == {"a": version}
    notices = await client.execute("XRANGE", REGISTRY_EVENTS_KEY, "-", "+")
    assert notices[-1][1] == [b"type", b"lb_config", b"lb", b"a", b"version", str(version).encode()]


async def test_delete_and_recreate(client: RedisClient) -> None:
    v1, _ = await apublish_config(client, "a", lb_dict("a"), 0, "t")
    v2, sid = await adelete_lb(client, "a", v1, "t")
    assert v2 > v1
    snap = await load_snapshot(client, "a")
    assert snap is not None and (snap.version, snap.stream_id, snap.config) == (v2, sid, None)
    assert await load_registry(client) == {}
    with pytest.raises(VersionConflict) as info:
        await apublish_config(client, "a", lb_dict("a"), 0, "t")  # "never applied" is wrong now
    assert info.value.current == v2
    v3, _ = await apublish_config(client, "a", lb_dict("a", targets=2), v2, "t")
    assert await load_registry(client) == {"a": v3}
    log = RedisEventLog(client)
    events = [e for _, _, e in await log.read({config_stream("a"): "0"})]
    assert [(type(e), e.version) for e in events] == [
        (LbConfig, v1),
        (LbDeleted, v2),
        (LbConfig, v3),
    ]


async def test_concurrent_publishers_exactly_one_wins(
    client: RedisClient,
    redis_proc_module: RedisProc,  # noqa: F811
) -> None:
    results: list[Any] = []

    async def publisher(n: int, c: RedisClient) -> None:
        try:
            results.append(await apublish_config(c, "a", lb_dict("a", targets=n + 1), 0, f"n{n}"))
        except VersionConflict as exc:
            results.append(exc)

    other = RedisClient(redis_proc_module.url)
    async with trio.open_nursery() as nursery:
        await nursery.start(other.run)
        assert await other.wait_connected(WAIT)
        async with trio.open_nursery() as racers:
            for n in range(6):
                racers.start_soon(publisher, n, client if n % 2 else other)
        nursery.cancel_scope.cancel()
    wins = [r for r in results if isinstance(r, tuple)]
    conflicts = [r for r in results if isinstance(r, VersionConflict)]
    assert len(wins) == 1 and len(conflicts) == 5
    assert {c.current for c in conflicts} == {wins[0][0]}
    assert await client.execute("XLEN", config_stream("a")) == 1
    snap = await load_snapshot(client, "a")
    assert snap is not None and snap.version == wins[0][0] and snap.stream_id == wins[0][1]


def test_concurrent_sync_publishers_exactly_one_wins(redis_proc_module: RedisProc) -> None:  # noqa: F811
    redis_proc_module.command("FLUSHALL")
    barrier = threading.Barrier(8)
    results: list[Any] = []
    lock = threading.Lock()

    def publisher(n: int) -> None:
        r = redis.Redis.from_url(redis_proc_module.url, socket_timeout=WAIT)
        barrier.wait(WAIT)
        try:
            outcome: Any = publish_config(r, "a", lb_dict("a", targets=n + 1), 0, f"t{n}")
        except VersionConflict as exc:
            outcome = exc
        finally:
            r.close()
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=publisher, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    assert len(results) == 8
    assert sum(isinstance(r, tuple) for r in results) == 1
    assert redis_proc_module.command("XLEN", config_stream("a")) == 1


def test_sync_publish_and_delete(sync_redis: Any, redis_proc_module: RedisProc) -> None:  # noqa: F811
    redis_proc_module.command("FLUSHALL")
    v1, sid = publish_config(sync_redis, "a", LoadBalancer.model_validate(lb_dict("a")), 0, "lbctl")
    snapshot = json.loads(sync_redis.get(snapshot_key("a")))
    assert snapshot == {"stream_id": sid, "version": v1, "config": lb_dict("a")}
    v2, _ = delete_lb(sync_redis, "a", v1, "lbctl")
    assert json.loads(sync_redis.get(snapshot_key("a")))["config"] is None
    assert sync_redis.hgetall(REGISTRY_KEY) == {}
    assert int(sync_redis.hget(meta_key("a"), "version")) == v2


def test_stale_seq_is_moved_forward(sync_redis: Any, redis_proc_module: RedisProc) -> None:  # noqa: F811
    redis_proc_module.command("FLUSHALL")
    v1, _ = publish_config(sync_redis, "a", lb_dict("a"), 0, "t")
    sync_redis.set(SEQ_KEY, 0)  # e.g. a restored backup of lb:seq
    v2, _ = publish_config(sync_redis, "a", lb_dict("a", targets=2), v1, "t")
    assert v2 > v1
    assert int(sync_redis.get(SEQ_KEY)) == v2


def test_registry_write_overtaken_by_a_delete_is_repaired(
    sync_redis: Any,
    redis_proc_module: RedisProc,  # noqa: F811
) -> None:
    redis_proc_module.command("FLUSHALL")
    v1, _ = publish_config(sync_redis, "a", lb_dict("a"), 0, "t")
    delete_lb(sync_redis, "a", v1, "t")
    # The create's registry step arriving late, after the delete's, must not bring "a" back.
    _sync_registry(sync_redis, "a", v1, deleted=False)
    assert sync_redis.hgetall(REGISTRY_KEY) == {}


async def test_publish_refuses_invalid_configs(client: RedisClient) -> None:
    with pytest.raises(ConfigError) as info:
        await apublish_config(client, "a", {"name": "a", "targets": [{"id": "t"}]}, 0, "t")
    assert info.value.problems == ["targets[0].address: required key is missing"]
    with pytest.raises(ValueError, match="names 'b'"):
        await apublish_config(client, "a", {"name": "b"}, 0, "t")
    assert await client.execute("EXISTS", config_stream("a"), SEQ_KEY) == 0


# -- loaders ------------------------------------------------------------------------------------


async def test_load_config_state_from_registry_and_snapshots(client: RedisClient) -> None:
    va, sa = await apublish_config(client, "a", lb_dict("a", 8080), 0, "t")
    vb, _ = await apublish_config(client, "b", lb_dict("b", 8081), 0, "t")
    vd, sb = await adelete_lb(client, "b", vb, "t")
    vc, sc = await apublish_config(client, "c", lb_dict("c", 8082), 0, "t")
    await client.execute("HSET", REGISTRY_KEY, "junk", "not-a-number")
    assert await load_registry(client) == {"a": va, "c": vc}
    assert await load_snapshot(client, "nope") is None
    state, positions = await load_config_state(client)
    assert sorted(state.lbs) == ["a", "c"] and state.version == vc
    assert positions == {config_stream("a"): sa, config_stream("c"): sc}
    assert sb  # the deleted one is not followed from the registry (its deletion is in sb)
    assert vd < vc


async def test_load_heartbeats_prunes_old_entries(client: RedisClient) -> None:
    for node_id, age in (("n2", 1.0), ("n1", 30.0), ("n3", 61.0)):
        await client.execute(
            "HSET", NODES_KEY, node_id, json.dumps({"id": node_id, "last_heartbeat": 1000.0 - age})
        )
    await client.execute("HSET", NODES_KEY, "junk", "{")
    beats = await load_heartbeats(client, now=1000.0)
    assert [(b.id, b.live(1000.0)) for b in beats] == [("n1", False), ("n2", True)]
    assert sorted(await client.execute("HKEYS", NODES_KEY)) == [b"junk", b"n1", b"n2"]
