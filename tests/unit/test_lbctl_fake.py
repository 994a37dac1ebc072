"""Tests for lbctl run in-process against fakeredis: every read command's human and --json
output, local validation, and each error path's one-line message and exit code.

fakeredis here has no Lua (no ``lupa``), so commands that publish are tested end to end
against a real redis-server in tests/integration/test_lbctl.py; here the Redis state is
seeded as the cluster contract lays it out.
"""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
import yaml

from lbshared import docgen
from lbshared.config import LoadBalancer, lb_to_dict, parse_config
from lbshared import lbctl
from lbshared.events import LbConfig, LbDeleted, decode, encode
from lbshared.lbctl import connect, run
from lbshared.redis_url import RedisAddress
from lbshared.store import (
    NODES_KEY,
    REGISTRY_KEY,
    config_stream,
    meta_key,
    snapshot_key,
)

NOW = 1_700_000_100.0

API = {
    "name": "api-lb",
    "listeners": [{"port": 8080}],  # as lb_to_dict writes it: defaults omitted
    "targets": [{"id": "api-1", "address": "127.0.0.1:9001"},
                {"id": "api-2", "address": "127.0.0.1:9002", "weight": 50}],
    "rules": {"v2": {"path": "/v2/*", "targets": ["api-1"]}},
}  # fmt: skip
WEB = {"name": "web", "listeners": [{"port": 8081}]}


class Cluster:
    """A fakeredis server seeded the way publish_config leaves Redis."""

    def __init__(self) -> None:
        self.server = fakeredis.FakeServer()
        self.r = fakeredis.FakeRedis(server=self.server)
        self.connects = 0

    def connector(self, address: RedisAddress) -> redis.Redis:
        self.connects += 1
        return fakeredis.FakeRedis(server=self.server)

    def publish(self, name: str, version: int, config: dict[str, Any] | None,
                at: float = NOW) -> str:  # fmt: skip
        if config is None:
            event: Any = LbDeleted(lb=name, origin="lbctl", at=at, version=version)
        else:
            event = LbConfig(lb=name, origin="lbctl", at=at, version=version,
                             config=LoadBalancer.model_validate(config))  # fmt: skip
        entry_id = self.r.xadd(config_stream(name), encode(event)).decode()  # type: ignore[arg-type]
        body = None if config is None else lb_to_dict(event.config)
        self.r.set(
            snapshot_key(name),
            json.dumps({"stream_id": entry_id, "version": version, "config": body}),
        )
        self.r.hset(meta_key(name), mapping={"version": version, "updated_at": at,
                                             "updated_by": "lbctl"})  # fmt: skip
        if config is None:
            self.r.hdel(REGISTRY_KEY, name)
        else:
            self.r.hset(REGISTRY_KEY, name, version)
        return entry_id

    def heartbeat(self, node_id: str, age: float, **extra: Any) -> None:
        beat = {"id": node_id, "address": f"10.0.0.{len(node_id)}", "admin": "127.0.0.1:9901",
                "last_heartbeat": NOW - age, "config_version": 3, "degraded": False,
                "started_at": NOW - 500, "pid": 42, "version": "0.1.0", **extra}  # fmt: skip
        self.r.hset(NODES_KEY, node_id, json.dumps(beat))

    def lbctl(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = run(["--redis", "redis://127.0.0.1:1/0", *argv], connector=self.connector,
                   stdout=out, stderr=err, environ={}, clock=lambda: NOW)  # fmt: skip
        return code, out.getvalue(), err.getvalue()


@pytest.fixture
def cluster() -> Cluster:
    c = Cluster()
    c.publish("api-lb", 3, API)
    c.publish("web", 4, WEB)
    return c


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


# -- list ---------------------------------------------------------------------------------------


def test_list_json(cluster: Cluster) -> None:
    code, out, err = cluster.lbctl("list", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == [
        {"name": "api-lb", "version": 3, "listeners": ["http:8080"], "targets": ["api-1", "api-2"]},
        {"name": "web", "version": 4, "listeners": ["http:8081"], "targets": []},
    ]


def test_list_table(cluster: Cluster) -> None:
    code, out, _ = cluster.lbctl("list")
    assert code == 0
    assert out.splitlines() == [
        "NAME     VERSION   LISTENERS   TARGETS",
        "api-lb   3         http:8080   api-1, api-2",
        "web      4         http:8081   -",
    ]


def test_list_skips_deleted_and_unreadable(cluster: Cluster) -> None:
    cluster.publish("web", 5, None)
    cluster.r.hset(REGISTRY_KEY, "broken", 9)
    cluster.r.set(snapshot_key("broken"), "{not json")
    code, out, err = cluster.lbctl("list", "--json")
    assert code == 0
    assert [row["name"] for row in json.loads(out)] == ["api-lb"]
    assert one_line(err).startswith("lbctl: skipped 'broken': unreadable snapshot (bad JSON")


def test_list_empty() -> None:
    code, out, _ = Cluster().lbctl("list", "--json")
    assert (code, json.loads(out)) == (0, [])


# -- get ----------------------------------------------------------------------------------------


def test_get_json(cluster: Cluster) -> None:
    code, out, _ = cluster.lbctl("get", "api-lb", "--json")
    assert code == 0
    data = json.loads(out)
    assert data.pop("version") == 3
    assert data == API


def test_get_yaml_is_a_config_file(cluster: Cluster) -> None:
    code, out, _ = cluster.lbctl("get", "api-lb")
    assert code == 0
    assert out.splitlines()[0] == "# api-lb version 3"
    assert yaml.safe_load(out) == {"load_balancers": [API]}
    assert parse_config(out).load_balancers[0] == LoadBalancer.model_validate(API)


@pytest.mark.parametrize("argv", [("get", "nope"), ("get", "nope", "--json"), ("delete", "nope"),
                                  ("targets", "add", "nope", "t", "127.0.0.1:1"),
                                  ("targets", "remove", "nope", "t")])  # fmt: skip
def test_unknown_load_balancer(cluster: Cluster, argv: tuple[str, ...]) -> None:
    code, out, err = cluster.lbctl(*argv)
    assert (code, out) == (1, "")
    assert one_line(err) == "lbctl: no load balancer named 'nope'"


def test_deleted_load_balancer_is_unknown(cluster: Cluster) -> None:
    cluster.publish("web", 5, None)
    code, _, err = cluster.lbctl("get", "web")
    assert (code, one_line(err)) == (1, "lbctl: no load balancer named 'web'")


# -- targets: refusals decided before anything is published ------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("targets", "add", "api-lb", "api-1", "127.0.0.1:1"),
         "lbctl: load balancer 'api-lb' already has a target 'api-1'"),
        (("targets", "add", "api-lb", "api-3", "nope"),
         "lbctl: invalid config for 'api-lb': targets[2].address: 'nope' has no port"),
        (("targets", "add", "api-lb", "api-3", "127.0.0.1:1", "--weight", "-1"),
         "lbctl: invalid config for 'api-lb': targets[2].weight: -1 must be >= 0"),
        (("targets", "add", "api-lb", "bad{id}", "127.0.0.1:1"),
         "lbctl: invalid config for 'api-lb': targets[2].id: 'bad{id}' is not a valid name"
         " (letters, digits, '_', '.', '-')"),
        (("targets", "remove", "api-lb", "zzz"),
         "lbctl: no target 'zzz' in load balancer 'api-lb'"),
        (("targets", "remove", "api-lb", "api-1"),
         "lbctl: invalid config for 'api-lb': rules.v2.targets[0]: 'api-1' is not a target"
         " of this load balancer"),
    ],
)  # fmt: skip
def test_target_refusals(cluster: Cluster, argv: tuple[str, ...], message: str) -> None:
    before = cluster.r.hget(meta_key("api-lb"), "version")
    code, out, err = cluster.lbctl(*argv)
    assert (code, out, one_line(err)) == (1, "", message)
    assert cluster.r.hget(meta_key("api-lb"), "version") == before


# -- apply: local validation -------------------------------------------------------------------


def test_apply_invalid_config_publishes_nothing(cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("load_balancers:\n  - name: x\n    listeners: [{prot: http, port: 80}]\n"
                    "    targets: [{id: a, address: nope}]\n")  # fmt: skip
    code, out, err = cluster.lbctl("apply", "-f", str(path))
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"lbctl: invalid config {path}:",
        "  load_balancers[0].listeners[0].prot: unknown key (did you mean 'protocol'?)",
        "  load_balancers[0].targets[0].address: 'nope' has no port",
    ]
    assert cluster.connects == 0  # refused before Redis was even contacted


def test_apply_missing_file(tmp_path: Path) -> None:
    cluster = Cluster()
    code, _, err = cluster.lbctl("apply", "-f", str(tmp_path / "none.yaml"))
    assert code == 1
    assert err.splitlines()[0] == f"lbctl: invalid config {tmp_path / 'none.yaml'}:"
    assert "cannot read" in err.splitlines()[1]


def test_apply_refuses_a_port_of_another_load_balancer(cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "clash.yaml"
    path.write_text("load_balancer:\n  name: new\n  listeners: [{port: 8081}]\n")
    code, out, err = cluster.lbctl("apply", "-f", str(path))
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"lbctl: invalid config {path}:",
        "  load_balancers[0].listeners[0].port: port 8081 is already used by load balancer 'web'"
        " in the cluster",
    ]
    assert cluster.r.hget(REGISTRY_KEY, "new") is None


# -- nodes --------------------------------------------------------------------------------------


def test_nodes_json_live_dead_and_expired(cluster: Cluster) -> None:
    cluster.heartbeat("node-b", age=0.5, degraded=True)
    cluster.heartbeat("node-a", age=10)
    cluster.heartbeat("node-c", age=61)
    code, out, err = cluster.lbctl("nodes", "--json")
    assert (code, err) == (0, "")
    rows = json.loads(out)
    assert rows == [
        {"id": "node-a", "address": "10.0.0.6", "admin": "127.0.0.1:9901",
         "last_heartbeat": NOW - 10, "config_version": 3, "degraded": False, "live": False},
        {"id": "node-b", "address": "10.0.0.6", "admin": "127.0.0.1:9901",
         "last_heartbeat": NOW - 0.5, "config_version": 3, "degraded": True, "live": True},
    ]  # fmt: skip
    assert set(cluster.r.hkeys(NODES_KEY)) == {b"node-a", b"node-b"}  # node-c was deleted


def test_nodes_live_window_boundary(cluster: Cluster) -> None:
    cluster.heartbeat("n1", age=2.999)
    cluster.heartbeat("n2", age=3.0)
    _, out, _ = cluster.lbctl("nodes", "--json")
    assert [(row["id"], row["live"]) for row in json.loads(out)] == [("n1", True), ("n2", False)]


def test_nodes_table_and_bad_entry(cluster: Cluster) -> None:
    cluster.heartbeat("node-a", age=1.25)
    cluster.r.hset(NODES_KEY, "junk", "{")
    code, out, err = cluster.lbctl("nodes")
    assert code == 0
    assert out.splitlines() == [
        "ID       ADDRESS    ADMIN            LAST HEARTBEAT   CONFIG VERSION   DEGRADED   LIVE",
        "node-a   10.0.0.6   127.0.0.1:9901   1.2s ago         3                no         yes",
    ]
    assert one_line(err) == "lbctl: skipped node 'junk': unreadable heartbeat"


# -- events -------------------------------------------------------------------------------------


def test_events_history_all_load_balancers(cluster: Cluster) -> None:
    cluster.publish("web", 5, None, at=NOW + 1)
    code, out, _ = cluster.lbctl("events")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 3
    ids = [line.split(" ", 1)[0] for line in lines]
    assert ids == sorted(ids, key=lambda i: tuple(int(p) for p in i.split("-")))
    assert lines[0].endswith(" 2023-11-14T22:15:00.000Z api-lb lb_config version 3 by lbctl"
                             " (listeners: http:8080; targets: api-1, api-2)")  # fmt: skip
    assert lines[1].endswith(" web lb_config version 4 by lbctl (listeners: http:8081; targets: -)")
    assert lines[2].endswith(" 2023-11-14T22:15:01.000Z web lb_deleted version 5 by lbctl")


def test_events_json_one_load_balancer_since(cluster: Cluster) -> None:
    first = cluster.r.xrange(config_stream("web"))[0][0].decode()
    later = cluster.publish("web", 5, None, at=NOW + 1)
    code, out, _ = cluster.lbctl("events", "--lb", "web", "--json")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert records == [
        {"id": first, "lb": "web", "type": "lb_config", "version": 4, "origin": "lbctl",
         "at": NOW, "config": WEB},
        {"id": later, "lb": "web", "type": "lb_deleted", "version": 5, "origin": "lbctl",
         "at": NOW + 1},
    ]  # fmt: skip
    code, out, _ = cluster.lbctl("events", "--lb", "web", "--json", "--since", first)
    assert [json.loads(line)["id"] for line in out.splitlines()] == [later]
    code, out, _ = cluster.lbctl("events", "--since", "$")
    assert (code, out) == (0, "")


def test_events_skip_malformed_entries(cluster: Cluster) -> None:
    bad = cluster.r.xadd(
        config_stream("web"),
        {"v": "1", "type": "mystery", "lb": "web", "origin": "x", "at": "1", "data": "{}"},
    ).decode()
    code, out, err = cluster.lbctl("events", "--lb", "web")
    assert code == 0
    assert len(out.splitlines()) == 1
    assert one_line(err) == f"lbctl: skipped malformed entry {bad} in lb:{{web}}:config" \
                            " (unknown type: 'mystery')"  # fmt: skip


def test_events_unknown_lb_and_bad_since(cluster: Cluster) -> None:
    code, _, err = cluster.lbctl("events", "--lb", "nope")
    assert (code, one_line(err)) == (1, "lbctl: no load balancer named 'nope'")
    code, _, err = cluster.lbctl("events", "--since", "yesterday")
    assert (code, one_line(err)) == (2, "lbctl: --since 'yesterday' is not a stream id"
                                        " (ms-seq, 0 or $)")  # fmt: skip


# -- schema, later commands, usage --------------------------------------------------------------


def test_schema_needs_no_redis() -> None:
    cluster = Cluster()
    code, out, _ = cluster.lbctl("schema")
    assert code == 0
    assert json.loads(out) == docgen.json_schema()
    assert cluster.connects == 0


@pytest.mark.parametrize(
    "argv",
    [("status", "api-lb"), ("status", "api-lb", "--json"), ("metrics", "api-lb", "--json"),
     ("health", "api-lb"), ("health", "api-lb", "--json")],
)  # fmt: skip
def test_views_of_node_stats_answer_without_any_node(cluster: Cluster, argv: tuple[str, ...]) -> None:
    code, out, err = cluster.lbctl(*argv)
    assert code == 0 and out
    if "--json" in argv:
        assert err == ""
    else:
        assert one_line(err).startswith(
            "lbctl: no node has published stats for 'api-lb' in the last 10s"
        )


def _stats(node: str, targets: dict[str, Any], age: float = 1.0) -> str:
    return json.dumps({"node": node, "at": NOW - age, "stats": {}, "targets": targets})


def test_health_json_merges_committed_state_overrides_and_node_reports(cluster: Cluster) -> None:
    cluster.publish("api-lb", 5, {**API, "circuit_breaker": {"min_requests": 10}})
    cluster.r.hset(lbctl.healthstate_key("api-lb"), mapping={
        "health:api-1": 3, "hstate:api-1": json.dumps({
            "state": "unhealthy", "voted": "unhealthy", "at": NOW - 30, "generation": 3,
            "reason": "connect refused (2 of 2 probers)", "node": "n2"}),
        "breaker:api-2": 1, "bstate:api-2": json.dumps({"type": "circuit_open", "generation": 1,
                                                        "wait": 30.0, "at": NOW - 3}),
    })  # fmt: skip
    cluster.r.hset(lbctl.overrides_key("api-lb"), "api-2", "up")
    probe = {"ok": False, "reason": "connect refused", "status": None, "latency_ms": 0.2}
    cluster.r.hset("lb:{api-lb}:stats", mapping={
        "n1": _stats("n1", {
            "api-1": {"health": "unhealthy", "probers": ["n1", "n2"], "ejected": True,
                      "last_probes": [{**probe, "at": NOW - 2, "node": "n1"}]},
            "api-2": {"health": "healthy", "since": NOW - 100, "probers": ["n2", "n1"]}}),
        "n2": _stats("n2", {
            "api-1": {"health": "unhealthy", "probers": ["n1", "n2"],
                      "last_probes": [{**probe, "at": NOW - 1.5, "node": "n2"},
                                      {**probe, "at": NOW - 2.5, "node": "n2"}]},
            "api-2": {"health": "healthy", "since": NOW - 90, "reason": "initial state"}}),
    })  # fmt: skip
    code, out, err = cluster.lbctl("health", "api-lb", "--json")
    assert (code, err) == (0, "")
    one, two = json.loads(out)
    assert one == {
        "target": "api-1", "state": "unhealthy", "since": NOW - 30, "override": "auto",
        "breaker": "closed", "reason": "connect refused (2 of 2 probers)",
        "last_probes": [{**probe, "at": NOW - 2.5, "node": "n2"},
                        {**probe, "at": NOW - 2, "node": "n1"},
                        {**probe, "at": NOW - 1.5, "node": "n2"}],
        "probers": ["n1", "n2"], "ejected_on": ["n1"],
        "nodes": {"n1": "unhealthy", "n2": "unhealthy"},
    }  # fmt: skip
    # No committed health transition: the nodes' agreed state, since the earliest report.
    assert (two["state"], two["since"], two["override"], two["breaker"]) == (
        "healthy", NOW - 100, "up", "open")  # fmt: skip
    code, table, err = cluster.lbctl("health", "api-lb")
    assert code == 0
    lines = table.splitlines()
    assert lines[0].split() == ["TARGET", "STATE", "SINCE", "OVERRIDE", "BREAKER", "REASON",
                                "LAST", "PROBE"]  # fmt: skip
    assert lines[1].split()[:5] == ["api-1", "unhealthy", "2023-11-14T22:14:30.000Z", "auto",
                                    "closed"]  # fmt: skip
    assert lines[1].endswith("   connect refused (2 of 2 probers)   "
                             "failed (connect refused) by n2 1.5s ago")  # fmt: skip
    assert lines[2].split()[:6] == ["api-2", "healthy", "2023-11-14T22:13:20.000Z", "up", "open",
                                    "initial"]  # fmt: skip


def test_health_set_stores_the_override_and_announces_it(cluster: Cluster) -> None:
    code, out, err = cluster.lbctl("health", "set", "api-lb", "api-2", "down")
    assert (code, out, err) == (0, "set health of api-2 in api-lb to down\n", "")
    assert cluster.r.hgetall(lbctl.overrides_key("api-lb")) == {b"api-2": b"down"}
    ((_id, fields),) = cluster.r.xrange("lb:{api-lb}:state")
    event = decode(fields)
    assert (event.type, event.target, event.mode, event.origin) == (
        "health_override", "api-2", "down", "lbctl")  # fmt: skip
    assert cluster.lbctl("health", "set", "api-lb", "api-2", "auto")[0] == 0
    assert cluster.r.hgetall(lbctl.overrides_key("api-lb")) == {}
    assert decode(cluster.r.xrange("lb:{api-lb}:state")[-1][1]).mode == "auto"


@pytest.mark.parametrize(
    ("argv", "message"),
    [(("health", "set", "api-lb", "api-9", "down"), "no target 'api-9' in load balancer 'api-lb'"),
     (("health", "set", "nope", "api-1", "up"), "no load balancer named 'nope'"),
     (("health", "nope"), "no load balancer named 'nope'")],
)  # fmt: skip
def test_health_refusals(cluster: Cluster, argv: tuple[str, ...], message: str) -> None:
    code, out, err = cluster.lbctl(*argv)
    assert (code, out, one_line(err)) == (1, "", f"lbctl: {message}")
    assert cluster.r.exists(lbctl.overrides_key("api-lb")) == 0


def test_events_include_the_health_streams(cluster: Cluster) -> None:
    from lbshared.events import Unhealthy

    event = Unhealthy(lb="api-lb", origin="n2", at=NOW + 2, target="api-1",
                      reason="connect refused (2 of 2 probers)", generation=1, node="n2")
    entry = cluster.r.xadd("lb:{api-lb}:health", encode(event)).decode()  # type: ignore[arg-type]
    code, out, _ = cluster.lbctl("events", "--lb", "api-lb")
    assert code == 0
    assert out.splitlines()[-1] == (f"{entry} 2023-11-14T22:15:02.000Z api-lb unhealthy api-1"
                                    " by n2: connect refused (2 of 2 probers)")  # fmt: skip
    code, out, _ = cluster.lbctl("events", "--json")
    # Ids are per stream: a config entry may share this id, so match the type too.
    (record,) = [r for r in map(json.loads, out.splitlines())
                 if r["id"] == entry and r["type"] == "unhealthy"]  # fmt: skip
    assert record == {
        "id": entry, "lb": "api-lb", "type": "unhealthy", "target": "api-1",
        "reason": "connect refused (2 of 2 probers)", "at": NOW + 2, "node": "n2",
        "generation": 1}  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "start"),
    [
        ((), "lbctl: the following arguments are required: COMMAND"),
        (("frob",), "lbctl: argument COMMAND: invalid choice: 'frob'"),
        (("get",), "lbctl: the following arguments are required: NAME"),
        (("apply",), "lbctl: the following arguments are required: -f/--file"),
        (("targets", "add", "a", "b"), "lbctl: the following arguments are required: ADDRESS"),
        (("targets", "add", "a", "b", "c:1", "--weight", "x"), "lbctl: argument --weight"),
        (("health", "set", "a"), "lbctl: usage: lbctl health set NAME TARGET up|down|auto"),
        (("health", "set", "a", "b", "sideways"), "lbctl: health set: 'sideways' is not up,"),
        (("health", "a", "b"), "lbctl: usage: lbctl health NAME"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_exit_2(cluster: Cluster, argv: tuple[str, ...],
                                          start: str) -> None:  # fmt: skip
    code, out, err = cluster.lbctl(*argv)
    assert (code, out) == (2, "")
    assert one_line(err).startswith(start), err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--help"]) == 0
    assert "apply" in capsys.readouterr().out


# -- Redis URL and reachability ----------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_real(*argv: str, environ: dict[str, str] | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), stdout=out, stderr=err, environ=environ or {})
    return code, out.getvalue(), err.getvalue()


def test_unreachable_redis_one_line_password_redacted() -> None:
    port = _closed_port()
    code, out, err = _run_real("--redis", f"redis://:hunter2@127.0.0.1:{port}/0", "list")
    assert (code, out) == (3, "")
    assert one_line(err) == (
        f"lbctl: cannot reach Redis at redis://:***@127.0.0.1:{port}/0: Connection refused"
    )


def test_url_from_environment() -> None:
    port = _closed_port()
    code, _, err = _run_real("list", environ={"LB_REDIS_URL": f"redis://127.0.0.1:{port}/2"})
    assert code == 3
    assert (
        one_line(err)
        == f"lbctl: cannot reach Redis at redis://127.0.0.1:{port}/2: Connection refused"
    )


def test_bad_url_is_a_usage_error() -> None:
    code, _, err = _run_real("--redis", "http://x", "list")
    assert code == 2
    assert one_line(err).startswith("lbctl: unsupported scheme 'http'")


def test_connect_uses_short_timeouts_and_no_retries() -> None:
    r = connect(RedisAddress(host="127.0.0.1", port=1, db=2, password="pw"))
    kwargs = r.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"], kwargs["db"]) == (
        2.0,
        2.0,
        2,
    )
    r.close()
