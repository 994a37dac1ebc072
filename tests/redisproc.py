"""Private ``redis-server`` processes for tests (and benchmarks).

Tests never touch the system Redis on 127.0.0.1:6379: each :class:`RedisProc`
is a ``redis-server`` of its own on a free port, bound to 127.0.0.1, with no
persistence (``--save "" --appendonly no``) and its working directory in a
temporary folder, so a restart comes back empty.

Everything is bounded: start waits (at most ``START_TIMEOUT``) for an answer
to ``PING``; stop sends SIGTERM by PID, waits ``STOP_TIMEOUT``, then SIGKILL.
The fixtures stop their servers at teardown, and an ``atexit`` hook stops any
server a crashed test left behind, by PID.

Usage::

    from tests.redisproc import redis_proc          # a fixture, function scope

    async def test_x(redis_proc):
        client = RedisClient(redis_proc.url)
        ...
        redis_proc.pause()      # SIGSTOP: the server hangs
        redis_proc.resume()     # SIGCONT
        redis_proc.kill()       # SIGKILL
        redis_proc.restart()    # same port, empty

``RedisProc.command(*args)`` runs one command synchronously over a plain
socket (for set-up such as ``ACL SETUSER``; it blocks, so keep it out of
timing-sensitive code).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hiredis
import pytest

__all__ = [
    "REDIS_SERVER",
    "RedisProc",
    "TLSFiles",
    "free_port",
    "redis_proc",
    "redis_proc_module",
    "start_redis",
]

#: The redis-server binary (Debian's, from ``make services``).
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
HOST = "127.0.0.1"
# A server that does not answer PING within this long has failed to start.
START_TIMEOUT = 10.0
# SIGTERM, then this long before SIGKILL.
STOP_TIMEOUT = 5.0
# Any socket operation of command() and of the readiness probe.
IO_TIMEOUT = 5.0
# Poll interval while waiting for readiness.
POLL_INTERVAL = 0.02
# A start that loses the race for its free port is retried on another this many times.
PORT_RETRIES = 3

_LIVE: weakref.WeakSet[RedisProc] = weakref.WeakSet()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for a TLS-only server (``--tls-port``); clients are not asked for certificates."""

    cert: Path
    key: Path
    ca: Path


class RedisProc:
    """One private redis-server; ``start()`` it (or use it as a context manager)."""

    def __init__(self, directory: Path, *extra_args: str, port: int | None = None,
                 tls: TLSFiles | None = None, requirepass: str | None = None) -> None:  # fmt: skip
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.extra_args = list(extra_args)
        self.tls = tls
        self.requirepass = requirepass
        self.host = HOST
        self.port = port or 0
        self._fixed_port = port is not None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "redis.log"
        self._paused = False

    # -- addresses ------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT`` (``rediss://`` with TLS), with the requirepass if set."""
        return self.url_for(password=self.requirepass)

    def url_for(self, username: str | None = None, password: str | None = None,
                db: int | None = None) -> str:  # fmt: skip
        """A URL to this server with the given credentials and database."""
        scheme = "rediss" if self.tls else "redis"
        auth = ""
        if password is not None:
            auth = f"{username or ''}:{password}@"
        path = f"/{db}" if db is not None else ""
        return f"{scheme}://{auth}{self.host}:{self.port}{path}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- life -----------------------------------------------------------------------------

    def _argv(self) -> list[str]:
        argv = [REDIS_SERVER, "--bind", self.host, "--save", "", "--appendonly", "no",
                "--dir", str(self.dir)]  # fmt: skip
        if self.tls is not None:
            argv += [
                "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no",
            ]  # fmt: skip
        else:
            argv += ["--port", str(self.port)]
        if self.requirepass is not None:
            argv += ["--requirepass", self.requirepass]
        return argv + self.extra_args

    def start(self) -> RedisProc:
        """Start the server and wait (bounded) until it answers PING."""
        assert not self.running, "already running"
        for attempt in range(PORT_RETRIES + 1):
            if not self._fixed_port:
                self.port = free_port()
            for stale in ("dump.rdb", "appendonly.aof"):  # a restart must come back empty
                (self.dir / stale).unlink(missing_ok=True)
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    self._argv(), cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            _LIVE.add(self)
            self._paused = False
            if self._wait_ready():
                return self
            self.stop()
            if self._fixed_port or attempt == PORT_RETRIES:
                break
        log_tail = self.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log_tail}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not self.running:
                return False
            try:
                reply = self._roundtrip(("PING",), auth=False)
            except (OSError, hiredis.ProtocolError):
                time.sleep(POLL_INTERVAL)
                continue
            # NOAUTH means a server that is up and wants a password.
            if reply == b"PONG":
                return True
            if isinstance(reply, hiredis.ReplyError) and "NOAUTH" in str(reply):
                return True
            time.sleep(POLL_INTERVAL)
        return False

    def stop(self) -> int | None:
        """SIGTERM by PID, bounded wait, then SIGKILL; the exit code (None if never started)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                os.kill(proc.pid, signal.SIGCONT)  # a paused server must run to handle SIGTERM
            except ProcessLookupError:
                pass
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT)
        self._paused = False
        _LIVE.discard(self)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL by PID (connections are reset at once), and reap it."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT)
        self._paused = False
        _LIVE.discard(self)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing."""
        assert self.running, "not running"
        os.kill(self.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.running, "not running"
        os.kill(self.pid, signal.SIGCONT)
        self._paused = False

    def restart(self) -> RedisProc:
        """Stop (if running) and start again on the same port, with no data."""
        self.stop()
        self._fixed_port = True
        return self.start()

    def __enter__(self) -> RedisProc:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<RedisProc port={self.port} pid={pid} tls={self.tls is not None}>"

    # -- synchronous commands -----------------------------------------------------------------

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=IO_TIMEOUT)
        if self.tls is None:
            return sock
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        return context.wrap_socket(sock, server_hostname=self.host)

    def _roundtrip(self, *commands: tuple[Any, ...], auth: bool = True,
                   username: str | None = None, password: str | None = None) -> Any:  # fmt: skip
        """Send ``commands`` (after AUTH if wanted) on a fresh connection; the last reply."""
        password = password if password is not None else self.requirepass
        if auth and password is not None:
            login: tuple[Any, ...] = ("AUTH", password)
            if username:
                login = ("AUTH", username, password)
            commands = (login, *commands)
        reader = hiredis.Reader()
        with self._connect() as sock:
            sock.sendall(b"".join(hiredis.pack_command(c) for c in commands))
            replies: list[Any] = []
            while len(replies) < len(commands):
                reply = reader.gets()
                if reply is False:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("redis-server closed the connection")
                    reader.feed(data)
                else:
                    replies.append(reply)
        return replies[-1]

    def command(self, *args: Any, db: int | None = None, username: str | None = None,
                password: str | None = None) -> Any:  # fmt: skip
        """Run one command (as the default user with ``requirepass``, or as ``username``).

        Error replies are raised as ``hiredis.ReplyError``.
        """
        commands: list[tuple[Any, ...]] = []
        if db is not None:
            commands.append(("SELECT", db))
        commands.append(tuple(args))
        reply = self._roundtrip(*commands, username=username, password=password)
        if isinstance(reply, hiredis.ReplyError):
            raise reply
        return reply


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_LIVE):
        proc.stop()


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[RedisProc]:
    """A fresh redis-server for one test, stopped (by PID) at teardown."""
    with RedisProc(tmp_path / "redis") as proc:
        yield proc


@pytest.fixture(scope="module")
def redis_proc_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProc]:
    """One redis-server shared by the tests of a module (flush what you rely on being empty)."""
    with RedisProc(tmp_path_factory.mktemp("redis")) as proc:
        yield proc


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., RedisProc]]:
    """``start_redis(*extra_args, tls=None, requirepass=None) -> RedisProc``.

    Every server it started is stopped (by PID) at teardown.
    """
    procs: list[RedisProc] = []

    def start(*extra_args: str, **kw: Any) -> RedisProc:
        directory = Path(tempfile.mkdtemp(prefix="redis-", dir=tmp_path))
        proc = RedisProc(directory, *extra_args, **kw)
        procs.append(proc)
        return proc.start()

    try:
        yield start
    finally:
        for proc in reversed(procs):
            proc.stop()
