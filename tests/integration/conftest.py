"""Integration fixtures: real ``lbnode`` and demo-backend processes on 127.0.0.1.

Everything here is bounded: processes are started with a deadline for their
readiness (``START_TIMEOUT``), socket reads have a timeout (``IO_TIMEOUT``),
and every process a fixture starts is stopped at teardown by its PID
(SIGTERM, then SIGKILL after ``STOP_TIMEOUT``).

Tools for exact-byte tests:

* ``RawClient``: one client connection on a plain socket; sends raw bytes and
  parses responses itself (status line, headers, Content-Length, chunked or
  close-delimited bodies), so malformed requests reach the proxy as written.
* ``RawUpstream``: a fake upstream on a raw socket, one thread per accepted
  connection, recording every byte it receives; ``scripted`` builds one that
  answers canned bytes per request path (keep-alive for the others).
* ``Blackhole``: an address whose connects hang (a full accept queue).

Node and backend processes are module-scoped where tests allow it
(``module_launcher``): one node per test module keeps the suite fast.
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
# A node or backend not ready within this long has failed to start.
START_TIMEOUT = 10.0
# SIGTERM, then this long before SIGKILL.
STOP_TIMEOUT = 10.0
# Any single socket operation of a test client.
IO_TIMEOUT = 10.0
# Poll interval of wait_for.
POLL_INTERVAL = 0.02

_LB_ENV = ("LB_CONFIG", "LB_REDIS_URL", "LB_NODE_ID", "LB_BIND", "LB_ADMIN", "LB_ADMIN_TOKEN",
           "LB_ACCESS_LOG", "LB_LOG_LEVEL", "LB_WORKERS", "LB_DRAIN_TIMEOUT",
           "LB_HTTP_IMPL", "LB_HTTP", "LB_LOG_FORMAT")  # fmt: skip


# -- small helpers -------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free_on_all(addrs: tuple[str, ...]) -> int:
    """A port free on every address of ``addrs`` (nodes on 127.0.0.2, .3, ...)."""
    for _ in range(20):
        port = free_port()
        try:
            for addr in addrs:
                with socket.socket() as s:
                    s.bind((addr, port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free on every address")


def closed_port() -> int:
    """A port nothing listens on (connects are refused)."""
    return free_port()


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: the checkout importable, no LB_* leaking in."""
    env = {k: v for k, v in os.environ.items() if k not in _LB_ENV}
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + old if old else "")
    env.update(extra or {})
    return env


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(POLL_INTERVAL)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM ``proc`` by its PID, wait (bounded), SIGKILL if needed; its exit code."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            return proc.wait(timeout)
    return proc.returncode


def run_lbnode(
    *args: str, env: dict[str, str] | None = None, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m lbnode ARGS`` to completion (for commands expected to exit)."""
    return subprocess.run(
        [sys.executable, "-m", "lbnode", *args],
        cwd=REPO_ROOT,
        env=subprocess_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def admin_get(port: int, path: str, token: str | None = None) -> tuple[int, Any]:
    """GET an admin path; (status, parsed JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=IO_TIMEOUT)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if body else None
    finally:
        conn.close()


# -- raw HTTP client -------------------------------------------------------------------------


class RawResponse:
    """One parsed response: header names lower-cased, values as text."""

    __slots__ = ("version", "status", "reason", "headers", "body", "head", "chunked")

    def __init__(self, version: str, status: int, reason: str, headers: list[tuple[str, str]],
                 head: bytes) -> None:  # fmt: skip
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers
        self.head = head
        self.body = b""
        self.chunked = False

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"RawResponse({self.status}, {self.headers!r}, {self.body[:200]!r})"


class RawClient:
    """One client connection on a plain socket, parsing responses itself."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = IO_TIMEOUT,
                 sock: Any = None) -> None:  # fmt: skip
        if sock is None:
            sock = socket.create_connection((host, port), timeout=timeout)
        sock.settimeout(timeout)
        self.sock = sock
        self.buf = bytearray()
        self.eof = False
        self.host = f"{host}:{port}"

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request_bytes(self, method: str, path: str, headers: list[tuple[str, str]] | None = None,
                      body: bytes = b"", version: str = "1.1") -> bytes:  # fmt: skip
        lines = [f"{method} {path} HTTP/{version}"]
        names = {k.lower() for k, _ in headers or []}
        if "host" not in names and version == "1.1":
            lines.append(f"Host: {self.host}")
        lines.extend(f"{k}: {v}" for k, v in headers or [])
        if body and "content-length" not in names and "transfer-encoding" not in names:
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def request(self, method: str, path: str, headers: list[tuple[str, str]] | None = None,
                body: bytes = b"", version: str = "1.1") -> RawResponse:  # fmt: skip
        """Send one request and read its (final) response."""
        self.send(self.request_bytes(method, path, headers, body, version))
        resp = self.read_response(head_request=method == "HEAD")
        while 100 <= resp.status < 200 and resp.status != 101:
            resp = self.read_response(head_request=method == "HEAD")
        return resp

    def get(self, path: str, headers: list[tuple[str, str]] | None = None) -> RawResponse:
        return self.request("GET", path, headers)

    # -- reading -----------------------------------------------------------------------

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(262144)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _read_until(self, marker: bytes) -> bytes:
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                out = bytes(self.buf[: i + len(marker)])
                del self.buf[: i + len(marker)]
                return out
            if not self._fill():
                raise EOFError(f"connection closed before {marker!r}; got {bytes(self.buf)!r}")

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"connection closed after {len(self.buf)} of {n} bytes")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_head(self) -> RawResponse:
        head = self._read_until(b"\r\n\r\n")
        lines = head[:-4].decode("latin-1").split("\r\n")
        m = re.fullmatch(r"HTTP/(\d\.\d) (\d{3}) ?(.*)", lines[0])
        assert m, f"bad status line {lines[0]!r}"
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        return RawResponse(m.group(1), int(m.group(2)), m.group(3), headers, head)

    def read_response(self, head_request: bool = False) -> RawResponse:
        """Read one response, whole (a 1xx has no body)."""
        resp = self.read_head()
        if resp.status < 200 or resp.status in (204, 304) or head_request:
            return resp
        te = resp.header("transfer-encoding")
        cl = resp.header("content-length")
        if te is not None:
            assert te.lower() == "chunked", te
            resp.chunked = True
            body = bytearray()
            while True:
                size_line = self._read_until(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self._read_until(b"\r\n") != b"\r\n":  # trailers
                        pass
                    break
                body += self._read_exact(size)
                assert self._read_exact(2) == b"\r\n"
            resp.body = bytes(body)
        elif cl is not None:
            resp.body = self._read_exact(int(cl))
        else:
            while self._fill():
                pass
            resp.body = bytes(self.buf)
            self.buf.clear()
        return resp

    def read_until_close(self) -> bytes:
        """Everything until the peer closes (bounded by the socket timeout)."""
        while self._fill():
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def wait_closed(self) -> bool:
        """True if the peer closes with nothing more sent (within the socket timeout)."""
        try:
            return self.read_until_close() == b""
        except TimeoutError:
            return False


def request(port: int, method: str, path: str, headers: list[tuple[str, str]] | None = None,
            body: bytes = b"", timeout: float = IO_TIMEOUT) -> RawResponse:  # fmt: skip
    """One request on a new connection."""
    with RawClient(port, timeout=timeout) as c:
        return c.request(method, path, headers, body)


# -- fake upstreams ---------------------------------------------------------------------------


class RawConn:
    """One connection accepted by a RawUpstream; every byte read is recorded."""

    def __init__(self, sock: socket.socket, upstream: RawUpstream) -> None:
        self.sock = sock
        self.upstream = upstream
        self.buf = bytearray()

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            return False
        self.upstream.record(data)
        self.buf += data
        return True

    def read_head(self) -> bytes | None:
        """The next request head, or None if the peer closed first."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return None
        i = self.buf.index(b"\r\n\r\n") + 4
        head = bytes(self.buf[:i])
        del self.buf[:i]
        return head

    def read_exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self._fill():
                return None
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


Handler = Callable[[RawConn], None]


class RawUpstream:
    """A fake upstream: ``handler(conn)`` runs in a thread per accepted connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"
        self.accepts = 0
        self._received = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def record(self, data: bytes) -> None:
        with self._lock:
            self._received += data

    @property
    def received(self) -> bytes:
        with self._lock:
            return bytes(self._received)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(IO_TIMEOUT * 3)
            with self._lock:
                self.accepts += 1
                self._conns.append(sock)
            t = threading.Thread(target=self._run, args=(sock,), daemon=True)
            self._threads.append(t)
            t.start()

    def _run(self, sock: socket.socket) -> None:
        try:
            self.handler(RawConn(sock, self))
        except OSError:
            pass
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(2.0)
        self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(2.0)


OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


def request_path(head: bytes) -> str:
    return head.split(b" ", 2)[1].decode("latin-1")


def read_body(conn: RawConn, head: bytes) -> bool:
    """Read (and record) the body of the request ``head``; False if the peer closed.
    Chunked bodies are read up to the last-chunk marker (no trailers)."""
    for line in head.lower().split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name == b"content-length":
            return conn.read_exact(int(value)) is not None
        if name == b"transfer-encoding":
            while b"0\r\n\r\n" not in conn.buf:
                if not conn._fill():
                    return False
            i = conn.buf.index(b"0\r\n\r\n") + 5
            del conn.buf[:i]
            return True
    return True


def scripted(canned: dict[str, bytes]) -> Handler:
    """A handler answering ``canned[path]`` (then closing) or, for other paths,
    ``OK_RESPONSE`` with keep-alive, after reading the request body."""

    def handler(conn: RawConn) -> None:
        while True:
            head = conn.read_head()
            if head is None or not read_body(conn, head):
                return
            answer = canned.get(request_path(head))
            if answer is None:
                conn.send(OK_RESPONSE)
                continue
            conn.send(answer)
            return

    return handler


class Blackhole:
    """A listening address whose accept queue is full: connects hang (SYNs dropped)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = int(self.sock.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"
        self._fill: list[socket.socket] = []
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", self.port))
            self._fill.append(c)
        # Proof: one more connect does not complete.
        probe = socket.socket()
        probe.settimeout(0.2)
        try:
            probe.connect(("127.0.0.1", self.port))
        except TimeoutError:
            pass
        else:  # pragma: no cover - the kernel accepted past the backlog
            raise RuntimeError("could not fill the accept queue for a blackhole")
        finally:
            probe.close()

    def close(self) -> None:
        for c in self._fill:
            c.close()
        self.sock.close()


# -- processes ---------------------------------------------------------------------------


class Backend:
    """A demo backend process (``python -m lbnode.demo_backend``)."""

    def __init__(
        self, backend_id: str, proc: subprocess.Popen[bytes], port: int, log: Path
    ) -> None:
        self.id = backend_id
        self.proc = proc
        self.port = port
        self.log = log
        self.address = f"127.0.0.1:{port}"

    def stats(self) -> dict[str, Any]:
        resp = request(self.port, "GET", "/stats")
        assert resp.status == 200, resp
        return resp.json()  # type: ignore[no-any-return]

    def count(self, path: str) -> int:
        return int(self.stats()["paths"].get(path, 0))

    def stop(self) -> int:
        return stop_process(self.proc)


class Node:
    """An ``lbnode`` process and what tests need to reach it."""

    def __init__(self, proc: subprocess.Popen[bytes], config_path: Path, admin_port: int,
                 access_log: Path | None, stdout: Path, stderr: Path,
                 ports: dict[str, list[int]], token: str | None) -> None:  # fmt: skip
        self.proc = proc
        self.config_path = config_path
        self.admin_port = admin_port
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.access_log = access_log
        self.stdout = stdout
        self.stderr = stderr
        self.ports = ports
        self.token = token

    @property
    def port(self) -> int:
        """The first listener port of the first load balancer."""
        return next(iter(self.ports.values()))[0]

    def healthz(self) -> tuple[int, Any]:
        return admin_get(self.admin_port, "/healthz")

    def status(self) -> dict[str, Any]:
        code, body = admin_get(self.admin_port, "/status", self.token)
        assert code == 200, (code, body)
        return body  # type: ignore[no-any-return]

    def target(self, lb: str, target_id: str) -> dict[str, Any]:
        for entry in self.status()["load_balancers"]:
            if entry["name"] == lb:
                for t in entry["targets"]:
                    if t["id"] == target_id:
                        return t  # type: ignore[no-any-return]
        raise KeyError((lb, target_id))

    def stderr_text(self) -> str:
        return self.stderr.read_text(errors="replace")

    def access_records(self) -> list[dict[str, Any]]:
        assert self.access_log is not None
        text = self.access_log.read_text() if self.access_log.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait_access_record(self, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for rec in self.access_records():
                if rec.get("request_id") == request_id:
                    return rec
            return None

        found = wait_for(find, timeout, f"access-log record {request_id}")
        return found  # type: ignore[no-any-return]

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def write_config(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        self.config_path.write_text(text)

    def stop(self) -> int:
        return stop_process(self.proc)


def _listener_ports(data: Any) -> dict[str, list[int]]:
    if not isinstance(data, dict):
        return {}
    if "load_balancer" in data:
        lbs = [data["load_balancer"]]
    else:
        lbs = data.get("load_balancers") or []
    out: dict[str, list[int]] = {}
    for lb in lbs:
        if isinstance(lb, dict):
            ports = [lst["port"] for lst in lb.get("listeners") or [] if isinstance(lst, dict)]
            out[str(lb.get("name", "default"))] = ports
    return out


def assign_ports(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with every listener ``port: 0`` given a free port."""
    config = copy.deepcopy(config)
    single = "load_balancer" in config
    lbs = [config["load_balancer"]] if single else config.get("load_balancers", [])
    for lb in lbs:
        for lst in lb.get("listeners", []):
            if lst.get("port") == 0:
                lst["port"] = free_port()
    return config


class Launcher:
    """Starts backends and nodes in ``directory``; ``close`` stops them all by PID."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.procs: list[subprocess.Popen[bytes]] = []
        self.upstreams: list[RawUpstream | Blackhole] = []
        self._n = 0

    def _name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}-{self._n}"

    def backend(self, backend_id: str) -> Backend:
        log = self.dir / f"{self._name('backend-' + backend_id)}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lbnode.demo_backend", "--port", "0", "--id", backend_id,
                 "--host", "127.0.0.1"],
                cwd=REPO_ROOT, env=subprocess_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        self.procs.append(proc)

        def bound() -> int | None:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
            if m:
                return int(m.group(1))
            if proc.poll() is not None:
                raise AssertionError(f"backend {backend_id} exited: {log.read_text()}")
            return None

        port = wait_for(bound, START_TIMEOUT, f"backend {backend_id} to listen")
        return Backend(backend_id, proc, port, log)

    def raw_upstream(self, handler: Handler) -> RawUpstream:
        up = RawUpstream(handler)
        self.upstreams.append(up)
        return up

    def blackhole(self) -> Blackhole:
        bh = Blackhole()
        self.upstreams.append(bh)
        return bh

    def spawn_node(self, config: dict[str, Any] | str, *extra_args: str,
                   env: dict[str, str] | None = None, access_log: str | None = None,
                   admin_token: str | None = None, node_id: str | None = None,
                   admin: str | None = None, args: list[str] | None = None,
                   ) -> tuple[subprocess.Popen[bytes], Node]:  # fmt: skip
        """Start a node without waiting for it; ``args`` replaces the default flags.

        ``env`` values may name ``{config}`` and ``{admin_port}`` (this node's).
        """
        name = self._name("node")
        config_path = self.dir / f"{name}.yaml"
        if isinstance(config, dict):
            config = assign_ports(config)
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            ports = _listener_ports(config)
        else:
            config_path.write_text(config)
            ports = _listener_ports(yaml.safe_load(config))
        admin_port = free_port()
        log_path: Path | None = self.dir / f"{name}.access.log"
        if access_log is not None:
            log_path = Path(access_log) if access_log not in ("-", "off") else None
        stdout = self.dir / f"{name}.stdout"
        stderr = self.dir / f"{name}.stderr"
        if args is None:
            args = [
                "--config", str(config_path), "--bind", "127.0.0.1",
                "--admin", admin or f"127.0.0.1:{admin_port}",
                "--access-log", access_log or str(log_path), "--log-level", "info",
            ]  # fmt: skip
            if admin_token:
                args += ["--admin-token", admin_token]
            if node_id:
                args += ["--node-id", node_id]
        if env:
            env = {k: v.format(config=config_path, admin_port=admin_port) for k, v in env.items()}
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lbnode", *args, *extra_args],
                cwd=REPO_ROOT, env=subprocess_env(env), stdin=subprocess.DEVNULL,
                stdout=out, stderr=err,
            )  # fmt: skip
        self.procs.append(proc)
        node = Node(proc, config_path, admin_port, log_path, stdout, stderr, ports, admin_token)
        return proc, node

    def node(self, config: dict[str, Any] | str, *extra_args: str, **kw: Any) -> Node:
        """Start a node and wait (bounded) until it serves: /healthz 200 with its config applied."""
        proc, node = self.spawn_node(config, *extra_args, **kw)
        wait_ready(node)
        return node

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)
        for up in self.upstreams:
            up.close()


def wait_ready(node: Node, timeout: float = START_TIMEOUT) -> None:
    def ready() -> bool:
        if node.proc.poll() is not None:
            raise AssertionError(
                f"lbnode exited with {node.proc.returncode}:\n{node.stderr_text()}"
            )
        try:
            code, body = node.healthz()
        except (OSError, http.client.HTTPException):
            return False
        return code == 200 and body["config_version"] >= 1

    wait_for(ready, timeout, "lbnode /healthz")


@pytest.fixture(scope="module")
def module_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """Backends and nodes shared by the tests of one module."""
    launcher = Launcher(tmp_path_factory.mktemp("procs"))
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    """Backends and nodes of one test."""
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture
def start_node(launcher: Launcher) -> Callable[..., Node]:
    """``start_node(config_dict_or_yaml, *extra_args, **options) -> Node``, stopped at teardown."""
    return launcher.node
