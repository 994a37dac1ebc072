"""A load balancer as the data path runs it, built from its config.

``LbRuntime`` is immutable once built: a reload or a config event builds a
new one and the listener's slot is repointed at it, so a request that took
the old runtime finishes on it (it never sees half of each). What must
survive a rebuild (a target's in-flight count, upstream pools) is carried
over by target id and address.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from lbnode.metrics import LbStats
from lbnode.policy.access import AccessPolicy, NetworkSet, client_ip_from, parse_ip
from lbnode.policy.balancing import Algorithm, make_algorithm
from lbnode.policy.breaker import Breaker
from lbnode.policy.keys import KeySpec
from lbnode.policy.ratelimit import MemoryCounterStore, RateLimiter
from lbnode.policy.request import RequestView
from lbnode.policy.rules import CompiledRules
from lbnode.policy.sticky import StickyPolicy
from lbnode.cluster.pins import AsyncPinStore, LocalPinStore
from lbnode.upstream import UpstreamPool
from lbshared.config import LoadBalancer, RateLimit, Target

if TYPE_CHECKING:
    from lbnode.health import LbHealth

log = logging.getLogger("lbnode.runtime")


class TargetState:
    """One target of one load balancer, with what the data path counts."""

    __slots__ = (
        "id", "address", "host", "port", "weight", "base_weight", "active", "requests",
        "healthy", "pool", "breaker", "ejected_until", "trial_lease",
    )  # fmt: skip

    def __init__(self, target: Target, pool: UpstreamPool) -> None:
        self.id = target.id
        self.address = target.address
        self.host = target.host
        self.port = target.port
        self.weight = target.weight  # effective (slow start ramps it)
        self.base_weight = target.weight
        self.active = 0  # requests in flight to this target
        self.requests = 0
        self.healthy = True  # the cluster's view (active checks, overrides)
        self.pool = pool
        self.breaker: Breaker | None = None
        self.ejected_until = 0.0  # passive detection: out until then
        self.trial_lease = True  # half-open breaker: this node may send trials

    def available(self, now: float) -> bool:
        """May a new request go here? Healthy, not ejected, breaker allowing."""
        if not self.healthy or self.ejected_until > now:
            return False
        b = self.breaker
        if b is None or b.state == "closed":
            return True
        return b.state == "half_open" and self.trial_lease and b.allows(now)

    def __repr__(self) -> str:
        return f"TargetState({self.id!r}, {self.address!r}, active={self.active})"


class TargetGroup:
    """A set of targets and the algorithm that balances over them."""

    __slots__ = ("targets", "by_id", "algorithm", "key_spec", "wants_record")

    def __init__(
        self, targets: list[TargetState], algorithm: Algorithm, key_spec: KeySpec | None
    ) -> None:
        self.targets = targets
        self.by_id = {t.id: t for t in targets}
        self.algorithm = algorithm
        self.key_spec = key_spec
        self.wants_record = bool(getattr(algorithm, "wants_record", False))

    def pick(self, view: RequestView, exclude: TargetState | None = None) -> TargetState | None:
        now = time.monotonic()
        candidates = [t for t in self.targets if t is not exclude and t.available(now)]
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


class Policies:
    """Builds a load balancer's stateful policy objects: in-process here; the
    cluster mode (``lbnode.cluster.node``) builds shared ones instead."""

    def limiter(
        self, lb_name: str, name: str, cfg: RateLimit, previous: RateLimiter | None
    ) -> RateLimiter:
        """The limiter ``name`` ("" = the LB's own); an unchanged one is kept,
        windows and all."""
        if previous is not None and previous.config == cfg:
            return previous
        return RateLimiter(cfg, MemoryCounterStore(cfg.interval, max_keys=cfg.max_keys))

    def pins(self, lb_name: str, previous: AsyncPinStore | None) -> AsyncPinStore:
        return previous if previous is not None else LocalPinStore()


LOCAL_POLICIES = Policies()


class LbRuntime:
    """Everything the data path needs to serve one load balancer."""

    def __init__(
        self,
        cfg: LoadBalancer,
        pools: PoolRegistry,
        previous: LbRuntime | None = None,
        version: int = 0,
        policies: Policies = LOCAL_POLICIES,
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
                ts.weight = ts.base_weight = t.weight
            targets.append(ts)
        self.targets = targets
        self.by_id = {t.id: t for t in targets}
        # Algorithms keep their state (round-robin position, WRR weights)
        # across rebuilds when their spec is unchanged.
        prev_algos = previous.algorithms if previous is not None else {}
        self.algorithms: dict[tuple[str, str], Algorithm] = {}

        def algorithm(group: str, spec: str) -> Algorithm:
            algo = prev_algos.get((group, spec)) or make_algorithm(spec)
            self.algorithms[(group, spec)] = algo
            return algo

        self.default_group = TargetGroup(
            targets, algorithm("", cfg.algorithm), _key_spec(cfg.algorithm, cfg.hash_key)
        )
        to = cfg.timeouts
        self.connect_timeout = to.connect
        self.request_headers_timeout = to.request_headers
        self.upstream_timeout = to.upstream_response
        self.idle_timeout = to.idle
        self.max_header_bytes = cfg.limits.max_header_bytes
        self.max_headers = cfg.limits.max_headers

        # Traffic policy (checked in this order by the data path): access,
        # rules, rate limit, sticky, balancing. State that must outlive a
        # rebuild (pins, rate-limit windows) is carried over.
        self.trusted = NetworkSet(cfg.trusted_proxies) if cfg.trusted_proxies else None
        self.access = AccessPolicy.from_config(cfg.access) if cfg.access else None
        self.rules = CompiledRules.for_load_balancer(cfg)
        self.has_rules = len(self.rules) > 0
        self.rule_groups: dict[int, TargetGroup] = {}
        self.rule_limiters: dict[int, RateLimiter] = {}
        prev_limiters = previous.limiters_by_name() if previous is not None else {}
        for match in self.rules.matches:
            rule = match.rule
            algo = rule.algorithm or cfg.algorithm
            subset = [self.by_id[i] for i in rule.targets] if rule.targets else targets
            self.rule_groups[match.index] = TargetGroup(
                subset, algorithm(match.name, algo), _key_spec(algo, rule.hash_key or cfg.hash_key)
            )
            if rule.rate_limit is not None and rule.rate_limit.enabled:
                self.rule_limiters[match.index] = policies.limiter(
                    cfg.name, match.name, rule.rate_limit, prev_limiters.get(match.name)
                )
        self.limiter: RateLimiter | None = None
        if cfg.rate_limit is not None and cfg.rate_limit.enabled:
            self.limiter = policies.limiter(cfg.name, "", cfg.rate_limit, prev_limiters.get(""))
        self.sticky = (
            StickyPolicy.from_config("", cfg.sticky_session)
            if cfg.sticky_session is not None and cfg.sticky_sessions
            else None
        )
        self.pins = policies.pins(cfg.name, previous.pins if previous is not None else None)
        # Refusals and re-pins by (kind, rule name or ""), for /status and metrics.
        self.counters: dict[tuple[str, str], int] = (
            previous.counters if previous is not None else {}
        )
        self.stats = previous.stats if previous is not None else LbStats()
        self.health: LbHealth | None = None  # set by the node's HealthManager

    def limiters_by_name(self) -> dict[str, RateLimiter]:
        out = {self.rules.matches[i].name: lim for i, lim in self.rule_limiters.items()}
        if self.limiter is not None:
            out[""] = self.limiter
        return out

    def client_ip(self, peer: str, view_headers: list[tuple[bytes, bytes]]) -> str:
        """The client address: the peer, or from X-Forwarded-For when the
        peer is one of ``trusted_proxies``."""
        if self.trusted is None:
            return peer
        xff = [v for n, v in view_headers if n == b"x-forwarded-for"]
        return client_ip_from(peer, xff, self.trusted) if xff else peer

    def count(self, kind: str, rule: str | None) -> None:
        key = (kind, rule or "")
        self.counters[key] = self.counters.get(key, 0) + 1

    def believes_proxy_header(self, peer: str) -> bool:
        """A PROXY protocol header is believed on a listener that enables
        it when no ``trusted_proxies`` are set, or when the peer is one."""
        if self.trusted is None:
            return True
        addr = parse_ip(peer)
        return addr is not None and self.trusted.contains_address(addr)
