"""Health checking, passive ejection and circuit breakers of a node (I/O side).

Theory of operation
-------------------
The decisions are the pure machines of ``lbnode.policy`` (``Hysteresis``,
``ClusterHealth``, ``Breaker``, ``OutlierDetector``, ``probers_for``); this
module runs them and moves their results between the node and a
``HealthBus``:

* **Probing.** Every ``interval`` each load balancer with a ``health_check``
  computes, for every target, its R probers by rendezvous hashing over the
  live nodes (``bus.live_nodes()``) and probes the targets assigned to this
  node. Each probe round feeds the (this node, target) ``Hysteresis``; a
  transition is this node's *verdict*, published on the bus.
* **The vote.** Verdicts from every prober reach every node (the bus), which
  folds them into the same ``ClusterHealth``: a target goes down when a
  majority of its current probers say so. A change of the cluster's view is
  applied at once to the target (``TargetState.healthy``) and *committed* on
  the bus: a compare-and-set, so exactly one ``healthy``/``unhealthy``
  event reaches the feed cluster-wide however many nodes saw the change.
* **Passive detection.** Every proxied request reports its outcome
  (``record``): consecutive connect failures or 5xx eject the target
  locally at once (``OutlierDetector``: Envoy's outlier detection), until
  the cluster's view catches up or the ejection time passes.
* **Breakers.** Outcomes also feed the target's ``Breaker`` window (and the
  bus, which shares them with the other nodes). A ticker steps every
  breaker: a due transition is committed on the bus (compare-and-set on the
  breaker's generation) and then applied; the node whose commit wins emits
  the ``circuit_*`` event. While a breaker is open its target gets no
  traffic; half-open, a few trial requests go through (on one node at a
  time in a cluster: the bus grants a trial lease).

Standalone nodes use ``LocalHealthBus``: the node is the only prober and its
own committer. The cluster's bus is ``lbnode.cluster.health.RedisHealthBus``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

import trio

from lbnode.policy.assignment import probers_for
from lbnode.policy.breaker import Breaker, BreakerEvent
from lbnode.policy.health import HEALTHY, UNHEALTHY, ClusterHealth, Hysteresis, SlowStart
from lbnode.policy.outlier import OutlierDetector
from lbnode.probes import ProbeResult, check_target, verdict

if TYPE_CHECKING:
    from lbnode.node import Node
    from lbnode.runtime import LbRuntime, TargetState
    from lbshared.config import LoadBalancer

log = logging.getLogger("lbnode.health")

TICK = 0.25  # how often breakers, ejections and slow start are stepped
KEEP_PROBES = 5  # last probe results kept per target for get_health


class HealthBus(Protocol):
    """Where a node's health decisions meet the other nodes'."""

    def live_nodes(self) -> list[str]: ...
    async def publish_verdict(self, lb: str, target: str, state: str, reason: str) -> None: ...
    async def commit(self, lb: str, target: str, kind: str, reason: str, generation: int) -> bool: ...
    async def commit_breaker(self, lb: str, target: str, event: BreakerEvent) -> bool: ...
    async def acquire_trial(self, lb: str, target: str, ttl: float) -> bool: ...
    def outcome(self, lb: str, target: str, ok: bool, now: float) -> None: ...
    async def set_override(self, lb: str, target: str, mode: str) -> None: ...


class LocalHealthBus:
    """Standalone: this node is every prober and the only committer."""

    def __init__(self, manager: HealthManager) -> None:
        self.manager = manager
        self._generations: dict[tuple[str, str, str], int] = {}

    def live_nodes(self) -> list[str]:
        return [self.manager.node_id]

    async def publish_verdict(self, lb: str, target: str, state: str, reason: str) -> None:
        await self.manager.on_verdict(lb, target, self.manager.node_id, state, reason)

    async def commit(self, lb: str, target: str, kind: str, reason: str, generation: int) -> bool:
        return self._cas((lb, target, "health"), generation, kind, lb, target, reason)

    async def commit_breaker(self, lb: str, target: str, event: BreakerEvent) -> bool:
        return self._cas((lb, target, "breaker"), event.generation, event.type, lb, target, event.reason)

    def _cas(self, key: tuple[str, str, str], generation: int, kind: str, lb: str, target: str,
             reason: str) -> bool:  # fmt: skip
        if self._generations.get(key, -1) >= generation:
            return False
        self._generations[key] = generation
        self.manager.emit(kind, lb, target, reason)
        return True

    async def acquire_trial(self, lb: str, target: str, ttl: float) -> bool:
        return True

    def outcome(self, lb: str, target: str, ok: bool, now: float) -> None:
        pass  # the local breaker already counted it

    async def set_override(self, lb: str, target: str, mode: str) -> None:
        await self.manager.on_override(lb, target, mode)


class LbHealth:
    """The health state of one load balancer on this node."""

    def __init__(self, cfg: LoadBalancer, now: float) -> None:
        self.name = cfg.name
        self.cfg = cfg
        hc = cfg.health_check
        self.hc = hc if hc is not None and hc.enabled else None
        initial = self.hc.initial_state if self.hc is not None else HEALTHY
        self.cluster = ClusterHealth(initial)
        self.hysteresis: dict[str, Hysteresis] = {}
        self.last_probes: dict[str, list[dict[str, Any]]] = {}
        self.generations: dict[str, int] = {}  # committed health transitions per target
        self.slow = SlowStart(self.hc.slow_start) if self.hc and self.hc.slow_start else None
        cb = cfg.circuit_breaker
        self.breaker_cfg = cb if cb is not None and cb.enabled else None
        self.breakers: dict[str, Breaker] = {}
        self.outlier = OutlierDetector([t.id for t in cfg.targets])
        for t in cfg.targets:
            self.cluster.add_target(t.id, now)

    def reconfigure(self, cfg: LoadBalancer, now: float) -> None:
        """Follow a config change, keeping what still applies."""
        old_hc, old_cb = self.hc, self.breaker_cfg
        self.cfg = cfg
        hc = cfg.health_check
        self.hc = hc if hc is not None and hc.enabled else None
        cb = cfg.circuit_breaker
        self.breaker_cfg = cb if cb is not None and cb.enabled else None
        if self.hc != old_hc:
            self.hysteresis.clear()
            self.slow = SlowStart(self.hc.slow_start) if self.hc and self.hc.slow_start else None
        if self.breaker_cfg != old_cb:
            self.breakers.clear()
        ids = [t.id for t in cfg.targets]
        for tid in self.cluster.targets():
            if tid not in ids:
                self.cluster.remove_target(tid)
                self.hysteresis.pop(tid, None)
                self.breakers.pop(tid, None)
                self.last_probes.pop(tid, None)
        for tid in ids:
            self.cluster.add_target(tid, now)
        self.outlier.set_targets(ids)

    def breaker(self, target: str) -> Breaker | None:
        if self.breaker_cfg is None:
            return None
        b = self.breakers.get(target)
        if b is None:
            b = self.breakers[target] = Breaker.from_config(self.breaker_cfg)
        return b


class HealthManager:
    """Runs health checks and breakers for every load balancer of a node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.node_id = node.node_id
        self.lbs: dict[str, LbHealth] = {}
        self.bus: HealthBus = LocalHealthBus(self)
        self._nursery: trio.Nursery | None = None
        self._probe_scopes: dict[str, trio.CancelScope] = {}
        self._changed = trio.Event()

    # -- wiring --------------------------------------------------------------------

    def sync(self, runtimes: dict[str, LbRuntime]) -> None:
        """Called after every config apply: follow the new runtimes."""
        now = time.monotonic()
        for name in list(self.lbs):
            if name not in runtimes:
                del self.lbs[name]
                scope = self._probe_scopes.pop(name, None)
                if scope is not None:
                    scope.cancel()
        for name, rt in runtimes.items():
            h = self.lbs.get(name)
            if h is None:
                h = self.lbs[name] = LbHealth(rt.cfg, now)
            elif h.cfg != rt.cfg:
                h.reconfigure(rt.cfg, now)
            rt.health = h
            for t in rt.targets:
                t.breaker = h.breaker(t.id)
                t.healthy = h.cluster.is_healthy(t.id)
            if self._nursery is not None and name not in self._probe_scopes:
                self._start_prober(name)
        self._changed.set()

    def _start_prober(self, name: str) -> None:
        assert self._nursery is not None
        scope = self._probe_scopes[name] = trio.CancelScope()

        async def runner() -> None:
            with scope:
                try:
                    await self._probe_loop(name)
                except Exception:
                    log.exception("lb %s: health checking failed", name)

        self._nursery.start_soon(runner)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for name in self.lbs:
                if name not in self._probe_scopes:
                    self._start_prober(name)
            nursery.start_soon(self._ticker)
            task_status.started()

    # -- probing -------------------------------------------------------------------

    def _runtime(self, name: str) -> LbRuntime | None:
        return self.node.runtimes.get(name)

    async def _probe_loop(self, name: str) -> None:
        while True:
            h = self.lbs.get(name)
            rt = self._runtime(name)
            if h is None or rt is None:
                return
            if h.hc is None:
                self._changed = trio.Event()
                await self._changed.wait()
                continue
            started = trio.current_time()
            await self.probe_round(h, rt)
            await trio.sleep_until(started + h.hc.effective_schedule().interval)

    async def probe_round(self, h: LbHealth, rt: LbRuntime) -> None:
        """Probe this node's share of ``rt``'s targets once."""
        assert h.hc is not None
        live = self.bus.live_nodes()
        now = time.monotonic()
        mine: list[TargetState] = []
        for t in rt.targets:
            probers = probers_for(f"{h.name}/{t.id}", live, max(1, h.hc.probers))
            tr = h.cluster.set_probers(t.id, probers, now)
            if tr is not None:
                await self._changed_view(h, tr.target, tr.state, tr.reason)
            if self.node_id in probers:
                mine.append(t)

        async def one(t: TargetState) -> None:
            assert h.hc is not None
            results = await check_target(h.hc, t.host, t.port)
            await self._observe(h, t.id, results)

        async with trio.open_nursery() as nursery:
            for t in mine:
                nursery.start_soon(one, t)

    async def _observe(self, h: LbHealth, target: str, results: list[ProbeResult]) -> None:
        assert h.hc is not None
        now = time.monotonic()
        ok, reason = verdict(results)
        kept = h.last_probes.setdefault(target, [])
        for r in results:
            kept.append(
                {
                    "at": round(time.time(), 3),
                    "ok": r.ok,
                    "reason": r.reason,
                    "status": r.status,
                    "latency_ms": round(r.latency * 1000, 3),
                    "node": self.node_id,
                }
            )
        del kept[:-KEEP_PROBES]
        hy = h.hysteresis.get(target)
        if hy is None:
            hy = h.hysteresis[target] = Hysteresis.from_config(
                h.hc, now, state=h.cluster.seed_state(target, self.node_id)
            )
        tr = hy.observe(ok, reason, now)
        if tr is not None:
            log.info("lb %s: probes say %s is %s (%s)", h.name, target, tr.state, tr.reason or "ok")
            await self.bus.publish_verdict(h.name, target, tr.state, tr.reason or "probes passed")

    # -- inbound from the bus ----------------------------------------------------------

    async def on_verdict(self, lb: str, target: str, prober: str, state: str, reason: str) -> None:
        h = self.lbs.get(lb)
        if h is None or target not in h.cluster.targets():
            return
        tr = h.cluster.record_verdict(target, prober, state, reason, time.monotonic())
        if tr is not None:
            await self._changed_view(h, target, tr.state, tr.reason)

    async def on_override(self, lb: str, target: str, mode: str) -> None:
        h = self.lbs.get(lb)
        if h is None or target not in h.cluster.targets():
            return
        tr = h.cluster.set_override(target, mode, time.monotonic())
        if tr is not None:
            await self._changed_view(h, target, tr.state, tr.reason)

    def on_committed_health(self, lb: str, target: str, state: str, reason: str, generation: int) -> None:
        """A health transition committed by some node (cluster follower)."""
        h = self.lbs.get(lb)
        if h is None or target not in h.cluster.targets():
            return
        h.generations[target] = max(h.generations.get(target, 0), generation)
        h.cluster.adopt(target, state, reason, time.monotonic())
        self._apply_health(lb, target, state == HEALTHY)

    def on_committed_breaker(self, lb: str, target: str, event: BreakerEvent) -> None:
        h = self.lbs.get(lb)
        b = h.breaker(target) if h is not None else None
        if b is not None:
            b.adopt(event, time.monotonic())

    def on_outcomes(self, lb: str, target: str, ok: int, errors: int, bucket_time: float) -> None:
        h = self.lbs.get(lb)
        b = h.breaker(target) if h is not None else None
        if b is not None:
            b.add_counts(ok, errors, bucket_time)

    # -- transitions -------------------------------------------------------------------

    async def _changed_view(self, h: LbHealth, target: str, state: str, reason: str) -> None:
        self._apply_health(h.name, target, state == HEALTHY)
        generation = h.generations.get(target, 0) + 1
        h.generations[target] = generation
        await self.bus.commit(h.name, target, state, reason, generation)

    def _apply_health(self, lb: str, target: str, healthy: bool) -> None:
        rt = self._runtime(lb)
        if rt is not None and target in rt.by_id:
            t = rt.by_id[target]
            t.healthy = healthy
            if healthy:  # the cluster sees it back: a local passive ejection ends too
                t.ejected_until = 0.0

    def emit(self, kind: str, lb: str, target: str, reason: str, node: str | None = None) -> None:
        """One committed transition: log it and put it on the feed."""
        level = logging.WARNING if kind in (UNHEALTHY, "circuit_open") else logging.INFO
        log.log(level, "lb %s: %s %s: %s", lb, target, kind, reason)
        self.node.feed.emit(kind, lb, target, reason, node)

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(TICK)
            now = time.monotonic()
            for name, h in list(self.lbs.items()):
                rt = self._runtime(name)
                if rt is None:
                    continue
                for tid, b in list(h.breakers.items()):
                    due = b.due(now)
                    if due is None:
                        continue
                    t = rt.by_id.get(tid)
                    if due == "probe" and t is not None:
                        # Trials go through one node at a time: the lease holder's.
                        t.trial_lease = await self.bus.acquire_trial(name, tid, b.half_open_timeout)
                    ev = b.step(now)
                    if ev is not None:
                        # Applied here at once; the commit (compare-and-set on the
                        # generation) decides which node announces it.
                        await self.bus.commit_breaker(name, tid, ev)
                if h.slow is not None:
                    for t in rt.targets:
                        view = h.cluster.view(t.id)
                        factor = h.slow.weight_factor(now, view.healthy_since)
                        t.weight = max(1, round(t.base_weight * factor)) if t.base_weight else 0

    # -- the data path's report ----------------------------------------------------------

    def record(self, rt: LbRuntime, target: TargetState, status: int, kind: str, trial: bool) -> None:
        """One proxied request's outcome: ``kind`` is ``ok``, ``5xx``, ``connect`` or ``timeout``."""
        h = rt.health
        if h is None:
            return
        now = time.monotonic()
        ok = kind == "ok"
        b = target.breaker
        if b is not None:
            b.record(ok, now, trial=trial)
            self.bus.outcome(rt.name, target.id, ok, now)
        ej = h.outlier.observe(target.id, ok, "5xx" if kind == "timeout" else kind, now)
        if ej is not None:
            target.ejected_until = ej.until
            log.warning(
                "lb %s: ejecting %s for %gs after %s (passive detection)",
                rt.name, target.id, ej.until - now, kind,
            )

    # -- HealthManager API of the reference document -------------------------------------

    async def check_health(self, lb: str, target: str) -> list[dict[str, Any]]:
        """Run the target's probes now; the results (not folded into its state)."""
        h, t = self._find(lb, target)
        hc = h.hc or _default_tcp_check()
        return [
            {"ok": r.ok, "reason": r.reason, "status": r.status, "latency_ms": round(r.latency * 1000, 3)}
            for r in await check_target(hc, t.host, t.port)
        ]

    async def set_health(self, lb: str, target: str, mode: str) -> None:
        """Override a target ``up``, ``down`` (drain) or back to ``auto``."""
        if mode not in ("up", "down", "auto"):
            raise ValueError(f"health must be up, down or auto, not {mode!r}")
        self._find(lb, target)
        await self.bus.set_override(lb, target, mode)

    def get_health(self, lb: str) -> list[dict[str, Any]]:
        """DESIGN.md's ``health NAME`` shape, one entry per target."""
        h = self.lbs.get(lb)
        rt = self._runtime(lb)
        if h is None or rt is None:
            raise KeyError(lb)
        now = time.monotonic()
        wall = time.time()
        out = []
        for t in rt.targets:
            view = h.cluster.view(t.id)
            b = t.breaker
            out.append(
                {
                    "target": t.id,
                    "state": view.state,
                    "since": round(wall - (now - view.since), 3),
                    "override": view.override,
                    "breaker": b.state if b is not None else "disabled",
                    "ejected": t.ejected_until > now,
                    "reason": view.reason,
                    "probers": list(view.probers),
                    "last_probes": h.last_probes.get(t.id, []),
                }
            )
        return out

    def _find(self, lb: str, target: str) -> tuple[LbHealth, TargetState]:
        h = self.lbs.get(lb)
        rt = self._runtime(lb)
        if h is None or rt is None:
            raise KeyError(f"no load balancer named {lb!r}")
        t = rt.by_id.get(target)
        if t is None:
            raise KeyError(f"load balancer {lb!r} has no target {target!r}")
        return h, t


def _default_tcp_check() -> Any:
    from lbshared.config import HealthCheck

    return HealthCheck()
