"""A target that dies under its pooled connections: requests without a body go elsewhere."""

from __future__ import annotations

import pytest
import trio

import lbnode.upstream
from lbnode.api import HttpRequest
from lbnode.demo_backend import serve_backend
from lbnode.node import Node, NodeOptions
from lbshared.config import parse_config


async def test_a_request_on_a_dead_pooled_connection_is_served_by_another_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Skip the pool's liveness peek, so the dead connection is really used:
    # the race the peek narrows but cannot close.
    monkeypatch.setattr(lbnode.upstream, "PEEK_AFTER", 3600.0)
    async with trio.open_nursery() as nursery:
        a_scope = trio.CancelScope()

        async def backend_a(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            with a_scope:
                await serve_backend("127.0.0.1", 0, "a", task_status=task_status)

        port_a = await nursery.start(backend_a)
        port_b = await nursery.start(serve_backend, "127.0.0.1", 0, "b")
        cfg = parse_config({"load_balancers": [{
            "name": "r", "algorithm": "round_robin",
            "targets": [{"id": "a", "address": f"127.0.0.1:{port_a}"},
                        {"id": "b", "address": f"127.0.0.1:{port_b}"}]}]})  # fmt: skip
        node = await nursery.start(Node(cfg, NodeOptions(admin=None, access_log="off")).run)
        seen = [(await node.route(HttpRequest(path="/"))).header("x-backend") for _ in range(2)]
        assert sorted(seen) == ["a", "b"]  # both now have a pooled connection
        a_scope.cancel()  # backend a dies: its listener and connections close
        await trio.sleep(0.05)
        replies = [await node.route(HttpRequest(path="/")) for _ in range(4)]
        assert [r.status for r in replies] == [200] * 4
        assert {r.header("x-backend") for r in replies} == {"b"}
        node.stop()
        nursery.cancel_scope.cancel()
