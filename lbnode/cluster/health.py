"""The cluster's ``HealthBus``: health and circuit breakers decided once, acted on by every node.

Theory of operation
-------------------
``lbnode.health.HealthManager`` makes the decisions (probe hysteresis, the
prober vote, breaker windows); this module moves its inputs and outputs
through Redis so that every node folds the same facts into the same view.

Inputs travel on ``lb:{NAME}:state`` (the shared-state stream), and every
node follows that stream (one follower task per load balancer, which also
follows ``lb:{NAME}:health``):

* ``probe_verdict`` {target, prober, state, reason}: a prober's hysteresis
  changed state. The prober XADDs it, then folds it itself, directly
  (``on_verdict``); followers skip verdicts of their own node, so each
  verdict reaches each manager exactly once. The order matters: a transition
  is committed only after the entry that caused it, and a follower reads
  ``lb:{NAME}:state`` before ``lb:{NAME}:health`` in each read, so no node
  adopts a change before it knows why (it would vote it back at its next
  probe round: one flap, two needless events). A verdict that cannot be
  sent is kept (the latest per target) and re-sent by the shipper.
* ``outcome_delta`` {node, deltas: [[target, ok, errors, bucket_start]]}:
  request outcomes for the breakers. ``outcome`` (per proxied request; a
  dict increment) counts them per (load balancer, target, 100 ms slice of
  cluster time = ``monotonic() + view.clock_offset``); every
  ``SHIP_PERIOD`` the shipper sends one event per load balancer. Followers
  fold the others' deltas into their breakers (``on_outcomes``) at the
  middle of the slice in their own monotonic clock, so every breaker sees
  the cluster-wide error rate (skew between nodes' clocks moves an outcome
  by at most the skew). Unsent deltas are kept up to ``MAX_PENDING`` slices
  and ``STATE_RETENTION`` seconds, then dropped and counted.
* ``health_override`` {target, mode}: ``set_health``/``lbctl health set``.
  The override is also stored in the hash ``lb:{NAME}:overrides`` (target
  -> up/down; ``auto`` deletes the field), the truth a (re)loading node
  reads.

Committed transitions. When a node's fold changes the view of a target
(``commit``) or steps a breaker (``commit_breaker``), it proposes the
transition with the generation it believes comes next. One Lua script
(``COMMIT_SCRIPT``) on the hash ``lb:{NAME}:healthstate`` compares it with
the stored generation (``health:<target>`` / ``breaker:<target>``): if the
stored one is lower, it stores the generation and the state
(``hstate:<target>`` / ``bstate:<target>``, JSON, for reloads) and XADDs the
event to ``lb:{NAME}:health`` (``MAXLEN ~ 10000``), returning its id: that
node won and its event is *the* event. Otherwise it returns the stored
generation and state: someone committed first. Nodes fold the same inputs,
so they usually propose the same generation for the same change and exactly
one wins. A losing node keeps its generation (the winner's event reaches its
follower, which adopts it), so it never jumps ahead of changes it has not seen. A
*breaker* whose generation lags the stored one (re-created by a config change, or its
target removed and re-added) re-proposes once with the stored generation + 1, so its
change is not swallowed; its proposals come from its own window, never from entries
still on their way.

Every follower, for each event of ``lb:{NAME}:health``: publishes it to the
node's feed (the admin websocket) with the stream id as its ``id``, and
adopts it: ``on_committed_health`` when the event is not older than the
node's own generation for the target, breaker events through
``Breaker.adopt`` - and at an *equal* generation with a different state
the committed one wins (two nodes proposed different transitions from the
same state, e.g. one saw its trials succeed and another a failure).

Reload. After every (re)connection a follower first resolves the streams'
ends, then reads ``lb:{NAME}:healthstate`` and ``lb:{NAME}:overrides`` and
takes them as Redis's word (overrides set, votes adopted, generations reset
to the stored ones, breakers forced to the stored state with the remaining
open wait), then follows from the resolved ends: nothing falls in between.

Trial lease. A half-open breaker lets ``trials`` requests through, on one
node at a time: the node that holds ``lb:{NAME}:trial:<target>`` (value =
its id, ``PX`` = ``min(half_open_timeout, LEASE_MAX)``). The node whose
ticker steps the breaker half-open asks first (``acquire_trial``); the
others poll every half lease. The holder renews it while it is using it
(trial requests started since the last check, or still in flight) and
gives it up when it had no trial traffic for half a lease - so a holder that
dies, or that gets no traffic, hands the trials to a node that has some.

Membership. ``live_nodes()`` is the sorted ids of the live heartbeats the
cluster agent loads every second, plus this node; the manager computes the
probers of each target from it (rendezvous hashing).

Redis unreachable (``view.degraded``). Nothing here raises into the
manager: ``live_nodes()`` is this node alone (it probes every target and
decides by itself, as a standalone node does), commits return False (the
node keeps its local view; no feed event is made up without a stream id),
trials are this node's own decision, verdicts and outcomes wait bounded.
When Redis is back, the followers reload and the cluster's stored view wins.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import trio
from prometheus_client.core import CounterMetricFamily

from lbnode.policy.breaker import CLOSED, HALF_OPEN, OPEN, BreakerEvent
from lbnode.policy.health import HEALTHY, UNHEALTHY
from lbshared.events import (
    HEALTH_EVENT_MODELS,
    HealthOverride,
    OutcomeDelta,
    ProbeVerdict,
    SkipCounter,
    encode,
)
from lbshared.redis_trio import Backoff, RedisError, Script
from lbshared.store import (
    DEFAULT_MAXLEN,
    STATE_RETENTION,
    RedisEventLog,
    health_stream,
    healthstate_key,
    overrides_key,
    parse_id,
    state_stream,
    trial_key,
)

from .view import ClusterView, stream_tail

if TYPE_CHECKING:
    from lbnode.feed import FeedEvent
    from lbnode.health import HealthManager, LbHealth
    from lbnode.policy.breaker import Breaker
    from lbshared.events import Event
    from lbshared.redis_trio import RedisClient

__all__ = [
    "COMMIT_SCRIPT",
    "LEASE_MAX",
    "LEASE_SCRIPT",
    "SHIP_PERIOD",
    "HealthBusStats",
    "RedisHealthBus",
    "healthstate_key",
    "overrides_key",
    "trial_key",
]

log = logging.getLogger("lbnode.cluster.health")

#: Seconds between two outcome batches (and retries of unsent verdicts) of one node.
SHIP_PERIOD: Final = 0.1
#: Outcomes are counted per slice of this many seconds of cluster time.
SLICE: Final = 0.1
#: Unsent outcome slices kept while Redis is unreachable; beyond it new ones are dropped.
MAX_PENDING: Final = 20_000
#: Longest trial lease (seconds); shorter when half_open_timeout is.
LEASE_MAX: Final = 2.0
#: How often the lease task looks at the half-open breakers (seconds).
LEASE_TICK: Final = 0.1
#: Bound of one commit, verdict or override call (seconds): a stalled Redis must not
#: hold the prober or the breaker ticker for long.
CALL_TIMEOUT: Final = 0.5
#: How long one XREAD BLOCK of a follower waits (seconds).
FOLLOW_BLOCK: Final = 1.0
#: Events kept in memory for the feed's history while Redis cannot be read.
RECENT: Final = 1000

#: KEYS[1] lb:{N}:healthstate, KEYS[2] lb:{N}:health. ARGV[1] generation field, ARGV[2]
#: proposed generation, ARGV[3] state field, ARGV[4] state JSON, ARGV[5] MAXLEN, ARGV[6..]
#: the stream entry's fields and values. {1, id} if stored and appended, else
#: {0, stored generation, stored state JSON}.
COMMIT_SCRIPT: Final = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') or 0
if cur >= tonumber(ARGV[2]) then
  return {0, cur, redis.call('HGET', KEYS[1], ARGV[3]) or ''}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
local entry = {}
for i = 6, #ARGV do entry[#entry + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', unpack(entry))
return {1, id}
"""

#: KEYS[1] lb:{N}:trial:<target>. ARGV[1] node id, ARGV[2] ttl ms, ARGV[3] "take" or
#: "release". take: 1 if the lease is (now) ours, renewed; 0 if another node holds it.
LEASE_SCRIPT: Final = """
local cur = redis.call('GET', KEYS[1])
if ARGV[3] == 'release' then
  if cur == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_BREAKER_STATE: Final = {
    "circuit_open": OPEN,
    "circuit_half_open": HALF_OPEN,
    "circuit_closed": CLOSED,
}





def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _hash(reply: Any) -> dict[str, str]:
    if isinstance(reply, dict):
        return {_text(k): _text(v) for k, v in reply.items()}
    if not reply:
        return {}
    return {_text(k): _text(v) for k, v in zip(reply[0::2], reply[1::2], strict=False)}


def _loads(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


class HealthBusStats:
    """Counters of one ``RedisHealthBus`` (for /metrics)."""

    __slots__ = ("verdicts_sent", "verdicts_held", "outcome_events_sent", "outcomes_dropped",
                 "overrides_sent", "commits_won", "commits_lost", "commit_errors",
                 "events_followed", "follow_errors", "reloads")  # fmt: skip

    def __init__(self) -> None:
        for name in HealthBusStats.__slots__:
            setattr(self, name, 0)

    def snapshot(self) -> dict[str, int]:
        return {s: getattr(self, s) for s in HealthBusStats.__slots__}


class _Lease:
    """This node's view of one half-open breaker's trial lease."""

    __slots__ = ("held", "next_check", "seen_started")

    def __init__(self) -> None:
        self.held = False
        self.next_check = 0.0
        self.seen_started = 0


class RedisHealthBus:
    """``lbnode.health.HealthBus`` over Redis (see module doc).

    ``live_ids()`` returns the ids of the live nodes (the agent's heartbeat
    table); ``clock`` gives epoch seconds (``at`` of events, trimming).
    ``run()`` ships outcomes and keeps trial leases; ``follow(name)`` is the
    per-load-balancer follower (run until cancelled; survives Redis outages).
    """

    def __init__(
        self,
        client: RedisClient,
        manager: HealthManager,
        view: ClusterView,
        live_ids: Callable[[], Sequence[str]],
        *,
        clock: Callable[[], float] = time.time,
        ship_period: float = SHIP_PERIOD,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.client = client
        self.manager = manager
        self.view = view
        self.node_id = view.node_id
        self.stats = HealthBusStats()
        self.skipped = SkipCounter(logger=log)
        self._live_ids = live_ids
        self._clock = clock
        self.ship_period = ship_period
        self.max_pending = max_pending
        self._commit = Script(client, COMMIT_SCRIPT)
        self._lease_script = Script(client, LEASE_SCRIPT)
        # (lb, target, slice) -> [ok, errors]: this node's outcomes not yet shipped.
        self._pending: dict[tuple[str, str, int], list[int]] = {}
        self._unsent: dict[tuple[str, str], ProbeVerdict] = {}
        self._leases: dict[tuple[str, str], _Lease] = {}
        self._recent: deque[FeedEvent] = deque(maxlen=RECENT)
        self._server_ms: int | None = None  # the id time of our last XADD: MINID horizon
        self._slices_per_s = 1.0 / SLICE

    # -- the HealthBus protocol ------------------------------------------------------------------

    def live_nodes(self) -> list[str]:
        """Sorted live node ids, this one included; this node alone while degraded."""
        if self.view.degraded:
            return [self.node_id]
        ids = set(self._live_ids())
        ids.add(self.node_id)
        return sorted(ids)

    async def publish_verdict(self, lb: str, target: str, state: str, reason: str) -> None:
        """Tell the cluster (kept for a retry if Redis fails), then fold our own verdict.

        In that order: a transition our fold commits must follow, in the streams, the
        verdict that caused it - a node that adopted the transition before folding the
        verdict would vote it back at its next probe round.
        """
        event = ProbeVerdict(lb=lb, origin=self.node_id, at=self._clock(), target=target,
                             prober=self.node_id, state=state, reason=reason)  # type: ignore[arg-type]  # fmt: skip
        self._unsent.pop((lb, target), None)
        try:
            await self._xadd_state(lb, event)
            self.stats.verdicts_sent += 1
        except RedisError as exc:
            log.warning("lb %s: cannot publish the verdict on %s (%s); retrying", lb, target, exc)
            self._unsent[(lb, target)] = event
            self.stats.verdicts_held += 1
        await self.manager.on_verdict(lb, target, self.node_id, state, reason)

    async def commit(self, lb: str, target: str, kind: str, reason: str, generation: int) -> bool:
        """Compare-and-set a health transition; True only on the node whose event it is."""
        h = self.manager.lbs.get(lb)
        voted = kind
        if h is not None and target in h.cluster.targets():
            voted = h.cluster.view(target).voted
        at = self._clock()
        event = HEALTH_EVENT_MODELS[kind](lb=lb, origin=self.node_id, at=at, target=target,
                                          reason=reason, generation=generation,
                                          node=self.node_id,
                                          voted=voted)  # type: ignore[call-arg]  # fmt: skip
        state = {"state": kind, "voted": voted, "reason": reason, "at": at,
                 "generation": generation, "node": self.node_id}  # fmt: skip
        reply = await self._cas(lb, f"health:{target}", generation, f"hstate:{target}", state,
                                event)  # fmt: skip
        if reply is None:
            return False
        if reply[0]:
            self._announce(kind, lb, target, reason)
            return True
        # Another node committed this generation (or later ones, on their way to our
        # follower, which adopts them). Our generation is left alone: raising it here
        # would let our next proposal jump ahead of changes we have not seen yet.
        self.stats.commits_lost += 1
        return False

    async def commit_breaker(self, lb: str, target: str, event: BreakerEvent) -> bool:
        """Compare-and-set a breaker transition; True only for the node that announced it."""
        h = self.manager.lbs.get(lb)
        b = h.breakers.get(target) if h is not None else None
        generation = event.generation
        for _attempt in range(2):
            at = self._clock()
            model = HEALTH_EVENT_MODELS[event.type]
            record = model(lb=lb, origin=self.node_id, at=at, target=target, reason=event.reason,
                           generation=generation, node=self.node_id,
                           transition=event.transition, wait=event.wait)  # type: ignore[call-arg]  # fmt: skip
            state = {"type": event.type, "transition": event.transition, "reason": event.reason,
                     "at": at, "generation": generation, "wait": event.wait,
                     "node": self.node_id}  # fmt: skip
            reply = await self._cas(lb, f"breaker:{target}", generation, f"bstate:{target}",
                                    state, record)  # fmt: skip
            if reply is None:
                return False
            won, stored, _stored_state = reply
            if won:
                self._announce(event.type, lb, target, event.reason)
                return True
            if b is None or stored <= generation or b.generation != generation:
                self.stats.commits_lost += 1
                return False
            # Our breaker was re-created (generation reset): continue Redis's numbering.
            generation = stored + 1
            b.generation = generation
        self.stats.commits_lost += 1
        return False

    async def acquire_trial(self, lb: str, target: str, ttl: float) -> bool:
        """Take (or renew) the trial lease of ``target``; True if this node holds it.

        Redis unreachable: True (degraded, this node decides for itself).
        """
        lease = self._leases.get((lb, target))
        if lease is None:
            lease = self._leases[(lb, target)] = _Lease()
        ttl = min(ttl, LEASE_MAX)
        try:
            held = bool(await self._lease_script(
                (trial_key(lb, target),), (self.node_id, max(1, round(ttl * 1000)), "take"),
                timeout=CALL_TIMEOUT))  # fmt: skip
        except RedisError:
            held = True
        # (check_leases may have dropped it meanwhile, while the breaker was still open.)
        lease = self._leases.setdefault((lb, target), lease)
        if held and not lease.held:
            h = self.manager.lbs.get(lb)
            b = h.breakers.get(target) if h is not None else None
            lease.seen_started = b.trials_started if b is not None else 0
        lease.held = held
        lease.next_check = time.monotonic() + ttl / 2
        return held

    def outcome(self, lb: str, target: str, ok: bool, now: float) -> None:
        """Count one proxied request's outcome for the cluster's breakers (the hot path)."""
        key = (lb, target, int((now + self.view.clock_offset) * self._slices_per_s))
        counts = self._pending.get(key)
        if counts is None:
            if len(self._pending) >= self.max_pending:
                self.stats.outcomes_dropped += 1
                return
            counts = self._pending[key] = [0, 0]
        counts[0 if ok else 1] += 1

    async def set_override(self, lb: str, target: str, mode: str) -> None:
        """Store ``mode`` for the cluster, tell the other nodes, then apply it here (in that
        order, as for verdicts: the entry precedes the transition it causes)."""
        event = HealthOverride(lb=lb, origin=self.node_id, at=self._clock(), target=target,
                               mode=mode)  # type: ignore[arg-type]  # fmt: skip
        store = (("HDEL", overrides_key(lb), target) if mode == "auto"
                 else ("HSET", overrides_key(lb), target, mode))  # fmt: skip
        try:
            await self.client.pipeline([store, self._xadd_args(state_stream(lb), event)],
                                       timeout=CALL_TIMEOUT)  # fmt: skip
            self.stats.overrides_sent += 1
        except RedisError as exc:
            log.warning("lb %s: override %s of %s applies to this node only: %s",
                        lb, mode, target, exc)  # fmt: skip
        await self.manager.on_override(lb, target, mode)

    # -- Redis calls -----------------------------------------------------------------------------

    def _xadd_args(self, stream: str, event: Event) -> tuple[str, ...]:
        args: list[str] = ["XADD", stream]
        if self._server_ms is not None:
            horizon = max(0, self._server_ms - int(STATE_RETENTION * 1000))
            args += ["MINID", "~", f"{horizon}-0"]
        args.append("*")
        for field, value in encode(event).items():
            args += (field, value)
        return tuple(args)

    def _saw_id(self, entry_id: Any) -> None:
        try:
            ms = parse_id(_text(entry_id))[0]
        except ValueError:
            return
        if self._server_ms is None or ms > self._server_ms:
            self._server_ms = ms

    async def _xadd_state(self, lb: str, event: Event) -> None:
        entry_id = await self.client.execute(*self._xadd_args(state_stream(lb), event),
                                             timeout=CALL_TIMEOUT)  # fmt: skip
        self._saw_id(entry_id)

    async def _cas(self, lb: str, gen_field: str, generation: int, state_field: str,
                   state: dict[str, Any], event: Any) -> tuple[bool, int, str] | None:  # fmt: skip
        """Run ``COMMIT_SCRIPT``; None when Redis could not be asked."""
        args: list[Any] = [gen_field, generation, state_field,
                           json.dumps(state, separators=(",", ":")), DEFAULT_MAXLEN]  # fmt: skip
        for field, value in encode(event).items():
            args += (field, value)
        try:
            reply = await self._commit((healthstate_key(lb), health_stream(lb)), args,
                                       timeout=CALL_TIMEOUT)  # fmt: skip
        except RedisError as exc:
            self.stats.commit_errors += 1
            log.info("lb %s: cannot commit %s %s (%s); keeping the local view",
                     lb, event.type, event.target, exc)  # fmt: skip
            return None
        if int(reply[0]) == 1:
            self.stats.commits_won += 1
            self._saw_id(reply[1])
            return True, generation, ""
        return False, int(reply[1]), _text(reply[2])

    def _announce(self, kind: str, lb: str, target: str, reason: str) -> None:
        level = logging.WARNING if kind in (UNHEALTHY, "circuit_open") else logging.INFO
        log.log(level, "lb %s: %s %s: %s", lb, target, kind, reason)

    # -- background: shipping and leases --------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ship outcomes (and held verdicts) and keep trial leases, until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ship_loop)
            nursery.start_soon(self._lease_loop)
            task_status.started()

    def take_batches(self, now: float) -> dict[str, list[tuple[str, int, int, float]]]:
        """Drain the pending outcomes into one delta list per load balancer.

        Slices older than ``STATE_RETENTION`` (epoch ``now``) are dropped and counted.
        """
        pending, self._pending = self._pending, {}
        oldest = int((now - STATE_RETENTION) * self._slices_per_s)
        out: dict[str, list[tuple[str, int, int, float]]] = {}
        for (lb, target, s), (ok, err) in pending.items():
            if s < oldest:
                self.stats.outcomes_dropped += ok + err
                continue
            out.setdefault(lb, []).append((target, ok, err, round(s * SLICE, 3)))
        return out

    def _put_back(self, lb: str, deltas: list[tuple[str, int, int, float]]) -> None:
        for target, ok, err, start in deltas:
            key = (lb, target, round(start * self._slices_per_s))
            counts = self._pending.get(key)
            if counts is None:
                if len(self._pending) >= self.max_pending:
                    self.stats.outcomes_dropped += ok + err
                    continue
                counts = self._pending[key] = [0, 0]
            counts[0] += ok
            counts[1] += err

    async def flush(self) -> int:
        """Send the pending outcomes, one ``outcome_delta`` per load balancer, and any held
        verdicts; the number of outcome events sent. What Redis refused waits for the next."""
        sent = 0
        now = self._clock()
        for lb, deltas in self.take_batches(now).items():
            event = OutcomeDelta(lb=lb, origin=self.node_id, at=now, node=self.node_id,
                                 deltas=tuple(deltas))  # fmt: skip
            try:
                await self._xadd_state(lb, event)
            except RedisError:
                self._put_back(lb, deltas)
                continue
            sent += 1
            self.stats.outcome_events_sent += 1
        for key, verdict in list(self._unsent.items()):
            try:
                await self._xadd_state(key[0], verdict)
            except RedisError:
                break
            if self._unsent.get(key) is verdict:
                del self._unsent[key]
            self.stats.verdicts_sent += 1
        return sent

    async def _ship_loop(self) -> None:
        while True:
            await trio.sleep(self.ship_period)
            if self.view.degraded or not (self._pending or self._unsent):
                continue
            await self.flush()

    async def _lease_loop(self) -> None:
        while True:
            await trio.sleep(LEASE_TICK)
            await self.check_leases(time.monotonic())

    async def check_leases(self, now: float) -> None:
        """One pass over the half-open breakers: renew, give up or try to take their leases."""
        for (lb, target), lease in list(self._leases.items()):
            h = self.manager.lbs.get(lb)
            b = h.breakers.get(target) if h is not None else None
            if b is None or b.state != HALF_OPEN:
                del self._leases[(lb, target)]
        for lb, h in list(self.manager.lbs.items()):
            rt = self.manager.node.runtimes.get(lb)
            if rt is None:
                continue
            for target, b in list(h.breakers.items()):
                t = rt.by_id.get(target)
                if b.state != HALF_OPEN or t is None:
                    continue
                lease = self._leases.get((lb, target))
                if lease is None:
                    lease = self._leases[(lb, target)] = _Lease()
                if now < lease.next_check:
                    continue
                ttl = min(b.half_open_timeout, LEASE_MAX)
                if lease.held:
                    started = b.trials_started
                    in_flight = started - b.trial_successes - b.trial_failures
                    if started != lease.seen_started or in_flight > 0:
                        lease.seen_started = started
                        t.trial_lease = await self.acquire_trial(lb, target, ttl)
                        lease.next_check = now + ttl / 2
                    else:  # no trial traffic here: let a node that has some take over
                        await self._release(lb, target)
                        lease.held = False
                        t.trial_lease = False
                        lease.next_check = now + ttl
                else:
                    t.trial_lease = await self.acquire_trial(lb, target, ttl)
                    lease.next_check = now + ttl / 2

    async def _release(self, lb: str, target: str) -> None:
        try:
            await self._lease_script((trial_key(lb, target),), (self.node_id, 1, "release"),
                                     timeout=CALL_TIMEOUT)  # fmt: skip
        except RedisError:
            pass

    # -- following -------------------------------------------------------------------------------

    async def follow(self, lb: str) -> None:
        """Follow ``lb``'s state and health streams until cancelled (reloading after errors)."""
        backoff = Backoff(0.05, 2.0)
        reader = RedisEventLog(self.client, skipped=self.skipped)
        state, health = state_stream(lb), health_stream(lb)
        failing = False
        try:
            while True:
                try:
                    positions = {state: await stream_tail(self.client, state),
                                 health: await stream_tail(self.client, health)}  # fmt: skip
                    await self.reload(lb)
                    if failing:
                        log.info("lb %s: following health again", lb)
                        failing = False
                    backoff.reset()
                    while True:
                        for stream, entry_id, event in await reader.read(
                            positions, block=FOLLOW_BLOCK, count=1000
                        ):
                            await self.handle(lb, stream, entry_id, event)
                except RedisError as exc:
                    self.stats.follow_errors += 1
                    if not failing:
                        log.warning("lb %s: cannot follow health (%s)", lb, exc)
                    failing = True
                    await trio.sleep(backoff.next())
        finally:
            with trio.CancelScope(shield=True):
                await reader.aclose()

    async def handle(self, lb: str, stream: str, entry_id: str, event: Any) -> None:
        """Apply one followed entry (see module doc)."""
        self.stats.events_followed += 1
        kind = event.type
        if kind == "probe_verdict":
            if event.prober != self.node_id:
                await self.manager.on_verdict(lb, event.target, event.prober, event.state,
                                              event.reason)  # fmt: skip
        elif kind == "outcome_delta":
            if event.node != self.node_id:
                # Cluster time (epoch) -> our monotonic clock, mid-slice.
                shift = SLICE / 2 - self.view.clock_offset
                for target, ok, err, start in event.deltas:
                    if ok or err:
                        self.manager.on_outcomes(lb, target, ok, err, start + shift)
        elif kind == "health_override":
            if event.origin != self.node_id:
                await self.manager.on_override(lb, event.target, event.mode)
        elif kind in HEALTH_EVENT_MODELS:
            self._publish(entry_id, event)
            self._adopt(lb, event, time.monotonic())

    def _publish(self, entry_id: str, event: Any) -> None:
        record = {"id": entry_id, "type": event.type, "lb": event.lb, "target": event.target,
                  "reason": event.reason, "at": round(event.at, 3), "node": event.node}  # fmt: skip
        self._recent.append(record)
        self.manager.node.feed.publish(record)

    def _adopt(self, lb: str, event: Any, now: float) -> None:
        h = self.manager.lbs.get(lb)
        if h is None or event.target not in h.cluster.targets():
            return
        target = event.target
        if event.type in (HEALTHY, UNHEALTHY):
            if event.generation < h.generations.get(target, 0):
                return  # older than what we committed or adopted since
            view = h.cluster.view(target)
            voted = event.voted or event.type
            if view.state == event.type and view.voted == voted:
                h.generations[target] = event.generation  # nothing else to learn
                return
            # The vote is what we adopt; our own override (the same as the committer's,
            # once its entry reached us) stays on top of it.
            self.manager.on_committed_health(lb, target, voted, event.reason, event.generation)
            rt = self.manager.node.runtimes.get(lb)
            if rt is not None and target in rt.by_id:
                rt.by_id[target].healthy = h.cluster.is_healthy(target)
            return
        b = h.breaker(target)
        if b is None:
            return
        ev = BreakerEvent(event.type, event.transition, event.reason, now, event.generation,
                          event.wait)  # fmt: skip
        if self._force_breaker(lb, target, b, ev, now):
            log.info("lb %s: %s %s (committed by %s)", lb, target, event.type, event.node)

    def _force_breaker(self, lb: str, target: str, b: Breaker, ev: BreakerEvent,
                       now: float, *, reset: bool = False) -> bool:  # fmt: skip
        """Adopt a committed breaker state: newer generations always, an equal generation
        with another state too (the committed one wins); ``reset``: whatever ours is."""
        state = _BREAKER_STATE[ev.type]
        if ev.generation < b.generation and not reset:
            return False
        if ev.generation <= b.generation:
            if b.state == state and ev.generation == b.generation:
                return False
            b.generation = ev.generation - 1
        self.manager.on_committed_breaker(lb, target, ev)
        if state == HALF_OPEN:
            rt = self.manager.node.runtimes.get(lb)
            t = rt.by_id.get(target) if rt is not None else None
            if t is not None:
                lease = self._leases.get((lb, target))
                t.trial_lease = lease is not None and lease.held
        return True

    async def reload(self, lb: str) -> None:
        """Take Redis's stored health, breaker states and overrides of ``lb`` as the truth."""
        reply = await self.client.pipeline([("HGETALL", healthstate_key(lb)),
                                            ("HGETALL", overrides_key(lb))])  # fmt: skip
        stored, overrides = _hash(reply[0]), _hash(reply[1])
        h = self.manager.lbs.get(lb)
        rt = self.manager.node.runtimes.get(lb)
        if h is None or rt is None:
            return
        self.stats.reloads += 1
        now = time.monotonic()
        wall = self._clock()
        for target in h.cluster.targets():
            self._restore_health(h, target, stored, overrides.get(target, "auto"), now)
            t = rt.by_id.get(target)
            if t is not None:
                t.healthy = h.cluster.is_healthy(target)
            b = h.breaker(target)
            bstate = _loads(stored.get(f"bstate:{target}"))
            if b is None or bstate is None or bstate.get("type") not in _BREAKER_STATE:
                continue
            try:
                generation = int(stored.get(f"breaker:{target}", bstate.get("generation", 0)))
                wait = float(bstate.get("wait", 0.0))
                at = float(bstate.get("at", wall))
            except (TypeError, ValueError):
                continue
            if generation < 1:
                continue
            ev = BreakerEvent(bstate["type"], str(bstate.get("transition", "")),
                              str(bstate.get("reason", "")), now, generation, wait)  # fmt: skip
            self._force_breaker(lb, target, b, ev, now, reset=True)
            if b.state == OPEN:  # the wait runs from the commit, not from our reload
                b.open_until = now + max(0.0, at + wait - wall)

    def _restore_health(self, h: LbHealth, target: str, stored: dict[str, str], override: str,
                        now: float) -> None:  # fmt: skip
        if override in ("up", "down", "auto"):
            h.cluster.set_override(target, override, now)
        hstate = _loads(stored.get(f"hstate:{target}"))
        if hstate is None:
            return
        voted = hstate.get("voted", hstate.get("state"))
        if voted not in (HEALTHY, UNHEALTHY):
            return
        try:
            generation = int(stored.get(f"health:{target}", hstate.get("generation", 0)))
        except (TypeError, ValueError):
            return
        h.cluster.adopt(target, voted, str(hstate.get("reason", "")), now)
        h.generations[target] = generation

    # -- the feed's history ----------------------------------------------------------------------

    async def history(self, since: str, lb: str | None = None) -> list[FeedEvent]:
        """The kept events of the health streams after ``since`` ("0": all), oldest first
        (``HealthFeed.history_source``). Redis unreachable: what this node saw itself."""
        try:
            after = parse_id(since) if since not in ("", "0", "0-0") else (0, 0)
        except ValueError:
            after = (0, 0)
        names = [lb] if lb is not None else sorted(self.manager.lbs)
        start = "-" if after == (0, 0) else f"({after[0]}-{after[1]}"
        out: list[tuple[tuple[int, int], FeedEvent]] = []
        try:
            for name in names:
                for entry_id, event in await self._range(health_stream(name), start):
                    out.append((parse_id(entry_id), {
                        "id": entry_id, "type": event.type, "lb": event.lb,
                        "target": event.target, "reason": event.reason,
                        "at": round(event.at, 3), "node": event.node}))  # fmt: skip
        except RedisError:
            return [e for e in self._recent
                    if parse_id(e["id"]) > after and (lb is None or e["lb"] == lb)]  # fmt: skip
        out.sort(key=lambda pair: pair[0])
        return [e for _, e in out]

    async def _range(self, stream: str, start: str) -> list[tuple[str, Any]]:
        from lbshared.events import BadEvent, decode

        out: list[tuple[str, Any]] = []
        while True:
            page = await self.client.execute("XRANGE", stream, start, "+", "COUNT", "1000")
            for raw_id, raw_fields in page or ():
                entry_id = _text(raw_id)
                try:
                    fields = _hash(raw_fields) if not isinstance(raw_fields, dict) else raw_fields
                    event = decode(fields)
                except (BadEvent, ValueError) as exc:
                    self.skipped.skip(stream, entry_id, exc if isinstance(exc, BadEvent)
                                      else BadEvent("missing field", "odd fields"))  # fmt: skip
                    continue
                if event.type in HEALTH_EVENT_MODELS:
                    out.append((entry_id, event))
            if not page or len(page) < 1000:
                return out
            start = "(" + _text(page[-1][0])

    # -- housekeeping ----------------------------------------------------------------------------

    def forget(self, lb: str) -> None:
        """Drop what this node holds for a deleted load balancer."""
        for key in [k for k in self._pending if k[0] == lb]:
            del self._pending[key]
        for key in [k for k in self._unsent if k[0] == lb]:
            del self._unsent[key]
        for key in [k for k in self._leases if k[0] == lb]:
            del self._leases[key]

    def metrics(self) -> list[Any]:
        """Counter families for /metrics."""
        st = self.stats
        return [
            CounterMetricFamily("lbnode_health_verdicts_sent", "Probe verdicts published.",
                                value=st.verdicts_sent),  # fmt: skip
            CounterMetricFamily("lbnode_health_outcome_events_sent",
                                "Breaker outcome batches published.",
                                value=st.outcome_events_sent),  # fmt: skip
            CounterMetricFamily("lbnode_health_outcomes_dropped",
                                "Breaker outcomes dropped (Redis unreachable too long).",
                                value=st.outcomes_dropped),  # fmt: skip
            CounterMetricFamily("lbnode_health_commits_won",
                                "Health and breaker transitions this node announced.",
                                value=st.commits_won),  # fmt: skip
            CounterMetricFamily("lbnode_health_commits_lost",
                                "Transitions another node committed first.",
                                value=st.commits_lost),  # fmt: skip
            CounterMetricFamily("lbnode_health_commit_errors",
                                "Transitions that could not be committed (Redis).",
                                value=st.commit_errors),  # fmt: skip
            CounterMetricFamily("lbnode_health_events_skipped",
                                "Malformed health/state entries skipped.",
                                value=self.skipped.total),  # fmt: skip
        ]
