"""A bundled HTTP/1.1 load generator, used by ``bench/run.py`` when wrk is missing.

Theory of operation
===================

Closed-loop load like wrk's: each of ``-c`` keep-alive connections sends one
request, waits for the whole response, records the latency and sends the next,
until ``-d`` seconds have passed. Connections are split over ``-t`` worker
processes (a Python process saturates one core long before wrk does, so
"threads" are processes here); each worker runs one asyncio loop with a
``Protocol`` per connection, which parses responses (``Content-Length``,
chunked, or close-delimited) straight from the received bytes.

The report has wrk's ``--latency`` shape, so ``bench/run.py`` parses both with
the same code::

    Running 10s test @ http://127.0.0.1:8080/
      2 threads and 64 connections
      Thread Stats   Avg      Stdev     Max   +/- Stdev
        Latency     1.02ms  300.00us   9.87ms   80.00%
      Latency Distribution
         50%    0.98ms
         75%    1.10ms
         90%    1.30ms
         99%    2.40ms
      123456 requests in 10.00s, 12.34MB read
      Socket errors: connect 0, read 0, write 0, timeout 0   (only when non-zero)
      Non-2xx or 3xx responses: 12                          (only when non-zero)
    Requests/sec:  12345.67
    Transfer/sec:      1.23MB

``--json`` prints one JSON object instead (requests, duration, rps, latency
percentiles in milliseconds, errors, non_2xx_3xx).

Like wrk (without its corrected-latency mode) this measures a closed loop:
latency percentiles are per completed request, with no coordinated-omission
correction.

Usage: ``python bench/loadgen.py -c 64 -t 2 -d 10 [-H 'Name: value'] [--json] URL``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import sys
import time
from array import array
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

# Percentiles reported, as wrk --latency does.
PERCENTILES = (50.0, 75.0, 90.0, 99.0)
# Upper bound of one head; a larger one is a broken server.
MAX_HEAD = 65536


@dataclass(slots=True)
class Errors:
    """Socket error counts, named as wrk names them."""

    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0

    def total(self) -> int:
        return self.connect + self.read + self.write + self.timeout


@dataclass(slots=True)
class WorkerResult:
    """What one worker process measured."""

    requests: int = 0
    bytes_read: int = 0
    non_2xx_3xx: int = 0
    errors: Errors = field(default_factory=Errors)
    latencies: bytes = b""  # array('d') of seconds, as bytes (cheap to pickle)


class _Conn(asyncio.Protocol):
    """One keep-alive client connection in a closed loop."""

    def __init__(self, worker: _Worker) -> None:
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.sent_at = 0.0
        self.remaining = -1  # body bytes still expected; -1: reading a head
        self.chunked = False
        self.until_close = False
        self.status = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send()

    def data_received(self, data: bytes) -> None:
        self.worker.result.bytes_read += len(data)
        self.buf = self.buf + data if self.buf else data
        try:
            while self.transport is not None and self._parse():
                pass
        except ValueError:
            self.worker.result.errors.read += 1
            self._close()

    def eof_received(self) -> bool | None:
        if self.until_close and self.remaining == -2:
            self._complete()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.until_close and self.remaining == -2:
            self._complete()
        elif self.sent_at and not self.worker.stopping:
            # Lost mid-exchange: a read error (wrk counts it the same way).
            self.worker.result.errors.read += 1
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)

    # -- the loop -------------------------------------------------------------------

    def _send(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if self.worker.stopping:
            self._close()
            return
        self.sent_at = time.perf_counter()
        transport.write(self.worker.request)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _complete(self) -> None:
        now = time.perf_counter()
        result = self.worker.result
        result.requests += 1
        self.worker.latencies.append(now - self.sent_at)
        if not 200 <= self.status < 400:
            result.non_2xx_3xx += 1
        self.sent_at = 0.0
        self.remaining = -1
        self.chunked = False
        if self.until_close:
            self.until_close = False
            self._close()
            return
        self._send()

    def _parse(self) -> bool:
        """Consume what the buffer holds of the current response; True to go on."""
        buf = self.buf
        if self.remaining == -1:  # the head
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise ValueError("head too large")
                return False
            head = buf[:end].lower()
            self.buf = buf = buf[end + 4 :]
            if not head.startswith(b"http/1."):
                raise ValueError("not an HTTP/1 response")
            self.status = int(head[9:12])
            if 100 <= self.status < 200:
                return True  # informational: the real head follows
            if self.worker.head_only or self.status in (204, 304):
                self.remaining = 0
            elif b"\r\ntransfer-encoding:" in head and b"chunked" in head:
                self.chunked = True
                self.remaining = 0
            else:
                i = head.find(b"\r\ncontent-length:")
                if i >= 0:
                    j = head.find(b"\r\n", i + 17)
                    self.remaining = int(head[i + 17 : j if j >= 0 else len(head)])
                else:
                    self.until_close = True
                    self.remaining = -2
            if b"\r\nconnection: close" in head:
                self.until_close = True
            if self.remaining == 0 and not self.chunked:
                self._complete()
                return bool(self.buf)
            return True
        if self.remaining == -2:  # close-delimited body: wait for EOF
            self.buf = b""
            return False
        if self.chunked:
            return self._parse_chunks()
        take = min(self.remaining, len(buf))
        self.remaining -= take
        self.buf = buf[take:]
        if self.remaining == 0:
            self._complete()
            return bool(self.buf)
        return False

    def _parse_chunks(self) -> bool:
        buf = self.buf
        if self.remaining > 0:  # inside a chunk's data (+ its CRLF)
            take = min(self.remaining, len(buf))
            self.remaining -= take
            self.buf = buf[take:]
            return bool(self.buf) and self.remaining == 0
        line_end = buf.find(b"\r\n")
        if line_end < 0:
            return False
        size = int(buf[:line_end].split(b";", 1)[0], 16)
        if size == 0:  # last chunk, optional trailers, blank line
            trailer_end = buf.find(b"\r\n\r\n", line_end)
            if trailer_end < 0:
                return False
            self.buf = buf[trailer_end + 4 :]
            self._complete()
            return bool(self.buf)
        self.remaining = size + 2
        self.buf = buf[line_end + 2 :]
        return bool(self.buf)


class _Worker:
    """One process's share of the connections."""

    def __init__(self, request: bytes, head_only: bool) -> None:
        self.request = request
        self.head_only = head_only
        self.stopping = False
        self.result = WorkerResult()
        self.latencies = array("d")

    async def _connection(
        self, host: str, port: int, deadline: float, connect_timeout: float
    ) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping and loop.time() < deadline:
            try:
                _, conn = await asyncio.wait_for(
                    loop.create_connection(lambda: _Conn(self), host, port), connect_timeout
                )
            except TimeoutError:
                self.result.errors.timeout += 1
                continue
            except OSError:
                self.result.errors.connect += 1
                await asyncio.sleep(0.05)  # a refused port should not spin the loop
                continue
            await conn.closed

    async def run(
        self, host: str, port: int, connections: int, duration: float, io_timeout: float
    ) -> WorkerResult:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + duration
        tasks = [
            asyncio.create_task(self._connection(host, port, deadline, io_timeout))
            for _ in range(connections)
        ]
        await asyncio.sleep(duration)
        self.stopping = True
        # In-flight requests get `io_timeout` to finish, then count as timeouts.
        done, pending = await asyncio.wait(tasks, timeout=io_timeout)
        for task in pending:
            task.cancel()
        self.result.errors.timeout += len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
        self.result.latencies = self.latencies.tobytes()
        return self.result


def _worker_main(args: tuple[str, int, bytes, bool, int, float, float]) -> WorkerResult:
    host, port, request, head_only, connections, duration, timeout = args
    worker = _Worker(request, head_only)
    return asyncio.run(worker.run(host, port, connections, duration, timeout))


def build_request(
    url: str, method: str, headers: list[str], body: bytes
) -> tuple[str, int, bytes]:
    """Return (host, port, raw request bytes) for *url*."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise SystemExit(f"loadgen: only http:// URLs are supported, not {url!r}")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    names = {h.split(":", 1)[0].strip().lower() for h in headers}
    lines = [f"{method} {target} HTTP/1.1"]
    if "host" not in names:
        lines.append(f"Host: {parts.netloc}")
    lines.extend(headers)
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def percentile(sorted_values: array[float] | list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def format_time(seconds: float) -> str:
    """A duration the way wrk prints it: ``842.00us``, ``1.66ms``, ``1.20s``."""
    us = seconds * 1e6
    if us < 1000:
        return f"{us:.2f}us"
    if us < 1e6:
        return f"{us / 1000:.2f}ms"
    return f"{us / 1e6:.2f}s"


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.2f}{unit}"
        n /= 1024
    return f"{n:.2f}GB"  # pragma: no cover


@dataclass(slots=True)
class Summary:
    """The result of one run (``--json`` prints it as a dict)."""

    url: str
    connections: int
    threads: int
    duration_s: float
    requests: int
    bytes_read: int
    rps: float
    transfer_per_s: float
    latency_ms: dict[str, float]
    errors: Errors
    non_2xx_3xx: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def run(
    url: str,
    *,
    connections: int,
    threads: int,
    duration: float,
    timeout: float = 2.0,
    method: str = "GET",
    headers: list[str] | None = None,
    body: bytes = b"",
) -> Summary:
    """Run the load against *url* and summarise it."""
    threads = max(1, min(threads, connections))
    host, port, request = build_request(url, method, headers or [], body)
    share = [connections // threads + (i < connections % threads) for i in range(threads)]
    jobs = [(host, port, request, method == "HEAD", n, duration, timeout) for n in share]
    if threads == 1:
        results = [_worker_main(jobs[0])]
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(threads) as pool:
            results = pool.map(_worker_main, jobs)
    latencies = array("d")
    errors = Errors()
    requests = bytes_read = non_ok = 0
    for res in results:
        part = array("d")
        part.frombytes(res.latencies)
        latencies.extend(part)
        requests += res.requests
        bytes_read += res.bytes_read
        non_ok += res.non_2xx_3xx
        errors.connect += res.errors.connect
        errors.read += res.errors.read
        errors.write += res.errors.write
        errors.timeout += res.errors.timeout
    ordered = sorted(latencies)
    n = len(ordered)
    mean = sum(ordered) / n if n else 0.0
    stdev = math.sqrt(sum((x - mean) ** 2 for x in ordered) / n) if n else 0.0
    within = sum(1 for x in ordered if abs(x - mean) <= stdev) / n * 100 if n else 0.0
    latency = {
        "avg": mean * 1e3,
        "stdev": stdev * 1e3,
        "max": (ordered[-1] if n else 0.0) * 1e3,
        "within_stdev_pct": within,
    }
    for p in PERCENTILES:
        latency[f"p{p:g}"] = percentile(ordered, p) * 1e3
    return Summary(
        url=url,
        connections=connections,
        threads=threads,
        duration_s=duration,
        requests=requests,
        bytes_read=bytes_read,
        rps=requests / duration if duration else 0.0,
        transfer_per_s=bytes_read / duration if duration else 0.0,
        latency_ms=latency,
        errors=errors,
        non_2xx_3xx=non_ok,
    )


def format_report(summary: Summary) -> str:
    """The summary in wrk's ``--latency`` text shape."""
    lat = summary.latency_ms
    err = summary.errors
    ms = 1e-3
    lines = [
        f"Running {summary.duration_s:g}s test @ {summary.url}",
        f"  {summary.threads} threads and {summary.connections} connections",
        "  Thread Stats   Avg      Stdev     Max   +/- Stdev",
        f"    Latency   {format_time(lat['avg'] * ms):>8} {format_time(lat['stdev'] * ms):>8} "
        f"{format_time(lat['max'] * ms):>8} {lat['within_stdev_pct']:>8.2f}%",
        "  Latency Distribution",
    ]
    for p in PERCENTILES:
        lines.append(f"  {p:>4g}%  {format_time(lat[f'p{p:g}'] * ms):>8}")
    lines.append(
        f"  {summary.requests} requests in {summary.duration_s:.2f}s, "
        f"{format_bytes(summary.bytes_read)} read"
    )
    if err.total():
        lines.append(
            f"  Socket errors: connect {err.connect}, read {err.read}, "
            f"write {err.write}, timeout {err.timeout}"
        )
    if summary.non_2xx_3xx:
        lines.append(f"  Non-2xx or 3xx responses: {summary.non_2xx_3xx}")
    lines.append(f"Requests/sec: {summary.rps:>10.2f}")
    lines.append(f"Transfer/sec: {format_bytes(summary.transfer_per_s):>10}")
    return "\n".join(lines)


def parse_duration(text: str) -> float:
    """``10``, ``10s``, ``500ms``, ``1m`` -> seconds (wrk's -d accepts the suffixed forms)."""
    text = text.strip().lower()
    for suffix, scale in (("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HTTP/1.1 keep-alive load generator (wrk-like)")
    parser.add_argument("url")
    parser.add_argument("-c", "--connections", type=int, default=10)
    parser.add_argument("-t", "--threads", type=int, default=2, help="worker processes")
    parser.add_argument("-d", "--duration", default="10s", help="e.g. 10, 10s, 500ms, 1m")
    parser.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("-m", "--method", default="GET")
    parser.add_argument("--body", default="", help="request body (sent with Content-Length)")
    parser.add_argument("--timeout", default="2s", help="connect / final-drain timeout")
    parser.add_argument("--latency", action="store_true", help="accepted for wrk compatibility")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    args = parser.parse_args(argv)
    if args.connections < 1:
        parser.error("need at least one connection")
    summary = run(
        args.url,
        connections=args.connections,
        threads=args.threads,
        duration=parse_duration(args.duration),
        timeout=parse_duration(args.timeout),
        method=args.method.upper(),
        headers=args.header,
        body=args.body.encode(),
    )
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(format_report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
