"""The Python API of a node: the reference document's managers, in-process.

``LoadBalancerManager`` (register, deregister, get, list) and, per load
balancer, a ``LoadBalancerHandle`` (route, set_rules, get_rules, add_target,
remove_target, set_rate_limit). Every change goes through the same path as
a config file: the whole new config is validated (with the same messages as
``lbshared.config``) and applied atomically by ``Node.apply``, so a request
in flight sees the old load balancer or the new one, never a mix.

``route(request)`` sends a request object through the node's real data path
(the same connection handler the listeners use, over an in-memory stream),
so rules, limits, balancing, retries and error mapping are all the same as
for a request from the network.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import h11
import trio
import trio.testing

from lbshared.config import (
    ConfigError,
    LoadBalancer,
    RateLimit,
    Rule,
    Target,
    config_to_dict,
    lb_to_dict,
    parse_config,
)

if TYPE_CHECKING:
    from lbnode.node import Node


class UnknownLoadBalancer(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown load balancer {self.name!r}"


@dataclass
class HttpRequest:
    """A request to route in-process."""

    method: str = "GET"
    path: str = "/"
    headers: Sequence[tuple[str, str]] | Mapping[str, str] = ()
    body: bytes = b""
    client_ip: str = "127.0.0.1"
    scheme: str = "http"


@dataclass
class HttpResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def _header_pairs(headers: Sequence[tuple[str, str]] | Mapping[str, str]) -> list[tuple[str, str]]:
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


async def route(node: Node, request: HttpRequest, lb_name: str | None = None) -> HttpResponse:
    """Send ``request`` through load balancer ``lb_name`` of ``node``."""
    from lbnode.proxy import DownstreamConnection, ListenerSlot

    if lb_name is None:
        if len(node.runtimes) != 1:
            raise ValueError(
                f"route: name the load balancer (this node serves {sorted(node.runtimes)})"
            )
        lb_name = next(iter(node.runtimes))
    runtime = node.runtimes.get(lb_name)
    if runtime is None:
        raise UnknownLoadBalancer(lb_name)
    slot = ListenerSlot(runtime, request.scheme.encode(), 0)
    ours, theirs = trio.testing.memory_stream_pair()
    headers = _header_pairs(request.headers)
    names = {k.lower() for k, _ in headers}
    if "host" not in names:
        headers.append(("host", lb_name))
    if request.body and "content-length" not in names and "transfer-encoding" not in names:
        headers.append(("content-length", str(len(request.body))))
    headers.append(("connection", "close"))
    client = h11.Connection(h11.CLIENT)
    out = client.send(h11.Request(method=request.method, target=request.path, headers=headers))
    if request.body:
        out += client.send(h11.Data(data=request.body))
    out += client.send(h11.EndOfMessage())
    response: HttpResponse | None = None
    body: list[bytes] = []
    async with trio.open_nursery() as nursery:
        conn = DownstreamConnection(theirs, slot, node.services, request.client_ip)
        nursery.start_soon(conn.serve)
        await ours.send_all(out)
        while True:
            ev = client.next_event()
            if ev is h11.NEED_DATA:
                client.receive_data(await ours.receive_some(65536))
                continue
            if isinstance(ev, h11.Response):
                response = HttpResponse(
                    ev.status_code, [(k.decode(), v.decode("latin-1")) for k, v in ev.headers]
                )
            elif isinstance(ev, h11.Data):
                body.append(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                break
        await ours.aclose()
    assert response is not None
    response.body = b"".join(body)
    return response


class LoadBalancerHandle:
    """One load balancer of a node (the reference's ``lb``)."""

    def __init__(self, node: Node, name: str) -> None:
        self.node = node
        self.name = name

    def config(self) -> LoadBalancer:
        for lb in self.node.config.load_balancers:
            if lb.name == self.name:
                return lb
        raise UnknownLoadBalancer(self.name)

    async def route(self, request: HttpRequest) -> HttpResponse:
        return await route(self.node, request, self.name)

    async def _edit(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Read this load balancer's config, ``change`` it and register it, all
        under the manager's lock, so concurrent edits cannot lose one another."""
        manager = self.node.manager
        async with manager.lock:
            data = lb_to_dict(self.config())
            change(data)
            await manager._register(data)

    async def _replace(self, **changes: Any) -> None:
        await self._edit(lambda data: data.update(changes))

    async def set_rules(self, rules: Iterable[Rule | Mapping[str, Any]]) -> None:
        """Replace this load balancer's rules, in order, atomically."""
        out: dict[str, Any] = {}
        for i, rule in enumerate(rules):
            d = rule.model_dump(mode="json") if isinstance(rule, Rule) else dict(rule)
            name = d.pop("name", "")
            if not name:
                raise ConfigError([f"rules[{i}]: a rule needs a name"])
            if name in out:  # a dict would silently keep only the last one
                raise ConfigError([f"rules[{i}].name: duplicate rule name {name!r}"])
            out[name] = d
        await self._replace(rules=out)

    async def get_rules(self) -> list[Rule]:
        return list(self.config().rules.values())

    async def add_target(self, target: Target | Mapping[str, Any]) -> None:
        t = target.model_dump(mode="json") if isinstance(target, Target) else dict(target)

        def change(data: dict[str, Any]) -> None:
            targets = [x for x in data.get("targets", []) if x["id"] != t["id"]]
            data["targets"] = [*targets, t]

        await self._edit(change)

    async def remove_target(self, target_id: str) -> None:
        def change(data: dict[str, Any]) -> None:
            targets = data.get("targets", [])
            if not any(x["id"] == target_id for x in targets):
                raise KeyError(f"load balancer {self.name!r} has no target {target_id!r}")
            data["targets"] = [x for x in targets if x["id"] != target_id]

        await self._edit(change)

    async def set_rate_limit(self, rate_limit: RateLimit | Mapping[str, Any] | None) -> None:
        if isinstance(rate_limit, RateLimit):
            rate_limit = rate_limit.model_dump(mode="json")
        await self._replace(rate_limit=rate_limit)


class LoadBalancerManager:
    """The reference's ``LoadBalancerManager`` over one node's config."""

    def __init__(self, node: Node) -> None:
        self.node = node
        # Serialises read-modify-write of the config: two concurrent changes
        # must not both start from the same old config (one would be lost).
        self.lock = trio.Lock()

    async def register(self, lb: LoadBalancer | Mapping[str, Any]) -> None:
        """Create or replace (whole) one load balancer."""
        async with self.lock:
            await self._register(lb)

    async def _register(self, lb: LoadBalancer | Mapping[str, Any]) -> None:
        data = lb_to_dict(lb) if isinstance(lb, LoadBalancer) else dict(lb)
        name = data.get("name", "default")
        current = config_to_dict(self.node.config)["load_balancers"]
        # Replaced where it stands (list() order and error paths stay put); new ones go last.
        lbs = [data if x["name"] == name else x for x in current]
        if not any(x["name"] == name for x in current):
            lbs.append(data)
        new = parse_config({"load_balancers": lbs}, source="<api>")
        if self.node.cluster is not None:
            # Cluster mode: the change goes through the log like lbctl's, and
            # every node (this one included) applies it from there.
            lb_cfg = next(x for x in new.load_balancers if x.name == name)
            await self._publish(name, lb_cfg)
            return
        await self.node.apply(new)

    async def _publish(self, name: str, lb: LoadBalancer | None) -> None:
        from lbshared.publish import VersionConflict, apublish_config

        agent = self.node.cluster
        assert agent is not None
        for _ in range(5):  # compare-and-set on the version we hold, as lbctl does
            try:
                version, _ = await apublish_config(
                    agent.client, name, lb, agent.state.held_version(name), self.node.node_id
                )
                break
            except VersionConflict:
                await trio.sleep(0.05)  # the follower catches up with the newer version
        else:
            raise RuntimeError(f"{name}: the config kept changing under us; try again")
        with trio.move_on_after(5):
            while self.node.config_version < version:
                await trio.sleep(0.01)

    async def deregister(self, name: str) -> None:
        async with self.lock:
            current = config_to_dict(self.node.config)["load_balancers"]
            if not any(x["name"] == name for x in current):
                raise UnknownLoadBalancer(name)
            if self.node.cluster is not None:
                await self._publish(name, None)
                return
            rest = [x for x in current if x["name"] != name]
            await self.node.apply(parse_config({"load_balancers": rest}, source="<api>"))

    async def get(self, name: str) -> LoadBalancer:
        return LoadBalancerHandle(self.node, name).config()

    async def list(self) -> list[LoadBalancer]:
        return list(self.node.config.load_balancers)
