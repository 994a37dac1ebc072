"""Active health probes: one HTTP or TCP check against a target, over trio.

Theory of operation
-------------------
``run_probe`` performs one probe and never raises for a target's failure:
the outcome is a ``ProbeResult(ok, reason, latency, status)`` whose
``reason`` is what operators read in events and ``lbctl health``:

=====================================  =======================================
``connect refused``                    nothing listens on the port
``timeout after 2s``                   connect + exchange exceeded the timeout
``status 503, expected 200-399``       the status is not in ``expected_status``
``body did not match``                 ``expected_body`` not found in the body
``connection closed before response``  the target hung up without answering
``bad response: ...``                  not HTTP/1.x (h11's complaint follows)
``cannot resolve HOST``, ``host unreachable``, ``connect failed: ...``
=====================================  =======================================

HTTP probes speak HTTP/1.1 through ``h11`` on a fresh ``trio`` TCP stream
(no pooling: a probe must see what a new client would see). The request is
``METHOD path`` with ``Host: host:port`` (the address probed),
``User-Agent: lbnode-health/VERSION`` and ``Connection: close``; headers of
the probe replace these by name (case-insensitive) or add to them. Only when
the probe has ``expected_body`` is the body read, at most ``MAX_BODY``
bytes; it is decoded as UTF-8 (errors replaced) and searched for the
substring, or for the regex when written ``/regex/``. Then the stream is
closed, whatever was left unread. TCP probes connect and close.

The whole probe - name resolution, connect, request, response - runs under
one deadline (``timeout``; a TCP probe's own ``timeout`` wins). ``latency``
is the elapsed ``trio.current_time()``, so under a mock clock it is exact.

``check_target`` runs every effective probe of a ``HealthCheck``
concurrently; each failed probe is retried at once up to the schedule's
``retry`` times, and only if every attempt failed does it count as one
failure (``ProbeResult.attempts`` says how many were made). The target
passes the round when all its probes pass; ``verdict(results)`` gives that
``(ok, reason)`` pair for ``Hysteresis.observe``.
"""

from __future__ import annotations

import errno
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

import h11
import trio

import lbshared
from lbshared.config import HealthCheck, HttpProbe, TcpProbe

__all__ = [
    "MAX_BODY",
    "USER_AGENT",
    "ProbeResult",
    "check_target",
    "run_probe",
    "run_with_retry",
    "verdict",
]

#: Default User-Agent of HTTP probes.
USER_AGENT: Final = f"lbnode-health/{lbshared.__version__}"
#: Most body bytes read for ``expected_body`` matching.
MAX_BODY: Final = 64 * 1024
# Bytes asked of the socket per receive.
_RECEIVE_SIZE: Final = 16 * 1024
# Most response-head bytes h11 buffers before declaring the response bad.
_MAX_HEAD: Final = 64 * 1024

# Connect errnos with a reason of their own; other OSErrors read "connect failed: <strerror>".
_CONNECT_REASONS: Final = {
    errno.ECONNREFUSED: "connect refused",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ECONNRESET: "connection reset",
    errno.ETIMEDOUT: "connect timed out",
}


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one probe (after retries, when from ``check_target``)."""

    ok: bool
    reason: str  # "" when ok
    latency: float  # seconds, of the last attempt
    status: int | None = None  # HTTP status, if a response head arrived
    attempts: int = 1


def _secs(x: float) -> str:
    return f"{x:g}s"


def _host_header(host: str, port: int) -> bytes:
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode("ascii")


@lru_cache(maxsize=256)
def _body_matcher(expected: str) -> Callable[[str], bool]:
    """A predicate for ``expected_body``: substring, or ``/regex/`` searched (compiled once)."""
    if len(expected) >= 2 and expected[0] == expected[-1] == "/":
        return re.compile(expected[1:-1]).search  # type: ignore[return-value]
    return lambda text: expected in text


@lru_cache(maxsize=256)
def _request_headers(
    host_header: bytes, extra: tuple[tuple[str, str], ...]
) -> tuple[tuple[bytes, bytes], ...]:
    names = {k.lower() for k, _ in extra}
    base = [(b"host", host_header), (b"user-agent", USER_AGENT.encode()),
            (b"connection", b"close")]  # fmt: skip
    out = [(k, v) for k, v in base if k.decode() not in names]
    out.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in extra)
    return tuple(out)


def _connect_reason(exc: OSError, host: str) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host}"
    # trio.open_tcp_stream wraps the per-address failures in an ExceptionGroup.
    causes: list[BaseException] = [exc]
    group = exc.__cause__
    if isinstance(group, BaseExceptionGroup):
        causes = list(group.exceptions)
    for cause in causes:
        if isinstance(cause, OSError) and cause.errno in _CONNECT_REASONS:
            return _CONNECT_REASONS[cause.errno]
    first = causes[0]
    text = first.strerror if isinstance(first, OSError) and first.strerror else str(first)
    return f"connect failed: {text}"


async def _http_exchange(
    stream: trio.abc.Stream, probe: HttpProbe, host: str, port: int
) -> tuple[bool, str, int | None]:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
    headers = _request_headers(_host_header(host, port), tuple(probe.headers.items()))
    request = h11.Request(method=probe.method, target=probe.path, headers=list(headers))
    data = conn.send(request) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
    response: h11.Response | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            received = await stream.receive_some(_RECEIVE_SIZE)
            if not received and response is None:
                return False, "connection closed before response", None
            conn.receive_data(bytes(received))
            continue
        if type(event) is h11.Response:
            response = event
            status = event.status_code
            if status not in probe.expected_status:
                return False, f"status {status}, expected {probe.expected_status}", status
            if probe.expected_body is None:
                return True, "", status
        elif type(event) is h11.Data:
            body += event.data
            if len(body) >= MAX_BODY:
                break
        elif type(event) is h11.EndOfMessage:
            break
        elif type(event) is h11.ConnectionClosed:
            break
        # InformationalResponse (1xx): keep reading
    assert response is not None and probe.expected_body is not None
    text = bytes(body[:MAX_BODY]).decode("utf-8", "replace")
    if _body_matcher(probe.expected_body)(text):
        return True, "", response.status_code
    return False, "body did not match", response.status_code


# A timeout parameter (ASYNC109) on purpose: running out of time is a probe outcome, not an error.
async def run_probe(
    probe: HttpProbe | TcpProbe,
    host: str,
    port: int,
    timeout: float,  # noqa: ASYNC109
) -> ProbeResult:
    """Probe ``host``:``port`` (or the probe's own port) once, within ``timeout`` seconds."""
    port = probe.port or port
    if isinstance(probe, TcpProbe) and probe.timeout is not None:
        timeout = probe.timeout
    start = trio.current_time()
    ok, reason, status = False, f"timeout after {_secs(timeout)}", None
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            ok, reason = False, _connect_reason(exc, host)
        else:
            try:
                if isinstance(probe, HttpProbe):
                    ok, reason, status = await _http_exchange(stream, probe, host, port)
                else:
                    ok, reason = True, ""
            except h11.RemoteProtocolError as exc:
                ok, reason = False, f"bad response: {exc}"
            except (h11.LocalProtocolError, UnicodeEncodeError) as exc:
                ok, reason = False, f"bad probe request: {exc}"
            except (trio.BrokenResourceError, OSError):
                ok, reason = False, "connection reset"
            finally:
                await trio.aclose_forcefully(stream)
    return ProbeResult(ok, reason, trio.current_time() - start, status)


async def run_with_retry(
    probe: HttpProbe | TcpProbe,
    host: str,
    port: int,
    timeout: float,  # noqa: ASYNC109
    retry: int,
) -> ProbeResult:
    """``run_probe`` retried at once up to ``retry`` times while it fails."""
    attempts = 0
    while True:
        attempts += 1
        result = await run_probe(probe, host, port, timeout)
        if result.ok or attempts > retry:
            return ProbeResult(result.ok, result.reason, result.latency, result.status, attempts)


async def check_target(health_check: HealthCheck, host: str, port: int) -> list[ProbeResult]:
    """One probe round: every effective probe, concurrently, in probe order.

    Returns ``[]`` when the health check is disabled.
    """
    if not health_check.enabled:
        return []
    probes = health_check.effective_probes()
    schedule = health_check.effective_schedule()
    results: list[ProbeResult | None] = [None] * len(probes)

    async def one(i: int, probe: HttpProbe | TcpProbe) -> None:
        results[i] = await run_with_retry(probe, host, port, schedule.timeout, schedule.retry)

    if len(probes) == 1:
        await one(0, probes[0])
    else:
        async with trio.open_nursery() as nursery:
            for i, probe in enumerate(probes):
                nursery.start_soon(one, i, probe)
    return [r for r in results if r is not None]


def verdict(results: Sequence[ProbeResult]) -> tuple[bool, str]:
    """``(ok, reason)`` of a round: ok when every probe passed, else the first failure's reason."""
    for r in results:
        if not r.ok:
            return False, r.reason
    return True, ""
