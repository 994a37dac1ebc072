"""Active health checks, passive ejection and circuit breakers on one node (standalone)."""

from __future__ import annotations

import functools
from typing import Any

import trio

from lbnode.api import HttpRequest
from lbnode.demo_backend import BackendState, serve_backend
from lbnode.node import Node, NodeOptions
from lbshared.config import parse_config


async def backends(nursery: trio.Nursery, n: int) -> tuple[list[int], list[BackendState]]:
    ports, states = [], []
    for i in range(n):
        state = BackendState(f"b{i}")
        ports.append(await nursery.start(functools.partial(serve_backend, state=state), "127.0.0.1", 0, f"b{i}"))
        states.append(state)
    return ports, states


def config(ports: list[int], **lb: Any) -> Any:
    return parse_config(
        {
            "load_balancers": [
                {
                    "name": "h",
                    "targets": [
                        {"id": f"b{i}", "address": f"127.0.0.1:{p}"} for i, p in enumerate(ports)
                    ],
                    **lb,
                }
            ]
        }
    )


async def wait_until(pred: Any, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


async def test_a_failing_target_goes_down_after_its_threshold_and_comes_back() -> None:
    async with trio.open_nursery() as nursery:
        ports, states = await backends(nursery, 2)
        cfg = config(ports, health_check={"path": "/health", "interval": "100ms", "timeout": "1s",
                                          "healthy_threshold": 2, "unhealthy_threshold": 2})
        node = await nursery.start(Node(cfg, NodeOptions(admin=None, access_log="off")).run)
        sub = node.feed.subscribe()
        states[1].healthy = False  # /health now answers 503
        await wait_until(lambda: not node.runtimes["h"].by_id["b1"].healthy)
        with trio.fail_after(5):
            event = await sub.recv.receive()
        assert (event["type"], event["target"]) == ("unhealthy", "b1")
        assert event["reason"].startswith("status 503, expected 200-399")
        for _ in range(10):  # no traffic to the unhealthy target
            r = await node.route(HttpRequest(path="/"))
            assert r.header("x-backend") == "b0"
        health = {h["target"]: h for h in node.health.get_health("h")}
        assert health["b1"]["state"] == "unhealthy" and health["b1"]["last_probes"]
        assert health["b0"]["state"] == "healthy" and health["b1"]["breaker"] == "disabled"
        states[1].healthy = True
        await wait_until(lambda: node.runtimes["h"].by_id["b1"].healthy)
        with trio.fail_after(5):
            event = await sub.recv.receive()
        assert (event["type"], event["target"]) == ("healthy", "b1")
        assert sub.recv.statistics().current_buffer_used == 0  # exactly one event each way
        node.stop()
        nursery.cancel_scope.cancel()


async def test_initial_state_unhealthy_waits_for_probes() -> None:
    async with trio.open_nursery() as nursery:
        ports, _ = await backends(nursery, 1)
        cfg = config(ports, health_check={"path": "/health", "interval": "100ms",
                                          "healthy_threshold": 2, "initial_state": "unhealthy"})
        node = await nursery.start(Node(cfg, NodeOptions(admin=None, access_log="off")).run)
        first = await node.route(HttpRequest(path="/"))
        assert first.status == 503 and first.text == "503 no healthy target\n"
        await wait_until(lambda: node.runtimes["h"].by_id["b0"].healthy)
        assert (await node.route(HttpRequest(path="/"))).status == 200
        node.stop()
        nursery.cancel_scope.cancel()


async def test_tcp_probe_without_path_reports_connect_refused() -> None:
    async with trio.open_nursery() as nursery:
        ports, _ = await backends(nursery, 1)
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
        s.close()
        cfg = config([ports[0], dead], health_check={"interval": "100ms", "unhealthy_threshold": 1})
        node = await nursery.start(Node(cfg, NodeOptions(admin=None, access_log="off")).run)
        await wait_until(lambda: not node.runtimes["h"].by_id["b1"].healthy)
        view = {h["target"]: h for h in node.health.get_health("h")}["b1"]
        assert view["reason"].startswith("connect refused")
        node.stop()
        nursery.cancel_scope.cancel()


async def test_override_down_drains_and_auto_hands_back() -> None:
    async with trio.open_nursery() as nursery:
        ports, _ = await backends(nursery, 2)
        node = await nursery.start(Node(config(ports), NodeOptions(admin=None, access_log="off")).run)
        await node.health.set_health("h", "b0", "down")
        assert {(await node.route(HttpRequest(path="/"))).header("x-backend") for _ in range(6)} == {"b1"}
        await node.health.set_health("h", "b0", "auto")
        assert {(await node.route(HttpRequest(path="/"))).header("x-backend") for _ in range(6)} == {"b0", "b1"}
        results = await node.health.check_health("h", "b0")
        assert results and results[0]["ok"]
        node.stop()
        nursery.cancel_scope.cancel()


async def test_passive_detection_ejects_a_target_that_keeps_failing() -> None:
    async with trio.open_nursery() as nursery:
        ports, states = await backends(nursery, 2)
        node = await nursery.start(Node(config(ports), NodeOptions(admin=None, access_log="off")).run)
        for _ in range(12):  # b0 and b1 alternate; only /status/500 fails, on both
            await node.route(HttpRequest(path="/status/500"))
        ejected = [t.id for t in node.runtimes["h"].targets if t.ejected_until > trio.current_time() - 1e9
                   and t.ejected_until > 0]
        assert len(ejected) == 1  # never more than half of the group
        node.stop()
        nursery.cancel_scope.cancel()


async def test_breaker_opens_on_error_rate_then_half_opens_and_closes() -> None:
    async with trio.open_nursery() as nursery:
        ports, _ = await backends(nursery, 1)
        cfg = config(ports, circuit_breaker={"threshold": 0.5, "min_requests": 4, "interval": "10s",
                                             "half_open_timeout": "300ms"})
        node = await nursery.start(Node(cfg, NodeOptions(admin=None, access_log="off")).run)
        sub = node.feed.subscribe()
        for _ in range(4):
            assert (await node.route(HttpRequest(path="/status/500"))).status == 500
        with trio.fail_after(5):
            opened = await sub.recv.receive()
        assert opened["type"] == "circuit_open" and "error rate 100%" in opened["reason"]
        refused = await node.route(HttpRequest(path="/"))
        assert refused.status == 503 and refused.text == "503 circuit breaker open\n"
        with trio.fail_after(5):
            half = await sub.recv.receive()
        assert half["type"] == "circuit_half_open"
        for _ in range(3):  # the trials succeed
            assert (await node.route(HttpRequest(path="/"))).status == 200
        with trio.fail_after(5):
            closed = await sub.recv.receive()
        assert closed["type"] == "circuit_closed"
        assert (await node.route(HttpRequest(path="/"))).status == 200
        node.stop()
        nursery.cancel_scope.cancel()
