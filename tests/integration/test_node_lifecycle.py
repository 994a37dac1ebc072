"""The node as a process: command line, environment, admin API, access log,
graceful shutdown (SIGTERM) and reload (SIGHUP)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from typing import Any

import pytest
import yaml

from .conftest import (
    Backend,
    Launcher,
    Node,
    RawClient,
    RawResponse,
    admin_get,
    free_port,
    request,
    run_lbnode,
    wait_for,
    wait_ready,
)

TOKEN = "s3cret-token"
ACCESS_KEYS = {"ts", "node", "lb", "rule", "client", "method", "path", "status", "target",
               "upstream_ms", "total_ms", "bytes_in", "bytes_out", "request_id"}  # fmt: skip


def one_lb(backends: list[Backend], *ports: int, name: str = "app") -> dict[str, Any]:
    return {
        "load_balancers": [
            {
                "name": name,
                "listeners": [{"protocol": "http", "port": p} for p in ports or (0,)],
                "targets": [{"id": b.id, "address": b.address} for b in backends],
            }
        ]
    }


@pytest.fixture(scope="module")
def a(module_launcher: Launcher) -> Backend:
    return module_launcher.backend("a")


@pytest.fixture(scope="module")
def b(module_launcher: Launcher) -> Backend:
    return module_launcher.backend("b")


@pytest.fixture(scope="module")
def node(module_launcher: Launcher, a: Backend) -> Node:
    """A node with an admin token, a node id, an access-log file, and DEBUG logging."""
    config = one_lb([a])
    empty = {"name": "empty", "listeners": [{"protocol": "http", "port": 0}]}
    config["load_balancers"].append(empty)
    return module_launcher.node(config, "--log-level", "DeBuG", admin_token=TOKEN, node_id="node-7")


# -- admin -------------------------------------------------------------------------------------


def test_healthz_is_exactly_the_documented_json(node: Node) -> None:
    code, body = node.healthz()
    assert code == 200
    assert body == {"status": "serving", "degraded": False, "node": "node-7", "config_version": 1}


def test_admin_token_guards_everything_but_healthz(node: Node) -> None:
    assert admin_get(node.admin_port, "/healthz")[0] == 200
    assert admin_get(node.admin_port, "/status")[0] == 401
    assert admin_get(node.admin_port, "/status", "wrong")[0] == 401
    assert admin_get(node.admin_port, "/no-such-path")[0] == 401
    code, body = admin_get(node.admin_port, "/status", TOKEN)
    assert code == 200 and body["node"] == "node-7" and body["draining"] is False
    assert admin_get(node.admin_port, "/no-such-path", TOKEN)[0] == 404


def test_status_lists_pools_per_target(node: Node) -> None:
    request(node.ports["app"][0], "GET", "/")
    t = node.target("app", "a")
    assert {"pool_open", "pool_idle", "requests_total", "health"} <= set(t)
    assert t["pool_idle"] >= 1


# -- access log ---------------------------------------------------------------------------------


def test_access_log_has_exactly_the_documented_keys(node: Node, a: Backend) -> None:
    port = node.ports["app"][0]
    resp = request(port, "POST", "/echo?x=1", [("X-Request-Id", "acc-1")], body=b"12345")
    assert resp.status == 200
    rec = node.wait_access_record("acc-1")
    assert set(rec) == ACCESS_KEYS
    assert rec["node"] == "node-7" and rec["lb"] == "app" and rec["rule"] is None
    assert rec["client"] == "127.0.0.1" and rec["target"] == "a"
    assert rec["method"] == "POST" and rec["path"] == "/echo?x=1" and rec["status"] == 200
    assert rec["bytes_in"] == 5 and rec["bytes_out"] == 5
    assert isinstance(rec["upstream_ms"], (int, float)) and rec["upstream_ms"] >= 0
    assert rec["total_ms"] >= rec["upstream_ms"]
    assert abs(rec["ts"] - time.time()) < 60


def test_access_log_records_refusals(node: Node) -> None:
    resp = request(node.ports["empty"][0], "GET", "/nothing", [("X-Request-Id", "acc-2")])
    assert resp.status == 503
    rec = node.wait_access_record("acc-2")
    assert set(rec) == ACCESS_KEYS
    assert rec["status"] == 503 and rec["lb"] == "empty" and rec["target"] is None


@pytest.mark.parametrize("where", ["off", "-"])
def test_access_log_off_or_stdout(launcher: Launcher, a: Backend, where: str) -> None:
    n = launcher.node(one_lb([a]), access_log=where)
    assert request(n.port, "GET", "/", [("X-Request-Id", "acc-std")]).status == 200
    assert n.stop() == 0
    lines = [line for line in n.stdout.read_text().splitlines() if line.strip()]
    if where == "off":
        assert lines == []
        assert list(launcher.dir.glob("*.access.log")) == []
    else:
        records = [json.loads(line) for line in lines]
        assert [r["request_id"] for r in records] == ["acc-std"]
        assert set(records[0]) == ACCESS_KEYS


# -- command line and environment ----------------------------------------------------------------


def test_bad_log_level_is_refused(tmp_path: Any) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(one_lb([], free_port())))
    done = run_lbnode("--config", str(cfg), "--admin", f"127.0.0.1:{free_port()}",
                      "--log-level", "loud")  # fmt: skip
    assert done.returncode == 2
    assert "--log-level" in done.stderr and "loud" in done.stderr
    assert "Traceback" not in done.stderr


def test_json_event_logs(launcher: Launcher, a: Backend) -> None:
    n = launcher.node(one_lb([a]), "--log-format", "JSON", access_log="off", node_id="jlog")
    assert n.stop() == 0
    records = [json.loads(line) for line in n.stderr.read_text().splitlines() if line.strip()]
    assert records and all(set(r) >= {"ts", "level", "logger", "node", "msg"} for r in records)
    assert all(r["node"] == "jlog" for r in records)
    msgs = [r["msg"] for r in records]
    assert any(m.startswith("applied config version 1") for m in msgs)
    assert "drained" in msgs


def test_bad_log_format_is_refused(tmp_path: Any) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(one_lb([], free_port())))
    done = run_lbnode("--config", str(cfg), "--log-format", "xml")
    assert done.returncode == 2 and done.stderr.startswith("lbnode: --log-format:")


def test_admin_off_loopback_needs_a_token(tmp_path: Any) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(one_lb([], free_port())))
    done = run_lbnode("--config", str(cfg), "--admin", f"0.0.0.0:{free_port()}")
    assert done.returncode != 0
    assert "token" in done.stderr and "Traceback" not in done.stderr


def test_a_bad_redis_url_is_refused_with_a_message(tmp_path: Any) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(one_lb([], free_port())))
    done = run_lbnode("--config", str(cfg), "--redis", "http://127.0.0.1:1/0",
                      "--admin", f"127.0.0.1:{free_port()}")  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("lbnode: --redis:") and "Traceback" not in done.stderr


def test_invalid_config_at_start_lists_every_problem(tmp_path: Any) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "load_balancers:\n"
        "  - name: t\n"
        "    listeners: [{protocol: http, port: 70000}]\n"
        "    targets:\n"
        "      - {id: a, address: nope}\n"
        "      - {id: b, address: '127.0.0.1:1', wieght: 3}\n"
        "    timeouts: {connect: fast}\n"
    )
    done = run_lbnode("--config", str(cfg), "--admin", f"127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    problems = [line.strip() for line in lines[1:]]
    assert [p.split(":")[0] for p in problems] == [
        "load_balancers[0].listeners[0].port",
        "load_balancers[0].targets[0].address",
        "load_balancers[0].targets[1].wieght",
        "load_balancers[0].timeouts.connect",
    ]


def test_listener_port_in_use_at_start_is_a_clean_error(tmp_path: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump(one_lb([], taken.getsockname()[1])))
        done = run_lbnode("--config", str(cfg), "--bind", "127.0.0.1",
                          "--admin", f"127.0.0.1:{free_port()}")  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "load_balancers[0].listeners[0]" in done.stderr and "in use" in done.stderr


def test_admin_port_of_another_node_is_refused(node: Node, tmp_path: Any) -> None:
    # Listeners share ports (SO_REUSEPORT) on purpose; the admin port must
    # not, or /healthz would answer for a random one of the two nodes.
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(one_lb([], free_port())))
    done = run_lbnode("--config", str(cfg), "--bind", "127.0.0.1",
                      "--admin", f"127.0.0.1:{node.admin_port}")  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "in use" in done.stderr
    assert node.healthz()[1]["node"] == "node-7"


def test_environment_variables_are_honoured(launcher: Launcher, a: Backend) -> None:
    env = {
        "LB_CONFIG": "{config}",
        "LB_BIND": "127.0.0.1",
        "LB_ADMIN": "127.0.0.1:{admin_port}",
        "LB_NODE_ID": "from-env",
        "LB_ACCESS_LOG": "off",
    }
    proc, n = launcher.spawn_node(one_lb([a]), args=[], env=env)
    wait_ready(n)
    assert n.healthz()[1]["node"] == "from-env"
    assert request(n.port, "GET", "/").status == 200
    code, status = admin_get(n.admin_port, "/status")
    assert code == 200 and status["bind"] == "127.0.0.1"
    # A flag wins over its variable.
    proc2, n2 = launcher.spawn_node(one_lb([a]), "--node-id", "from-flag", args=[], env=env)
    wait_ready(n2)
    assert n2.healthz()[1]["node"] == "from-flag"


# -- graceful shutdown ---------------------------------------------------------------------------


def connect_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_drains_in_flight_requests(launcher: Launcher, a: Backend) -> None:
    n = launcher.node(one_lb([a]))
    idle = RawClient(n.port)
    assert idle.get("/").status == 200  # a kept-alive, idle connection
    result: list[RawResponse | BaseException] = []

    def slow() -> None:
        try:
            result.append(request(n.port, "GET", "/slow?delay=2"))
        except BaseException as exc:  # noqa: BLE001 - checked below
            result.append(exc)

    t = threading.Thread(target=slow)
    t.start()
    try:
        wait_for(lambda: admin_get(n.admin_port, "/status")[1]["active_requests"] == 1, 5.0,
                 "the slow request in flight")  # fmt: skip
        t_term = time.monotonic()
        n.signal(signal.SIGTERM)
        # Meanwhile: no new connections, /healthz says draining, idle ones closed.
        wait_for(lambda: connect_refused(n.port), 5.0, "the listener to close")
        code, body = n.healthz()
        assert code == 503 and body["status"] == "draining"
        assert idle.wait_closed()
        idle.close()
        assert n.proc.poll() is None  # still finishing the slow request
    finally:
        t.join(10)
    [resp] = result
    assert isinstance(resp, RawResponse), resp
    assert resp.status == 200 and resp.json()["delay"] == 2
    assert resp.header("connection") == "close"
    assert n.proc.wait(10) == 0
    assert time.monotonic() - t_term < 8
    assert "draining" in n.stderr_text() and "Traceback" not in n.stderr_text()


# -- reload ----------------------------------------------------------------------------------------


def test_sighup_reloads_without_dropping_connections(
    launcher: Launcher, a: Backend, b: Backend
) -> None:
    p1, p2 = free_port(), free_port()
    n = launcher.node(one_lb([a], p1))

    def reload(config: dict[str, Any] | str, version: int) -> None:
        n.write_config(config)
        n.signal(signal.SIGHUP)
        wait_for(lambda: n.healthz()[1]["config_version"] == version, 5.0, f"version {version}")

    c1 = RawClient(p1)
    assert c1.get("/").json()["backend"] == "a"
    # v2: a target and a listener added; the open connection sees both targets.
    reload(one_lb([a, b], p1, p2), 2)
    assert {c1.get("/").json()["backend"] for _ in range(2)} == {"a", "b"}
    c2 = RawClient(p2)
    assert c2.get("/").status == 200
    # v3: the first port goes away (the listener "moves" to p2).
    reload(one_lb([a, b], p2), 3)
    wait_for(lambda: connect_refused(p1), 5.0, "the old listener to close")
    for _ in range(3):
        assert c2.get("/").status == 200  # untouched
    # The idle keep-alive connection on the removed port is closed at once, as
    # nginx closes idle connections of a reloaded listener (in-flight requests
    # would finish first: see test_cluster_e2e's draining test).
    assert c1.wait_closed()
    c1.close()
    # An invalid config is refused; the node keeps serving version 3.
    bad = one_lb([a, b], p2)
    bad["load_balancers"][0]["targets"][1]["address"] = "no-port-here"
    n.write_config(bad)
    n.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in n.stderr_text(), 5.0, "the refusal to be logged")
    assert "load_balancers[0].targets[1].address" in n.stderr_text()
    assert n.healthz()[1]["config_version"] == 3
    assert c2.get("/").status == 200
    # So is a config whose new listener cannot be opened (the port is taken).
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        n.write_config(one_lb([a, b], p2, taken.getsockname()[1]))
        n.signal(signal.SIGHUP)
        wait_for(lambda: n.stderr_text().count("reload refused") == 2, 5.0, "the second refusal")
    assert n.healthz()[1]["config_version"] == 3
    assert c2.get("/").status == 200
    assert request(p2, "GET", "/").status == 200
    c2.close()
    assert n.stop() == 0
