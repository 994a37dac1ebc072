"""``--workers N``: supervised worker processes sharing the listeners."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from .conftest import Launcher, admin_get, free_port, request, wait_for


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def healthz(port: int) -> dict[str, Any] | None:
    try:
        status, body = admin_get(port, "/healthz")
    except OSError:
        return None
    return body if status == 200 else None


def config(backend: Any, port: int, weight: int = 100) -> dict[str, Any]:
    return {"load_balancers": [{
        "name": "w", "listeners": [{"protocol": "http", "port": port}],
        "targets": [{"id": backend.id, "address": backend.address, "weight": weight}]}]}  # fmt: skip


def test_workers_share_listeners_restart_reload_one_at_a_time_and_drain(
    launcher: Launcher,
) -> None:
    a = launcher.backend("a")
    port = free_port()
    n = launcher.node(config(a, port), "--workers", "2", node_id="wk")
    admin = [n.admin_port, n.admin_port + 1]
    wait_for(lambda: all(healthz(p) for p in admin), 10, "both workers")
    assert [admin_get(p, "/healthz")[1]["node"] for p in admin] == ["wk/w0", "wk/w1"]
    assert all(request(port, "GET", "/").status == 200 for _ in range(20))
    served = [admin_get(p, "/status")[1]["requests_total"] for p in admin]
    assert sum(served) == 20  # the kernel spreads connections over both (SO_REUSEPORT)

    # A crashed worker is restarted.
    pids = children(n.proc.pid)
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: len(children(n.proc.pid)) == 2 and set(children(n.proc.pid)) != set(pids),
             10, "the worker to be restarted")  # fmt: skip
    wait_for(lambda: all(healthz(p) for p in admin), 10, "both serving")

    # SIGHUP: a rolling reload, every worker ends on the new config.
    n.write_config(config(a, port, weight=5))
    n.signal(signal.SIGHUP)
    wait_for(lambda: all((healthz(p) or {}).get("config_version") == 2 for p in admin),
             10, "both workers to reload")  # fmt: skip
    assert "reloading worker 0" in n.stderr_text() and "reloading worker 1" in n.stderr_text()

    # SIGTERM drains every worker; the supervisor exits 0.
    workers = children(n.proc.pid)
    assert n.stop() == 0
    assert all(not Path(f"/proc/{w}").exists() for w in workers)
