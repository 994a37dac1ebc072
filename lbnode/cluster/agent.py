"""A node's membership of the cluster: config from the log, heartbeats, shared state.

Theory of operation
-------------------
``ClusterAgent.run`` is one subtree of the node's nursery::

    ClusterAgent.run
     ├── RedisClient.run          connection manager (reconnects forever)
     ├── config follower          registry + snapshots, then XREAD BLOCK on every
     │                            lb:{NAME}:config stream and lb:registry:events
     ├── heartbeat                HSET lb:nodes every second; counts live nodes
     ├── stats publisher          a compact, mergeable stats summary per load balancer
     ├── health bus               breaker outcome batches, half-open trial leases
     └── per load balancer        RateSync (rate-limit deltas), SharedPinStore
                                  (pin cache flusher/notices) and the health follower
                                  (verdicts, outcomes, overrides, committed transitions;
                                  lbnode.cluster.health), cancelled with the LB

The follower is the only writer of the node's config in cluster mode: it
folds config events with the pure reducer of ``lbshared.projections`` and
hands the folded config to ``Node.apply``. On every (re)connection it
reloads from the registry and the snapshots (always the state after the
latest event), so a node that was away, or whose resume id fell behind the
stream's trimming, never silently misses a change; while connected it
follows the streams from the snapshots' ids, and before each read it checks
that no stream was trimmed past its position (else it reloads). A registry
notice for a load balancer it does not follow yet also makes it reload.

When Redis is unreachable (or answers nothing ``STALL_TIMEOUT`` past a
call's deadline, which drops the connection) nothing here blocks a request:
the node keeps its last config, ``view.degraded`` turns rate limits into
per-node shares and pins into the local cache, and ``/healthz`` says
``degraded``. When Redis comes back the heartbeat republishes membership, pin
stores republish the pins in use, and the follower reloads; a Redis that came
back *empty* has no config, and the node keeps its own, says so and raises
``lb:seq`` to its version, so the next change is newer than what it serves.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lbnode.cluster.health import RedisHealthBus
from lbnode.cluster.pins import AsyncPinStore, SharedPinStore
from lbnode.cluster.ratelimit import ClusterRateLimiter, RateSync, StrictRateLimiter
from lbnode.cluster.view import ClusterView
from lbnode.metrics import summary
from lbnode.policy.ratelimit import RateLimiter
from lbnode.policy.sticky import MemoryPinStore
from lbnode.runtime import Policies
from lbshared import __version__
from lbshared.config import Config, RateLimit
from lbshared.events import Heartbeat, LbConfig, LbDeleted, RegistryNotice
from lbshared.projections import EMPTY, ConfigState, fold_config
from lbshared.publish import VersionConflict, apublish_config
from lbshared.redis_trio import Backoff, RedisClient, RedisError
from lbshared.store import (
    NODES_KEY,
    REGISTRY_EVENTS_KEY,
    SEQ_KEY,
    RedisEventLog,
    config_stream,
    load_config_state,
    load_heartbeats,
    parse_id,
    stats_key,
)

if TYPE_CHECKING:
    from lbnode.node import Node

log = logging.getLogger("lbnode.cluster")

HEARTBEAT_INTERVAL = 1.0
# How long a starting node waits for Redis before serving what it has.
STARTUP_WAIT = 3.0
# A blocking read returns at least this often, to re-check trimming.
FOLLOW_BLOCK = 5.0
# A Redis that leaves a call unanswered this long past its deadline is treated as gone
# (frozen, or a half-open connection): the connection is dropped and the node degraded.
STALL_TIMEOUT = 1.0
# Raises lb:seq to at least ARGV[1] (after Redis lost it), so versions stay monotonic.
SEQ_FLOOR = """
if (tonumber(redis.call('GET', KEYS[1]) or '0') or 0) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 0
"""
STATS_INTERVAL = 2.0
STATS_TTL = 30
# ``request_rate`` in a stats summary covers about this many seconds (+ one interval).
RATE_WINDOW = 10.0



class RateWindow:
    """Requests per second over the last ``RATE_WINDOW`` seconds, from cumulative
    counts sampled at each stats publish (keys: target ids, ``None`` = the LB)."""

    __slots__ = ("_samples",)

    def __init__(self, start: float) -> None:
        self._samples: deque[tuple[float, dict[str | None, int]]] = deque([(start, {})])

    def update(
        self, now: float, counts: dict[str | None, int]
    ) -> tuple[dict[str | None, float], float]:
        """Record ``counts`` at monotonic ``now``; the rates and the seconds they cover."""
        samples = self._samples
        samples.append((now, counts))
        while len(samples) > 2 and samples[1][0] <= now - RATE_WINDOW:
            samples.popleft()
        start, base = samples[0]
        span = now - start
        if span <= 0:
            return {k: 0.0 for k in counts}, 0.0
        # A target re-created under the same id restarts from 0: never a negative rate.
        return {k: max(0, n - base.get(k, 0)) / span for k, n in counts.items()}, span


def _breaker_state(target: Any) -> str:
    breaker = getattr(target, "breaker", None)
    return breaker.state if breaker is not None else "disabled"


def _health_fields(view: dict[str, Any] | None) -> dict[str, Any]:
    """A target's health as this node sees it (``HealthManager.get_health``), for lbctl."""
    if view is None:
        return {}
    return {"health": view["state"], "since": view["since"], "override": view["override"],
            "reason": view["reason"], "probers": view["probers"], "ejected": view["ejected"],
            "last_probes": view["last_probes"]}  # fmt: skip


class ClusterPolicies(Policies):
    """Shared rate limiters and pin stores for the node's runtimes."""

    def __init__(self, agent: ClusterAgent) -> None:
        self.agent = agent

    def limiter(
        self, lb_name: str, name: str, cfg: RateLimit, previous: RateLimiter | None
    ) -> RateLimiter:
        if previous is not None and previous.config == cfg:
            return previous
        agent = self.agent
        sync = agent.rate_sync(lb_name)
        base = ClusterRateLimiter(cfg, None, agent.view, sync.wake)
        if cfg.mode == "strict":
            return StrictRateLimiter(cfg, agent.client, lb_name, agent.view, base, name=name)
        return base

    def pins(self, lb_name: str, previous: AsyncPinStore | None) -> AsyncPinStore:
        if previous is not None:
            return previous
        return self.agent.pin_store(lb_name)


class ClusterAgent:
    def __init__(self, node: Node, redis_url: str, seed: Config | None = None) -> None:
        self.node = node
        self.seed = seed
        self.view = ClusterView(node.node_id)
        self.client = RedisClient(
            redis_url, name=f"lbnode:{node.node_id}", on_state_change=self._on_state,
            stall_timeout=STALL_TIMEOUT,
        )  # fmt: skip
        self.log = RedisEventLog(self.client)
        self.policies = ClusterPolicies(self)
        self.state: ConfigState = EMPTY
        self.started_at = time.time()
        self.stream_lag = 0.0
        self.reloads = 0
        self._nursery: trio.Nursery | None = None
        self._lb_scopes: dict[str, list[trio.CancelScope]] = {}
        self._syncs: dict[str, RateSync] = {}
        self._pins: dict[str, SharedPinStore] = {}
        self._reconnected = trio.Event()
        self._was_connected = False
        self._from_log = False
        self._closing = False  # set by close(): no heartbeat may follow its HDEL
        #: Sorted ids of the live nodes (the heartbeats), refreshed every second.
        self.live_ids: list[str] = []
        self.health_bus = RedisHealthBus(self.client, node.health, self.view, lambda: self.live_ids)
        node.health.bus = self.health_bus
        node.feed.history_source = self.health_bus.history
        self._health_followed: set[str] = set()

    # -- wiring ------------------------------------------------------------------

    def _on_state(self, up: bool) -> None:
        self.view.degraded = not up
        if up:
            log.info("redis: connected to %s", self.client.address)
            if self._was_connected:
                self._reconnected.set()
            self._was_connected = True
        else:
            log.warning("redis: connection lost; serving degraded (per-node decisions)")

    def _start(self, name: str, fn: Any) -> None:
        """Run a load balancer's background task until the LB is deleted. A
        task that fails is logged; it never takes the node down."""
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._lb_scopes.setdefault(name, []).append(scope)

        async def runner() -> None:
            with scope:
                try:
                    await fn()
                except Exception:
                    log.exception("%s: background task %s failed", name, getattr(fn, "__qualname__", fn))

        self._nursery.start_soon(runner)

    def rate_sync(self, lb_name: str) -> RateSync:
        sync = self._syncs.get(lb_name)
        if sync is None:
            node = self.node

            def limiters() -> dict[str, RateLimiter]:
                rt = node.runtimes.get(lb_name)
                return rt.limiters_by_name() if rt is not None else {}

            sync = self._syncs[lb_name] = RateSync(self.client, lb_name, node.node_id, limiters)
            self._start(lb_name, sync.run)
        return sync

    def pin_store(self, lb_name: str) -> SharedPinStore:
        store = self._pins.get(lb_name)
        if store is None:
            retention = self._syncs[lb_name].retention if lb_name in self._syncs else None
            kw = {"retention": retention} if retention else {}
            store = self._pins[lb_name] = SharedPinStore(
                self.client, lb_name, self.view, MemoryPinStore(), **kw
            )
            self._start(lb_name, store.run)
        return store

    def forget(self, names: set[str]) -> None:
        """Stop the shared-state tasks of deleted load balancers."""
        for name in names:
            for scope in self._lb_scopes.pop(name, []):
                scope.cancel()
            self._syncs.pop(name, None)
            self._pins.pop(name, None)
            self._health_followed.discard(name)
            self.health_bus.forget(name)

    def _follow_health(self) -> None:
        """One health follower per load balancer served (stopped by ``forget``)."""
        for name in self.node.runtimes:
            if name not in self._health_followed:
                self._health_followed.add(name)
                self._start(name, functools.partial(self.health_bus.follow, name))

    # -- lifecycle ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.client.run)
            self.view.degraded = not await self.client.wait_connected(STARTUP_WAIT)
            if self.view.degraded:
                log.warning(
                    "redis at %s unreachable; starting degraded%s",
                    self.client.address,
                    " on --config" if self.seed is not None else " with no load balancer",
                )
                if self.seed is not None:
                    await self.node.apply(self.seed)
                    self._follow_health()
            else:
                await self._load()
            nursery.start_soon(self._follow)
            nursery.start_soon(self._heartbeat)
            nursery.start_soon(self._publish_stats)
            nursery.start_soon(self._republisher)
            nursery.start_soon(self.health_bus.run)
            task_status.started()

    async def close(self) -> None:
        """Take this node out of the live set at once (clean shutdown)."""
        self._closing = True
        with trio.move_on_after(0.5):
            try:
                await self.client.execute("HDEL", NODES_KEY, self.node.node_id)
            except RedisError:
                pass
        await self.log.aclose()

    # -- config follower -----------------------------------------------------------

    async def _load(self) -> dict[str, str]:
        """Reload the whole config from the registry and snapshots; return
        the stream positions to follow from."""
        tail = await self.client.execute("XREVRANGE", REGISTRY_EVENTS_KEY, "+", "-", "COUNT", "1")
        registry_pos = tail[0][0].decode() if tail else "0-0"
        state, positions = await load_config_state(self.client, self.log.skipped)
        if (
            not state.lbs
            and not self._from_log  # a node whose config came from Redis never re-seeds it
            and self.seed is not None
            and self.seed.load_balancers
        ):
            await self._seed()
            state, positions = await load_config_state(self.client, self.log.skipped)
        positions[REGISTRY_EVENTS_KEY] = registry_pos
        self.reloads += 1
        if not state.lbs and self.node.config.load_balancers:
            log.warning(
                "redis holds no configuration (restarted empty?): keeping config version %d",
                self.node.config_version,
            )
            # The next change must get a version above the one served here.
            kept = str(self.node.config_version)
            await self.client.execute("EVAL", SEQ_FLOOR, "1", SEQ_KEY, kept)
            return positions
        await self._apply(state)
        return positions

    async def _seed(self) -> None:
        assert self.seed is not None
        for lb in self.seed.load_balancers:
            try:
                version, _ = await apublish_config(self.client, lb.name, lb, 0, self.node.node_id)
                log.info("seeded the empty cluster with %s (version %d)", lb.name, version)
            except VersionConflict:
                log.info("%s already seeded by another node", lb.name)

    async def _apply(self, state: ConfigState) -> None:
        removed = set(self.state.lbs) - set(state.lbs)
        self.state = state
        self._from_log = True
        await self.node.apply(state.to_config(), version=state.version)
        self.forget(removed)
        self._follow_health()

    async def _follow(self) -> None:
        backoff = Backoff()
        positions: dict[str, str] | None = None
        while True:
            try:
                if positions is None:
                    if not self.client.connected:
                        await trio.sleep(backoff.next())
                        continue
                    positions = await self._load()
                    backoff.reset()
                if await self._trimmed_past(positions):
                    positions = None
                    continue
                events = await self.log.read(positions, block=FOLLOW_BLOCK)
                state = self.state
                for stream, entry_id, event in events:
                    self.stream_lag = max(0.0, time.time() - parse_id(entry_id)[0] / 1000.0)
                    if isinstance(event, RegistryNotice):
                        if config_stream(event.lb) not in positions:
                            # A load balancer we do not follow yet: new, or created in a
                            # Redis that restarted empty (its versions may be below ours).
                            # Reload it all from the snapshots: Redis's word, whole.
                            positions = None
                            break
                    elif isinstance(event, LbConfig | LbDeleted):
                        state = fold_config(state, event)
                if positions is None:
                    continue
                if state is not self.state:
                    await self._apply(state)
            except RedisError as exc:
                log.warning("config follower: %s; reloading when Redis is back", exc)
                positions = None
                await trio.sleep(backoff.next())

    async def _trimmed_past(self, positions: dict[str, str]) -> bool:
        """Whether entries after our position in some config stream were trimmed away:
        its first entry is past our position, or it is empty while its last id is."""
        streams = [s for s, pos in positions.items()
                   if s != REGISTRY_EVENTS_KEY and pos not in ("0", "0-0", "$")]  # fmt: skip
        if not streams:
            return False
        replies = await self.client.pipeline([("XINFO", "STREAM", s) for s in streams])
        for stream, info in zip(streams, replies, strict=True):
            if not isinstance(info, list):
                continue  # no such stream (an error reply): nothing to miss
            fields = dict(zip(info[0::2], info[1::2], strict=False))
            first, last = fields.get(b"first-entry"), fields.get(b"last-generated-id")
            pos = parse_id(positions[stream])
            if first:
                missed = parse_id(first[0].decode()) > pos
            else:
                missed = isinstance(last, bytes) and parse_id(last.decode()) > pos
            if missed:
                log.warning("%s was trimmed past our position %s: reloading from snapshots",
                            stream, positions[stream])  # fmt: skip
                return True
        return False

    # -- membership ----------------------------------------------------------------

    async def _heartbeat(self) -> None:
        node = self.node
        admin = f"{node.options.admin[0]}:{node.options.admin[1]}" if node.options.admin else ""
        while True:
            now = time.time()
            beat = Heartbeat(
                id=node.node_id,
                address=node.options.bind,
                admin=admin,
                last_heartbeat=now,
                config_version=node.config_version,
                degraded=self.view.degraded,
                started_at=self.started_at,
                pid=os.getpid(),
                version=__version__,
            )
            if self._closing:
                return  # (checked with no checkpoint before the HSET is queued)
            try:
                await self.client.execute("HSET", NODES_KEY, node.node_id, beat.to_json())
                beats = await load_heartbeats(self.client, now)
                self.live_ids = [b.id for b in beats if b.live(now)]  # sorted by id
                self.view.live_nodes = max(1, len(self.live_ids))
            except RedisError:
                pass
            await trio.sleep(HEARTBEAT_INTERVAL)

    async def _republisher(self) -> None:
        """After a reconnection: put back the pins Redis may have lost."""
        while True:
            await self._reconnected.wait()
            self._reconnected = trio.Event()
            for store in list(self._pins.values()):
                n = await store.republish()
                if n:
                    log.info("republished %d sticky pin(s) of %s", n, store.lb_name)

    async def _publish_stats(self) -> None:
        """Every few seconds, each load balancer's stats summary under
        ``lb:{NAME}:stats`` (hash node -> JSON), for ``lbctl metrics``/``status``.

        Besides ``stats`` (cumulative, mergeable) a summary holds the LB's
        ``requests_total`` (requests answered) and ``request_rate`` (per second
        over the last ``rate_window`` seconds, about ``RATE_WINDOW``), and per
        target ``active`` (in flight), ``healthy``, ``breaker`` (closed, open,
        half_open or disabled), ``requests_total`` (sent to it), ``request_rate`` and this
        node's health view of it (``health``, ``since``, ``override``, ``reason``,
        ``probers``, ``ejected``, ``last_probes``: ``HealthManager.get_health``)."""
        windows: dict[str, RateWindow] = {}
        last = time.monotonic()
        while True:
            await trio.sleep(STATS_INTERVAL)
            mono = time.monotonic()
            for gone in set(windows) - set(self.node.runtimes):
                del windows[gone]
            if not self.client.connected:
                continue
            now = time.time()
            for name, rt in list(self.node.runtimes.items()):
                window = windows.get(name)
                if window is None:  # a new LB: its counts started at 0 since the last round
                    window = windows[name] = RateWindow(last)
                total = sum(st.total for st in rt.stats.entries.values())
                counts: dict[str | None, int] = {t.id: t.requests for t in rt.targets}
                counts[None] = total
                rates, span = window.update(mono, counts)
                try:
                    health = {h["target"]: h for h in self.node.health.get_health(name)}
                except KeyError:
                    health = {}
                body = {
                    "node": self.node.node_id,
                    "at": now,
                    "stats": summary(rt.stats),
                    "requests_total": total,
                    "request_rate": round(rates[None], 3),
                    "rate_window": round(span, 3),
                    "targets": {
                        t.id: {
                            "active": t.active,
                            "healthy": t.healthy,
                            "breaker": _breaker_state(t),
                            "requests_total": t.requests,
                            "request_rate": round(rates[t.id], 3),
                            **_health_fields(health.get(t.id)),
                        }
                        for t in rt.targets
                    },
                }
                try:
                    await self.client.pipeline(
                        [
                            ("HSET", stats_key(name), self.node.node_id, json.dumps(body)),
                            ("EXPIRE", stats_key(name), str(STATS_TTL)),
                        ]
                    )
                except RedisError:
                    break
            last = mono

    # -- views ---------------------------------------------------------------------

    def metrics(self) -> list[Any]:
        st = self.client.stats
        rtt = GaugeMetricFamily(
            "lbnode_redis_round_trip_seconds_avg", "Average Redis round trip of this node."
        )
        rtt.add_metric([], st.latency_sum / st.latency_count if st.latency_count else 0.0)
        return [
            CounterMetricFamily("lbnode_redis_calls", "Redis calls.", value=st.calls),
            CounterMetricFamily("lbnode_redis_errors", "Redis calls that failed.", value=st.errors),
            CounterMetricFamily("lbnode_redis_timeouts", "Redis calls that timed out.", value=st.timeouts),
            CounterMetricFamily("lbnode_redis_reconnects", "Redis reconnections.", value=st.reconnects),
            rtt,
            GaugeMetricFamily(
                "lbnode_redis_connected", "1 while connected to Redis.", value=0 if self.view.degraded else 1
            ),
            GaugeMetricFamily(
                "lbnode_event_stream_lag_seconds",
                "Age of the last config event when this node read it.",
                value=self.stream_lag,
            ),
            GaugeMetricFamily("lbnode_cluster_live_nodes", "Live nodes seen.", value=self.view.live_nodes),
            CounterMetricFamily(
                "lbnode_events_skipped", "Malformed stream entries skipped.", value=self.log.skipped.total
            ),
            *self.health_bus.metrics(),
        ]


def default_node_id(admin: tuple[str, int] | None) -> str:
    host = socket.gethostname()
    return f"{host}:{admin[0]}:{admin[1]}" if admin else host
