"""The lbnode hop benchmark (``bench/run.py``, in ``make bench-all``): what does a hop cost?

Theory of operation
===================

For each scenario the same load runs twice, against the same fixed-response
backend (``bench/fast_backend.py``, far faster than the proxy):

* **direct**: load generator -> backend;
* **proxied**: load generator -> lbnode -> backend, once per HTTP/1.1
  implementation of the data path (``--http h11`` and ``--http httptools``
  by default, one row each);
* **bare h11**: load generator -> ``bench/bare_proxy.py`` (trio + h11 and
  nothing else) -> backend, the floor a trio + h11 proxy cannot go below.

The table shows requests/s and latency p50/p99 for each, the throughput ratio
(proxied / direct), the latency the hop adds at the median, and lbnode's
throughput relative to the bare proxy measured in the same run. The load
generator is wrk when it is on PATH (Debian's ``wrk``), else the bundled
``bench/loadgen.py``, whose report has wrk's shape, so one parser reads both.

Every process this script starts is stopped by its PID in a ``finally``
block (terminate, bounded wait, kill), and every wait is bounded.

Adding a benchmark
------------------

Append a :class:`Scenario` to ``SCENARIOS``. ``lb_extra`` is merged into the
load balancer's config for the proxied run (rules, rate limits, several
targets...), ``node_args`` adds lbnode arguments (``--redis URL``,
``--workers 2``). Scenarios with the same ``lb_extra``/``node_args`` share
one lbnode process. ``direct=False`` skips the baseline when it means
nothing (for example, a rule-matching scenario whose direct run would equal
the plain one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
HOST = "127.0.0.1"
# Bounds of every wait on a child process.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
#: PIDs of every process child() started, in order (bench_peers charges a
#: row the CPU time of the processes it started).
STARTED: list[int] = []
POLL_INTERVAL = 0.1
# The load generator gets this long beyond the run's duration before it is killed.
LOADGEN_GRACE = 30.0


@dataclass(frozen=True, slots=True)
class Scenario:
    """One benchmark: a load shape, and what the proxied run configures."""

    name: str
    connections: int
    threads: int
    description: str = ""
    path: str = "/"
    method: str = "GET"
    headers: tuple[str, ...] = ()
    body: str = ""
    direct: bool = True
    lb_extra: Mapping[str, object] = field(default_factory=dict)
    node_args: tuple[str, ...] = ()

    def node_key(self) -> str:
        """Scenarios with equal keys share one lbnode process."""
        return json.dumps([dict(self.lb_extra), list(self.node_args)], sort_keys=True)


SCENARIOS: list[Scenario] = [
    Scenario(
        name="64 conns, 2 threads",
        connections=64,
        threads=2,
        description="throughput: many keep-alive clients, pooled upstream connections",
    ),
    Scenario(
        name="1 conn, 1 thread",
        connections=1,
        threads=1,
        description="latency: one client in a closed loop; the added p50 is the hop's cost",
    ),
]


@dataclass(slots=True)
class Measurement:
    """What one load-generator run reported."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    socket_errors: int
    non_2xx_3xx: int


@dataclass(slots=True)
class Result:
    scenario: str
    connections: int
    threads: int
    http: str = "h11"  # lbnode's --http for the proxied run
    direct: Measurement | None = None
    proxied: Measurement | None = None
    bare: Measurement | None = None  # bench/bare_proxy.py: a bare trio + h11 proxy
    error: str | None = None

    def ratio_bare(self) -> float | None:
        if self.bare is None or self.proxied is None or not self.bare.rps:
            return None
        return self.proxied.rps / self.bare.rps

    def ratio_rps(self) -> float | None:
        if self.direct is None or self.proxied is None or not self.direct.rps:
            return None
        return self.proxied.rps / self.direct.rps

    def added_p50_ms(self) -> float | None:
        if self.direct is None or self.proxied is None:
            return None
        return self.proxied.p50_ms - self.direct.p50_ms

    def to_dict(self) -> dict[str, object]:
        doc = asdict(self)
        doc["ratio_rps"] = self.ratio_rps()
        doc["added_p50_ms"] = self.added_p50_ms()
        doc["ratio_bare"] = self.ratio_bare()
        return doc


class BenchError(Exception):
    """A process did not start or a run could not be measured."""


# -- processes ----------------------------------------------------------------------


def free_port() -> int:
    """A port that was free a moment ago on HOST."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@contextmanager
def child(argv: Sequence[str], name: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Run *argv*; stop it by PID on exit (terminate, bounded wait, kill).

    Its stdout and stderr go to a temp file, shown when it fails to start.
    """
    with tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=_child_env()
        )
    STARTED.append(proc.pid)
    try:
        yield proc, log_path
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        log_path.unlink(missing_ok=True)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    log: Path,
    what: str,
) -> None:
    """Poll *ready* until true; fail if *proc* exits or START_TIMEOUT passes."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode}:\n{_tail(log)}")
        if ready():
            return
        time.sleep(POLL_INTERVAL)
    raise BenchError(f"{what} not ready after {START_TIMEOUT:g}s:\n{_tail(log)}")


def port_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(url: str, timeout: float = 1.0) -> tuple[int, dict[str, str], bytes] | None:
    """(status, headers, body) of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (local URLs)
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()
    except (OSError, ValueError):
        return None


@contextmanager
def fast_backend() -> Iterator[int]:
    """Start bench/fast_backend.py on a free port; yield the port."""
    port = free_port()
    argv = [sys.executable, str(BENCH_DIR / "fast_backend.py"), "--host", HOST, "--port", str(port)]
    with child(argv, "backend") as (proc, log):
        wait_until(lambda: port_open(port), proc, log, "fast_backend")
        yield port


def lb_config(
    listen_port: int, backend_port: int, extra: Mapping[str, object]
) -> dict[str, object]:
    """The proxied run's config: one LB, one listener, the fast backend as its only target."""
    lb: dict[str, object] = {
        "name": "bench",
        "listeners": [{"protocol": "http", "port": listen_port}],
        "targets": [{"id": "fast", "address": f"{HOST}:{backend_port}"}],
    }
    lb.update(extra)
    return {"load_balancers": [lb]}


@contextmanager
def bare_proxy(backend_port: int, parser: str = "h11") -> Iterator[int]:
    """Start bench/bare_proxy.py (trio and ``parser``, h11 or httptools, nothing else)
    in front of the backend."""
    port = free_port()
    argv = [sys.executable, str(BENCH_DIR / "bare_proxy.py"), "--port", str(port),
            "--upstream", f"{HOST}:{backend_port}", "--parser", parser]  # fmt: skip
    with child(argv, "bare_proxy") as (proc, log):
        wait_until(lambda: port_open(port), proc, log, "bare_proxy")
        yield port


def healthz(admin: str) -> dict[str, object] | None:
    """A node's ``GET /healthz`` document (admin ``HOST:PORT``), or None unless it says 200."""
    reply = http_get(f"http://{admin}/healthz")
    if reply is None or reply[0] != 200:
        return None
    try:
        doc = json.loads(reply[2])
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def node_status(admin: str) -> object:
    """The ``status`` a node's ``/healthz`` reports ("serving"), or None."""
    doc = healthz(admin)
    return None if doc is None else doc.get("status")


def probe(url: str, log: Path, what: str) -> dict[str, str]:
    """GET ``url`` once; the response headers if the fast backend answered 200 through
    ``what``, else BenchError (with the tail of ``what``'s log)."""
    reply = http_get(url)
    if reply is None or reply[0] != 200 or reply[1].get("x-backend") != "fast":
        raise BenchError(f"a request through {what} did not reach the backend: {reply!r}\n"
                         f"{_tail(log)}")  # fmt: skip
    return reply[1]


@contextmanager
def lbnode(backend_port: int, scenario: Scenario, extra_args: Sequence[str]) -> Iterator[int]:
    """Start ``python -m lbnode`` in front of the backend; yield its listener port."""
    listen_port, admin_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="bench-lbnode-") as tmp:
        config = Path(tmp) / "bench.yaml"
        config.write_text(yaml.safe_dump(lb_config(listen_port, backend_port, scenario.lb_extra)))
        argv = [
            sys.executable, "-m", "lbnode",
            "--config", str(config),
            "--bind", HOST,
            "--admin", f"{HOST}:{admin_port}",
            "--access-log", "off",
            "--log-level", "warning",
            *scenario.node_args,
            *extra_args,
        ]  # fmt: skip
        with child(argv, "lbnode") as (proc, log):
            admin = f"{HOST}:{admin_port}"
            wait_until(lambda: node_status(admin) == "serving", proc, log, "lbnode")
            wait_until(lambda: port_open(listen_port), proc, log, "lbnode's listener")
            probe(f"http://{HOST}:{listen_port}{scenario.path}", log, "lbnode")
            yield listen_port


# -- load generators ------------------------------------------------------------------

_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_RE_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_RE_PCT = re.compile(r"^\s+(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\b", re.M)
_RE_REQUESTS = re.compile(r"^\s+(\d+) requests in", re.M)
_RE_SOCKET = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.M
)
_RE_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)", re.M)


def parse_report(text: str) -> Measurement:
    """Read wrk's ``--latency`` report (or loadgen.py's copy of it)."""
    rps = _RE_RPS.search(text)
    pcts = {int(p): float(v) * _TIME_UNITS[u] for p, v, u in _RE_PCT.findall(text)}
    if rps is None or 50 not in pcts or 99 not in pcts:
        raise BenchError(f"cannot read the load generator's report:\n{text}")
    requests = _RE_REQUESTS.search(text)
    sock = _RE_SOCKET.search(text)
    non2xx = _RE_NON2XX.search(text)
    return Measurement(
        rps=float(rps.group(1)),
        p50_ms=pcts[50],
        p99_ms=pcts[99],
        requests=int(requests.group(1)) if requests else 0,
        socket_errors=sum(int(g) for g in sock.groups()) if sock else 0,
        non_2xx_3xx=int(non2xx.group(1)) if non2xx else 0,
    )


class LoadGenerator:
    """wrk if available (or asked for), else bench/loadgen.py."""

    def __init__(self, choice: str) -> None:
        wrk = shutil.which("wrk")
        if choice == "wrk" and wrk is None:
            raise BenchError("--loadgen wrk: wrk is not on PATH")
        self.wrk = wrk if choice in ("auto", "wrk") else None
        self.name = "wrk" if self.wrk else "bench/loadgen.py"

    def argv(self, url: str, scenario: Scenario, duration: float, lua: Path | None) -> list[str]:
        threads = max(1, min(scenario.threads, scenario.connections))
        if self.wrk:
            argv = [
                self.wrk, "--latency", "--timeout", "2s",
                "-t", str(threads), "-c", str(scenario.connections),
                "-d", f"{max(1, round(duration))}s",
            ]  # fmt: skip
            for header in scenario.headers:
                argv += ["-H", header]
            if lua is not None:
                argv += ["-s", str(lua)]
            return [*argv, url]
        argv = [
            sys.executable, str(BENCH_DIR / "loadgen.py"),
            "-t", str(threads), "-c", str(scenario.connections),
            "-d", f"{duration:g}s", "-m", scenario.method,
        ]  # fmt: skip
        for header in scenario.headers:
            argv += ["-H", header]
        if scenario.body:
            argv += ["--body", scenario.body]
        return [*argv, url]

    def run(self, url: str, scenario: Scenario, duration: float) -> Measurement:
        with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
            lua = None
            if self.wrk and (scenario.method != "GET" or scenario.body):
                lua = Path(tmp) / "request.lua"
                lua.write_text(
                    f"wrk.method = {json.dumps(scenario.method)}\n"
                    f"wrk.body = {json.dumps(scenario.body)}\n"
                )
            argv = self.argv(url, scenario, duration, lua)
            try:
                done = subprocess.run(
                    argv, capture_output=True, text=True, timeout=duration + LOADGEN_GRACE,
                    cwd=REPO_ROOT,
                )  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                raise BenchError(f"{self.name} did not finish: {' '.join(argv)}") from exc
        if done.returncode != 0:
            raise BenchError(f"{self.name} failed ({done.returncode}):\n{done.stderr}{done.stdout}")
        return parse_report(done.stdout)


# -- the run ------------------------------------------------------------------------------


def measure(
    gen: LoadGenerator,
    port: int,
    scenario: Scenario,
    duration: float,
    warmup: float,
    host: str = HOST,
) -> Measurement:
    url = f"http://{host}:{port}{scenario.path}"
    if warmup > 0:
        gen.run(url, scenario, warmup)
    return gen.run(url, scenario, duration)


def run_all(
    scenarios: Sequence[Scenario],
    *,
    duration: float,
    warmup: float,
    gen: LoadGenerator,
    direct_only: bool,
    node_args: Sequence[str],
    progress: bool,
    impls: Sequence[str] = ("h11",),
) -> list[Result]:
    """Each scenario direct, through the bare proxy, and through lbnode once
    per implementation in ``impls``: one Result per (scenario, impl), the
    direct and bare measurements shared by a scenario's rows."""
    rows = {
        (s.name, impl): Result(s.name, s.connections, s.threads, impl)
        for s in scenarios
        for impl in impls
    }
    results = {s.name: rows[s.name, impls[0]] for s in scenarios}

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    with fast_backend() as backend_port:
        for scenario in scenarios:
            if scenario.direct:
                say(f"direct   {scenario.name} ...")
                results[scenario.name].direct = measure(
                    gen, backend_port, scenario, duration, warmup
                )
        if direct_only:
            return list(results.values())
        with bare_proxy(backend_port) as bare_port:
            for scenario in scenarios:
                if scenario.direct and not scenario.lb_extra and not scenario.node_args:
                    say(f"bare     {scenario.name} ...")
                    results[scenario.name].bare = measure(
                        gen, bare_port, scenario, duration, warmup
                    )
        for (name, _), row in rows.items():
            row.direct, row.bare = results[name].direct, results[name].bare
        groups: dict[str, list[Scenario]] = {}
        for scenario in scenarios:
            groups.setdefault(scenario.node_key(), []).append(scenario)
        for group in groups.values():
            for impl in impls:
                try:
                    with ExitStack() as stack:
                        args = [*node_args, "--http", impl]
                        port = stack.enter_context(lbnode(backend_port, group[0], args))
                        for scenario in group:
                            say(f"proxied  {scenario.name} (--http {impl}) ...")
                            rows[scenario.name, impl].proxied = measure(
                                gen, port, scenario, duration, warmup
                            )
                except BenchError as exc:
                    for scenario in group:
                        if rows[scenario.name, impl].proxied is None:
                            rows[scenario.name, impl].error = str(exc)
    return list(rows.values())


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: Sequence[Result]) -> str:
    header = (
        "scenario", "--http", "direct rps", "p50 ms", "p99 ms",
        "proxied rps", "p50 ms", "p99 ms", "proxied/direct", "added p50 ms",
        "bare h11 rps", "lbnode/bare",
    )  # fmt: skip
    rows = [header]
    for r in results:
        d, p = r.direct, r.proxied
        ratio = r.ratio_rps()
        added = r.added_p50_ms()
        rows.append((
            r.scenario, r.http,
            _fmt(d.rps if d else None, ",.0f"), _fmt(d.p50_ms if d else None, ".3f"),
            _fmt(d.p99_ms if d else None, ".3f"),
            _fmt(p.rps if p else None, ",.0f"), _fmt(p.p50_ms if p else None, ".3f"),
            _fmt(p.p99_ms if p else None, ".3f"),
            "-" if ratio is None else f"{ratio:.2f}x",
            "-" if added is None else f"{added:+.3f}",
            _fmt(r.bare.rps if r.bare else None, ",.0f"),
            "-" if r.ratio_bare() is None else f"{r.ratio_bare():.2f}x",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(row[2:], widths[2:], strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = []
    for r in results:
        for label, m in (("direct", r.direct), ("proxied", r.proxied)):
            if m is not None and (m.socket_errors or m.non_2xx_3xx):
                notes.append(
                    f"note: {r.scenario} [{r.http}] ({label}): {m.socket_errors} socket errors, "
                    f"{m.non_2xx_3xx} non-2xx/3xx responses of {m.requests}"
                )
        if r.error:
            notes.append(f"note: {r.scenario} [{r.http}] (proxied) not measured: {r.error}")
    return "\n".join(lines + notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="lbnode benchmark: direct vs through lbnode")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each run (1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--scenario", action="append", default=[], metavar="NAME", help="run only these"
    )
    parser.add_argument("--direct-only", action="store_true", help="skip lbnode")
    parser.add_argument(
        "--node-arg", action="append", default=[], metavar="ARG", help="extra lbnode argument"
    )
    parser.add_argument(
        "--http", action="append", choices=("h11", "httptools"), metavar="IMPL",
        help="lbnode's HTTP/1.1 implementation for the proxied runs, one row each "
        "(repeatable; default: h11 and httptools)",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)

    if args.list:
        for s in SCENARIOS:
            print(f"{s.name}: {s.description}")
        return 0
    scenarios = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    if not scenarios:
        parser.error(f"no scenario named {args.scenario}; see --list")
    try:
        gen = LoadGenerator(args.loadgen)
        results = run_all(
            scenarios,
            duration=args.duration,
            warmup=args.warmup,
            gen=gen,
            direct_only=args.direct_only,
            node_args=args.node_arg,
            progress=not args.json,
            impls=args.http or ("h11", "httptools"),
        )
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    meta = {
        "loadgen": gen.name,
        "duration_s": args.duration,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    if args.json:
        print(json.dumps({"meta": meta, "results": [r.to_dict() for r in results]}, indent=2))
    else:
        print(
            f"lbnode benchmark: {args.duration:g}s per run, load generator {gen.name}, "
            f"{meta['cpus']} CPUs (load generator, lbnode and backend share them)"
        )
        print(format_table(results))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
