"""The Python API of a cluster node publishes through the config log, as lbctl does."""

from __future__ import annotations

import trio

from lbnode.api import HttpRequest
from lbnode.demo_backend import serve_backend
from lbnode.node import Node, NodeOptions
from lbshared.config import Config
from lbshared.store import load_registry
from tests.redisproc import RedisProc, redis_proc  # noqa: F401  (fixture)


async def test_register_and_deregister_go_through_redis(redis_proc: RedisProc) -> None:  # noqa: F811
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_backend, "127.0.0.1", 0, "a")
        opts = NodeOptions(admin=None, access_log="off", redis_url=redis_proc.url, node_id="py")
        node = await nursery.start(Node(Config(load_balancers=[]), opts).run)
        await node.manager.register(
            {"name": "api", "targets": [{"id": "a", "address": f"127.0.0.1:{port}"}]}
        )
        assert "api" in node.runtimes and node.config_version >= 1
        assert "api" in await load_registry(node.cluster.client)  # type: ignore[union-attr]
        assert (await node.route(HttpRequest(path="/"), "api")).status == 200
        await node.lb("api").add_target({"id": "b", "address": "127.0.0.1:9"})
        assert [t.id for t in node.runtimes["api"].targets] == ["a", "b"]
        await node.manager.deregister("api")
        assert "api" not in node.runtimes
        assert "api" not in await load_registry(node.cluster.client)  # type: ignore[union-attr]
        node.stop()
        nursery.cancel_scope.cancel()
