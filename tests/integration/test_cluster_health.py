"""Health checking and circuit breakers decided once for the cluster, end to end.

A private redis-server, five ``lbnode`` processes on 127.0.0.2-6, ten demo
backends (``python -m lbnode.demo_backend``: ``GET /stats`` counts requests per
path, ``/health`` included; ``/status/500`` answers 500). Each test applies its
own load balancer (and deletes it at the end), so the module shares one cluster:

* probes are spread: ten targets, ``probers: 2``, five nodes - each target gets
  between R and R+1 probes per interval, counted at the targets, and every node
  names the same two probers per target, the rendezvous choice over the live set;
* a backend SIGKILLed under steady traffic through three nodes: every node marks
  it unhealthy within one probe interval of its unhealthy threshold, a websocket
  subscriber (on a node carrying no traffic) gets exactly one ``unhealthy``
  event, clients see only 200s; restarted on its port, exactly one ``healthy``;
* a target answering 500 through three nodes: one ``circuit_open`` and every
  node refuses with 503 ``circuit breaker open``; recovered, one
  ``circuit_half_open`` then one ``circuit_closed``; the error count that opened
  it is the cluster's (far fewer than ``min_requests`` on each node);
* ``lbctl health NAME --json`` and ``lbctl health set NAME TARGET down|auto``:
  drained on every node, then restored;
* a websocket ``?since=ID`` resumes from the Redis stream: the events committed
  while it was away, none twice, then the live ones.

The measured figures are printed (``pytest -s``). Every wait is bounded; every
process (nodes, backends, redis-server) is stopped by its PID at teardown.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from lbnode.policy.assignment import probers_for
from tests.integration.conftest import REPO_ROOT, START_TIMEOUT, Backend, subprocess_env
from tests.integration.test_cluster_e2e import (
    Cluster,
    ClusterNode,
    RawClient,
    free_port,
    lb,
    wait_for,
)

NODE_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6")
BACKENDS = tuple(f"b{i}" for i in range(10))
#: Probe interval of the tests (seconds) and probers per target.
INTERVAL, R = 0.5, 2
#: Bound of a wait for a config version, an event, a state on every node.
WAIT = 10.0
#: A websocket message expected "now" arrives within this long.
EVENT_WAIT = 5.0


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("health"))
    try:
        c.start(BACKENDS)
        c.start_nodes(None, hosts=NODE_HOSTS)
        c.wait_live(len(NODE_HOSTS), timeout=WAIT)
        yield c
    finally:
        c.close()


def apply(cluster: Cluster, config: dict[str, Any]) -> None:
    versions = cluster.apply({"load_balancers": [config]})
    cluster.wait_version(max(versions.values()), timeout=WAIT)


def delete(cluster: Cluster, name: str) -> None:
    code, out, err = cluster.ctl("delete", name)
    assert code == 0, (out, err)


def health_cfg(**kw: Any) -> dict[str, Any]:
    return {"path": "/health", "interval": f"{int(INTERVAL * 1000)}ms", "timeout": "300ms",
            "healthy_threshold": 2, "unhealthy_threshold": 2, "probers": R, **kw}  # fmt: skip


def target_status(node: ClusterNode, name: str, target: str) -> dict[str, Any]:
    for entry in node.status()["load_balancers"]:
        if entry["name"] == name:
            for t in entry["targets"]:
                if t["id"] == target:
                    return t  # type: ignore[no-any-return]
    raise KeyError((name, target))


def restart_backend(cluster: Cluster, backend: Backend) -> Backend:
    """Start ``backend`` again on its port (stopped by PID at teardown)."""
    log = cluster.dir / f"restart-{backend.id}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lbnode.demo_backend", "--port", str(backend.port),
             "--id", backend.id, "--host", "127.0.0.1"],
            cwd=REPO_ROOT, env=subprocess_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    cluster.launcher.procs.append(proc)
    wait_for(lambda: "listening on" in log.read_text(errors="replace") or proc.poll() is not None,
             START_TIMEOUT, f"backend {backend.id} to listen again")  # fmt: skip
    assert proc.poll() is None, log.read_text()
    restarted = Backend(backend.id, proc, backend.port, log)
    cluster.backends[backend.id] = restarted
    return restarted


class Traffic:
    """Steady GETs through some nodes: one keep-alive connection and thread per node.

    ``path`` may be changed while it runs. Records (node, monotonic time, status,
    X-Backend, body); a connection error is recorded (and the connection reopened).
    """

    def __init__(self, nodes: list[ClusterNode], port: int, path: str = "/",
                 period: float = 0.01) -> None:  # fmt: skip
        self.nodes = nodes
        self.port = port
        self.path = path
        self.period = period
        self.records: list[tuple[str, float, int, str | None, bytes]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                         for n in nodes]  # fmt: skip

    def _run(self, node: ClusterNode) -> None:
        client: RawClient | None = None
        while not self._stop.is_set():
            try:
                if client is None:
                    client = node.client(self.port, timeout=5.0)
                resp = client.get(self.path)
                self.records.append((node.id, time.monotonic(), resp.status,
                                     resp.header("x-backend"), resp.body))  # fmt: skip
                if resp.header("connection") == "close":
                    client.close()
                    client = None
            except (OSError, EOFError) as exc:
                self.errors.append(f"{node.id}: {exc!r}")
                if client is not None:
                    client.close()
                client = None
            self._stop.wait(self.period)
        if client is not None:
            client.close()

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10.0)

    def statuses(self, since: float = 0.0) -> Counter[int]:
        return Counter(r[2] for r in list(self.records) if r[1] >= since)


class Watcher:
    """A websocket subscriber of one node's ``/events/health``, collecting messages."""

    def __init__(self, node: ClusterNode, query: str) -> None:
        self.url = f"ws://{node.host}:{node.admin_port}/events/health?{query}"
        self.events: list[dict[str, Any]] = []
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_websocket_url(self.url) as ws:
            task_status.started()
            while True:
                self.events.append(json.loads(await ws.get_message()))
                self._changed.set()
                self._changed = trio.Event()

    async def wait(self, pred: Callable[[dict[str, Any]], bool], what: str,
                   timeout: float = EVENT_WAIT) -> dict[str, Any]:  # fmt: skip
        with trio.fail_after(timeout):
            while True:
                for event in self.events:
                    if pred(event):
                        return event
                await self._changed.wait()
        raise AssertionError(f"no {what}")  # pragma: no cover

    def of(self, kind: str, target: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind and e["target"] == target]


async def poll(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    """Await until ``pred()`` (a quick, blocking check) is truthy; fail after ``timeout``."""
    deadline = trio.current_time() + timeout
    while True:
        result = pred()
        if result:
            return result
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await trio.sleep(0.02)


async def quiet(seconds: float) -> None:
    """Let further (unwanted) events arrive, if any would."""
    await trio.sleep(seconds)


# -- 1. probes spread over the live nodes --------------------------------------------------------


async def test_each_target_is_probed_by_r_nodes_per_interval(cluster: Cluster) -> None:
    name, port = "spread", free_port()
    b = cluster.backends
    apply(cluster, lb(name, port, [(t, b[t].address) for t in BACKENDS],
                      health_check=health_cfg()))  # fmt: skip
    try:
        await trio.sleep(2 * INTERVAL)  # every node's first round, with the full live set
        starts = {}
        for t in BACKENDS:
            assert b[t].proc.poll() is None
            with RawClient(b[t].port) as c:
                assert c.request("DELETE", "/stats").status == 200
            starts[t] = time.monotonic()
        await trio.sleep(6 * INTERVAL)
        counts, rates = {}, {}
        for t in BACKENDS:
            counts[t] = b[t].count("/health")
            k = (time.monotonic() - starts[t]) / INTERVAL
            rates[t] = counts[t] / k
            assert R * (k - 1) <= counts[t] <= R * (k + 1), (t, counts[t], k)
        print(f"\nprobes per target per {INTERVAL:g}s interval (R={R}, 5 nodes): "
              + ", ".join(f"{t} {rates[t]:.2f}" for t in BACKENDS))  # fmt: skip
        # (The window's ends cut a round or not: R * k, give or take a round.)
        assert R - 0.25 <= sum(rates.values()) / len(rates) <= R + 1

        # Every node names the same probers for each target: rendezvous over the live set.
        live = sorted(n.id for n in cluster.nodes)

        def reported() -> list[dict[str, Any]] | None:
            code, out, err = cluster.ctl("health", name, "--json")
            assert code == 0, err
            rows: list[dict[str, Any]] = json.loads(out)
            return rows if all(r["probers"] and r["last_probes"] for r in rows) else None

        rows = await poll(reported, WAIT, "every node's stats with probe results")
        for row in rows:
            assert {"target", "state", "since", "override", "breaker", "last_probes"} <= set(row)
            assert (row["state"], row["override"], row["breaker"]) == ("healthy", "auto", "disabled")
            assert sorted(row["probers"]) == sorted(probers_for(f"{name}/{row['target']}", live, R))
            assert {p["node"] for p in row["last_probes"]} <= set(row["probers"])
            assert all(p["ok"] for p in row["last_probes"])
    finally:
        delete(cluster, name)


# -- 2. a backend killed under traffic -------------------------------------------------------------


async def test_a_killed_backend_is_cut_off_everywhere_with_one_event_each_way(
    cluster: Cluster,
) -> None:
    name, port = "kill", free_port()
    b = cluster.backends
    ids = ("b0", "b1", "b2")
    apply(cluster, lb(name, port, [(t, b[t].address) for t in ids], health_check=health_cfg()))
    traffic_nodes, watch_node = cluster.nodes[:3], cluster.nodes[4]
    watcher = Watcher(watch_node, f"lb={name}")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            with Traffic(traffic_nodes, port) as traffic:
                await poll(lambda: {r[3] for r in traffic.records} >= set(ids), WAIT,
                           "traffic to every target")  # fmt: skip
                victim = b["b1"]
                t_kill = time.monotonic()
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait(5)
                down = await watcher.wait(lambda e: e["type"] == "unhealthy", "unhealthy event")
                t_event = time.monotonic()
                assert (down["target"], down["lb"]) == ("b1", name)
                # Every node has cut it off (its view, not a local ejection only).
                cut: dict[str, float] = {}

                def all_cut() -> bool:
                    for node in cluster.nodes:
                        if node.id not in cut and target_status(node, name, "b1")["health"] == "unhealthy":
                            cut[node.id] = time.monotonic() - t_kill
                    return len(cut) == len(cluster.nodes)

                await poll(all_cut, WAIT, "every node to mark b1 unhealthy")
                ejected = [n.id for n in traffic_nodes if target_status(n, name, "b1")["ejected"]]
                await quiet(2 * INTERVAL)
                bad = Counter(f"{r[2]} {r[4][:60]!r}" for r in traffic.records if r[2] != 200)
                served = Counter(r[3] for r in traffic.records if r[1] > t_event)

                restarted = restart_backend(cluster, victim)
                t_back = time.monotonic()
                up = await watcher.wait(lambda e: e["type"] == "healthy", "healthy event")
                back_after = time.monotonic() - t_back
                assert (up["target"], up["lb"]) == ("b1", name)
                await quiet(2 * INTERVAL)
            assert restarted.proc.poll() is None
            nursery.cancel_scope.cancel()
        threshold_at = 2 * INTERVAL  # unhealthy_threshold probe rounds after the kill, at most
        print(f"\nkill: unhealthy event {t_event - t_kill:.2f}s after SIGKILL; every node cut"
              f" it off after {', '.join(f'{k} {v:.2f}s' for k, v in sorted(cut.items()))}"
              f" (threshold reached by {threshold_at:g}s); passive ejection on {ejected};"
              f" healthy {back_after:.2f}s after the restart;"
              f" {len(traffic.records)} requests, non-200: {bad}")  # fmt: skip
        assert max(cut.values()) <= threshold_at + INTERVAL + 0.5, cut  # (0.5 s for a slow CI)
        assert not bad and traffic.errors == [], (bad, traffic.errors[:3])
        assert served["b1"] == 0  # nothing answered by the dead backend, obviously
        assert len(watcher.of("unhealthy", "b1")) == 1, watcher.events
        assert len(watcher.of("healthy", "b1")) == 1, watcher.events
        assert [e["type"] for e in watcher.events] == ["unhealthy", "healthy"]
        code, out, err = cluster.ctl("events", "--lb", name, "--json")
        assert code == 0, err
        health = [json.loads(line) for line in out.splitlines()]
        assert [(e["type"], e["target"]) for e in health if e["type"] != "lb_config"] == [
            ("unhealthy", "b1"), ("healthy", "b1")]  # fmt: skip
        assert [e["id"] for e in health if e["type"] != "lb_config"] == [
            e["id"] for e in watcher.events]  # fmt: skip
    finally:
        delete(cluster, name)


# -- 3. the circuit breaker, cluster-wide ----------------------------------------------------------


async def test_the_breaker_opens_on_every_node_together_then_half_opens_and_closes(
    cluster: Cluster,
) -> None:
    name, port = "brk", free_port()
    min_requests = 30
    apply(cluster, lb(name, port, [("b3", cluster.backends["b3"].address)], circuit_breaker={
        "threshold": 0.5, "min_requests": min_requests, "interval": "10s",
        "half_open_timeout": "1s"}))  # fmt: skip
    watcher = Watcher(cluster.nodes[4], f"lb={name}")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            with Traffic(cluster.nodes[:3], port, "/status/500", period=0.05) as traffic:
                opened = await watcher.wait(lambda e: e["type"] == "circuit_open", "circuit_open",
                                            timeout=WAIT)  # fmt: skip
                t_open = time.monotonic()
                errors_before = sum(1 for r in list(traffic.records)
                                    if r[2] == 500 and r[1] <= t_open)  # fmt: skip
                # Every node refuses: 503 circuit breaker open (the only target).
                refused_after: dict[str, float] = {}

                def all_refuse() -> bool:
                    for node in cluster.nodes:
                        if node.id in refused_after:
                            continue
                        with node.client(port) as c:
                            resp = c.get("/")
                        if resp.status == 503 and resp.body == b"503 circuit breaker open\n":
                            refused_after[node.id] = time.monotonic() - t_open
                    return len(refused_after) == len(cluster.nodes)

                await poll(all_refuse, WAIT, "every node to refuse with the breaker open")
                traffic.path = "/"  # the target recovers
                half = await watcher.wait(lambda e: e["type"] == "circuit_half_open",
                                          "circuit_half_open")  # fmt: skip
                closed = await watcher.wait(lambda e: e["type"] == "circuit_closed",
                                            "circuit_closed", timeout=WAIT)  # fmt: skip
                t_closed = time.monotonic()
                await quiet(2 * INTERVAL)
                after_close = traffic.statuses(since=t_closed + 0.5)
            nursery.cancel_scope.cancel()
        print(f"\nbreaker: circuit_open after {errors_before} errors over 3 nodes"
              f" (min_requests {min_requests}: counted cluster-wide); every node refusing"
              f" {max(refused_after.values()) * 1000:.0f} ms after the event; "
              f"{opened['reason']!r}; half-open {half['reason']!r}; closed {closed['reason']!r}")
        # Nodes counting alone would each need min_requests errors of their own (a third
        # of the traffic each): about 3 x min_requests in all before the first one opened.
        # Counted cluster-wide it opens at min_requests, plus what arrives within a
        # breaker tick (250 ms) and an outcome batch (100 ms) at ~60 requests/s.
        assert errors_before < 2.5 * min_requests
        assert max(refused_after.values()) < 1.0
        assert [e["type"] for e in watcher.events] == [
            "circuit_open", "circuit_half_open", "circuit_closed"], watcher.events  # fmt: skip
        assert opened["reason"].startswith("error rate 100%")
        assert set(after_close) == {200}, after_close
        assert traffic.errors == []
    finally:
        delete(cluster, name)


# -- 4 and 5. overrides with lbctl, and resuming the feed --------------------------------------------


async def test_lbctl_health_set_drains_everywhere_and_the_feed_resumes_from_redis(
    cluster: Cluster,
) -> None:
    name, port = "ovr", free_port()
    b = cluster.backends
    apply(cluster, lb(name, port, [("b4", b["b4"].address), ("b5", b["b5"].address)]))

    def backends_seen(node: ClusterNode, n: int = 8) -> set[str | None]:
        with node.client(port) as c:
            return {c.get("/").header("x-backend") for _ in range(n)}

    try:
        assert all(backends_seen(n) == {"b4", "b5"} for n in cluster.nodes)
        code, out, err = cluster.ctl("health", "set", name, "nope", "down")
        assert (code, out, err) == (1, "", f"lbctl: no target 'nope' in load balancer '{name}'\n")
        code, out, err = cluster.ctl("health", "set", "no-such-lb", "b4", "down")
        assert (code, err) == (1, "lbctl: no load balancer named 'no-such-lb'\n")

        node = cluster.nodes[1]
        first = Watcher(node, f"lb={name}")
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            done = cluster.lbctl("health", "set", name, "b4", "down")  # the real command line
            assert (done.returncode, done.stdout, done.stderr) == (
                0, f"set health of b4 in {name} to down\n", "")  # fmt: skip
            down = await first.wait(lambda e: e["type"] == "unhealthy", "unhealthy (override)")
            nursery.cancel_scope.cancel()
        assert (down["target"], down["reason"]) == ("b4", "override down")
        await poll(lambda: all(target_status(n, name, "b4")["health"] == "unhealthy"
                               for n in cluster.nodes), WAIT, "b4 drained on every node")  # fmt: skip
        assert all(backends_seen(n) == {"b5"} for n in cluster.nodes)
        code, out, err = cluster.ctl("health", name, "--json")
        assert code == 0, err
        rows = {r["target"]: r for r in json.loads(out)}
        assert (rows["b4"]["state"], rows["b4"]["override"]) == ("unhealthy", "down")
        assert (rows["b5"]["state"], rows["b5"]["override"]) == ("healthy", "auto")
        code, table, err = cluster.ctl("health", name)
        assert code == 0 and re.search(r"^b4\s+unhealthy\s+\S+\s+down\s+", table, re.M), table

        # While no subscriber is connected: two more transitions.
        assert cluster.ctl("health", "set", name, "b4", "auto")[0] == 0
        assert cluster.ctl("health", "set", name, "b5", "down")[0] == 0
        await poll(lambda: target_status(node, name, "b5")["health"] == "unhealthy", WAIT,
                   "b5 drained")  # fmt: skip
        resumed = Watcher(node, f"lb={name}&since={down['id']}")
        async with trio.open_nursery() as nursery:
            await nursery.start(resumed.run)
            await resumed.wait(lambda e: e["target"] == "b5", "the missed events")
            assert cluster.ctl("health", "set", name, "b5", "auto")[0] == 0
            await resumed.wait(lambda e: e["type"] == "healthy" and e["target"] == "b5",
                               "the live event")  # fmt: skip
            await quiet(2 * INTERVAL)
            nursery.cancel_scope.cancel()
        assert [(e["type"], e["target"]) for e in resumed.events] == [
            ("healthy", "b4"), ("unhealthy", "b5"), ("healthy", "b5")]  # fmt: skip
        ids = [e["id"] for e in resumed.events]
        assert len(set(ids)) == len(ids) and down["id"] not in ids
        await poll(lambda: all(target_status(n, name, t)["health"] == "healthy"
                               for n in cluster.nodes for t in ("b4", "b5")), WAIT,
                   "both targets back on every node")  # fmt: skip
        assert all(backends_seen(n) == {"b4", "b5"} for n in cluster.nodes)
    finally:
        delete(cluster, name)
