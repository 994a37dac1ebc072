"""The probe runner against real sockets: the demo backend and small raw servers."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import pytest
import trio
import trio.testing

import lbshared
from lbnode.demo_backend import BackendState, serve_backend
from lbnode.probes import MAX_BODY, USER_AGENT, ProbeResult, check_target, run_probe, verdict
from lbshared.config import HealthCheck, HttpProbe, Schedule, StatusSet, TcpProbe

HOST = "127.0.0.1"


@pytest.fixture
async def backend(nursery: trio.Nursery) -> AsyncIterator[tuple[int, BackendState]]:
    state = BackendState("b1")
    port = await nursery.start(partial(serve_backend, HOST, 0, "b1", state=state))
    yield port, state


async def raw_server(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=HOST))
    return int(listeners[0].socket.getsockname()[1])


def closed_port() -> int:
    s = socket.socket()
    s.bind((HOST, 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


async def read_request(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_user_agent_names_the_version() -> None:
    assert USER_AGENT == f"lbnode-health/{lbshared.__version__}"


# ------------------------------------------------------------------ HTTP against the demo backend


async def test_http_probe_passes_then_fails_when_the_backend_flips(
    backend: tuple[int, BackendState],
) -> None:
    port, state = backend
    ok = await run_probe(HttpProbe(path="/health"), HOST, port, 2.0)
    assert (ok.ok, ok.reason, ok.status) == (True, "", 200)
    assert ok.latency > 0
    flip = await run_probe(HttpProbe(path="/admin/health/down", method="POST"), HOST, port, 2.0)
    assert flip.ok and not state.healthy
    down = await run_probe(HttpProbe(path="/health"), HOST, port, 2.0)
    assert (down.ok, down.reason, down.status) == (False, "status 503, expected 200-399", 503)
    exact = await run_probe(
        HttpProbe(path="/health", expected_status=StatusSet.parse(200)), HOST, port, 2.0
    )
    assert exact.reason == "status 503, expected 200"
    listed = await run_probe(
        HttpProbe(path="/health", expected_status=StatusSet.parse([200, 503])), HOST, port, 2.0
    )
    assert listed.ok


@pytest.mark.parametrize(
    ("expected_body", "ok"),
    [("ok", True), ("nope", False), ("/o+k/", True), ("/^down/", False), ("/^ok$/", True)],
)
async def test_expected_body_substring_or_regex(
    backend: tuple[int, BackendState], expected_body: str, ok: bool
) -> None:
    port, _ = backend
    result = await run_probe(
        HttpProbe(path="/health", expected_body=expected_body), HOST, port, 2.0
    )
    assert (result.ok, result.reason) == (ok, "" if ok else "body did not match")


async def test_request_headers_host_and_user_agent(backend: tuple[int, BackendState]) -> None:
    port, _ = backend
    default = HttpProbe(path="/headers",
                        expected_body=f'["user-agent","{USER_AGENT}"]')  # fmt: skip
    assert (await run_probe(default, HOST, port, 2.0)).ok
    host = HttpProbe(path="/headers", expected_body=f'["host","{HOST}:{port}"]')
    assert (await run_probe(host, HOST, port, 2.0)).ok
    headers = {"User-Agent": "custom/1", "X-Probe": "yes"}
    custom = HttpProbe(
        path="/headers",
        headers=headers,
        expected_body='/\\["User-Agent","custom/1"\\].*\\["X-Probe","yes"\\]/',
    )
    assert (await run_probe(custom, HOST, port, 2.0)).ok
    replaced = HttpProbe(path="/headers", headers=headers, expected_body=USER_AGENT)
    assert (await run_probe(replaced, HOST, port, 2.0)).reason == "body did not match"


async def test_the_probe_port_overrides_the_targets(backend: tuple[int, BackendState]) -> None:
    port, _ = backend
    result = await run_probe(HttpProbe(path="/health", port=port), HOST, closed_port(), 2.0)
    assert result.ok


# ------------------------------------------------------------------ TCP and connect failures


async def test_tcp_probe_connects_and_closes(backend: tuple[int, BackendState]) -> None:
    port, _ = backend
    result = await run_probe(TcpProbe(), HOST, port, 2.0)
    assert result == ProbeResult(True, "", result.latency, None)


@pytest.mark.parametrize("probe", [TcpProbe(), HttpProbe(path="/health")])
async def test_refused(probe: HttpProbe | TcpProbe) -> None:
    result = await run_probe(probe, HOST, closed_port(), 2.0)
    assert (result.ok, result.reason, result.status) == (False, "connect refused", None)


async def test_unresolvable_host() -> None:
    result = await run_probe(TcpProbe(), "no-such-host.invalid", 80, 2.0)
    assert (result.ok, result.reason) == (False, "cannot resolve no-such-host.invalid")


async def test_a_listener_that_never_answers_times_out(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await trio.sleep_forever()

    port = await raw_server(nursery, silent)
    result = await run_probe(HttpProbe(path="/health"), HOST, port, 2.0)
    assert (result.ok, result.reason, result.status) == (False, "timeout after 2s", None)
    assert result.latency == pytest.approx(2.0)
    result = await run_probe(HttpProbe(path="/health"), HOST, port, 0.5)
    assert result.reason == "timeout after 0.5s"


async def test_the_tcp_probes_own_timeout_wins(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # A connect that never completes (a black-holed address), without relying on the network.
    async def black_hole(host: str, port: int) -> trio.SocketStream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(trio, "open_tcp_stream", black_hole)
    result = await run_probe(TcpProbe(timeout=0.25), HOST, 80, 5.0)
    assert result.reason == "timeout after 0.25s"
    assert result.latency == pytest.approx(0.25)
    result = await run_probe(TcpProbe(), HOST, 80, 5.0)
    assert result.reason == "timeout after 5s"
    assert result.latency == pytest.approx(5.0)


# ------------------------------------------------------------------ misbehaving servers


async def test_closed_before_response(nursery: trio.Nursery) -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.aclose()

    port = await raw_server(nursery, hang_up)
    result = await run_probe(HttpProbe(path="/"), HOST, port, 2.0)
    assert (result.ok, result.reason) == (False, "connection closed before response")


async def test_not_http(nursery: trio.Nursery) -> None:
    async def garbage(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await stream.aclose()

    port = await raw_server(nursery, garbage)
    result = await run_probe(HttpProbe(path="/"), HOST, port, 2.0)
    assert not result.ok and result.reason.startswith("bad response: ")


@pytest.mark.parametrize(("needle_at", "ok"), [(0, True), (MAX_BODY - 6, True), (MAX_BODY, False)])
async def test_at_most_64k_of_body_is_matched(
    nursery: trio.Nursery, needle_at: int, ok: bool
) -> None:
    body = b"a" * needle_at + b"NEEDLE" + b"a" * (4 * MAX_BODY)

    async def big(stream: trio.SocketStream) -> None:
        await read_request(stream)
        head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body)
        try:
            await stream.send_all(head + body)
        except trio.BrokenResourceError:
            pass  # the probe stops reading once it has enough

    port = await raw_server(nursery, big)
    result = await run_probe(HttpProbe(path="/", expected_body="NEEDLE"), HOST, port, 2.0)
    assert (result.ok, result.reason) == (ok, "" if ok else "body did not match")


# ------------------------------------------------------------------ check_target and retries


async def flaky_server(nursery: trio.Nursery, failures: int) -> tuple[int, list[int]]:
    """Answers 503 to the first ``failures`` connections, then 200; counts connections."""
    seen = [0]

    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        seen[0] += 1
        status = b"503 Service Unavailable" if seen[0] <= failures else b"200 OK"
        await stream.send_all(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\n\r\n")
        await stream.aclose()

    return await raw_server(nursery, handler), seen


@pytest.mark.parametrize(("retry", "ok", "attempts"), [(0, False, 1), (1, False, 2),
                                                       (2, True, 3), (5, True, 3)])  # fmt: skip
async def test_retries_within_one_round(
    nursery: trio.Nursery, retry: int, ok: bool, attempts: int
) -> None:
    port, seen = await flaky_server(nursery, failures=2)
    schedule = Schedule(interval=10.0, timeout=1.0, retry=retry)
    hc = HealthCheck(path="/health", schedule=schedule)
    (result,) = await check_target(hc, HOST, port)
    assert (result.ok, result.attempts, seen[0]) == (ok, attempts, attempts)
    assert result.reason == ("" if ok else "status 503, expected 200-399")


async def test_check_target_runs_every_probe(backend: tuple[int, BackendState]) -> None:
    port, state = backend
    probes: list[HttpProbe | TcpProbe] = [
        TcpProbe(),
        HttpProbe(path="/health", expected_body="ok"),
        TcpProbe(port=closed_port()),
    ]
    hc = HealthCheck(probes=probes)
    results = await check_target(hc, HOST, port)
    assert [(r.ok, r.reason) for r in results] == [(True, ""), (True, ""),
                                                   (False, "connect refused")]  # fmt: skip
    assert verdict(results) == (False, "connect refused")
    state.healthy = False
    results = await check_target(hc, HOST, port)
    assert verdict(results) == (False, "status 503, expected 200-399")
    assert verdict(results[:1]) == (True, "")


async def test_check_target_default_forms(backend: tuple[int, BackendState]) -> None:
    port, _ = backend
    # no path: a TCP connect; with path: an HTTP GET; disabled: nothing
    (tcp,) = await check_target(HealthCheck(), HOST, port)
    assert tcp.ok and tcp.status is None
    (http,) = await check_target(HealthCheck(path="/health"), HOST, port)
    assert http.ok and http.status == 200
    assert await check_target(HealthCheck(enabled=False, path="/health"), HOST, port) == []
