"""Redis goes away under steady traffic, and nothing a client sees changes.

Three ``lbnode`` processes on 127.0.0.2-4 serve one load balancer whose every
request touches Redis: a ``strict`` rate limit (one Lua script a request), a
sticky rule (pin reads through on a cache miss, ``SET NX`` for a new session).
A paced load of 50 requests/s spread over the nodes runs for 8 s; in the middle
of it the private redis-server is

* killed (SIGKILL) and, a couple of seconds later, restarted empty on the same
  port, or
* frozen (SIGSTOP: it keeps its sockets and answers nothing), then resumed.

Asserted: every request is answered 200 (no 5xx, no connection error), none
waits long on Redis (the slowest is reported), sessions pinned before the
outage keep their target throughout, ``/healthz`` says ``degraded`` on every
node while Redis is away and not once it is back, the nodes reconnect and
agree on one config version, and ``lbctl nodes`` lists all three, live and not
degraded. Restarted empty, the nodes keep serving their last config, log
"redis holds no configuration", put their membership and the pins in use back
into Redis, and take the next ``lbctl apply``.

The harness (``Cluster``, ``paced_load``) is ``test_cluster_e2e``'s. Every
wait is bounded; every process is stopped by its PID at teardown.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.integration.test_cluster_e2e import (
    Cluster,
    ClusterNode,
    RawClient,
    free_port,
    lb,
    paced_load,
    served_by,
    wait_for,
)

#: The steady load: requests/s over the three nodes, and for how long.
RATE, DURATION = 50, 8.0
#: When the outage starts and ends, in seconds after the load started.
OUTAGE_AT, OUTAGE_END = 2.5, 5.0
#: Sessions pinned before the outage (followed by the load throughout).
PRE_SESSIONS = 30
#: No request may take longer than this (a Redis call on the request path is bounded by
#: 100 ms; a request makes at most three of them) - with room for a loaded CI machine.
MAX_LATENCY = 1.0
#: Bound of the waits for the nodes to notice the outage, and the recovery.
NOTICE_TIMEOUT, RECOVER_TIMEOUT = 5.0, 10.0


class Scenario:
    """A cluster serving ``web`` (strict rate limit + a sticky rule), sessions pinned."""

    def __init__(self, directory: Path) -> None:
        self.cluster = Cluster(directory)
        self.port = free_port()
        self.pinned: dict[str, str] = {}
        self.wrong: list[tuple[str, str | None, str]] = []
        self.lock = threading.Lock()

    def config(self, targets: tuple[str, ...] = ("b1", "b2", "b3")) -> dict[str, Any]:
        b = self.cluster.backends
        return {"load_balancers": [lb(
            "web", self.port, [(t, b[t].address) for t in targets],
            rate_limit={"limit": 1_000_000, "interval": "60s", "mode": "strict"},
            rules={"app": {"path": "/app/*", "targets": list(targets),
                           "sticky_session": {"cookie": "session_id", "ttl": "1h"}}},
        )]}  # fmt: skip

    def start(self) -> Scenario:
        c = self.cluster
        c.start()
        c.start_nodes(self.config())
        c.wait_live(3)
        # Sessions opened on one node, then used on every node (each caches the pin).
        nodes = c.nodes
        for i in range(PRE_SESSIONS):
            s = f"pre-{i}"
            with nodes[i % 3].client(self.port) as client:
                resp = client.get(f"/app/set-cookie?name=session_id&value={s}")
                assert resp.status == 200
                self.pinned[s] = resp.header("x-backend") or "?"
            for node in nodes:
                with node.client(self.port) as client:
                    assert self.follow(client, s) == self.pinned[s]
        return self

    @staticmethod
    def follow(client: RawClient, session: str) -> str | None:
        resp = client.get("/app/x", [("Cookie", f"session_id={session}")])
        assert resp.status == 200, resp
        return resp.header("x-backend")

    def request(self, client: RawClient, i: int) -> int:
        """Request ``i`` of the load: a pinned session, a new one, an unknown one, plain."""
        kind = i % 4
        if kind == 0:
            s = f"pre-{(i // 4) % PRE_SESSIONS}"
            resp = client.get("/app/x", [("Cookie", f"session_id={s}")])
            if resp.header("x-backend") != self.pinned[s]:
                with self.lock:
                    self.wrong.append((s, resp.header("x-backend"), self.pinned[s]))
        elif kind == 1:
            resp = client.get(f"/app/set-cookie?name=session_id&value=new-{i}")
        elif kind == 2:
            resp = client.get("/app/x", [("Cookie", f"session_id=unknown-{i}")])
        else:
            resp = client.get("/")
        return resp.status

    def run(self, outage: Any, restore: Any) -> dict[str, Any]:
        """The load with the outage in its middle; what was seen, for the assertions:
        ``noticed``/``recovered``: seconds until each node's /healthz said degraded
        true/false; ``listed``: seconds after the restore until ``lbctl nodes`` listed
        the three nodes live and not degraded; the load's statuses and slowest request."""
        c = self.cluster
        result: dict[str, Any] = {}
        stop = threading.Event()

        def load() -> None:
            try:
                result["load"] = paced_load(c.nodes, self.port, RATE, DURATION, self.request,
                                            stop)  # fmt: skip
            except BaseException as exc:  # re-raised in the test's thread
                result["error"] = exc

        t0 = time.perf_counter()
        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        try:
            try:
                time.sleep(max(0.0, t0 + OUTAGE_AT - time.perf_counter()))
                down = time.perf_counter()
                outage()
                result["noticed"] = {n.id: wait_degraded(n, True, down) for n in c.nodes}
                time.sleep(max(0.0, t0 + OUTAGE_END - time.perf_counter()))
            finally:
                restore()
            up = time.perf_counter()
            result["recovered"] = {n.id: wait_degraded(n, False, up) for n in c.nodes}
            wait_listed(c)
            result["listed"] = round(time.perf_counter() - up, 2)
        except BaseException:
            stop.set()
            raise
        finally:
            loader.join(DURATION + 30.0)
        assert not loader.is_alive(), "the load did not finish"
        if "error" in result:
            raise result["error"]
        statuses, _per_node, slowest, behind = result["load"]
        result.update(statuses=statuses, slowest=slowest, behind=behind)
        return result


def wait_degraded(node: ClusterNode, degraded: bool, since: float) -> float:
    """Seconds from ``since`` until ``node``'s /healthz says ``degraded`` is ``degraded``."""
    timeout = NOTICE_TIMEOUT if degraded else RECOVER_TIMEOUT
    wait_for(lambda: node.healthz()["degraded"] is degraded, timeout,
             f"{node.id} to report degraded={degraded}")  # fmt: skip
    return round(time.perf_counter() - since, 2)


def wait_listed(c: Cluster) -> list[dict[str, Any]]:
    """Until ``lbctl nodes`` lists the three nodes, live and not degraded; the rows."""

    def listed() -> list[dict[str, Any]] | None:
        rows = c.nodes_json()
        ok = len(rows) == 3 and all(r["live"] and not r["degraded"] for r in rows)
        return rows if ok else None

    rows: list[dict[str, Any]] = wait_for(listed, RECOVER_TIMEOUT, "lbctl nodes to list 3 nodes")
    return rows


def check_traffic(s: Scenario, result: dict[str, Any], what: str) -> None:
    statuses: Counter[int] = result["statuses"]
    print(f"\n{what}: {sum(statuses.values())} requests, statuses {dict(statuses)}; slowest "
          f"{result['slowest'] * 1e3:.0f} ms; /healthz degraded after {result['noticed']} s; "
          f"not degraded {result['recovered']} s after the restore; lbctl nodes lists all "
          f"three live {result['listed']} s after it")  # fmt: skip
    assert statuses == Counter({200: int(RATE * DURATION)}), statuses
    assert result["slowest"] < MAX_LATENCY, result["slowest"]
    assert not s.wrong, s.wrong[:5]


def check_cluster_agrees(c: Cluster) -> int:
    """The three nodes listed live, not degraded, on one config version; that version."""
    versions = {n.healthz()["config_version"] for n in c.nodes}
    assert len(versions) == 1, versions
    done = c.lbctl("nodes", "--json")  # the command itself, as an operator runs it
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["live"], r["degraded"], r["config_version"]) for r in rows] == [
        (True, False, *versions)
    ] * 3, rows
    return versions.pop()


def test_redis_killed_then_restarted_empty_under_traffic(tmp_path: Path) -> None:
    s = Scenario(tmp_path)
    c = s.cluster
    try:
        s.start()
        version = c.nodes[0].version()
        result = s.run(c.redis.kill, c.redis.restart)  # restarted: same port, empty
        check_traffic(s, result, "redis killed, restarted empty")
        assert check_cluster_agrees(c) == version
        for node in c.nodes:
            assert node.version() == version  # kept its config...
            assert "redis holds no configuration" in node.log()  # ...and said so
        code, out, _ = c.ctl("list", "--json")
        assert (code, out.strip()) == (0, "[]")  # Redis really came back empty
        # The pins in use were put back: Redis has them, with their TTL.
        for session, target in s.pinned.items():
            key = f"lb:{{web}}:sticky:app:{session}"
            assert c.redis.command("GET", key) == target.encode(), session
        # A session pinned before the restart still lands on its target, on every node.
        for node in c.nodes:
            with node.client(s.port) as client:
                for session, target in list(s.pinned.items())[:5]:
                    assert s.follow(client, session) == target
        # The next lbctl apply is taken by every node, with a version above the one they
        # kept (the nodes moved the restarted lb:seq past it).
        applied = c.apply(s.config(("b3",)))["web"]
        assert applied > version
        c.wait_version(applied)
        for node in c.nodes:
            with node.client(s.port) as client:
                assert served_by(client) == "b3"
    finally:
        c.close()


def test_redis_frozen_under_traffic(tmp_path: Path) -> None:
    s = Scenario(tmp_path)
    c = s.cluster
    try:
        s.start()
        version = c.nodes[0].version()
        result = s.run(c.redis.pause, c.redis.resume)
        check_traffic(s, result, "redis frozen (SIGSTOP) then resumed")
        assert check_cluster_agrees(c) == version
        # Nothing was lost: the config and the pins are still there, and changes go on.
        code, out, _ = c.ctl("list", "--json")
        assert code == 0 and [e["version"] for e in json.loads(out)] == [version]
        assert not any("redis holds no configuration" in n.log() for n in c.nodes)
        applied = c.apply(s.config(("b2",)))["web"]
        c.wait_version(applied)
        for node in c.nodes:
            with node.client(s.port) as client:
                assert served_by(client) == "b2"
    finally:
        c.close()
