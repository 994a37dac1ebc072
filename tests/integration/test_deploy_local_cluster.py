"""deploy/local-cluster.sh, run for real: Redis, three backends, three nodes on 127.0.0.2-4.

The script runs as a subprocess with free ports and a pidfile; the test waits (bounded)
for its "local cluster up" banner, follows the URLs it printed (traffic through all three
nodes, a sticky session across nodes, the strict rate limit, the admin APIs), runs the
lbctl commands it printed, then sends SIGTERM and checks that every process the script
recorded is gone and its ports are closed.

The script's Redis runs with the ACL rules of deploy/redis/users.acl (user ``default``
off), so this also proves that those rules let nodes and lbctl do everything they do
here: no node logs a NOPERM, no node is degraded, every lbctl command succeeds. The
other copies of the rules (Kubernetes, docs) are checked to be the same text.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from lbshared.config import load_config
from lbshared.durations import parse_duration
from tests.conftest import REPO_ROOT
from tests.integration.conftest import (
    RawClient,
    free_port,
    port_free_on_all,
    subprocess_env,
    wait_for,
)

SCRIPT = REPO_ROOT / "deploy" / "local-cluster.sh"
ADDRS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
UP_TIMEOUT = 90.0  # Redis, three backends, three nodes, each with its own bounded wait
STOP_TIMEOUT = 60.0  # the script gives each process up to 10 s after SIGTERM
LBCTL_TIMEOUT = 30.0


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return False
    except OSError:
        return True


def recorded(pidfile: Path) -> list[tuple[int, str]]:
    text = pidfile.read_text() if pidfile.exists() else ""
    return [(int(pid), name) for pid, name in (line.split() for line in text.splitlines())]


@pytest.fixture
def script(tmp_path: Path) -> Iterator[dict[str, Any]]:
    pidfile = tmp_path / "pids"
    run = tmp_path / "run"
    out = tmp_path / "script.out"
    ports = {"redis": free_port(), "http": port_free_on_all(ADDRS),
             "admin": port_free_on_all(ADDRS)}  # fmt: skip
    backends = [free_port() for _ in range(3)]
    # A Ctrl-C must be able to reach the script even if this process ignores SIGINT (an
    # ignored signal stays ignored across exec, and bash cannot trap it then).
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    with open(out, "wb") as stdout:
        proc = subprocess.Popen(
            ["bash", str(SCRIPT), "--redis-port", str(ports["redis"]),
             "--http-port", str(ports["http"]), "--admin-port", str(ports["admin"]),
             "--backend-ports", ",".join(map(str, backends)), "--dir", str(run),
             "--pidfile", str(pidfile)],
            cwd=REPO_ROOT, env=subprocess_env(),
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT,
            process_group=0,  # like a terminal's foreground job: Ctrl-C signals the group
        )  # fmt: skip
    signal.signal(signal.SIGINT, previous)
    try:
        yield {"proc": proc, "out": out, "pidfile": pidfile, "ports": ports,
               "backends": backends, "run": run}  # fmt: skip
    finally:
        # Whatever happened: the script by PID, then anything it recorded and left running.
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        for pid, _name in recorded(pidfile):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c"])
def test_local_cluster_script_starts_serves_and_stops_everything(script: dict[str, Any],
                                                                 stop: str) -> None:  # fmt: skip
    proc, out, ports = script["proc"], script["out"], script["ports"]

    def banner() -> str | None:
        text = out.read_text(errors="replace")
        if proc.poll() is not None:
            raise AssertionError(f"the script exited with {proc.returncode}:\n{text}")
        return text if "Stop: Ctrl-C" in text else None

    text = wait_for(banner, UP_TIMEOUT, "the local cluster's banner")
    assert "applied demo version 1" in text
    redis_url = re.search(r"LB_REDIS_URL=(\S+)", text).group(1)  # type: ignore[union-attr]
    assert re.fullmatch(rf"redis://lb:[0-9a-f]{{24}}@127\.0\.0\.1:{ports['redis']}/0", redis_url)

    # The URLs it printed: traffic through each of the three nodes reaches the backends.
    traffic = sorted(set(re.findall(r"curl -s (http://127\.0\.0\.\d:\d+)/\n", text)))
    assert traffic == [f"http://{a}:{ports['http']}" for a in ADDRS]
    seen: set[str] = set()
    for url in traffic:
        host, port = url.removeprefix("http://").split(":")
        for _ in range(6):
            with_host = request_on(host, int(port), "/")
            assert with_host.status == 200, with_host
            seen.add(with_host.header("x-backend") or "")
    assert seen == {"web-1", "web-2", "web-3"}
    admin = re.findall(r"curl -s (http://127\.0\.0\.\d:\d+)/(healthz|status|metrics)", text)
    assert sorted(a for a, _ in admin) == [f"http://{a}:{ports['admin']}" for a in ADDRS]
    for url, path in admin:
        host, port = url.removeprefix("http://").split(":")
        resp = request_on(host, int(port), "/" + path)
        assert resp.status == 200, resp

    # A session pinned through node 1 sticks through nodes 2 and 3 (shared through Redis).
    http = ports["http"]
    pinned = request_on(ADDRS[0], http, "/set-cookie?name=session_id&value=s1")
    assert pinned.status == 200 and pinned.header("set-cookie"), pinned
    backend = pinned.header("x-backend")
    for addr in ADDRS[1:]:
        again = request_on(addr, http, "/", [("Cookie", "session_id=s1")])
        assert (again.status, again.header("x-backend")) == (200, backend), again
    # The strict limit (one Redis script per request) answers with its headers on every node.
    for addr in ADDRS:
        limited = request_on(addr, http, "/api/users")
        assert limited.status == 200 and limited.header("ratelimit-limit") == "100", limited

    # lbctl, as printed, sees three live nodes on the right addresses.
    def lbctl(*argv: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "lbshared.lbctl", "--redis", redis_url, *argv],
            capture_output=True, text=True, timeout=LBCTL_TIMEOUT, cwd=REPO_ROOT,
            env=subprocess_env(),
        )  # fmt: skip
        assert done.returncode == 0, (argv, done.stderr)
        return done.stdout

    def three_live() -> list[Any] | None:
        nodes = json.loads(lbctl("nodes", "--json"))
        return nodes if sum(n["live"] and not n["degraded"] for n in nodes) == 3 else None

    nodes = wait_for(three_live, 10.0, "three live nodes in lbctl nodes")
    assert [(n["id"], n["address"], n["admin"]) for n in nodes] == [
        (f"node-{i}", a, f"{a}:{ports['admin']}")
        for i, a in enumerate(ADDRS, start=1)]  # fmt: skip
    printed = re.findall(r"-m lbshared\.lbctl (.+)\n", text)
    assert printed == ["nodes", "status demo", "metrics demo", "events --lb demo",
                       f"apply -f {script['run']}/cluster.yaml"]  # fmt: skip
    for command in printed:
        lbctl(*command.split())
    assert lbctl("apply", "-f", f"{script['run']}/cluster.yaml") == "applied demo version 3\n"
    def counted() -> bool:
        return json.loads(lbctl("status", "demo", "--json"))["targets"][0]["requests_total"] > 0

    wait_for(counted, 10.0, "the nodes' stats")
    for i in (1, 2, 3):
        log = (script["run"] / f"node-{i}.log").read_text()
        assert "NOPERM" not in log and "Traceback" not in log, log
    # Redis refused nothing that nodes or lbctl sent (user admin may read the ACL log).
    admin = redis.Redis(host="127.0.0.1", port=ports["redis"], username="admin",
                        password=(script["run"] / "redis-admin.password").read_text().strip(),
                        socket_timeout=5)  # fmt: skip
    try:
        assert admin.acl_log() == []
        assert admin.acl_getuser("default")["enabled"] is False
    finally:
        admin.close()

    # SIGTERM to the script, or SIGINT to its whole process group (a Ctrl-C): it stops
    # everything it started, the nodes with one SIGTERM each (they drain), then exits.
    started = recorded(script["pidfile"])
    assert sorted(name for _, name in started) == sorted(
        ["redis-server", "web-1", "web-2", "web-3", "node-1", "node-2", "node-3"])  # fmt: skip
    assert all(alive(pid) for pid, _ in started)
    if stop == "sigterm":
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_TIMEOUT) == 128 + signal.SIGTERM
    else:
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(STOP_TIMEOUT) == 128 + signal.SIGINT
    for i in (1, 2, 3):
        log = (script["run"] / f"node-{i}.log").read_text()
        assert "SIGTERM: draining" in log and "second stop signal" not in log, log
    assert [name for pid, name in started if alive(pid)] == []
    closed = [(a, ports["http"]) for a in ADDRS] + [(a, ports["admin"]) for a in ADDRS]
    closed += [("127.0.0.1", ports["redis"])] + [("127.0.0.1", p) for p in script["backends"]]
    assert [hp for hp in closed if not refused(*hp)] == []
    assert "local-cluster: stopping 7 process(es)" in out.read_text()


def request_on(host: str, port: int, path: str,
               headers: list[tuple[str, str]] | None = None) -> Any:  # fmt: skip
    with RawClient(port, host=host) as client:
        return client.get(path, headers)


def test_bad_arguments_start_nothing(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(SCRIPT), "--frob"], capture_output=True, text=True, timeout=LBCTL_TIMEOUT,
        cwd=REPO_ROOT, env=subprocess_env(),
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == "local-cluster: unknown argument: --frob"
    assert "Usage: deploy/local-cluster.sh" in done.stderr


# -- the deployment files that cannot run here: consistent with the code and each other -------

DEPLOY = REPO_ROOT / "deploy"
ZERO_HASH = "#" + "0" * 64
# Words in command tuples that are arguments, not commands.
NOT_COMMANDS = {"MAXLEN", "MINID", "COUNT", "BLOCK", "STREAMS", "LIMIT", "WITHSCORES"}
COMMAND_RE = re.compile(r"""redis\.call\(\s*['"]([A-Za-z]+)['"]|[(\[]\s*"([A-Z]{3,})"\s*,""")


def acl_rules(line_start: str = "user lb on ") -> str:
    for line in (DEPLOY / "redis" / "users.acl").read_text().splitlines():
        if line.startswith(line_start):
            return line.removeprefix(line_start).removeprefix(ZERO_HASH + " ")
    raise AssertionError(f"no {line_start!r} in users.acl")


def test_acl_file_users_and_every_copy_agree() -> None:
    text = (DEPLOY / "redis" / "users.acl").read_text()
    lines = text.splitlines()
    assert lines[0] == "user default off"
    rules = acl_rules()
    assert lines[1:] == [f"user lb on {ZERO_HASH} {rules}", f"user lbctl on {ZERO_HASH} {rules}"]
    k8s = list(yaml.safe_load_all((DEPLOY / "k8s" / "redis.yaml").read_text()))
    assert k8s[0]["kind"] == "ConfigMap" and k8s[0]["data"]["users.acl"] == text
    security = (REPO_ROOT / "docs" / "security.md").read_text()
    assert f"user lb on #<sha256> {rules}\n" in security


def test_acl_allows_every_redis_command_in_the_node_code() -> None:
    # Commands the trio client and the Lua scripts send (lbctl's, through redis-py, are
    # exercised by the local-cluster test above, whose Redis logs every refusal).
    allowed = {rule[1:].split("|")[0].upper() for rule in acl_rules().split() if rule[0] == "+"}
    files = [*sorted((REPO_ROOT / "lbnode" / "cluster").glob("*.py")),
             *(REPO_ROOT / "lbshared" / f"{n}.py" for n in ("store", "publish", "redis_trio"))]
    used: dict[str, set[str]] = {}
    for path in files:
        for m in COMMAND_RE.finditer(path.read_text()):
            command = (m.group(1) or m.group(2)).upper()
            if command not in NOT_COMMANDS:
                used.setdefault(command, set()).add(path.name)
    assert {"XADD", "XREAD", "EVALSHA", "HSET", "ZADD", "TIME"} <= set(used)  # the scan works
    missing = {c: sorted(f) for c, f in used.items() if c not in allowed}
    assert missing == {}, f"add these to deploy/redis/users.acl: {missing}"


@pytest.mark.parametrize("path", ["deploy/compose-lb.yaml", "deploy/k8s/lb.yaml"])
def test_deploy_configs_are_valid(path: str) -> None:
    assert [lb.name for lb in load_config(REPO_ROOT / path).load_balancers]


def duration(text: str) -> float:
    return parse_duration(text)


def test_kubernetes_manifests_fit_together() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    docs = [d for name in kustomization["resources"]
            for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text())]  # fmt: skip
    assert all(d["apiVersion"] and d["kind"] and d["metadata"]["name"] for d in docs)
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    secrets = {d["metadata"]["name"]: set(d["stringData"]) for d in
               yaml.safe_load_all((DEPLOY / "k8s" / "secrets.example.yaml").read_text())}
    configmaps = {g["name"] for g in kustomization["configMapGenerator"]} | {
        name for kind, name in by_kind if kind == "ConfigMap"}  # fmt: skip

    for kind, name in [("Deployment", "lbnode"), ("StatefulSet", "lbnode-redis"),
                       ("Job", "lbctl-apply")]:  # fmt: skip
        spec = by_kind[(kind, name)]["spec"]["template"]["spec"]
        for container in spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]], (name, ref)
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, (name, volume)

    node = by_kind[("Deployment", "lbnode")]["spec"]["template"]["spec"]
    container = node["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert "tcpSocket" in container["livenessProbe"]  # not /healthz: 503 while draining
    assert env["LB_ADMIN"] == f"0.0.0.0:{ports['admin']}"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    sleep = float(re.search(r"sleep\((\d+)\)", pre_stop[-1]).group(1))  # type: ignore[union-attr]
    assert node["terminationGracePeriodSeconds"] > sleep + duration(env["LB_DRAIN_TIMEOUT"])
    # The listeners of lb.yaml are container ports, and the Service sends to them.
    listen = {lst.port for lb in load_config(DEPLOY / "k8s" / "lb.yaml").load_balancers
              for lst in lb.listeners}  # fmt: skip
    assert listen <= set(ports.values())
    service = by_kind[("Service", "lbnode")]["spec"]
    assert {ports[p["targetPort"]] for p in service["ports"]} == listen
    assert service["externalTrafficPolicy"] == "Local"
    job = by_kind[("Job", "lbctl-apply")]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == ["lbctl", "apply", "-f", "/config/lb.yaml"]


def test_compose_file_fits_together() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    nodes = [s for n, s in services.items() if n.startswith("node-")]
    assert len(nodes) == 3
    lbs = load_config(DEPLOY / "compose-lb.yaml").load_balancers
    lb_port = lbs[0].listeners[0].port
    for node in nodes:
        env = node["environment"]
        assert env["LB_REDIS_URL"].startswith("redis://lb:") and env["LB_ADMIN_TOKEN"]
        assert duration(node["stop_grace_period"]) > duration(env["LB_DRAIN_TIMEOUT"])
        assert any(p.endswith(f":{lb_port}") for p in node["ports"])
        assert node["depends_on"]["redis"]["condition"] == "service_healthy"
    assert {n["environment"]["LB_NODE_ID"] for n in nodes} == {"node-1", "node-2", "node-3"}
    apply = services["lbctl-apply"]
    assert apply["entrypoint"] == ["lbctl"]
    assert apply["command"] == ["apply", "-f", "/config/lb.yaml"]
    assert "./compose-lb.yaml:/config/lb.yaml:ro" in apply["volumes"]
    assert "./redis/users.acl:/etc/lbnode/users.acl:ro" in services["redis"]["volumes"]


def unit_settings(name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), value.strip())
    return out


def test_systemd_unit_stops_after_the_drain() -> None:
    unit = unit_settings("lbnode@.service")
    assert (unit["KillSignal"], unit["Restart"], unit["EnvironmentFile"]) == (
        "SIGTERM", "on-failure", "/etc/lbnode/%i.env")  # fmt: skip
    env = unit_settings("lbnode.env.example")
    assert duration(unit["TimeoutStopSec"]) > duration(env["LB_DRAIN_TIMEOUT"])
    assert unit_settings("lbnode-redis.service")["ExecStart"].endswith(
        "/etc/lbnode/redis.conf --supervised systemd --daemonize no")
