"""lbctl end to end against a private redis-server: as a subprocess for the main flows
(apply, list, get, nodes, schema, events --follow with Ctrl-C, every kind of failure), and
in-process (same code, real Redis, faster) for the remaining paths and the retry on conflict."""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from lbshared import docgen, lbctl
from lbshared.config import LoadBalancer, lb_to_dict
from lbshared.publish import publish_config
from lbshared.redis_url import parse_url
from lbshared.store import NODES_KEY, REGISTRY_KEY, config_stream, meta_key
from tests.conftest import REPO_ROOT
from tests.redisproc import RedisProc, free_port, redis_proc_module, start_redis  # noqa: F401

TIMEOUT = 30.0  # bound of any lbctl subprocess

FILE = """\
load_balancers:
  - name: api-lb
    listeners:
      - {protocol: http, port: 8080}
    targets:
      - {id: api-1, address: "127.0.0.1:9001", weight: 100}
      - {id: api-2, address: "127.0.0.1:9002"}
    rules:
      api_v2:
        path: /api/v2/*
        targets: [api-1]
  - name: web
    listeners: [{port: 8081}]
    targets: [{id: w1, address: "127.0.0.1:9100"}]
"""


@pytest.fixture
def url(redis_proc_module: RedisProc) -> str:  # noqa: F811
    redis_proc_module.command("FLUSHALL")
    return redis_proc_module.url


@pytest.fixture
def r(url: str) -> Any:
    client = redis.Redis.from_url(url, socket_timeout=5)
    yield client
    client.close()


def lbctl_proc(url: str, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("LB_REDIS_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "lbshared.lbctl", "--redis", url, *argv], input=stdin,
        capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=REPO_ROOT,
    )  # fmt: skip


def ctl(url: str, *argv: str) -> tuple[int, str, str]:
    """lbctl in-process with the real redis-py connector."""
    out, err = io.StringIO(), io.StringIO()
    code = lbctl.run(["--redis", url, *argv], stdout=out, stderr=err, environ={})
    return code, out.getvalue(), err.getvalue()


def write(tmp_path: Path, text: str, name: str = "lb.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- as a subprocess ----------------------------------------------------------------------------


def test_apply_list_get_and_reapply_from_get(url: str, tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    done = lbctl_proc(url, "apply", "-f", path)
    assert (done.returncode, done.stdout, done.stderr) == (
        0, "applied api-lb version 1\napplied web version 2\n", "")  # fmt: skip

    listed = lbctl_proc(url, "list", "--json")
    assert listed.returncode == 0
    assert json.loads(listed.stdout) == [
        {"name": "api-lb", "version": 1, "listeners": ["http:8080"], "targets": ["api-1", "api-2"]},
        {"name": "web", "version": 2, "listeners": ["http:8081"], "targets": ["w1"]},
    ]
    got = lbctl_proc(url, "get", "api-lb")
    assert got.returncode == 0 and got.stdout.startswith("# api-lb version 1\nload_balancers:\n")
    file_lb = yaml.safe_load(FILE)["load_balancers"][0]
    assert yaml.safe_load(got.stdout)["load_balancers"][0] == lb_to_dict(
        LoadBalancer.model_validate(file_lb)
    )

    # get's output is a config file: applied back through stdin it replaces api-lb, same config.
    again = lbctl_proc(url, "apply", "-f", "-", stdin=got.stdout)
    assert (again.returncode, again.stdout) == (0, "applied api-lb version 3\n")
    as_json = json.loads(lbctl_proc(url, "get", "api-lb", "--json").stdout)
    assert as_json.pop("version") == 3
    assert as_json == lb_to_dict(LoadBalancer.model_validate(file_lb))


def test_failures_are_one_line_with_exit_codes(url: str, tmp_path: Path, r: Any) -> None:
    bad = write(tmp_path, "load_balancer:\n  listeners: [{port: 99999}]\n", "bad.yaml")
    done = lbctl_proc(url, "apply", "-f", bad)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.splitlines() == [
        f"lbctl: invalid config {bad}:",
        "  load_balancer.listeners[0].port: 99999 must be <= 65535",
    ]
    assert r.keys("lb:*") == []  # nothing published

    unknown = lbctl_proc(url, "get", "nope")
    assert (unknown.returncode, unknown.stderr) == (1, "lbctl: no load balancer named 'nope'\n")

    port = free_port()
    down = lbctl_proc(f"redis://:s3cret@127.0.0.1:{port}/0", "list")
    assert (down.returncode, down.stdout) == (3, "")
    assert (
        down.stderr
        == f"lbctl: cannot reach Redis at redis://:***@127.0.0.1:{port}/0: Connection refused\n"
    )

    # The views of what nodes publish, and health overrides, on a load balancer that is not.
    gone = lbctl_proc(url, "status", "api-lb")
    assert (gone.returncode, gone.stdout, gone.stderr) == (
        1, "", "lbctl: no load balancer named 'api-lb'\n")  # fmt: skip
    for argv in (("metrics", "api-lb"), ("health", "api-lb", "--json"),
                 ("health", "set", "api-lb", "api-1", "down")):  # fmt: skip
        assert ctl(url, *argv) == (1, "", "lbctl: no load balancer named 'api-lb'\n"), argv


def test_nodes_and_schema(url: str, r: Any) -> None:
    now = time.time()
    for node_id, age in (("node-b", 0.2), ("node-a", 20.0), ("gone", 120.0)):
        r.hset(NODES_KEY, node_id, json.dumps({
            "id": node_id, "address": "127.0.0.2", "admin": "127.0.0.1:9901",
            "last_heartbeat": now - age, "config_version": 7, "degraded": node_id == "node-a",
            "started_at": now - 300, "pid": 1234, "version": "0.1.0"}))  # fmt: skip
    done = lbctl_proc(url, "nodes", "--json")
    assert done.returncode == 0
    rows = json.loads(done.stdout)
    assert [(n["id"], n["live"], n["degraded"], n["config_version"]) for n in rows] == [
        ("node-a", False, True, 7), ("node-b", True, False, 7)]  # fmt: skip
    assert set(rows[0]) == {"id", "address", "admin", "last_heartbeat", "config_version",
                            "degraded", "live"}  # fmt: skip
    assert sorted(r.hkeys(NODES_KEY)) == [b"node-a", b"node-b"]  # the stale entry was removed

    table = lbctl_proc(url, "nodes")
    assert table.stdout.splitlines()[0].split() == [
        "ID",
        "ADDRESS",
        "ADMIN",
        "LAST",
        "HEARTBEAT",
        "CONFIG",
        "VERSION",
        "DEGRADED",
        "LIVE",
    ]

    schema = lbctl_proc(url, "schema")
    assert (schema.returncode, json.loads(schema.stdout)) == (0, docgen.json_schema())


class Lines:
    """A subprocess's stdout lines, read by a thread; ``next()`` waits (bounded)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.q: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                self.q.put(line)
            self.q.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float = 10.0) -> dict[str, Any]:
        line = self.q.get(timeout=timeout)
        assert line is not None, "lbctl ended early"
        return json.loads(line)  # type: ignore[no-any-return]


def wait_blocked(r: Any) -> None:
    deadline = time.monotonic() + 10
    while r.info("clients")["blocked_clients"] < 1:
        assert time.monotonic() < deadline, "lbctl never blocked in XREAD"
        time.sleep(0.01)


def test_events_follow_until_ctrl_c(url: str, r: Any, tmp_path: Path) -> None:
    assert ctl(url, "apply", "-f", write(tmp_path, FILE))[0] == 0
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lbshared.lbctl", "--redis", url, "events", "--follow", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    try:
        lines = Lines(proc)
        history = [lines.next(), lines.next()]
        assert [(e["lb"], e["type"], e["version"]) for e in history] == [
            ("api-lb", "lb_config", 1), ("web", "lb_config", 2)]  # fmt: skip
        wait_blocked(r)
        assert ctl(url, "delete", "web") == (0, "deleted web version 3\n", "")
        assert (lambda e: (e["lb"], e["type"], e["version"]))(lines.next()) == (
            "web",
            "lb_deleted",
            3,
        )
        # A load balancer created while following is picked up through the registry stream.
        wait_blocked(r)
        new = write(
            tmp_path, "load_balancer:\n  name: fresh\n  listeners: [{port: 8090}]\n", "n.yaml"
        )
        assert ctl(url, "apply", "-f", new)[1] == "applied fresh version 4\n"
        event = lines.next()
        assert (event["lb"], event["type"], event["version"]) == ("fresh", "lb_config", 4)
        assert event["config"] == {"name": "fresh", "listeners": [{"port": 8090}]}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 0
        assert proc.stderr is not None and proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# -- in-process, real Redis ---------------------------------------------------------------------


def test_apply_leaves_others_alone_and_prune_deletes_them(url: str, tmp_path: Path, r: Any) -> None:
    assert ctl(url, "apply", "-f", write(tmp_path, FILE))[0] == 0
    only_web = write(tmp_path, "load_balancers:\n  - name: web\n    listeners: [{port: 8082}]\n",
                     "web.yaml")  # fmt: skip
    assert ctl(url, "apply", "-f", only_web) == (0, "applied web version 3\n", "")
    assert r.hgetall(REGISTRY_KEY) == {b"api-lb": b"1", b"web": b"3"}
    assert ctl(url, "apply", "-f", only_web, "--prune") == (
        0, "applied web version 4\ndeleted api-lb version 5\n", "")  # fmt: skip
    assert r.hgetall(REGISTRY_KEY) == {b"web": b"4"}
    code, out, _ = ctl(url, "list", "--json")
    assert [row["name"] for row in json.loads(out)] == ["web"]


def test_prune_frees_ports_for_the_file(url: str, tmp_path: Path) -> None:
    assert ctl(url, "apply", "-f", write(tmp_path, FILE))[0] == 0
    takeover = write(
        tmp_path, "load_balancer:\n  name: new\n  listeners: [{port: 8081}]\n", "t.yaml"
    )
    code, _, err = ctl(url, "apply", "-f", takeover)
    assert code == 1 and "port 8081 is already used by load balancer 'web'" in err
    assert ctl(url, "apply", "-f", takeover, "--prune") == (
        0,
        "deleted web version 3\napplied new version 4\ndeleted api-lb version 5\n",
        "",
    )


def test_targets_add_remove_and_delete(url: str, tmp_path: Path, r: Any) -> None:
    assert ctl(url, "apply", "-f", write(tmp_path, FILE))[0] == 0
    assert ctl(url, "targets", "add", "api-lb", "api-3", "127.0.0.1:9003", "--weight", "5") == (
        0, "added target api-3 to api-lb version 3\n", "")  # fmt: skip
    _, out, _ = ctl(url, "get", "api-lb", "--json")
    assert json.loads(out)["targets"][-1] == {"id": "api-3", "address": "127.0.0.1:9003",
                                              "weight": 5}  # fmt: skip
    assert ctl(url, "targets", "remove", "api-lb", "api-2") == (
        0, "removed target api-2 from api-lb version 4\n", "")  # fmt: skip
    _, out, _ = ctl(url, "get", "api-lb", "--json")
    assert [t["id"] for t in json.loads(out)["targets"]] == ["api-1", "api-3"]
    assert ctl(url, "targets", "remove", "api-lb", "api-2") == (
        1, "", "lbctl: no target 'api-2' in load balancer 'api-lb'\n")  # fmt: skip
    assert ctl(url, "delete", "api-lb") == (0, "deleted api-lb version 5\n", "")
    assert ctl(url, "delete", "api-lb") == (1, "", "lbctl: no load balancer named 'api-lb'\n")
    assert r.hget(meta_key("api-lb"), "version") == b"5"
    code, out, _ = ctl(url, "events", "--lb", "api-lb")
    assert [line.split()[3:6] for line in out.splitlines()] == [
        ["lb_config", "version", "1"], ["lb_config", "version", "3"],
        ["lb_config", "version", "4"], ["lb_deleted", "version", "5"]]  # fmt: skip


def test_read_modify_write_retries_on_conflict(url: str, tmp_path: Path, r: Any) -> None:
    assert ctl(url, "apply", "-f", write(tmp_path, FILE))[0] == 0
    client = lbctl.connect(parse_url(url))
    calls: list[int] = []

    def add_target(version: int, current: LoadBalancer | None) -> LoadBalancer:
        assert current is not None
        calls.append(version)
        if len(calls) == 1:  # someone else changes api-lb between our read and our write
            other = current.model_copy(update={"algorithm": "random"})
            publish_config(r, "api-lb", other, version, "someone")
        body = lb_to_dict(current)
        body["targets"].append({"id": "api-9", "address": "127.0.0.1:9999"})
        return LoadBalancer.model_validate(body)

    version = lbctl._change(client, "api-lb", add_target)
    assert calls == [1, 3] and version == 5  # 4 went to our conflicting try (gaps are allowed)
    _, out, _ = ctl(url, "get", "api-lb", "--json")
    result = json.loads(out)
    # Both changes survive: the other writer's and ours, re-applied on top of it.
    assert result["algorithm"] == "random" and result["targets"][-1]["id"] == "api-9"
    client.close()


def test_gives_up_after_repeated_conflicts(url: str, tmp_path: Path, r: Any) -> None:
    assert ctl(url, "apply", "-f", write(tmp_path, FILE))[0] == 0
    client = lbctl.connect(parse_url(url))

    def always_overtaken(version: int, current: LoadBalancer | None) -> LoadBalancer:
        assert current is not None
        publish_config(r, "api-lb", current, version, "someone")
        return current

    with pytest.raises(lbctl.Failure) as info:
        lbctl._change(client, "api-lb", always_overtaken)
    assert info.value.message == "'api-lb' kept changing under us (5 conflicts in a row); try again"
    assert r.xlen(config_stream("api-lb")) == 1 + lbctl.MAX_ATTEMPTS  # only the others' changes
    client.close()


def test_wrong_password(start_redis: Any) -> None:  # noqa: F811
    server = start_redis(requirepass="right")
    bad = f"redis://:wrong@127.0.0.1:{server.port}/0"
    code, out, err = ctl(bad, "list")
    assert (code, out) == (3, "")
    assert err.startswith(f"lbctl: Redis at redis://:***@127.0.0.1:{server.port}/0 refused the"
                          " credentials: ")  # fmt: skip
    assert "wrong" not in err and len(err.splitlines()) == 1
    none = f"redis://127.0.0.1:{server.port}/0"
    code, _, err = ctl(none, "list")
    assert code == 3 and len(err.splitlines()) == 1 and "right" not in err
    assert ctl(server.url, "list", "--json") == (0, "[]\n", "")
