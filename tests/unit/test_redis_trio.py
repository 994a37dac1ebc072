"""Tests for lbshared.redis_url and lbshared.redis_trio without a real Redis.

The client runs against ``FakeRedis``, an in-memory RESP server on trio memory
streams (``memory_stream_pair``) that parses commands with hiredis and answers
a small command set, plus commands that misbehave on purpose: ``SLOW secs x``
answers late (and holds back every later reply, as Redis does), ``HANG`` stalls
the server, ``EXTRA`` answers twice, ``GARBAGE`` breaks the protocol,
``CLOSE`` drops the connection. Time is trio's ``autojump_clock``: timeouts
are exact, and no test sleeps in real time.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import hiredis
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from lbshared.redis_trio import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    Backoff,
    RedisAuthError,
    RedisClient,
    RedisError,
    RedisTimeout,
    RedisUnavailable,
    ReplyError,
    Script,
)
from lbshared.redis_url import RedisAddress, parse_url

# -- URLs ------------------------------------------------------------------------------------------

VALID_URLS = [
    ("redis://127.0.0.1", RedisAddress("127.0.0.1")),
    ("redis://localhost:6380", RedisAddress("localhost", 6380)),
    ("redis://h/0", RedisAddress("h")),
    ("redis://h/", RedisAddress("h")),
    ("redis://h:7000/15", RedisAddress("h", 7000, 15)),
    ("redis://:secret@h", RedisAddress("h", password="secret")),
    ("redis://lb:secret@h:1/2", RedisAddress("h", 1, 2, "lb", "secret")),
    ("rediss://lb:secret@h", RedisAddress("h", username="lb", password="secret", tls=True)),
    ("REDISS://H", RedisAddress("h", tls=True)),
    ("redis://[::1]:6390/3", RedisAddress("::1", 6390, 3)),
    ("redis://u%40x:p%40ss%3Aw@h", RedisAddress("h", username="u@x", password="p@ss:w")),
    ("redis://:pa@ss@h", RedisAddress("h", password="pa@ss")),
    ("redis://h?db=4", RedisAddress("h", db=4)),
    ("redis://h/4?db=4", RedisAddress("h", db=4)),
    ("  redis://h:6379/1\n", RedisAddress("h", db=1)),
]


@pytest.mark.parametrize(("url", "expected"), VALID_URLS)
def test_parse_url(url: str, expected: RedisAddress) -> None:
    assert parse_url(url) == expected


INVALID_URLS = [
    ("", "empty redis URL"),
    ("127.0.0.1:6379", "has no scheme"),
    ("http://h", "unsupported scheme 'http'"),
    ("unix:///tmp/redis.sock", "unsupported scheme 'unix'"),
    ("redis://", "names no host"),
    ("redis://:secret@/0", "names no host"),
    ("redis://h:abc", "bad port"),
    ("redis://h:70000", "bad port"),
    ("redis://h:0", "bad port"),
    ("redis://h/x", "bad database 'x'"),
    ("redis://h/-1", "bad database '-1'"),
    ("redis://h/1/2", "bad database '1/2'"),
    ("redis://h?db=x", "bad database 'x'"),
    ("redis://h/1?db=2", "names two databases (1 and 2)"),
    ("redis://h?timeout=3", "unsupported option 'timeout'"),
    ("redis://h#frag", "fragment"),
    ("redis://secret@h", "user name but no password"),
    ("redis://[::1", "malformed redis URL"),
]


@pytest.mark.parametrize(("url", "message"), INVALID_URLS)
def test_parse_url_refuses(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://lb:hunter2@h:abc",
        "redis://:hunter2@h/x",
        "http://u:hunter2@h",
        "redis://:hunter2@h?x=1",
    ],  # fmt: skip
)
def test_refusal_messages_hide_the_password(url: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_url(url)
    assert "hunter2" not in str(info.value)
    assert "***" in str(info.value)


def test_parse_url_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        parse_url(b"redis://h")  # type: ignore[arg-type]


def test_address_str_and_repr_hide_the_password() -> None:
    address = parse_url("rediss://lb:hunter2@redis.internal:6380/2")
    assert str(address) == "rediss://lb:***@redis.internal:6380/2"
    assert address.redacted == str(address)
    assert "hunter2" not in repr(address)
    assert address.unredacted_url() == "rediss://lb:hunter2@redis.internal:6380/2"
    assert str(parse_url("redis://:pw@[::1]")) == "redis://:***@[::1]:6379/0"
    assert str(parse_url("redis://h")) == "redis://h:6379/0"


_text = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=12)


@given(
    username=st.none() | _text,
    password=_text,
    port=st.integers(1, 65535),
    db=st.integers(0, 1000),
    tls=st.booleans(),
)
def test_unredacted_url_round_trips(username: str | None, password: str, port: int, db: int,
                                    tls: bool) -> None:  # fmt: skip
    address = RedisAddress("redis.example", port, db, username, password, tls)
    assert parse_url(address.unredacted_url()) == address
    # The redacted form does not depend on the password at all.
    other = RedisAddress("redis.example", port, db, username, "something else", tls)
    assert str(address) == str(other) and ":***@" in str(address)


# -- backoff ---------------------------------------------------------------------------------------


def test_backoff_doubles_to_the_cap_with_jitter_and_resets() -> None:
    low = Backoff(rand=lambda: 0.0)
    assert [low.next() for _ in range(8)] == pytest.approx(
        [0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    )
    high = Backoff(rand=lambda: 1.0)
    assert [high.next() for _ in range(7)] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0])
    high.reset()
    assert high.next() == pytest.approx(BACKOFF_MIN)
    assert (BACKOFF_MIN, BACKOFF_MAX) == (0.05, 2.0)


@given(st.lists(st.floats(0.0, 0.999999), min_size=1, max_size=30))
def test_backoff_delays_stay_within_bounds(draws: list[float]) -> None:
    it = iter(draws)
    backoff = Backoff(rand=lambda: next(it))
    for _ in draws:
        delay = backoff.next()
        assert BACKOFF_MIN / 2 <= delay <= BACKOFF_MAX


def test_backoff_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(0, 1)
    with pytest.raises(ValueError):
        Backoff(2, 1)


# -- the fake server -------------------------------------------------------------------------------


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class FakeRedis:
    """An in-memory RESP server; ``factory`` is the client's ``stream_factory``."""

    def __init__(self, nursery: trio.Nursery, *, password: str | None = None,
                 users: dict[str, str] | None = None) -> None:  # fmt: skip
        self.nursery = nursery
        self.password = password
        self.users = users or {}
        self.data: dict[bytes, bytes] = {}
        self.scripts: dict[bytes, bytes] = {}
        self.commands: list[list[bytes]] = []  # every command received, in order
        self.chunks = 0  # receive_some calls that returned data: a bound on client writes
        self.connects = 0
        self.refuse = False  # connection attempts fail with ConnectionRefusedError
        self.server_ends: list[trio.abc.Stream] = []

    async def factory(self, address: RedisAddress) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        if self.refuse:
            raise ConnectionRefusedError(111, "Connection refused")
        self.connects += 1
        client_end, server_end = trio.testing.memory_stream_pair()
        self.server_ends.append(server_end)
        self.nursery.start_soon(self._serve, server_end)
        return client_end

    async def drop_all(self) -> None:
        for end in self.server_ends:
            await end.aclose()

    async def _serve(self, stream: trio.abc.Stream) -> None:
        reader = hiredis.Reader()
        authed = self.password is None and not self.users
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                self.chunks += 1
                reader.feed(data)  # type: ignore[arg-type]  # any buffer will do
                while (command := reader.gets()) is not False:
                    self.commands.append(command)
                    name = command[0].upper()
                    if name == b"AUTH":
                        authed = self._auth(command[1:])
                        reply = b"+OK\r\n" if authed else (
                            b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
                        )  # fmt: skip
                    elif not authed:
                        reply = b"-NOAUTH Authentication required.\r\n"
                    elif name == b"CLOSE":
                        await stream.aclose()
                        return
                    elif name == b"HANG":
                        await trio.sleep_forever()
                    else:
                        reply = await self._answer(name, command[1:])
                    await stream.send_all(reply)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return

    def _auth(self, args: list[bytes]) -> bool:
        if len(args) == 1:
            return self.password is not None and args[0].decode() == self.password
        return self.users.get(args[0].decode()) == args[1].decode()

    async def _answer(self, name: bytes, args: list[bytes]) -> bytes:
        if name == b"PING":
            return b"+PONG\r\n"
        if name in (b"SELECT", b"CLIENT"):
            return b"+OK\r\n"
        if name == b"ECHO":
            return _bulk(args[0])
        if name == b"SLOW":
            await trio.sleep(float(args[0]))
            return _bulk(args[1])
        if name == b"SET":
            self.data[args[0]] = args[1]
            return b"+OK\r\n"
        if name == b"GET":
            value = self.data.get(args[0])
            return b"$-1\r\n" if value is None else _bulk(value)
        if name == b"INCR":
            number = int(self.data.get(args[0], b"0")) + 1
            self.data[args[0]] = b"%d" % number
            return b":%d\r\n" % number
        if name == b"ARRAY":
            return b"*3\r\n:1\r\n$-1\r\n*1\r\n-ERR nested\r\n"
        if name == b"BIG":
            return _bulk(b"x" * int(args[0]))
        if name == b"EXTRA":
            return b"+OK\r\n+OK\r\n"
        if name == b"GARBAGE":
            return b"?what\r\n"
        if name == b"SCRIPT" and args[0].upper() == b"LOAD":
            sha = hashlib.sha1(args[1]).hexdigest().encode()
            self.scripts[sha] = args[1]
            return _bulk(sha)
        if name == b"SCRIPT" and args[0].upper() == b"FLUSH":
            self.scripts.clear()
            return b"+OK\r\n"
        if name == b"EVALSHA":
            if args[0] not in self.scripts:
                return b"-NOSCRIPT No matching script. Please use EVAL.\r\n"
            return self._run_script(self.scripts[args[0]], args[2:])
        if name == b"EVAL":
            self.scripts[hashlib.sha1(args[0]).hexdigest().encode()] = args[0]
            return self._run_script(args[0], args[2:])
        return b"-ERR unknown command '%s'\r\n" % name.lower()

    @staticmethod
    def _run_script(source: bytes, keys_and_args: list[bytes]) -> bytes:
        if source == b"error":
            return b"-ERR user_script:1: boom\r\n"
        return _bulk(b"ran:" + source + b":" + b",".join(keys_and_args))


@asynccontextmanager
async def serving(**client_kw: Any) -> AsyncIterator[tuple[RedisClient, FakeRedis]]:
    """A FakeRedis and a running, connected client on it; everything cancelled on exit."""
    url = client_kw.pop("url", "redis://fake")
    fake_kw = {k: client_kw.pop(k) for k in ("password", "users") if k in client_kw}
    async with trio.open_nursery() as nursery:
        fake = FakeRedis(nursery, **fake_kw)
        client = RedisClient(url, stream_factory=fake.factory, **client_kw)
        await nursery.start(client.run)
        assert await client.wait_connected(5)
        yield client, fake
        nursery.cancel_scope.cancel()


def names(fake: FakeRedis) -> list[bytes]:
    return [c[0].upper() for c in fake.commands]


# -- replies ---------------------------------------------------------------------------------------


async def test_replies_come_back_as_hiredis_gives_them(autojump_clock: Any) -> None:
    async with serving() as (client, _):
        assert await client.execute("SET", "k", "v") == b"OK"
        assert await client.execute("GET", "k") == b"v"
        assert await client.execute(b"GET", b"missing") is None
        assert await client.execute("INCR", "n") == 1
        reply = await client.execute("ARRAY")
        assert reply[:2] == [1, None]
        assert isinstance(reply[2][0], ReplyError) and reply[2][0].message == "ERR nested"
        assert await client.execute("BIG", 300_000) == b"x" * 300_000


async def test_error_reply_raises_reply_error(autojump_clock: Any) -> None:
    async with serving() as (client, _):
        with pytest.raises(ReplyError) as info:
            await client.execute("NOPE", "x")
        assert info.value.message == "ERR unknown command 'nope'"
        assert info.value.code == "ERR"
        assert isinstance(info.value, RedisError)
        assert await client.execute("ECHO", "still fine") == b"still fine"
        assert client.stats.errors == 1


async def test_pipeline_keeps_errors_in_place(autojump_clock: Any) -> None:
    async with serving() as (client, fake):
        before = fake.chunks
        replies = await client.pipeline([("SET", "a", 1), ["INCR", "a"], ("NOPE",), ("GET", "a")])
        assert replies[:2] == [b"OK", 2]
        assert isinstance(replies[2], ReplyError)
        assert replies[3] == b"2"
        assert fake.chunks == before + 1  # one write for the whole pipeline
        assert await client.pipeline([("ECHO", "one")]) == [b"one"]
        assert await client.pipeline([]) == []
        assert client.stats.calls == 5 and client.stats.errors == 1


async def test_bad_commands_are_refused_before_sending(autojump_clock: Any) -> None:
    async with serving() as (client, fake):
        sent = len(fake.commands)
        with pytest.raises(ValueError):
            await client.execute()
        with pytest.raises(ValueError):
            await client.pipeline([("PING",), ()])
        with pytest.raises(TypeError):
            await client.execute("SET", "k", None)
        assert len(fake.commands) == sent
        assert await client.execute("PING") == b"PONG"


# -- FIFO, pipelining, timeouts --------------------------------------------------------------------


async def test_concurrent_callers_each_get_their_own_reply(autojump_clock: Any) -> None:
    async with serving() as (client, fake):
        results: dict[int, Any] = {}

        async def call(i: int) -> None:
            results[i] = await client.execute("ECHO", f"value-{i}")

        writes = client.stats.writes
        async with trio.open_nursery() as nursery:
            for i in range(500):
                nursery.start_soon(call, i)
        assert results == {i: f"value-{i}".encode() for i in range(500)}
        # Queued together, sent together: far fewer writes than commands.
        assert client.stats.writes - writes <= 5
        assert client.stats.calls == 500
        assert client.stats.latency_count == 500


async def test_answered_calls_leave_the_timeout_queues(autojump_clock: Any) -> None:
    # White-box: the timer's queues must hold what is in flight, not every call
    # of the last call_timeout (at 100k calls/s that would be 100k waiters).
    async with serving(call_timeout=60.0) as (client, _):
        conn = client._conn
        assert conn is not None

        async def call(i: int) -> None:
            await client.execute("ECHO", i)
            await client.execute("ECHO", i, timeout=30.0)

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(call, i)
        assert len(conn.timeouts) == 0 and len(conn.timeout_heap) == 0
        assert len(conn.pending) == 0


async def test_timed_out_reply_is_discarded_not_given_to_the_next_caller(
    autojump_clock: Any,
) -> None:
    async with serving(call_timeout=1.0) as (client, _):
        got: dict[str, Any] = {}

        async def slow() -> None:
            start = trio.current_time()
            with pytest.raises(RedisTimeout, match="SLOW got no reply within 1s"):
                await client.execute("SLOW", 3, "late")
            got["slow_elapsed"] = trio.current_time() - start

        async def next_caller() -> None:
            got["next"] = await client.execute("ECHO", "mine", timeout=10)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(next_caller)
        assert got["slow_elapsed"] == pytest.approx(1.0, abs=1e-6)
        assert got["next"] == b"mine"  # not b"late"
        assert client.stats.timeouts == 1
        assert client.stats.discarded == 1
        assert client.connected and client.stats.disconnects == 0  # a timeout is not poison


async def test_custom_timeout_shorter_than_queued_default_ones(autojump_clock: Any) -> None:
    async with serving(call_timeout=10.0) as (client, _):
        elapsed: dict[str, float] = {}

        async def call(name: str, limit: float | None, *args: Any) -> None:
            start = trio.current_time()
            try:
                await client.execute(*args, timeout=limit)
            except RedisTimeout:
                elapsed[name] = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "default", None, "SLOW", 20, "x")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(call, "short", 0.5, "ECHO", "y")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(call, "later", 2, "ECHO", "z")
        assert elapsed == pytest.approx({"default": 10.0, "short": 0.5, "later": 2.0}, abs=1e-6)


async def test_pipeline_timeout(autojump_clock: Any) -> None:
    async with serving(call_timeout=1.0) as (client, _):
        with pytest.raises(RedisTimeout, match="pipeline of 2"):
            await client.pipeline([("ECHO", "a"), ("SLOW", 5, "b")])
        assert client.stats.timeouts == 2
        assert await client.pipeline([("ECHO", "c")], timeout=10) == [b"c"]


async def test_cancelled_caller_reply_is_discarded(autojump_clock: Any) -> None:
    async with serving(call_timeout=10.0) as (client, _):
        with trio.move_on_after(0.5):
            await client.execute("SLOW", 1, "abandoned")
        assert await client.execute("ECHO", "after") == b"after"
        assert client.stats.discarded == 1 and client.stats.timeouts == 0


async def test_latency_is_accumulated(autojump_clock: Any) -> None:
    async with serving() as (client, _):
        await client.execute("SLOW", 0.25, "a")
        await client.execute("SLOW", 0.5, "b")
        stats = client.stats
        assert stats.latency_count == 2
        assert stats.latency_sum == pytest.approx(0.75, abs=1e-6)
        assert stats.latency_max == pytest.approx(0.5, abs=1e-6)
        assert stats.latency_avg == pytest.approx(0.375, abs=1e-6)
        snap = stats.snapshot()
        assert snap["calls"] == 2 and snap["latency_avg"] == stats.latency_avg


# -- poisoning and reconnects ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "reason"),
    [("GARBAGE", "protocol error"), ("CLOSE", "closed by the server")],
)
async def test_untrustworthy_stream_is_dropped_and_rebuilt(
    autojump_clock: Any, command: str, reason: str
) -> None:
    states: list[bool] = []
    async with serving(on_state_change=states.append) as (client, fake):
        with pytest.raises(RedisUnavailable, match=reason):
            await client.execute(command)
        assert reason in (client.last_error or "")
        assert await client.wait_connected(5)
        assert states == [True, False, True]
        assert fake.connects == 2 and client.stats.reconnects == 1
        assert await client.execute("ECHO", "again") == b"again"


async def test_reply_out_of_step_poisons_the_connection(autojump_clock: Any) -> None:
    states: list[bool] = []
    async with serving(on_state_change=states.append) as (client, fake):
        assert await client.execute("EXTRA") == b"OK"  # the first reply is the caller's...
        await trio.testing.wait_all_tasks_blocked()
        # ...the second matches no request: the stream is out of step, so it is dropped.
        assert "no request pending" in (client.last_error or "")
        assert await client.wait_connected(5)
        assert states == [True, False, True] and fake.connects == 2
        assert await client.execute("ECHO", "again") == b"again"


async def test_drop_fails_every_pending_call_and_new_calls_fail_at_once(
    autojump_clock: Any,
) -> None:
    states: list[bool] = []
    async with serving(call_timeout=10.0, on_state_change=states.append) as (client, fake):
        failures: list[str] = []

        async def pending_call(i: int) -> None:
            try:
                await client.execute("SLOW", 5, i)
            except RedisUnavailable as exc:
                failures.append(str(exc))

        fake.refuse = True
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(pending_call, i)
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            await fake.drop_all()
        assert len(failures) == 3 and trio.current_time() - start < 0.01
        assert not client.connected
        start = trio.current_time()
        with pytest.raises(RedisUnavailable, match="not connected"):
            await client.execute("PING")
        with pytest.raises(RedisUnavailable):
            await client.pipeline([("PING",)])
        assert trio.current_time() == start  # at once: no waiting for a reconnect
        assert not await client.wait_connected(1.0)
        fake.refuse = False
        assert await client.wait_connected(5.0)
        assert states == [True, False, True]
        assert await client.execute("ECHO", "back") == b"back"


async def test_stalled_connection_is_rebuilt(autojump_clock: Any) -> None:
    dropped_at: list[float] = []

    def on_state_change(up: bool) -> None:
        if not up:
            dropped_at.append(trio.current_time())

    async with serving(call_timeout=1.0, stall_timeout=3.0,
                       on_state_change=on_state_change) as (client, fake):  # fmt: skip
        start = trio.current_time()
        with pytest.raises(RedisTimeout):
            await client.execute("HANG")
        assert trio.current_time() - start == pytest.approx(1.0, abs=1e-6)
        assert client.connected  # not yet: a timeout alone is not poison
        await trio.sleep(5)
        # Dropped once the oldest request was stall_timeout past its deadline.
        assert len(dropped_at) == 1
        assert dropped_at[0] - start == pytest.approx(1.0 + 3.0, abs=1e-6)
        assert "stalled" in (client.last_error or "")
        assert await client.wait_connected(5)
        assert fake.connects == 2
        assert await client.execute("ECHO", "fresh") == b"fresh"


async def test_no_stall_timeout_keeps_a_silent_connection(autojump_clock: Any) -> None:
    async with serving(call_timeout=1.0, stall_timeout=None) as (client, _):
        with pytest.raises(RedisTimeout):
            await client.execute("HANG")
        await trio.sleep(100)
        assert client.connected and client.stats.disconnects == 0


async def test_run_starts_at_once_while_redis_is_down(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        fake = FakeRedis(nursery)
        fake.refuse = True
        client = RedisClient("redis://fake", stream_factory=fake.factory)
        start = trio.current_time()
        await nursery.start(client.run)
        assert trio.current_time() == start
        assert not client.connected
        assert not await client.wait_connected(3)
        # Backoff: 50 ms doubling to 2 s, jittered: a handful of tries in 3 s, not a spin.
        assert 3 <= client.stats.connect_failures <= 9
        assert "Connection refused" in (client.last_error or "")
        with pytest.raises(RuntimeError, match="already running"):
            await client.run()
        nursery.cancel_scope.cancel()


async def test_stopping_run_reports_the_disconnect(autojump_clock: Any) -> None:
    states: list[bool] = []
    async with serving(on_state_change=states.append) as (client, _):
        pass
    assert states == [True, False]
    assert not client.connected
    with pytest.raises(RedisUnavailable):
        await client.execute("PING")


async def test_state_callback_errors_are_logged_not_raised(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(up: bool) -> None:
        raise RuntimeError("callback bug")

    async with serving(on_state_change=broken) as (client, _):
        assert await client.execute("PING") == b"PONG"
    assert any("on_state_change" in r.getMessage() for r in caplog.records)


# -- handshake and auth ----------------------------------------------------------------------------


async def test_handshake_is_pipelined_in_order(autojump_clock: Any) -> None:
    async with serving(url="redis://lb:s3cret@fake/3", users={"lb": "s3cret"},
                       name="node-1") as (client, fake):  # fmt: skip
        assert fake.commands == [
            [b"AUTH", b"lb", b"s3cret"],
            [b"SELECT", b"3"],
            [b"CLIENT", b"SETNAME", b"node-1"],
            [b"PING"],
        ]
        assert fake.chunks == 1
        assert await client.execute("ECHO", "x") == b"x"


async def test_password_only_auth(autojump_clock: Any) -> None:
    async with serving(url="redis://:pw@fake", password="pw") as (_, fake):
        assert fake.commands[:2] == [[b"AUTH", b"pw"], [b"PING"]]


async def test_wrong_password_is_logged_and_retried_with_backoff(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lbshared.redis")
    async with trio.open_nursery() as nursery:
        fake = FakeRedis(nursery, users={"lb": "right"})
        client = RedisClient("redis://lb:hunter2@fake", stream_factory=fake.factory)
        await nursery.start(client.run)
        assert not await client.wait_connected(10)
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1  # the same failure is not repeated every attempt...
        assert "WRONGPASS" in errors[0].getMessage()
        assert "hunter2" not in errors[0].getMessage()
        assert 5 <= fake.connects <= 14  # ...and attempts go on with backoff
        assert "AUTH refused: WRONGPASS" in (client.last_error or "")
        await trio.sleep(40)
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 2  # ...but it is repeated every LOG_REPEAT_INTERVAL
        fake.users["lb"] = "hunter2"  # the operator fixes the server
        assert await client.wait_connected(5)
        nursery.cancel_scope.cancel()


async def test_missing_password_is_an_auth_error(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        fake = FakeRedis(nursery, password="pw")
        client = RedisClient("redis://fake", stream_factory=fake.factory)
        with pytest.raises(RedisAuthError, match="requires a password"):
            async with client.blocking():
                pass  # pragma: no cover
        nursery.cancel_scope.cancel()


def test_constructor_refusals() -> None:
    with pytest.raises(ValueError, match="client name"):
        RedisClient("redis://h", name="has space")
    with pytest.raises(ValueError, match="not a rediss:// URL"):
        RedisClient("redis://h", ssl_context=ssl.create_default_context())
    with pytest.raises(ValueError, match="positive"):
        RedisClient("redis://h", call_timeout=0)
    with pytest.raises(ValueError, match="bad port"):
        RedisClient("redis://h:x")


# -- blocking connection and scripts ---------------------------------------------------------------


async def test_blocking_connection_is_separate(autojump_clock: Any) -> None:
    async with serving(call_timeout=1.0) as (client, fake):
        async with client.blocking() as blocking:
            assert fake.connects == 2
            got: dict[str, Any] = {}

            async def block() -> None:
                got["blocked"] = await blocking.execute("SLOW", 5, "data", timeout=10)
                got["at"] = trio.current_time()

            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(block)
                await trio.testing.wait_all_tasks_blocked()
                # The shared connection keeps serving meanwhile.
                assert await client.execute("ECHO", "shared") == b"shared"
                assert "blocked" not in got
            assert got["blocked"] == b"data" and got["at"] - start == pytest.approx(5, abs=1e-6)
            assert await blocking.execute("ECHO", "next") == b"next"
            with pytest.raises(ReplyError):
                await blocking.execute("NOPE")
            # A timeout leaves a reply in flight: the connection is closed, not reused.
            with pytest.raises(RedisTimeout):
                await blocking.execute("SLOW", 5, "late")
            assert blocking.closed
            with pytest.raises(RedisUnavailable, match="closed"):
                await blocking.execute("ECHO", "x")


async def test_blocking_connection_fails_clearly_when_down(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        fake = FakeRedis(nursery)
        fake.refuse = True
        client = RedisClient("redis://fake", stream_factory=fake.factory)
        with pytest.raises(RedisUnavailable, match="cannot connect"):
            async with client.blocking():
                pass  # pragma: no cover
        nursery.cancel_scope.cancel()


async def test_blocking_connection_cancelled_mid_call_is_closed(autojump_clock: Any) -> None:
    async with serving() as (client, _):
        async with client.blocking() as blocking:
            with trio.move_on_after(1):
                await blocking.execute("SLOW", 5, "x", timeout=10)
            assert blocking.closed


async def test_script_uses_evalsha_and_falls_back_to_eval(autojump_clock: Any) -> None:
    source = "return redis.call('GET', KEYS[1])"
    sha = hashlib.sha1(source.encode()).hexdigest()
    async with serving() as (client, fake):
        script = await client.script(source)
        assert script.sha == sha
        assert names(fake)[-1] == b"SCRIPT"  # loaded up front
        assert await script(["k1"], ["a1"]) == f"ran:{source}:k1,a1".encode()
        await client.execute("SCRIPT", "FLUSH")
        del fake.commands[:]
        assert await script(["k2"]) == f"ran:{source}:k2".encode()
        assert names(fake) == [b"EVALSHA", b"EVAL"]
        del fake.commands[:]
        assert await script(["k3"]) == f"ran:{source}:k3".encode()
        assert names(fake) == [b"EVALSHA"]  # EVAL cached it again
        # Any other error is raised, not retried.
        failing = Script(client, "error")
        with pytest.raises(ReplyError, match="boom"):
            await failing()
        del fake.commands[:]
        with pytest.raises(ReplyError, match="boom"):
            await failing()
        assert names(fake) == [b"EVALSHA"]


async def test_script_created_while_disconnected_loads_lazily(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        fake = FakeRedis(nursery)
        client = RedisClient("redis://fake", stream_factory=fake.factory)
        script = await client.script("return 7")
        assert fake.commands == []
        await nursery.start(client.run)
        assert await client.wait_connected(5)
        assert await script() == b"ran:return 7:"
        assert names(fake)[-2:] == [b"EVALSHA", b"EVAL"]
        nursery.cancel_scope.cancel()


async def test_wait_connected_returns_at_once_when_connected(autojump_clock: Any) -> None:
    async with serving() as (client, _):
        start = trio.current_time()
        assert await client.wait_connected(0)
        assert trio.current_time() == start


def test_client_repr_hides_the_password() -> None:
    client = RedisClient("redis://lb:hunter2@h/1")
    assert "hunter2" not in repr(client)
    assert "disconnected" in repr(client)
