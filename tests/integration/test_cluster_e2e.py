"""The cluster end to end: a private ``redis-server``, three ``lbnode`` processes on
127.0.0.2-4, real demo backends, ``lbctl`` (in-process for timing loops, as a
subprocess where the command line itself is the point).

What is proved here (the cluster issue's acceptance figures):

* ``lbctl apply -f FILE``: every node serves the new version quickly (p99 under
  1 s over 20 applies here, a bound loose enough for a loaded CI machine;
  ``bench/bench_cluster.py`` prints the real figure); a keep-alive client
  connection keeps working across applies that change its targets; a new
  load balancer's listener opens on every node, a deleted one closes after its
  in-flight request finished;
* membership: a node that stops heartbeating (SIGSTOP, SIGKILL) leaves the
  live set within three heartbeats and stays listed; SIGTERM removes it;
* rate limits over three nodes (600 per 60 s, 300 requests/s for 10 s):
  ``strict`` admits exactly 600, ``cluster`` 600 to 630;
* sticky sessions: 1,000 sessions opened on one node and followed on another
  land on their pinned target, every one;
* a node whose resume id fell behind the stream's trimming reloads from the
  snapshot; malformed stream entries are skipped and counted, never a crash.

The Redis outage scenarios are in ``test_cluster_outage.py``; both modules use
the harness defined here (``Cluster``), as does ``bench/bench_cluster.py``.

Every wait is bounded; every process (nodes, backends, redis-server) is
stopped by its PID at teardown (a SIGSTOPped node gets SIGCONT first).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbshared import lbctl
from tests.integration.conftest import (
    REPO_ROOT,
    Backend,
    Launcher,
    RawClient,
    free_port,
    stop_process,
    subprocess_env,
    wait_for,
)
from tests.redisproc import RedisProc

#: The nodes' addresses (loopback aliases: nothing to set up on Linux).
NODE_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
#: A node not serving within this long has failed to start.
NODE_START_TIMEOUT = 15.0
#: Any single admin or lbctl exchange.
IO_TIMEOUT = 10.0
#: Bound of a subprocess lbctl.
LBCTL_TIMEOUT = 30.0
#: Bound of a wait for the nodes to converge on a config version in the tests.
CONVERGE_TIMEOUT = 5.0
#: Heartbeat period and liveness window of the contract (seconds).
HEARTBEAT, LIVE_WINDOW = 1.0, 3.0


# -- the harness ---------------------------------------------------------------------------------


class AdminConn:
    """A keep-alive HTTP connection to one node's admin port."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._conn: http.client.HTTPConnection | None = None

    def get(self, path: str) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=IO_TIMEOUT)
            try:
                self._conn.request("GET", path)
                resp = self._conn.getresponse()
                return resp.status, resp.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class ClusterNode:
    """One ``lbnode --redis`` process bound to its own loopback address."""

    def __init__(self, node_id: str, host: str, admin_port: int, proc: subprocess.Popen[bytes],
                 stderr: Path) -> None:  # fmt: skip
        self.id = node_id
        self.host = host
        self.admin_port = admin_port
        self.proc = proc
        self.stderr = stderr
        self.admin = AdminConn(host, admin_port)
        self.stopped = False  # SIGSTOPped by the test

    def __repr__(self) -> str:
        return f"<ClusterNode {self.id} {self.host} pid={self.proc.pid}>"

    def healthz(self) -> dict[str, Any]:
        status, body = self.admin.get("/healthz")
        assert status in (200, 503), (status, body)
        return json.loads(body)  # type: ignore[no-any-return]

    def try_healthz(self) -> dict[str, Any] | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"node {self.id} exited {self.proc.returncode}:\n{self.log()}")
        try:
            return self.healthz()
        except (OSError, http.client.HTTPException, ValueError):
            return None

    def version(self) -> int:
        return int(self.healthz()["config_version"])

    def status(self) -> dict[str, Any]:
        status, body = self.admin.get("/status")
        assert status == 200, (status, body)
        return json.loads(body)  # type: ignore[no-any-return]

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as {"name{labels}": value} (comments dropped)."""
        status, body = self.admin.get("/metrics")
        assert status == 200, status
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def client(self, port: int, timeout: float = IO_TIMEOUT) -> RawClient:
        """A keep-alive client connection to this node's listener ``port``, from 127.0.0.1."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.connect((self.host, port))
        except OSError:
            sock.close()
            raise
        return RawClient(port, host=self.host, timeout=timeout, sock=sock)

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)
        if signum == signal.SIGSTOP:
            self.stopped = True
        elif signum == signal.SIGCONT:
            self.stopped = False

    def stop(self) -> int:
        if self.stopped:
            self.signal(signal.SIGCONT)
        self.admin.close()
        return stop_process(self.proc)


class Cluster:
    """A private redis-server, demo backends and ``lbnode`` processes, all stopped by PID."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.redis = RedisProc(directory / "redis")
        self.launcher = Launcher(directory)
        self.nodes: list[ClusterNode] = []
        self.backends: dict[str, Backend] = {}
        self._n = 0

    # life -------------------------------------------------------------------------------

    def start(self, backends: tuple[str, ...] = ("b1", "b2", "b3")) -> Cluster:
        self.redis.start()
        for b in backends:
            self.backends[b] = self.launcher.backend(b)
        return self

    def close(self) -> None:
        for node in self.nodes:
            if node.stopped:
                node.signal(signal.SIGCONT)
            node.admin.close()
        self.launcher.close()  # every node and backend, by PID
        self.redis.stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return self.redis.url + "/0"

    def spawn(self, host: str, *, seed: dict[str, Any] | None = None,
              node_id: str | None = None, extra: tuple[str, ...] = ()) -> ClusterNode:  # fmt: skip
        """Start a node on ``host`` (without waiting); ``seed`` is its ``--config``."""
        self._n += 1
        node_id = node_id or f"node-{host.rsplit('.', 1)[1]}"
        admin_port = free_port()
        args = ["--redis", self.url, "--bind", host, "--admin", f"{host}:{admin_port}",
                "--node-id", node_id, "--access-log", "off", "--log-level", "info",
                "--drain-timeout", "3s", *extra]  # fmt: skip
        if seed is not None:
            path = self.dir / f"seed-{self._n}.yaml"
            path.write_text(yaml.safe_dump(seed, sort_keys=False))
            args += ["--config", str(path)]
        stderr = self.dir / f"{node_id}-{self._n}.stderr"
        with open(stderr, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lbnode", *args], cwd=REPO_ROOT, env=subprocess_env(),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        self.launcher.procs.append(proc)
        node = ClusterNode(node_id, host, admin_port, proc, stderr)
        self.nodes.append(node)
        return node

    def start_nodes(self, seed: dict[str, Any] | None = None, hosts: tuple[str, ...] = NODE_HOSTS,
                    extra: tuple[str, ...] = ()) -> list[ClusterNode]:  # fmt: skip
        """Start one node per host (all with ``--config seed``), wait until all serve."""
        nodes = [self.spawn(host, seed=seed, extra=extra) for host in hosts]
        least = 1 if seed is not None else 0
        for node in nodes:
            wait_for(lambda node=node: (h := node.try_healthz()) and h["config_version"] >= least,
                     NODE_START_TIMEOUT, f"{node.id} to serve")  # fmt: skip
        return nodes

    def wait_live(self, n: int, timeout: float = 5.0) -> None:
        """Until every running node counts ``n`` live nodes (heartbeats seen)."""

        def counted() -> bool:
            return all(
                node.metrics().get("lbnode_cluster_live_nodes") == n
                for node in self.nodes if node.proc.poll() is None and not node.stopped
            )  # fmt: skip

        wait_for(counted, timeout, f"{n} live nodes")

    # lbctl ------------------------------------------------------------------------------

    def ctl(self, *argv: str) -> tuple[int, str, str]:
        """lbctl in-process (the same code as the command, no interpreter start-up)."""
        out, err = io.StringIO(), io.StringIO()
        code = lbctl.run(["--redis", self.url, *argv], stdout=out, stderr=err, environ={})
        return code, out.getvalue(), err.getvalue()

    def lbctl(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """``python -m lbshared.lbctl`` as a subprocess."""
        return subprocess.run(
            [sys.executable, "-m", "lbshared.lbctl", "--redis", self.url, *argv],
            capture_output=True, text=True, timeout=LBCTL_TIMEOUT, env=subprocess_env(),
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def apply(self, config: dict[str, Any], name: str = "apply.yaml") -> dict[str, int]:
        """``lbctl apply -f FILE`` (in-process); {lb name: version} as printed."""
        path = self.dir / name
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        code, out, err = self.ctl("apply", "-f", str(path))
        assert code == 0, (code, out, err)
        return {m[0]: int(m[1]) for m in re.findall(r"^applied (\S+) version (\d+)$", out, re.M)}

    def nodes_json(self) -> list[dict[str, Any]]:
        code, out, err = self.ctl("nodes", "--json")
        assert code == 0, err
        return json.loads(out)  # type: ignore[no-any-return]

    # convergence ------------------------------------------------------------------------

    def converge_times(self, version: int, start: float, timeout: float) -> list[float]:
        """Poll every running node's /healthz (tight, bounded) until each reports
        ``version`` or later; the seconds from ``start`` (perf_counter) per node."""
        nodes = [n for n in self.nodes if n.proc.poll() is None and not n.stopped]
        done: dict[str, float] = {}
        deadline = time.perf_counter() + timeout
        while len(done) < len(nodes):
            for node in nodes:
                if node.id not in done and node.version() >= version:
                    done[node.id] = time.perf_counter() - start
            if time.perf_counter() > deadline:
                late = [n.id for n in nodes if n.id not in done]
                raise AssertionError(f"{late} not at version {version} after {timeout:g}s")
        return [done[n.id] for n in nodes]

    def wait_version(self, version: int, timeout: float = CONVERGE_TIMEOUT) -> float:
        """Seconds until every running node serves ``version`` (or later)."""
        t0 = time.perf_counter()
        return max(self.converge_times(version, t0, timeout))


def lb(name: str, port: int, targets: list[tuple[str, str]], **extra: Any) -> dict[str, Any]:
    """One load balancer in file form."""
    return {
        "name": name,
        "listeners": [{"protocol": "http", "port": port}],
        "targets": [{"id": t, "address": a} for t, a in targets],
        **extra,
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank ``q`` quantile (0..1)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))
    return ordered[index]


def summary_ms(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max of ``values`` (seconds), in milliseconds."""
    return {
        "p50": round(percentile(values, 0.50) * 1e3, 1),
        "p95": round(percentile(values, 0.95) * 1e3, 1),
        "p99": round(percentile(values, 0.99) * 1e3, 1),
        "max": round(max(values) * 1e3, 1),
    }


def convergence_run(cluster: Cluster, name: str, port: int, applies: int,
                    timeout: float = CONVERGE_TIMEOUT,
                    each: Callable[[int], None] | None = None,
                    published: list[float] | None = None) -> list[float]:  # fmt: skip
    """``applies`` times: ``lbctl apply -f`` a change of ``name`` (a target's weight, then
    a rule added, alternately) and time until every node serves the printed version.
    ``each(i)`` runs after each convergence; ``published`` collects how long each
    ``lbctl apply`` itself took. Returns the convergence times (seconds), each from the
    start of the ``lbctl apply`` to the last node reporting the version."""
    b = cluster.backends
    targets = [(t, b[t].address) for t in ("b1", "b2")]
    times: list[float] = []
    for i in range(applies):
        cfg = lb(name, port, targets)
        if i % 2 == 0:
            cfg["targets"][0]["weight"] = 100 + i  # a weight change
        else:
            cfg["rules"] = {f"r{i}": {"path": f"/rule-{i}/*", "targets": ["b2"]}}  # a rule
        path = cluster.dir / "converge.yaml"
        path.write_text(yaml.safe_dump({"load_balancers": [cfg]}, sort_keys=False))
        t0 = time.perf_counter()
        code, out, err = cluster.ctl("apply", "-f", str(path))
        if published is not None:
            published.append(time.perf_counter() - t0)
        assert code == 0, (out, err)
        printed = re.fullmatch(rf"applied {name} version (\d+)\n", out)
        assert printed is not None, out
        version = int(printed.group(1))
        times.append(max(cluster.converge_times(version, t0, timeout)))
        if each is not None:
            each(i)
    return times


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three nodes, all started with the same ``--config`` (the first one seeds)."""
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        b = c.backends
        seed = {"load_balancers": [lb("web", free_port(), [("b1", b["b1"].address)])]}
        c.start_nodes(seed)
        c.wait_live(3)
        yield c
    finally:
        c.close()


def served_by(client: RawClient, path: str = "/") -> str:
    resp = client.get(path)
    assert resp.status == 200, resp
    backend = resp.header("x-backend")
    assert backend is not None
    return backend


def lb_port(cluster: Cluster, name: str) -> int:
    code, out, err = cluster.ctl("get", name, "--json")
    assert code == 0, err
    return int(json.loads(out)["listeners"][0]["port"])


# -- config ----------------------------------------------------------------------------------------


def test_seeded_once_and_served_by_every_node(cluster: Cluster) -> None:
    # Three nodes started with the same --config: one seeded, the others found it.
    seeded = [n for n in cluster.nodes if "seeded the empty cluster with web" in n.log()]
    assert len(seeded) == 1, [n.log() for n in cluster.nodes]
    done = cluster.lbctl("events", "--lb", "web", "--json")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(e["type"], e["version"], e["origin"]) for e in events] == [
        ("lb_config", 1, seeded[0].id)
    ]
    port = lb_port(cluster, "web")
    for node in cluster.nodes:
        assert node.healthz() == {
            "status": "serving", "degraded": False, "node": node.id, "config_version": 1,
        }  # fmt: skip
        with node.client(port) as c:
            assert served_by(c) == "b1"
        (entry,) = [e for e in node.status()["load_balancers"] if e["name"] == "web"]
        assert entry["version"] == 1 and [t["id"] for t in entry["targets"]] == ["b1"]


def test_apply_converges_on_every_node_and_keeps_client_connections(cluster: Cluster) -> None:
    b = cluster.backends
    port = free_port()
    created = cluster.apply({"load_balancers": [lb("conv", port, [("b1", b["b1"].address)])]})
    cluster.wait_version(created["conv"])
    # One keep-alive client connection per node, used across every apply below.
    clients = [node.client(port) for node in cluster.nodes]
    try:
        for c in clients:
            assert served_by(c) == "b1"

        def still_served(_i: int) -> None:
            for c in clients:
                resp = c.get("/")
                assert resp.status == 200 and resp.header("connection") is None, resp

        times = convergence_run(cluster, "conv", port, 20, each=still_served)
        figures = summary_ms(times)
        print(f"\nconvergence over {len(times)} applies (lbctl apply -> 3 nodes serving): "
              f"{figures} ms")  # fmt: skip
        assert percentile(times, 0.99) < 1.0, figures
        # A target change takes effect on the very same connections.
        moved = cluster.apply({"load_balancers": [lb("conv", port, [("b3", b["b3"].address)])]})
        cluster.wait_version(moved["conv"])
        for c in clients:
            assert [served_by(c) for _ in range(3)] == ["b3"] * 3
    finally:
        for c in clients:
            c.close()


def test_new_listener_opens_everywhere_and_a_deleted_one_closes_after_draining(
    cluster: Cluster,
) -> None:
    b = cluster.backends
    port = free_port()
    for node in cluster.nodes:
        with pytest.raises(ConnectionRefusedError):
            node.client(port)
    created = cluster.apply({"load_balancers": [lb("extra", port, [("b2", b["b2"].address)])]})
    cluster.wait_version(created["extra"])
    for node in cluster.nodes:
        with node.client(port) as c:
            assert served_by(c) == "b2"
    # An idle keep-alive connection to one node, a slow request in flight on another,
    # while the load balancer is deleted.
    idle = cluster.nodes[0].client(port, timeout=5.0)
    assert served_by(idle) == "b2"
    node = cluster.nodes[1]
    slow = node.client(port)
    answer: list[Any] = []
    slow.send(slow.request_bytes("GET", "/slow?delay=2"))
    reader = threading.Thread(target=lambda: answer.append(slow.read_response()), daemon=True)
    reader.start()
    wait_for(lambda: b["b2"].count("/slow") == 1, 5.0, "the slow request to reach b2")
    code, out, err = cluster.ctl("delete", "extra")
    assert code == 0 and out.startswith("deleted extra version "), (out, err)
    deleted = int(out.split()[-1])
    cluster.wait_version(deleted)
    for other in cluster.nodes:
        with pytest.raises(ConnectionRefusedError):
            other.client(port)  # closed at once for new connections, on every node
    assert reader.is_alive()  # ...while the in-flight request is still being served
    with idle:
        assert idle.wait_closed()  # an idle connection is closed, nothing sent
    reader.join(5.0)
    slow.close()
    (resp,) = answer
    assert resp.status == 200 and resp.header("x-backend") == "b2"
    assert resp.header("connection") == "close"  # drained: the connection ends after it
    assert "extra" not in {e["name"] for e in node.status()["load_balancers"]}


# -- sticky sessions ------------------------------------------------------------------------------

SESSIONS = 1000


def test_a_thousand_sessions_opened_on_one_node_stick_on_another(cluster: Cluster) -> None:
    b = cluster.backends
    port = free_port()
    app = lb("sticky", port, [(t, b[t].address) for t in ("b1", "b2", "b3")], rules={
        "app": {"path": "/app/*", "targets": ["b1", "b2", "b3"],
                "sticky_session": {"cookie": "session_id", "ttl": "1h"}},
    })  # fmt: skip
    cluster.wait_version(cluster.apply({"load_balancers": [app]})["sticky"])
    nodes = cluster.nodes
    pinned: dict[str, str] = {}
    followed: dict[str, str | None] = {}
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        # Sessions k, k+3, ...: opened on node k, followed on node k+1.
        try:
            with nodes[k].client(port) as opener, nodes[(k + 1) % 3].client(port) as follower:
                for i in range(k, SESSIONS, 3):
                    s = f"s{i}"
                    resp = opener.get(f"/app/set-cookie?name=session_id&value={s}")
                    assert resp.status == 200, resp
                    assert resp.header("set-cookie") == f"session_id={s}; Path=/"
                    pinned[s] = resp.header("x-backend") or "?"
                    again = follower.get("/app/x", [("Cookie", f"session_id={s}")])
                    assert again.status == 200, again
                    followed[s] = again.header("x-backend")
        except BaseException as exc:  # reported below
            errors.append(exc)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60.0)
    elapsed = time.perf_counter() - t0
    assert not errors, errors[0]
    assert len(pinned) == SESSIONS
    same = sum(followed[s] == pinned[s] for s in pinned)
    spread = Counter(pinned.values())
    print(f"\nsticky: {same}/{SESSIONS} sessions followed on another node landed on their "
          f"pinned target (targets {dict(sorted(spread.items()))}; {elapsed:.1f}s)")  # fmt: skip
    assert same == SESSIONS
    assert set(spread) == {"b1", "b2", "b3"}  # balanced when new, then pinned
    # Redis holds the pins (the truth every node reads through).
    assert cluster.redis.command("GET", "lb:{sticky}:sticky:app:s7") == pinned["s7"].encode()
    pttl = cluster.redis.command("PTTL", "lb:{sticky}:sticky:app:s7")
    assert 3_500_000 < pttl <= 3_600_000


# -- rate limits ----------------------------------------------------------------------------------

#: The acceptance scenario: 600 per 60 s for one client, 300 requests/s over 3 nodes for 10 s.
LIMIT, INTERVAL, RATE, DURATION = 600, "60s", 300, 10.0


def paced_load(nodes: list[ClusterNode], port: int, rate: float, duration: float,
               request: Callable[[RawClient, int], int] | None = None,
               stop: threading.Event | None = None,
               ) -> tuple[Counter[int], list[Counter[int]], float, float]:  # fmt: skip
    """``rate`` requests/s for ``duration`` s, round robin over ``nodes`` on an absolute
    schedule (request i goes to node i mod N at start + i/rate), one keep-alive client
    connection (from 127.0.0.1) per node, one thread per node.

    ``request(client, i)`` sends request i and returns its status (default: GET /).
    ``stop`` set: the workers stop early (the load then fails).
    Returns (statuses, statuses per node, the slowest request's seconds, the latest
    start behind schedule in seconds). A connection error fails the load."""
    n = len(nodes)
    total = int(rate * duration)
    per_node: list[Counter[int]] = [Counter() for _ in nodes]
    slowest = [0.0] * n
    behind = [0.0] * n
    errors: list[BaseException] = []
    start = time.perf_counter() + 0.2

    def get(client: RawClient, _i: int) -> int:
        return client.get("/").status

    send = request or get

    def worker(k: int) -> None:
        try:
            with nodes[k].client(port) as client:
                for i in range(k, total, n):
                    if stop is not None and stop.is_set():
                        raise RuntimeError("load stopped early")
                    due = start + i / rate
                    now = time.perf_counter()
                    if due > now:
                        time.sleep(due - now)
                    t0 = time.perf_counter()
                    behind[k] = max(behind[k], t0 - due)
                    per_node[k][send(client, i)] += 1
                    slowest[k] = max(slowest[k], time.perf_counter() - t0)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 30.0)
    assert not any(t.is_alive() for t in threads), "the load did not finish in time"
    assert not errors, errors[0]
    statuses: Counter[int] = sum(per_node, Counter())
    return statuses, per_node, max(slowest), max(behind)


def rate_limited_lb(cluster: Cluster, name: str, mode: str) -> int:
    b = cluster.backends
    port = free_port()
    cfg = lb(name, port, [("b1", b["b1"].address), ("b2", b["b2"].address)],
             rate_limit={"limit": LIMIT, "interval": INTERVAL, "key": "client_ip", "mode": mode})
    cluster.wait_version(cluster.apply({"load_balancers": [cfg]})[name])
    cluster.wait_live(3)  # the limiters size their shares and caps on three live nodes
    return port


def run_rate_scenario(cluster: Cluster, mode: str) -> tuple[int, list[int]]:
    port = rate_limited_lb(cluster, f"rl-{mode}", mode)
    statuses, per_node, slowest, behind = paced_load(cluster.nodes, port, RATE, DURATION)
    admitted = statuses[200]
    print(f"\n{mode} mode: admitted {admitted} of {sum(statuses.values())} "
          f"(per node {[c[200] for c in per_node]}; {statuses[429]} got 429); slowest "
          f"request {slowest * 1e3:.1f} ms; at most {behind * 1e3:.1f} ms behind "
          "schedule")  # fmt: skip
    assert set(statuses) <= {200, 429}, statuses
    assert sum(statuses.values()) == int(RATE * DURATION)
    return admitted, [c[200] for c in per_node]


def test_strict_rate_limit_admits_exactly_600_over_three_nodes(cluster: Cluster) -> None:
    admitted, per_node = run_rate_scenario(cluster, "strict")
    assert admitted == LIMIT, per_node
    assert all(n > 0 for n in per_node)
    assert cluster.redis.command("ZCARD", "lb:{rl-strict}:rl::127.0.0.1") == LIMIT


def test_cluster_rate_limit_admits_600_to_630_over_three_nodes(cluster: Cluster) -> None:
    admitted, per_node = run_rate_scenario(cluster, "cluster")
    assert LIMIT <= admitted <= 630, per_node
    assert all(n > 0 for n in per_node)


# -- membership -----------------------------------------------------------------------------------


def test_membership_stop_kill_and_clean_shutdown(tmp_path: Path) -> None:
    with Cluster(tmp_path) as c:
        c.start(backends=("b1",))
        seed = {"load_balancers": [lb("web", free_port(), [("b1", c.backends["b1"].address)])]}
        n2, n3, n4 = c.start_nodes(seed)
        c.wait_live(3)
        done = c.lbctl("nodes", "--json")
        assert done.returncode == 0, done.stderr
        rows = json.loads(done.stdout)
        assert [(r["id"], r["address"], r["admin"], r["config_version"], r["degraded"], r["live"])
                for r in rows] == [
            (n.id, n.host, f"{n.host}:{n.admin_port}", 1, False, True) for n in (n2, n3, n4)
        ]  # fmt: skip

        def row(node_id: str) -> dict[str, Any] | None:
            return next((r for r in c.nodes_json() if r["id"] == node_id), None)

        def gone_dead(node: ClusterNode, how: int) -> float:
            """Signal ``node``; seconds until lbctl nodes shows it listed with live false."""
            t0 = time.perf_counter()
            node.signal(how)
            wait_for(lambda: (r := row(node.id)) is not None and not r["live"],
                     LIVE_WINDOW + HEARTBEAT + 2.0, f"{node.id} to leave the live set")  # fmt: skip
            return time.perf_counter() - t0

        # A frozen node (SIGSTOP) leaves the live set within three heartbeats...
        stopped = gone_dead(n3, signal.SIGSTOP)
        assert LIVE_WINDOW - HEARTBEAT - 0.5 <= stopped <= LIVE_WINDOW + 1.0, stopped
        c.wait_live(2)  # ...the others count it out (their rate-limit shares grow)...
        n3.signal(signal.SIGCONT)
        wait_for(lambda: (r := row(n3.id)) is not None and r["live"], 5.0, "n3 live again")
        c.wait_live(3)  # ...and back in when it heartbeats again.
        # A killed node too; it stays listed, live false.
        killed = gone_dead(n4, signal.SIGKILL)
        assert killed <= LIVE_WINDOW + 1.0, killed
        n4.proc.wait(5.0)
        # A clean shutdown takes the node out of the list at once.
        assert n2.stop() == 0
        done = c.lbctl("nodes", "--json")
        assert done.returncode == 0, done.stderr
        listed = {r["id"]: r["live"] for r in json.loads(done.stdout)}
        assert listed == {n3.id: True, n4.id: False}, listed
        print(f"\nmembership: SIGSTOP -> live false after {stopped:.2f}s, "
              f"SIGKILL -> {killed:.2f}s; SIGTERM -> removed at exit")  # fmt: skip


# -- the log: trimming and malformed entries -----------------------------------------------------


def test_a_node_whose_resume_id_was_trimmed_reloads_from_the_snapshot(cluster: Cluster) -> None:
    b = cluster.backends
    port = free_port()
    targets = [("b1", b["b1"].address), ("b2", b["b2"].address)]
    cluster.wait_version(cluster.apply({"load_balancers": [lb("trim", port, targets)]})["trim"])
    node = cluster.nodes[1]
    reloads_before = node.log().count("was trimmed past our position")
    node.signal(signal.SIGSTOP)
    try:
        for weight in range(101, 106):
            cfg = lb("trim", port, targets)
            cfg["targets"][1]["weight"] = weight
            latest = cluster.apply({"load_balancers": [cfg]})["trim"]
        cluster.wait_version(latest)  # the two running nodes (the stopped one is skipped)
        # Every entry the stopped node has not read is gone from the stream.
        assert cluster.redis.command("XTRIM", "lb:{trim}:config", "MAXLEN", "0") == 6
        assert cluster.redis.command("XLEN", "lb:{trim}:config") == 0
    finally:
        node.signal(signal.SIGCONT)
    wait_for(lambda: node.version() >= latest, 10.0, f"{node.id} to reach version {latest}")
    (entry,) = [e for e in node.status()["load_balancers"] if e["name"] == "trim"]
    assert entry["version"] == latest
    assert [t["weight"] for t in entry["targets"]] == [100, 105]
    log = node.log()
    assert log.count("was trimmed past our position") > reloads_before, log[-3000:]


#: Stream entries that are not valid events, one per way of being wrong.
GARBAGE: list[tuple[str, ...]] = [
    ("garbage", "yes"),  # no envelope at all
    ("v", "1", "type", "lb_config", "lb", "{lb}", "origin", "x", "at", "1", "data", "{not json"),
    ("v", "9", "type", "lb_config", "lb", "{lb}", "origin", "x", "at", "1", "data", "{}"),
    ("v", "1", "type", "mystery", "lb", "{lb}", "origin", "x", "at", "1", "data", "{}"),
    # A huge version with an invalid config: applied, it would replace the load balancer.
    ("v", "1", "type", "lb_config", "lb", "{lb}", "origin", "x", "at", "1",
     "data", '{"version": 999999, "config": {"name": "{lb}", "listeners": "bad"}}'),
    ("v", "1", "type", "lb_deleted", "lb", "{lb}", "origin", "x", "at", "nan",
     "data", '{"version": 999999}'),
    ("v", "1", "type", "lb_deleted", "lb", "{lb}", "origin", "x", "at", "1", "data", "[]"),
]  # fmt: skip


def test_malformed_stream_entries_are_skipped_and_counted(cluster: Cluster) -> None:
    b = cluster.backends
    port = free_port()
    cfg = lb("junk", port, [("b1", b["b1"].address)])
    version = cluster.apply({"load_balancers": [cfg]})["junk"]
    cluster.wait_version(version)
    skipped = "lbnode_events_skipped_total"
    before = [node.metrics()[skipped] for node in cluster.nodes]
    for fields in GARBAGE:
        cluster.redis.command("XADD", "lb:{junk}:config", "*",
                              *(f.replace("{lb}", "junk") for f in fields))  # fmt: skip
    cluster.redis.command("XADD", "lb:registry:events", "*", "type", "lb_config", "lb", "junk")
    want = len(GARBAGE) + 1
    wait_for(lambda: all(n.metrics()[skipped] - was >= want
                         for n, was in zip(cluster.nodes, before, strict=True)),
             5.0, "every node to skip the bad entries")  # fmt: skip
    for node, was in zip(cluster.nodes, before, strict=True):
        assert node.metrics()[skipped] - was == want
        assert node.proc.poll() is None
        assert node.healthz()["config_version"] == version  # nothing was applied
        with node.client(port) as c:
            assert served_by(c) == "b1"
        assert "skipped bad event" in node.log()
    # The stream goes on: a valid change after the garbage is applied everywhere.
    cfg["targets"].append({"id": "b2", "address": b["b2"].address})
    cluster.wait_version(cluster.apply({"load_balancers": [cfg]})["junk"])
    for node in cluster.nodes:
        with node.client(port) as c:
            assert sorted({served_by(c) for _ in range(4)}) == ["b1", "b2"]
