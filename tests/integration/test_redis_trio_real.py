"""lbshared.redis_trio against real redis-server processes (``tests.redisproc``).

Each test uses a private redis-server on a free port (never the system one);
tests that pause, kill, restart or reconfigure the server get their own, the
others share one per module. Every wait is bounded (``trio.fail_after`` or a
client timeout), and every server is stopped by its PID at teardown.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme

from lbshared.redis_trio import (
    RedisAddress,
    RedisClient,
    RedisHandshakeError,
    RedisTimeout,
    RedisUnavailable,
    ReplyError,
)
from tests.redisproc import (  # noqa: F401 - fixtures
    RedisProc,
    TLSFiles,
    redis_proc,
    redis_proc_module,
    start_redis,
)

# ruff: noqa: F811 - the fixtures imported above are parameters of the tests below

# Bound of any single wait on the client or the server in these tests.
WAIT = 10.0


@asynccontextmanager
async def running(url: str, **kw: Any) -> AsyncIterator[RedisClient]:
    """A client on ``url``, its ``run()`` in a nursery, connected (bounded) unless told not to."""
    wait = kw.pop("wait", True)
    client = RedisClient(url, **kw)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        if wait:
            assert await client.wait_connected(WAIT), client.last_error
        yield client
        nursery.cancel_scope.cancel()


class CountingStream(trio.abc.Stream):
    """A TCP stream that counts ``send_all`` calls (to observe pipelining on the wire)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sends = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sends += 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


# -- shared server ---------------------------------------------------------------------------------


async def test_a_thousand_concurrent_callers_get_their_own_replies(
    redis_proc_module: RedisProc,
) -> None:
    async with running(redis_proc_module.url, call_timeout=WAIT) as client:
        wrong: list[tuple[int, Any]] = []

        async def caller(i: int) -> None:
            key = f"fifo:{i}"
            await client.execute("DEL", key)
            for expected in range(1, i % 5 + 2):
                got = await client.execute("INCR", key)
                if got != expected:
                    wrong.append((i, got))
            value = await client.execute("GET", key)
            if value != str(i % 5 + 1).encode():
                wrong.append((i, value))

        with trio.fail_after(WAIT * 3):
            async with trio.open_nursery() as nursery:
                for i in range(1000):
                    nursery.start_soon(caller, i)
        assert wrong == []
        assert client.stats.errors == 0 and client.stats.timeouts == 0
        # Pipelined: far fewer writes than the ~5,000 commands.
        assert client.stats.writes < client.stats.calls / 5


async def test_pipelining_is_observable_on_the_wire(redis_proc_module: RedisProc) -> None:
    streams: list[CountingStream] = []

    async def factory(address: RedisAddress) -> trio.abc.Stream:
        stream = CountingStream(await trio.open_tcp_stream(address.host, address.port))
        streams.append(stream)
        return stream

    async with running(redis_proc_module.url, stream_factory=factory) as client:
        sends_before = streams[0].sends  # the handshake
        results: dict[int, Any] = {}

        async def caller(i: int) -> None:
            results[i] = await client.execute("ECHO", str(i))

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                for i in range(300):
                    nursery.start_soon(caller, i)
        assert results == {i: str(i).encode() for i in range(300)}
        sends = streams[0].sends - sends_before
        assert sends == client.stats.writes
        assert 1 <= sends <= 30, sends  # 300 commands in a handful of send_all calls
        # An idle client still sends a lone command at once.
        assert await client.execute("PING") == b"PONG"
        assert streams[0].sends == sends_before + sends + 1


async def test_pipeline_method_returns_errors_in_place(redis_proc_module: RedisProc) -> None:
    async with running(redis_proc_module.url) as client:
        replies = await client.pipeline([
            ("SET", "pl:s", "text"), ("LPUSH", "pl:s", "x"), ("GET", "pl:s"), ("DEL", "pl:s"),
        ])  # fmt: skip
        assert replies[0] == b"OK"
        assert isinstance(replies[1], ReplyError) and replies[1].code == "WRONGTYPE"
        assert replies[2:] == [b"text", 1]
        await client.execute("DEL", "pl:list")
        assert await client.execute("LPUSH", "pl:list", "x") == 1
        with pytest.raises(ReplyError, match="WRONGTYPE"):
            await client.execute("INCR", "pl:list")


async def test_db_selection_and_client_name(redis_proc_module: RedisProc) -> None:
    url = redis_proc_module.url_for(db=5)
    async with running(url, name="lb-node-7") as client:
        assert await client.execute("SET", "db:key", "five") == b"OK"
        info = await client.execute("CLIENT", "INFO")
        assert b" db=5 " in info and b" name=lb-node-7 " in info
    assert redis_proc_module.command("GET", "db:key", db=5) == b"five"
    assert redis_proc_module.command("GET", "db:key") is None


async def test_bad_database_is_a_clear_handshake_error(redis_proc_module: RedisProc) -> None:
    client = RedisClient(redis_proc_module.url_for(db=99))  # the server has 16
    with pytest.raises(RedisHandshakeError, match="SELECT refused: ERR DB index is out of range"):
        async with client.blocking():
            pass  # pragma: no cover


async def test_blocking_read_does_not_hold_up_the_shared_connection(
    redis_proc_module: RedisProc,
) -> None:
    async with running(redis_proc_module.url) as client:
        await client.execute("DEL", "blk:stream")
        got: dict[str, Any] = {}
        async with client.blocking() as blocking:

            async def reader() -> None:
                got["entries"] = await blocking.execute(
                    "XREAD", "BLOCK", 5000, "STREAMS", "blk:stream", "$", timeout=WAIT
                )

            with trio.fail_after(WAIT):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reader)
                    # Wait (bounded) until the server has the XREAD blocked.
                    while b"cmd=xread" not in await client.execute("CLIENT", "LIST"):  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    for i in range(100):
                        assert await client.execute("ECHO", str(i)) == str(i).encode()
                    assert "entries" not in got  # still blocked, the shared one kept serving
                    entry_id = await client.execute("XADD", "blk:stream", "*", "f", "v")
            [[stream, [[read_id, fields]]]] = got["entries"]
            assert (stream, read_id, fields) == (b"blk:stream", entry_id, [b"f", b"v"])
            # A block that ends empty is a nil reply, and the connection stays usable.
            empty = await blocking.execute("XREAD", "BLOCK", 10, "STREAMS", "blk:stream", "$")
            assert empty is None
            assert await blocking.execute("PING") == b"PONG"


async def test_scripts_survive_script_flush(redis_proc_module: RedisProc) -> None:
    async with running(redis_proc_module.url) as client:
        await client.execute("DEL", "lua:n")
        script = await client.script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]
        assert await script(["lua:n"], [5]) == 5
        assert await client.execute("SCRIPT", "FLUSH") == b"OK"
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [0]
        assert await script(["lua:n"], [5]) == 10  # NOSCRIPT -> EVAL
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]
        assert await script(["lua:n"], [1]) == 11
        failing = await client.script("return redis.call('INCR', KEYS[1], 'extra')")
        with pytest.raises(ReplyError):
            await failing(["lua:n"])


# -- a server of their own -------------------------------------------------------------------------


async def test_paused_server_times_calls_out_and_recovers(redis_proc: RedisProc) -> None:
    async with running(redis_proc.url, call_timeout=0.3) as client:
        assert await client.execute("SET", "p:k", "before") == b"OK"
        redis_proc.pause()
        try:
            elapsed: list[float] = []

            async def caller(i: int) -> None:
                start = trio.current_time()
                with pytest.raises(RedisTimeout):
                    await client.execute("ECHO", f"late-{i}")
                elapsed.append(trio.current_time() - start)

            with trio.fail_after(WAIT):
                async with trio.open_nursery() as nursery:
                    for i in range(20):
                        nursery.start_soon(caller, i)
            assert len(elapsed) == 20
            assert all(0.3 <= e < 1.3 for e in elapsed), elapsed
            assert client.connected  # timeouts alone do not drop the connection
        finally:
            redis_proc.resume()
        # The 20 late replies are discarded; each new caller gets its own.
        assert await client.execute("ECHO", "fresh", timeout=WAIT) == b"fresh"
        assert await client.execute("GET", "p:k") == b"before"
        assert client.stats.timeouts == 20 and client.stats.discarded == 20
        assert client.stats.disconnects == 0


async def test_killed_server_fails_calls_fast_and_client_reconnects(redis_proc: RedisProc) -> None:
    states: list[bool] = []
    async with running(redis_proc.url, call_timeout=WAIT, on_state_change=states.append) as client:
        await client.execute("SET", "k:k", "gone after restart")
        redis_proc.pause()  # calls pile up, unanswered...
        failures: list[BaseException] = []

        async def pending_call() -> None:
            try:
                await client.execute("GET", "k:k")
            except RedisUnavailable as exc:
                failures.append(exc)

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(pending_call)
                await trio.testing.wait_all_tasks_blocked()
                start = trio.current_time()
                redis_proc.kill()  # ...then the server dies
        assert len(failures) == 10
        assert trio.current_time() - start < 2.0  # dropped, not timed out (call_timeout 10 s)
        assert states == [True, False]

        start = trio.current_time()
        with pytest.raises(RedisUnavailable, match="not connected"):
            await client.execute("PING")
        assert trio.current_time() - start < 0.5  # at once, no waiting for a reconnect

        redis_proc.restart()
        assert await client.wait_connected(WAIT), client.last_error
        assert states == [True, False, True]
        assert client.stats.reconnects == 1
        assert await client.execute("GET", "k:k") is None  # a new, empty server
        assert await client.execute("PING") == b"PONG"


async def test_requirepass(start_redis: Callable[..., RedisProc],
                           caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    proc = start_redis(requirepass="s3cret")
    async with running(proc.url_for(password="s3cret")) as client:
        assert await client.execute("SET", "rp:k", "v") == b"OK"
        async with client.blocking() as blocking:  # same credentials
            assert await blocking.execute("GET", "rp:k") == b"v"

    caplog.set_level(logging.DEBUG, logger="lbshared.redis")
    async with running(proc.url_for(), wait=False) as client:
        assert not await client.wait_connected(0.5)
        assert "requires a password" in (client.last_error or "")
    async with running(proc.url_for(password="nope-pw"), wait=False) as client:
        assert not await client.wait_connected(0.5)
        assert "WRONGPASS" in (client.last_error or "")
        with pytest.raises(RedisUnavailable):
            await client.execute("PING")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("requires a password" in m for m in errors)
    assert any("WRONGPASS" in m for m in errors)
    assert not any("nope-pw" in m or "s3cret" in m for m in errors)


async def test_acl_user_and_wrong_password_retry(
    redis_proc: RedisProc, caplog: pytest.LogCaptureFixture
) -> None:
    redis_proc.command("ACL", "SETUSER", "lb", "on", ">secret", "~lb:*", "&*", "+@all")
    async with running(redis_proc.url_for("lb", "secret")) as client:
        assert await client.execute("SET", "lb:k", "v") == b"OK"
        with pytest.raises(ReplyError) as info:
            await client.execute("SET", "other:k", "v")
        assert info.value.code == "NOPERM"

    caplog.set_level(logging.DEBUG, logger="lbshared.redis")
    states: list[bool] = []
    async with running(redis_proc.url_for("lb", "typo"), wait=False,
                       on_state_change=states.append) as client:  # fmt: skip
        assert not await client.wait_connected(1.5)
        # Logged (once: the same failure is not repeated each attempt)...
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "WRONGPASS" in errors[0] and "typo" not in errors[0]
        # ...and retried with backoff: neither given up nor a busy loop.
        assert 3 <= client.stats.connect_failures <= 15, client.stats.connect_failures
        # Fixing the user on the server heals the client without a restart.
        redis_proc.command("ACL", "SETUSER", "lb", ">typo")
        assert await client.wait_connected(WAIT), client.last_error
        assert states == [True]
        assert await client.execute("GET", "lb:k") == b"v"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[TLSFiles, trustme.CA]:
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = TLSFiles(directory / "cert.pem", directory / "key.pem", directory / "ca.pem")
    for pem in cert.cert_chain_pems:
        pem.write_to_path(str(files.cert), append=True)
    cert.private_key_pem.write_to_path(str(files.key))
    ca.cert_pem.write_to_path(str(files.ca))
    return files, ca


async def test_tls(start_redis: Callable[..., RedisProc],
                   tls_files: tuple[TLSFiles, trustme.CA]) -> None:  # fmt: skip
    files, ca = tls_files
    proc = start_redis(tls=files, requirepass="tls-pw")
    assert proc.url.startswith("rediss://")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with running(proc.url_for(password="tls-pw", db=2), ssl_context=context) as client:
        assert await client.execute("SET", "tls:k", "over tls") == b"OK"
        results = await client.pipeline([("GET", "tls:k"), ("INCR", "tls:n"), ("INCR", "tls:n")])
        assert results == [b"over tls", 1, 2]
        async with client.blocking() as blocking:
            assert await blocking.execute("GET", "tls:k") == b"over tls"
    assert proc.command("GET", "tls:k", db=2) == b"over tls"

    # Without the CA the certificate is refused, with a message saying so.
    async with running(proc.url_for(password="tls-pw"), wait=False) as client:
        assert not await client.wait_connected(0.5)
        assert "CERTIFICATE_VERIFY_FAILED" in (client.last_error or "")


def test_redisproc_restart_keeps_the_port_and_empties(tmp_path: Path) -> None:
    with RedisProc(tmp_path / "r") as proc:
        port = proc.port
        proc.command("SET", "x", "1")
        proc.pause()
        proc.resume()
        assert proc.command("GET", "x") == b"1"
        proc.restart()
        assert proc.port == port and proc.command("GET", "x") is None
        pid = proc.pid
    assert not proc.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
