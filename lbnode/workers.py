"""``--workers N``: N node processes sharing the listeners, one supervisor.

Each worker is a full ``lbnode`` process started with the same arguments and
``--workers 1``; they share every listening port through ``SO_REUSEPORT``, so
the kernel spreads connections over them. Worker ``i`` (from 0) serves its
admin API on the admin port plus ``i`` and names itself ``NODE-ID/wI``.

The supervisor forwards SIGTERM and SIGINT to every worker, turns SIGHUP
into a rolling reload (one worker after the other, RELOAD_GAP apart), restarts
a worker that dies unexpectedly (with a growing back-off, at most one restart
a second), and exits once all workers have exited after a stop signal: 0 if
they all exited cleanly.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger("lbnode.workers")

# Back-off between restarts of a crashing worker, doubled per quick crash.
RESTART_MIN = 1.0
RESTART_MAX = 30.0
POLL_INTERVAL = 0.2
# Between two workers of a rolling reload (SIGHUP).
RELOAD_GAP = 0.5


def _strip_flag(argv: list[str], flag: str) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == flag:
            skip = True
            continue
        if arg.startswith(flag + "="):
            continue
        out.append(arg)
    return out


def worker_argv(argv: list[str], index: int, admin: tuple[str, int] | None, node_id: str) -> list[str]:
    args = _strip_flag(_strip_flag(_strip_flag(argv, "--workers"), "--admin"), "--node-id")
    args += ["--workers", "1", "--node-id", f"{node_id}/w{index}"]
    if admin is None:
        args += ["--admin", "off"]
    else:
        host, port = admin
        args += ["--admin", f"{host}:{port + index}"]
    return [sys.executable, "-m", "lbnode", *args]


def supervise(argv: list[str], n: int, admin: tuple[str, int] | None, node_id: str) -> int:
    """Run ``n`` workers until a stop signal; returns the exit status."""
    procs: dict[int, subprocess.Popen[bytes]] = {}
    backoff = dict.fromkeys(range(n), RESTART_MIN)
    next_start = dict.fromkeys(range(n), 0.0)
    stopping = False
    env = dict(os.environ)
    # Each worker gets its settings from argv; the environment must not
    # override them (LB_WORKERS would recurse, LB_ADMIN would collide).
    for name in ("LB_WORKERS", "LB_ADMIN", "LB_NODE_ID"):
        env.pop(name, None)

    def start(i: int) -> None:
        procs[i] = subprocess.Popen(worker_argv(argv, i, admin, node_id), env=env)
        log.info("worker %d started (pid %d)", i, procs[i].pid)

    reloads: list[int] = []  # workers still to reload, one at a time
    next_reload = 0.0

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum == signal.SIGHUP:
            # A rolling reload: the workers re-read the config one after the
            # other, so a bad moment in one never hits them all at once.
            reloads[:] = sorted(procs)
            return
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for i in range(n):
        start(i)
    status = 0
    while procs:
        time.sleep(POLL_INTERVAL)
        if reloads and not stopping and time.monotonic() >= next_reload:
            i = reloads.pop(0)
            p = procs.get(i)
            if p is not None and p.poll() is None:
                log.info("reloading worker %d (pid %d)", i, p.pid)
                p.send_signal(signal.SIGHUP)
            next_reload = time.monotonic() + RELOAD_GAP
        for i, p in list(procs.items()):
            code = p.poll()
            if code is None:
                continue
            if stopping:
                del procs[i]
                status = status or (0 if code == 0 else 1)
                continue
            now = time.monotonic()
            if now < next_start[i]:
                continue
            log.error("worker %d (pid %d) exited with %s; restarting it", i, p.pid, code)
            next_start[i] = now + backoff[i]
            backoff[i] = min(backoff[i] * 2, RESTART_MAX)
            start(i)
    return status
