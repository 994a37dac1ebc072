"""A load balancer as the data path runs it, built from its config.

``LbRuntime`` is immutable once built: a reload or a config event builds a
new one and the listener's slot is repointed at it, so a request that took
the old runtime finishes on it (it never sees half of each). What must
survive a rebuild (a target's in-flight count, upstream pools) is carried
over by target id and address.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from lbnode.policy.balancing import Algorithm, make_algorithm
from lbnode.policy.keys import KeySpec
from lbnode.policy.request import RequestView
from lbnode.upstream import UpstreamPool
from lbshared.config import LoadBalancer, Target

log = logging.getLogger("lbnode.runtime")


class TargetState:
    """One target of one load balancer, with what the data path counts."""

    __slots__ = ("id", "address", "host", "port", "weight", "active", "requests", "healthy", "pool")

    def __init__(self, target: Target, pool: UpstreamPool) -> None:
        self.id = target.id
        self.address = target.address
        self.host = target.host
        self.port = target.port
        self.weight = target.weight
        self.active = 0  # requests in flight to this target
        self.requests = 0
        self.healthy = True
        self.pool = pool

    def __repr__(self) -> str:
        return f"TargetState({self.id!r}, {self.address!r}, active={self.active})"


class TargetGroup:
    """A set of targets and the algorithm that balances over them."""

    __slots__ = ("targets", "algorithm", "key_spec", "wants_record")

    def __init__(
        self, targets: list[TargetState], algorithm: Algorithm, key_spec: KeySpec | None
    ) -> None:
        self.targets = targets
        self.algorithm = algorithm
        self.key_spec = key_spec
        self.wants_record = bool(getattr(algorithm, "wants_record", False))

    def pick(self, view: RequestView, exclude: TargetState | None = None) -> TargetState | None:
        candidates = [t for t in self.targets if t.healthy and t is not exclude]
        if not candidates:
            return None
        key = self.key_spec.extract(view) if self.key_spec is not None else None
        return self.algorithm.select(candidates, key)


class PoolRegistry:
    """Upstream pools by address, shared across load balancers and reloads."""

    def __init__(self, http_impl: str = "h11") -> None:
        self.http_impl = http_impl
        self._pools: dict[tuple[str, int], UpstreamPool] = {}

    def get(self, host: str, port: int, max_idle: int, max_connections: int) -> UpstreamPool:
        pool = self._pools.get((host, port))
        if pool is None:
            pool = UpstreamPool(
                host,
                port,
                max_idle=max_idle,
                max_connections=max_connections,
                http_impl=self.http_impl,
            )
            self._pools[(host, port)] = pool
        else:
            pool.max_idle = max_idle
            pool.max_connections = max_connections
        return pool

    def pools(self) -> Iterable[UpstreamPool]:
        return self._pools.values()

    def close_all(self) -> None:
        for pool in self._pools.values():
            pool.close_idle()


def _key_spec(algorithm: str, hash_key: str) -> KeySpec | None:
    if algorithm == "consistent_hash" or ":" in algorithm:
        return KeySpec.parse(hash_key)
    return None


class LbRuntime:
    """Everything the data path needs to serve one load balancer."""

    def __init__(
        self,
        cfg: LoadBalancer,
        pools: PoolRegistry,
        previous: LbRuntime | None = None,
        version: int = 0,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.version = version
        old: dict[tuple[str, str], TargetState] = {}
        if previous is not None:
            old = {(t.id, t.address): t for t in previous.targets}
        targets: list[TargetState] = []
        for t in cfg.targets:
            ts = old.get((t.id, t.address))
            if ts is None:
                pool = pools.get(
                    t.host, t.port, cfg.pool.max_idle_per_target, cfg.pool.max_connections_per_target
                )
                ts = TargetState(t, pool)
            else:
                ts.weight = t.weight
            targets.append(ts)
        self.targets = targets
        self.by_id = {t.id: t for t in targets}
        self.default_group = TargetGroup(
            targets, make_algorithm(cfg.algorithm), _key_spec(cfg.algorithm, cfg.hash_key)
        )
        to = cfg.timeouts
        self.connect_timeout = to.connect
        self.request_headers_timeout = to.request_headers
        self.upstream_timeout = to.upstream_response
        self.idle_timeout = to.idle
        self.max_header_bytes = cfg.limits.max_header_bytes
        self.max_headers = cfg.limits.max_headers

    def group_for(self, view: RequestView) -> TargetGroup:
        return self.default_group
