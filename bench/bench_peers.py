"""lbnode next to the proxies operators know, on the same backend and client (``make bench``).

Theory of operation
===================

One run measures, one after the other with the same wrk load (64 keep-alive
connections, 2 threads; ``run.SCENARIOS[0]``) against the same
``bench/fast_backend.py``, one row each:

* the backend alone (no proxy: the ceiling);
* HAProxy (Debian's package, ``nbthread 1``, ``http-reuse always``);
* nginx as a reverse proxy (one worker, upstream keep-alive);
* an aiohttp reverse proxy (``bench/aiohttp_proxy.py``, asyncio's default loop);
* the bare trio proxies of ``bench/bare_proxy.py``, with h11 and with
  httptools: the floors of a trio proxy with each parser;
* lbnode ``--http h11``, ``--http httptools``, and ``--http httptools
  --workers 2``, one load balancer with the backend as its only target;
* lbnode ``--http httptools`` with a rule and a rate limit (``POLICY``: the
  rule ``all`` takes every path and carries a limit of 10,000,000 requests
  per second per client address, mode ``cluster``, which decides locally and
  never waits on Redis), standalone, and in a three-node cluster: a private
  ``redis-server`` on a free port and three ``lbnode --redis`` processes on
  127.0.0.2-4 started with the same ``--config`` (one seeds the cluster, the
  others load it from Redis). wrk loads ONE node; the other two are live,
  idle members that receive its rate-limit deltas.

Before a policy row is measured, a request through each node must come back
from the backend with ``RateLimit-Limit: 10000000``, the rule's limiter's
header: the rule matched and its limit decided. A row whose wrk report
counts any non-2xx/3xx response or socket error is FAILED (the numbers of a
run that was refused or broken mean nothing), and so is a row whose proxy
did not start; the run goes on and exits 1 at the end.

A peer that is not installed (haproxy, nginx, aiohttp, httptools,
redis-server) is skipped, and its row says so. Each row prints requests/s,
p50 and p99, and its throughput and p99 as ratios to HAProxy's; then the
cluster/standalone throughput ratio and the performance issue's targets with
the measured value of each and whether it is met (lbnode ``--http
httptools``, one worker: at least 40 % of HAProxy's requests/s, at least
twice the aiohttp proxy's, a p99 at most twice HAProxy's; the cluster row
within 15 % of the standalone one). Targets are reported, not enforced: the
exit status says whether every row was measured, not whether they are met.

``--write-docs`` (or ``--write PATH``) replaces what lies between
``<!-- bench_peers:begin -->`` and ``<!-- bench_peers:end -->`` in
docs/performance.md with the date, the machine (CPU model, CPU count,
kernel, RAM), the versions (Python, trio, h11, httptools, aiohttp, HAProxy,
nginx, redis-server, wrk), the load, the table and the targets; the prose
around the markers is left alone.

``--json`` prints one object instead of the table::

    {"meta": {"date", "machine": {"cpu", "cpus", "kernel", "ram_gib"},
              "versions": {name: version or null}, "loadgen",
              "connections", "threads", "duration_s", "warmup_s"},
     "rows": [{"key", "name", "status": "measured" | "skipped" | "failed",
               "rps", "p50_ms", "p99_ms", "requests", "non_2xx_3xx",
               "socket_errors", "rps_vs_haproxy", "p99_vs_haproxy",
               "cpu_us_per_request", "note", "error"}],
     "cluster_vs_standalone": float or null,
     "targets": [{"target", "value", "met": true | false | null}]}

(``cpu_us_per_request``: user + system CPU time of the processes the row
started, with their children, during the measured window, per request: the
proxy alone, or a cluster's three nodes and its Redis; null for the backend
alone. On a shared VM it varies less than requests/s, which depends on what
else got the CPUs. Figures are null when not measured; ``met`` is null when a row it needs
was not measured; ``value`` is the ratio the target is about.)

Every process is stopped by its PID (``run.child``, ``RedisProc``); every
wait is bounded.

    python bench/bench_peers.py [--duration 5] [--warmup 1] [--json]
                                [--write-docs | --write PATH]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402
    HOST,
    REPO_ROOT,
    SCENARIOS,
    STARTED,
    BenchError,
    LoadGenerator,
    Measurement,
    bare_proxy,
    child,
    fast_backend,
    free_port,
    healthz,
    http_get,
    lb_config,
    lbnode,
    measure,
    port_open,
    probe,
    wait_until,
)

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from tests.redisproc import RedisProc  # noqa: E402

SCENARIO = SCENARIOS[0]  # 64 connections, 2 threads
DOC = REPO_ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench_peers:begin -->", "<!-- bench_peers:end -->"
#: The cluster's nodes (loopback aliases: nothing to set up on Linux); wrk loads the first.
NODE_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
#: Per request: a rule that takes every path and carries the limit (so the
#: limit's response header proves the rule matched), far above any rate here.
RATE_LIMIT = 10_000_000
POLICY: dict[str, object] = {
    "rules": {
        "all": {
            "path": "/*",
            "targets": ["fast"],
            "rate_limit": {"limit": RATE_LIMIT, "interval": "1s", "key": "client_ip",
                           "mode": "cluster"},  # fmt: skip
        }
    }
}
#: The performance issue's targets.
MIN_VS_HAPROXY = 0.40
MIN_VS_AIOHTTP = 2.0
MAX_P99_VS_HAPROXY = 2.0
MIN_CLUSTER_VS_STANDALONE = 0.85
#: Bound of a `--version` call of a peer's binary.
VERSION_TIMEOUT = 10.0
#: Width of the generated Markdown's prose (the table rows are not wrapped).
DOC_WIDTH = 78


@dataclass(slots=True)
class Row:
    """One proxy (or the backend alone): its measurement, or why there is none."""

    key: str
    name: str
    m: Measurement | None = None
    note: str = ""  # how it was measured, or why it was skipped
    error: str = ""  # why it failed
    cpu_us: float | None = None  # CPU time of the row's processes per request

    @property
    def status(self) -> str:
        if self.error:
            return "failed"
        return "measured" if self.m is not None else "skipped"

    @property
    def ok(self) -> Measurement | None:
        """The measurement, if the row was measured cleanly."""
        return None if self.error else self.m


# -- peers ----------------------------------------------------------------------------------


@contextmanager
def haproxy(backend_port: int) -> Iterator[int]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "haproxy.cfg"
        cfg.write_text(
            f"""global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
frontend fe
    bind {HOST}:{port}
    default_backend be
backend be
    http-reuse always
    server fast {HOST}:{backend_port}
"""
        )
        with child([shutil.which("haproxy") or "haproxy", "-db", "-f", str(cfg)], "haproxy") as (
            proc,
            log,
        ):
            wait_until(lambda: port_open(port), proc, log, "haproxy")
            yield port


@contextmanager
def nginx(backend_port: int) -> Iterator[int]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "nginx.conf"
        cfg.write_text(
            f"""worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    client_body_temp_path {tmp};
    proxy_temp_path {tmp};
    upstream be {{ server {HOST}:{backend_port}; keepalive 64; }}
    server {{
        listen {HOST}:{port};
        location / {{
            proxy_pass http://be;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
        )
        argv = [shutil.which("nginx") or "nginx", "-c", str(cfg), "-p", tmp]
        with child(argv, "nginx") as (proc, log):
            wait_until(lambda: port_open(port), proc, log, "nginx")
            yield port


@contextmanager
def aiohttp_proxy(backend_port: int) -> Iterator[int]:
    """bench/aiohttp_proxy.py in front of the backend."""
    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve().parent / "aiohttp_proxy.py"),
            "--port", str(port), "--upstream", f"{HOST}:{backend_port}"]  # fmt: skip
    with child(argv, "aiohttp_proxy") as (proc, log):
        wait_until(lambda: port_open(port), proc, log, "aiohttp_proxy")
        probe(f"http://{HOST}:{port}{SCENARIO.path}", log, "aiohttp_proxy")
        yield port


def check_policy(host: str, port: int) -> None:
    """BenchError unless a request through ``host:port`` came back with the rule's limit."""
    reply = http_get(f"http://{host}:{port}{SCENARIO.path}")
    limit = reply[1].get("ratelimit-limit") if reply else None
    if reply is None or reply[0] != 200 or limit != str(RATE_LIMIT):
        raise BenchError(f"the rule and its rate limit are not active on {host}:{port}: "
                         f"{reply!r}")  # fmt: skip


@contextmanager
def lbnode_policy(backend_port: int) -> Iterator[int]:
    """One standalone lbnode (httptools) with POLICY."""
    scenario = replace(SCENARIO, lb_extra=POLICY)
    with lbnode(backend_port, scenario, ["--http", "httptools"]) as port:
        check_policy(HOST, port)
        yield port


def _live_nodes(admin: str) -> float | None:
    reply = http_get(f"http://{admin}/metrics")
    if reply is None or reply[0] != 200:
        return None
    found = re.search(rb"^lbnode_cluster_live_nodes (\S+)$", reply[2], re.M)
    return float(found.group(1)) if found else None


def _cluster_serving(admin: str) -> bool:
    """Serving, connected to Redis, with a config version (seeded or loaded)."""
    doc = healthz(admin)
    if doc is None or doc.get("status") != "serving" or doc.get("degraded") is not False:
        return False
    version = doc.get("config_version")
    return isinstance(version, int) and version >= 1


@dataclass(frozen=True, slots=True)
class _Node:
    host: str
    admin: str
    proc: subprocess.Popen[bytes]
    log: Path

    def wait_ready(self, listen_port: int) -> None:
        """Until the node serves the config and answers through the rule (bounded)."""
        what = f"cluster node {self.host}"
        wait_until(lambda: _cluster_serving(self.admin), self.proc, self.log, what)
        wait_until(lambda: port_open(listen_port, self.host), self.proc, self.log,
                   f"the listener of {what}")  # fmt: skip
        probe(f"http://{self.host}:{listen_port}{SCENARIO.path}", self.log, what)
        check_policy(self.host, listen_port)

    def wait_live(self, n: int) -> None:
        """Until the node counts ``n`` live nodes (their heartbeats seen; bounded)."""
        wait_until(lambda: _live_nodes(self.admin) == n, self.proc, self.log,
                   f"cluster node {self.host} to count {n} live nodes")  # fmt: skip


@contextmanager
def cluster(backend_port: int) -> Iterator[int]:
    """A private redis-server and one lbnode --redis (httptools) per NODE_HOSTS address,
    all seeded with POLICY; yields the listener port, the same on every node, once each
    node serves the config (Redis connected), answers through the rule and counts
    every node live."""
    listen_port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-peers-cluster-") as tmp, ExitStack() as stack:
        redis = stack.enter_context(RedisProc(Path(tmp) / "redis"))
        seed = Path(tmp) / "seed.yaml"
        seed.write_text(yaml.safe_dump(lb_config(listen_port, backend_port, POLICY)))
        nodes = []
        for n, host in enumerate(NODE_HOSTS, start=1):
            admin = f"{host}:{free_port()}"
            argv = [
                sys.executable, "-m", "lbnode",
                "--redis", f"{redis.url}/0", "--node-id", f"bench-{n}",
                "--config", str(seed),
                "--bind", host, "--admin", admin,
                "--access-log", "off", "--log-level", "warning",
                "--http", "httptools",
            ]  # fmt: skip
            proc, log = stack.enter_context(child(argv, f"lbnode-{n}"))
            nodes.append(_Node(host, admin, proc, log))
        for node in nodes:
            node.wait_ready(listen_port)
        for node in nodes:
            node.wait_live(len(nodes))
        yield listen_port


# -- the run --------------------------------------------------------------------------------


def cpu_seconds(roots: list[int]) -> float:
    """User + system CPU seconds of the processes ``roots`` and all their
    descendants (a supervisor's workers), from /proc; 0.0 where there is none."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    times: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        times[pid] = int(fields[11]) + int(fields[12])  # utime + stime
    total, todo = 0, list(roots)
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total / tick


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run_rows(gen: LoadGenerator, duration: float, warmup: float) -> list[Row]:
    """Every row, in table order (see the module docstring)."""
    rows: list[Row] = []

    def row(key: str, name: str, start: Callable[[], AbstractContextManager[int]],
            *, skip: str = "", note: str = "", host: str = HOST) -> None:  # fmt: skip
        r = Row(key, name, note=skip or note)
        rows.append(r)
        if skip:
            return
        print(f"{name} ...", file=sys.stderr, flush=True)
        first = len(STARTED)
        try:
            with start() as port:
                if warmup > 0:
                    measure(gen, port, SCENARIO, warmup, 0, host)
                own = STARTED[first:]  # the proxy, its workers' parent, a cluster's Redis
                cpu0 = cpu_seconds(own)
                r.m = measure(gen, port, SCENARIO, duration, 0, host)
                if own and r.m.requests:
                    r.cpu_us = (cpu_seconds(own) - cpu0) / r.m.requests * 1e6
        except BenchError as exc:
            r.error = str(exc)
        else:
            if r.m.non_2xx_3xx or r.m.socket_errors:
                r.error = (f"{r.m.non_2xx_3xx} non-2xx/3xx responses and {r.m.socket_errors} "
                           f"socket errors in {r.m.requests} requests")  # fmt: skip
        if r.error:
            print(f"FAILED: {name}: {r.error}", file=sys.stderr, flush=True)

    def missing(binary: str) -> str:
        return "" if shutil.which(binary) else f"skipped: {binary} is not installed"

    no_aiohttp = "" if _installed("aiohttp") else (
        "skipped: aiohttp is not installed (pip install -e '.[bench]')")  # fmt: skip
    no_httptools = "" if _installed("httptools") else (
        "skipped: httptools is not installed (pip install -e '.[fast]')")  # fmt: skip
    with fast_backend() as backend:

        def on_backend(
            start: Callable[[int], AbstractContextManager[int]],
        ) -> Callable[[], AbstractContextManager[int]]:
            return lambda: start(backend)

        def node(*args: str) -> Callable[[], AbstractContextManager[int]]:
            return lambda: lbnode(backend, SCENARIO, args)

        @contextmanager
        def alone() -> Iterator[int]:
            yield backend

        row("backend", "backend alone", alone)
        row("haproxy", "HAProxy, 1 thread", on_backend(haproxy), skip=missing("haproxy"))
        row("nginx", "nginx, 1 worker", on_backend(nginx), skip=missing("nginx"))
        row("aiohttp", "aiohttp reverse proxy", on_backend(aiohttp_proxy), skip=no_aiohttp)
        row("bare_h11", "bare trio + h11 proxy", lambda: bare_proxy(backend, "h11"))
        row("bare_httptools", "bare trio + httptools proxy",
            lambda: bare_proxy(backend, "httptools"), skip=no_httptools)  # fmt: skip
        row("lbnode_h11", "lbnode --http h11", node("--http", "h11"))
        row("lbnode_httptools", "lbnode --http httptools", node("--http", "httptools"),
            skip=no_httptools)  # fmt: skip
        row("lbnode_httptools_workers2", "lbnode --http httptools --workers 2",
            node("--http", "httptools", "--workers", "2"), skip=no_httptools)  # fmt: skip
        row("lbnode_policy_standalone", "lbnode httptools, rule + rate limit, standalone",
            on_backend(lbnode_policy), skip=no_httptools)  # fmt: skip
        row("lbnode_policy_cluster", "lbnode httptools, rule + rate limit, 3-node cluster",
            on_backend(cluster), skip=no_httptools or missing("redis-server"), host=NODE_HOSTS[0],
            note=f"wrk loads one node ({NODE_HOSTS[0]}); the other two are idle members "
            "that fold its rate-limit deltas from Redis")  # fmt: skip
    return rows


# -- figures --------------------------------------------------------------------------------


def _by_key(rows: list[Row]) -> dict[str, Measurement | None]:
    return {r.key: r.ok for r in rows}


def ratios(row: Row, haproxy: Measurement | None) -> tuple[float | None, float | None]:
    """(rps, p99) of ``row`` as ratios to HAProxy's."""
    m = row.ok
    if m is None or haproxy is None or not haproxy.rps or not haproxy.p99_ms:
        return None, None
    return m.rps / haproxy.rps, m.p99_ms / haproxy.p99_ms


def cluster_ratio(rows: list[Row]) -> float | None:
    """Cluster throughput over standalone throughput (rule + rate limit both)."""
    m = _by_key(rows)
    alone, clustered = m.get("lbnode_policy_standalone"), m.get("lbnode_policy_cluster")
    if alone is None or clustered is None or not alone.rps:
        return None
    return clustered.rps / alone.rps


@dataclass(slots=True)
class Target:
    """One of the performance issue's targets, with what this run measured."""

    target: str
    value: float | None  # the ratio the target is about; None: not measured
    met: bool | None  # None: not measured
    shown: str  # the measured value, in words

    def describe(self, bold: str = "") -> str:
        """One line: the target, the measured value, met or not (``bold`` wraps the verdict)."""
        if self.met is None:
            return f"{self.target}: {bold}not measured{bold} (a row it compares was not measured)"
        return f"{self.target}: {self.shown}: {bold}{'met' if self.met else 'not met'}{bold}"


def _target(
    target: str,
    num: Measurement | None,
    den: Measurement | None,
    field: str,
    ok: Callable[[float], bool],
    show: Callable[[float, float, float], str],
) -> Target:
    """``num.field / den.field`` judged by ``ok`` and worded by ``show(ratio, num, den)``."""
    if num is None or den is None or not getattr(den, field):
        return Target(target, None, None, "")
    a, b = getattr(num, field), getattr(den, field)
    return Target(target, a / b, ok(a / b), show(a / b, a, b))


def targets(rows: list[Row]) -> list[Target]:
    m = _by_key(rows)
    node, ha = m.get("lbnode_httptools"), m.get("haproxy")
    return [
        _target(f"lbnode --http httptools requests/s >= {MIN_VS_HAPROXY:.0%} of HAProxy's "
                "(1 thread)", node, ha, "rps", lambda v: v >= MIN_VS_HAPROXY,
                lambda v, a, b: f"{v:.0%} ({a:,.0f} vs {b:,.0f})"),
        _target(f"lbnode --http httptools requests/s >= {MIN_VS_AIOHTTP:g}x the aiohttp "
                "proxy's", node, m.get("aiohttp"), "rps", lambda v: v >= MIN_VS_AIOHTTP,
                lambda v, a, b: f"{v:.2f}x ({a:,.0f} vs {b:,.0f})"),
        _target(f"lbnode --http httptools p99 at {SCENARIO.connections} connections <= "
                f"{MAX_P99_VS_HAPROXY:g}x HAProxy's", node, ha, "p99_ms",
                lambda v: v <= MAX_P99_VS_HAPROXY,
                lambda v, a, b: f"{v:.2f}x ({a:.2f} ms vs {b:.2f} ms)"),
        _target(f"3-node cluster (rule + rate limit) requests/s within "
                f"{1 - MIN_CLUSTER_VS_STANDALONE:.0%} of standalone",
                m.get("lbnode_policy_cluster"), m.get("lbnode_policy_standalone"), "rps",
                lambda v: v >= MIN_CLUSTER_VS_STANDALONE,
                lambda v, a, b: f"{v:.2f}x ({a:,.0f} vs {b:,.0f})"),
    ]  # fmt: skip


# -- machine and versions -----------------------------------------------------------------


def machine() -> dict[str, object]:
    """CPU model, CPU count, kernel release and RAM of this machine."""
    cpu = "unknown CPU"
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1).strip() if found else platform.processor() or cpu
    except OSError:
        pass
    ram = None
    try:
        kib = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        ram = round(int(kib.group(1)) / 2**20, 1) if kib else None
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(), "ram_gib": ram}


def _binary_version(argv: list[str], pattern: str) -> str | None:
    """The version ``argv`` prints (stdout or stderr, ``pattern``'s group 1), or None."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=VERSION_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(pattern, done.stdout + done.stderr)
    return found.group(1) if found else None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"Python": platform.python_version()}
    for dist in ("trio", "h11", "httptools", "aiohttp"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    out["HAProxy"] = _binary_version(["haproxy", "-v"], r"version (\S+)")
    out["nginx"] = _binary_version(["nginx", "-v"], r"nginx/(\S+)")
    out["redis-server"] = _binary_version(["redis-server", "--version"], r"v=(\S+)")
    out["wrk"] = _binary_version(["wrk", "-v"], r"wrk (\S+)")
    return out


# -- output ---------------------------------------------------------------------------------


def _figures(row: Row, haproxy: Measurement | None) -> list[str] | None:
    """rps, p50, p99, the two ratios to HAProxy and the CPU per request,
    formatted; None unless measured cleanly."""
    m = row.ok
    if m is None:
        return None
    rps, p99 = ratios(row, haproxy)
    return [
        f"{m.rps:,.0f}", f"{m.p50_ms:.2f}", f"{m.p99_ms:.2f}",
        "-" if rps is None else f"{rps:.2f}x", "-" if p99 is None else f"{p99:.2f}x",
        "-" if row.cpu_us is None else f"{row.cpu_us:.0f}",
    ]  # fmt: skip


def _why(row: Row) -> str:
    """What a row without figures shows: FAILED and the reason's first line, or the skip."""
    return f"FAILED: {row.error.splitlines()[0]}" if row.error else row.note


def format_table(rows: list[Row]) -> str:
    haproxy = _by_key(rows).get("haproxy")
    width = max(len(r.name) for r in rows)
    lines = [f"{'proxy':{width}}  {'rps':>8}  {'p50 ms':>7}  {'p99 ms':>7}  "
             f"{'rps/HAProxy':>11}  {'p99/HAProxy':>11}  {'CPU us/req':>10}"]  # fmt: skip
    notes = []
    for r in rows:
        figures = _figures(r, haproxy)
        if figures is None:
            lines.append(f"{r.name:{width}}  {_why(r)}")
            continue
        rps, p50, p99, vs, p99vs, cpu = figures
        lines.append(f"{r.name:{width}}  {rps:>8}  {p50:>7}  {p99:>7}  {vs:>11}  {p99vs:>11}"
                     f"  {cpu:>10}")  # fmt: skip
        if r.note:
            notes.append(f"note: {r.name}: {r.note}")
    return "\n".join(lines + notes)


def format_markdown(rows: list[Row], meta: dict[str, object]) -> str:
    """The generated part of docs/performance.md (what goes between the markers)."""
    mach, vers = meta["machine"], meta["versions"]
    assert isinstance(mach, dict) and isinstance(vers, dict)
    shown = ", ".join(f"{k} {v}" for k, v in vers.items() if v is not None)
    absent = [k for k, v in vers.items() if v is None]
    if absent:
        shown += f" (not installed: {', '.join(absent)})"
    ram = f", {mach['ram_gib']:g} GiB RAM" if mach["ram_gib"] is not None else ""

    def para(text: str, indent: str = "") -> str:
        return textwrap.fill(text, DOC_WIDTH, subsequent_indent=indent, break_on_hyphens=False)

    out = [
        para(f"Generated by `bench/bench_peers.py --write-docs` on {meta['date']}."),
        "",
        para(f"- Machine: {mach['cpu']}, {mach['cpus']} CPUs, Linux {mach['kernel']}{ram}; "
             "the load generator, the proxy and the backend share the CPUs.", "  "),
        para(f"- Versions: {shown}.", "  "),
        para(f"- Load: {meta['loadgen']}, {meta['connections']} keep-alive connections, "
             f"{meta['threads']} threads, {meta['duration_s']:g} s per row after a "
             f"{meta['warmup_s']:g} s warm-up, the same `bench/fast_backend.py` behind "
             "every row.", "  "),
        "",
        "| proxy | requests/s | p50 ms | p99 ms | rps vs HAProxy | p99 vs HAProxy | CPU µs/request |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    haproxy = _by_key(rows).get("haproxy")
    notes: list[str] = []
    for r in rows:
        name = f"lbnode `{r.name[len('lbnode '):]}`" if r.name.startswith("lbnode --") else r.name
        figures = _figures(r, haproxy)
        if figures is None:
            figures = [_why(r).replace("|", "\\|"), "", "", "", "", ""]
        elif r.note:
            notes.append(para(f"{len(notes) + 1}. {r.name}: {r.note}.", "   "))
            name += f" ({len(notes)})"
        out.append(f"| {name} | " + " | ".join(figures) + " |")
    if notes:
        out += ["", *notes]
    ratio = cluster_ratio(rows)
    if ratio is not None:
        out += ["", f"Cluster / standalone requests/s (rule + rate limit): **{ratio:.2f}x**."]
    out += ["", "Targets of the performance issue:", ""]
    for t in targets(rows):
        line = t.describe("**").replace("lbnode --http httptools", "lbnode `--http httptools`")
        out.append(para(f"- {line}", "  "))
    return "\n".join(out)


def write_docs(path: Path, generated: str) -> None:
    """Replace what lies between BEGIN and END in ``path`` with ``generated``."""
    text = path.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise BenchError(f"{path}: no {BEGIN} ... {END} section to replace")
    path.write_text(text[: start + len(BEGIN)] + "\n" + generated + "\n" + text[end:])


def to_json(rows: list[Row], meta: dict[str, object]) -> dict[str, object]:
    """The ``--json`` document (its shape is in the module docstring)."""
    haproxy = _by_key(rows).get("haproxy")

    def row(r: Row) -> dict[str, object]:
        m = r.m
        rps, p99 = ratios(r, haproxy)
        return {
            "key": r.key, "name": r.name, "status": r.status,
            "rps": m.rps if m else None, "p50_ms": m.p50_ms if m else None,
            "p99_ms": m.p99_ms if m else None, "requests": m.requests if m else None,
            "non_2xx_3xx": m.non_2xx_3xx if m else None,
            "socket_errors": m.socket_errors if m else None,
            "rps_vs_haproxy": rps, "p99_vs_haproxy": p99, "cpu_us_per_request": r.cpu_us,
            "note": r.note or None, "error": r.error or None,
        }  # fmt: skip

    return {
        "meta": meta,
        "rows": [row(r) for r in rows],
        "cluster_vs_standalone": cluster_ratio(rows),
        "targets": [{"target": t.target, "value": t.value, "met": t.met} for t in targets(rows)],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per row (5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before each row (1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--write-docs", dest="write", action="store_const", const=DOC,
                     help=f"write the results into {DOC.relative_to(REPO_ROOT)}")  # fmt: skip
    out.add_argument("--write", type=Path, metavar="PATH",
                     help="write the results between the markers of PATH")  # fmt: skip
    a = p.parse_args(argv)
    if a.write is not None:  # refuse before a run whose results could not be written
        try:
            text = a.write.read_text()
        except OSError as exc:
            p.error(f"cannot read {a.write}: {exc}")
        if BEGIN not in text or END not in text:
            p.error(f"{a.write} has no {BEGIN} ... {END} section")
    try:
        gen = LoadGenerator("auto")
        rows = run_rows(gen, a.duration, a.warmup)
    except BenchError as exc:  # the backend itself did not start
        print(f"bench_peers: {exc}", file=sys.stderr)
        return 1
    meta: dict[str, object] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "versions": versions(),
        "loadgen": gen.name,
        "connections": SCENARIO.connections,
        "threads": SCENARIO.threads,
        "duration_s": a.duration,
        "warmup_s": a.warmup,
    }
    if a.json:
        print(json.dumps(to_json(rows, meta), indent=2))
    else:
        print(f"peers, {SCENARIO.name}, {a.duration:g}s per row after a {a.warmup:g}s warm-up, "
              f"{gen.name}, same backend and client")  # fmt: skip
        print(format_table(rows))
        ratio = cluster_ratio(rows)
        if ratio is not None:
            print(f"cluster / standalone (rule + rate limit): {ratio:.2f}x")
        print("targets:")
        for t in targets(rows):
            print(f"  {t.describe()}")
    if a.write is not None:
        write_docs(a.write, format_markdown(rows, meta))
        print(f"wrote {a.write}", file=sys.stderr)
    failed = [r.name for r in rows if r.error]
    if failed:
        print(f"bench_peers: FAILED rows: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
