"""``make demo``: three demo backends and one lbnode on the embedded default config.

``python -m lbnode.demo [--port-base 9001] [--lb-port 8080] [--admin 127.0.0.1:9901]``

Starts ``python -m lbnode.demo_backend`` on 127.0.0.1:9001-9003 (api-1..api-3),
then ``python -m lbnode --bind 127.0.0.1 --admin 127.0.0.1:9901`` with no
``--config`` (the embedded default, ``lbnode/default_config.yaml``), waits
for ``/healthz``, prints commands to try and runs until Ctrl-C or SIGTERM.
With non-default ports it writes the default config, adjusted, to a temp
file and passes ``--config``.

The children run in their own sessions, so a Ctrl-C reaches only this
process, which then stops them in order (the node first, so it drains, then
the backends), each by PID: terminate, bounded wait, kill. On Linux they also
get SIGTERM if this process dies without cleaning up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import yaml

HOST = "127.0.0.1"
BACKEND_IDS = ("api-1", "api-2", "api-3")
DEFAULT_PORT_BASE = 9001
DEFAULT_LB_PORT = 8080
DEFAULT_ADMIN = f"{HOST}:9901"
# Bounds of the waits on children.
BACKEND_START_TIMEOUT = 10.0
NODE_START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0  # lbnode drains in-flight requests on SIGTERM
POLL_INTERVAL = 0.1

PACKAGE_PARENT = Path(__file__).resolve().parent.parent


class Child(NamedTuple):
    name: str
    proc: subprocess.Popen[bytes]


class DemoError(Exception):
    """The demo cannot start; the message says why."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Best effort (Linux): the child gets SIGTERM when the demo process dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # `python -m lbnode...` must import this very package, wherever the demo runs from.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _start(name: str, argv: list[str]) -> Child:
    proc = subprocess.Popen(
        argv,
        env=_child_env(),
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
    )
    return Child(name, proc)


def stop(children: list[Child]) -> None:
    """Stop each child by PID, last started first: terminate, bounded wait, kill."""
    for child in reversed(children):
        proc = child.proc
        if proc.poll() is not None:
            continue
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"demo: {child.name} (pid {proc.pid}) still running; killing it", file=sys.stderr)
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


def port_in_use(host: str, port: int) -> bool:
    """True if *port* cannot be bound on *host* (as a server with SO_REUSEADDR would)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _healthz(admin: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{admin}/healthz", timeout=1.0) as resp:  # noqa: S310
            return resp.status == 200 and json.loads(resp.read()).get("status") == "serving"
    except (OSError, ValueError, urllib.error.URLError):
        return False


def _wait(check: Callable[[], bool], child: Child, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise DemoError(f"{child.name} exited with status {child.proc.returncode} {what}")
        if check():
            return
        time.sleep(POLL_INTERVAL)
    raise DemoError(f"{child.name} not ready after {timeout:g}s ({what})")


def demo_config(port_base: int, lb_port: int) -> dict[str, object]:
    """The embedded default with the listener and target ports moved."""
    text = resources.files("lbnode").joinpath("default_config.yaml").read_text()
    config = yaml.safe_load(text)
    lb = config["load_balancers"][0]
    lb["listeners"][0]["port"] = lb_port
    for i, target in enumerate(lb["targets"]):
        target["address"] = f"{HOST}:{port_base + i}"
    return config


def banner(lb_port: int, admin: str, port_base: int) -> str:
    lb = f"http://{HOST}:{lb_port}"
    first, last = port_base, port_base + len(BACKEND_IDS) - 1
    return f"""
lbnode demo: load balancer "demo" on {lb}, admin on http://{admin}
targets api-1..api-3 are demo backends on {HOST}:{first}-{last}; health-checked on /health.
The access log (one JSON object per request) prints on this terminal. Try:

  # round robin over api-1, api-2, api-3
  for i in 1 2 3 4 5 6; do curl -s {lb}/; done
  # rule api_canary: ~10% of X-Canary: true requests take it (api-3 only; the access
  # log's "rule" field shows which did), the rest are balanced as usual
  for i in $(seq 30); do curl -s -H 'X-Canary: true' {lb}/; done | sort | uniq -c
  # rule api_v2 (/api/v2/*, sticky on cookie session_id): one session stays on one target
  for i in 1 2 3 4; do curl -s -b session_id=alice {lb}/api/v2/orders; done
  for i in 1 2 3 4; do curl -s -b session_id=bob {lb}/api/v2/orders; done
  # an upload streamed through the proxy to /echo and back
  head -c 2000000 /dev/urandom > /tmp/blob
  curl -s --data-binary @/tmp/blob {lb}/echo | cmp - /tmp/blob && echo same
  # websockets are tunnelled: the handshake answers 101 from a backend (/ws echoes frames)
  curl -si --max-time 2 -H 'Connection: Upgrade' -H 'Upgrade: websocket' \\
       -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' {lb}/ws
  # take api-2 down (its /health answers 503); the probes notice within ~15 s
  curl -s -X POST http://{HOST}:{first + 1}/admin/health/down   # .../up to bring it back
  # node health and state
  curl -s http://{admin}/healthz; curl -s http://{admin}/status
  # the rate limit: 600 requests per minute per client IP, then 429 with Retry-After

Ctrl-C stops the node and the backends.
"""


class _Stop(Exception):
    pass


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Stop


def run(port_base: int, lb_port: int, admin: str) -> int:
    admin_host, _, admin_port = admin.rpartition(":")
    wanted = [(port_base + i, f"demo backend {bid}") for i, bid in enumerate(BACKEND_IDS)]
    wanted += [(lb_port, "the load balancer's listener")]
    if admin_port.isdigit():
        wanted.append((int(admin_port), "lbnode's admin API"))
    busy = [f"port {port} ({what})" for port, what in wanted if port_in_use(HOST, port)]
    if busy:
        print(f"demo: already in use on {HOST}: {', '.join(busy)}.", file=sys.stderr)
        print("Stop what holds them, or pick others: python -m lbnode.demo "
              "--port-base N --lb-port N --admin HOST:PORT", file=sys.stderr)
        return 1

    children: list[Child] = []
    signal.signal(signal.SIGTERM, _on_sigterm)
    with tempfile.TemporaryDirectory(prefix="lbnode-demo-") as tmp:
        try:
            for i, backend_id in enumerate(BACKEND_IDS):
                port = port_base + i
                argv = [sys.executable, "-m", "lbnode.demo_backend",
                        "--host", HOST, "--port", str(port), "--id", backend_id]
                children.append(_start(backend_id, argv))
            for i, child in enumerate(children):
                port = port_base + i
                _wait(lambda p=port: _port_open(p), child, BACKEND_START_TIMEOUT,
                      f"while opening port {port}")
            node_argv = [sys.executable, "-m", "lbnode", "--bind", HOST, "--admin", admin]
            if (port_base, lb_port) != (DEFAULT_PORT_BASE, DEFAULT_LB_PORT):
                path = Path(tmp) / "demo.yaml"
                path.write_text(yaml.safe_dump(demo_config(port_base, lb_port), sort_keys=False))
                node_argv += ["--config", str(path)]
            node = _start("lbnode", node_argv)
            children.append(node)
            _wait(lambda: _healthz(admin), node, NODE_START_TIMEOUT, f"waiting for {admin}/healthz")
            print(banner(lb_port, admin, port_base), flush=True)
            while True:
                for child in children:
                    if child.proc.poll() is not None:
                        raise DemoError(
                            f"{child.name} exited unexpectedly with status {child.proc.returncode}"
                        )
                time.sleep(0.5)
        except DemoError as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, _Stop):
            print("\ndemo: stopping", file=sys.stderr)
            return 0
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop is enough
            stop(children)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lbnode.demo",
        description="Run three demo backends and an lbnode in front of them.",
    )
    parser.add_argument("--port-base", type=int, default=DEFAULT_PORT_BASE,
                        help="first backend port; api-1..api-3 use it and the next two (9001)")
    parser.add_argument("--lb-port", type=int, default=DEFAULT_LB_PORT,
                        help="the load balancer's listener port (8080)")
    parser.add_argument("--admin", default=DEFAULT_ADMIN, help=f"lbnode admin ({DEFAULT_ADMIN})")
    args = parser.parse_args(argv)
    return run(args.port_base, args.lb_port, args.admin)


if __name__ == "__main__":
    sys.exit(main())
