"""Cluster-wide rate limits: one limit for a client, however many nodes it hits.

Theory of operation
-------------------
Two modes, chosen per limit by ``rate_limit.mode``.

``cluster`` (the default; the request path never waits on Redis)
    Every node decides locally with the sans-IO sliding window of
    ``lbnode.policy.ratelimit``, on a ``MemoryCounterStore`` that holds this
    node's own admissions *plus the other nodes' admissions folded in*.
    ``ClusterRateLimiter`` is that limiter; ``RateSync`` is the per-load-
    balancer task that keeps the stores in step:

    * every ``sync_period`` (50 ms) it drains each store's unsynced local
      admissions (``drain_unsynced``: ``(key, n, bucket_start)``) and XADDs
      ONE ``rate_delta`` event to ``lb:{NAME}:state``;
    * concurrently it follows that stream (XREAD BLOCK on a dedicated
      connection) and folds every *other* node's deltas into the store of the
      limiter they name (the rule name, ``""`` for the LB-level limit; a
      delta for a limiter this node does not have is dropped and counted).

    A key that accumulates ``cap`` unsynced admissions calls ``on_cap`` (bound
    to ``RateSync.wake``), so a burst is shipped at once instead of at the end
    of the period: that bounds what the others have not seen to
    ``min(r * (P + propagation), cap)`` per node. Default cap:
    ``max(1, limit // (10 * live_nodes))``: a tenth of a node's fair share,
    large enough that a steady client costs one event per period, small
    enough that a burst cannot hide more than 10 % of the share
    (docs/cluster.md, "Shared rate limits", derives the overshoot bound).

    Clocks. The stores run on *cluster time*, ``monotonic() + clock_offset``
    (``ClusterView.clock_offset``, computed once per process): it never jumps
    (it is the monotonic clock), yet it is epoch time to within the node's
    clock error when the process started, so every node cuts the interval
    into the same sub-buckets. A delta's ``bucket_start`` therefore needs no
    conversion: it is folded at the middle of its bucket, which lands it in
    the very bucket it came from as long as the nodes' clocks agree to within
    half a bucket (3 s for a 60 s interval with 10 buckets); beyond that the
    admissions are released up to half a bucket early or late.

    Redis unreachable (``view.degraded``). The shared store stops receiving
    the others' admissions, so deciding on it against the full limit would
    let every node admit the whole limit: ``N x limit`` for the cluster.
    ``on_store_error: allow`` therefore decides against a *local share*,
    ``ceil(limit / live_nodes)``, counting this node's admissions only, in a
    separate local store. Separate because the shared store still holds the
    other nodes' admissions from before the outage: counting those against a
    1/N share would refuse a client that the cluster as a whole still has
    room for, and would make the share depend on how stale the view is. The
    admissions made while degraded are also added to the shared store (as
    unsynced deltas), so the others learn of them once Redis is back.
    ``deny`` refuses (429, Retry-After 1) until Redis is back.

``strict`` (exact; one Redis round trip a request)
    ``StrictRateLimiter.acheck_request`` runs one Lua script a decision: an
    exact sliding log of admission timestamps in the sorted set
    ``lb:{NAME}:rl:<limiter>:<key>`` (members unique per node and call),
    on Redis server time (``redis.call('TIME')``), so node clocks do not
    matter: ZREMRANGEBYSCORE the admissions that left the window, ZCARD,
    ZADD when under the limit, PEXPIRE one interval. The call has a short
    timeout (``STRICT_TIMEOUT``, 100 ms: a hundred times Redis's usual
    sub-millisecond answer, short enough that a stalled Redis costs a
    request little); on ``RedisUnavailable``/``RedisTimeout`` (or while
    ``view.degraded``, without trying) it falls back to the local-share
    decision (``allow``) or refuses (``deny``).

Both produce the ``Decision`` of ``lbnode.policy.ratelimit``, with the same
headers. ``is_async`` tells the data path which call to make:
``check_request(req, now)`` (cluster, local) or ``await
acheck_request(req, now)`` (strict).
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import trio

from lbnode.policy.ratelimit import Decision, MemoryCounterStore, RateLimiter, keyless_decision
from lbshared.events import RateDelta, SkipCounter, encode
from lbshared.redis_trio import (
    Backoff,
    RedisError,
    RedisTimeout,
    RedisUnavailable,
    ReplyError,
    Script,
)
from lbshared.store import STATE_RETENTION, RedisEventLog, ratelimit_key, state_stream

from .view import ClusterView, stream_tail

if TYPE_CHECKING:
    from lbnode.policy.request import RequestView
    from lbshared.config import RateLimit
    from lbshared.redis_trio import RedisClient

__all__ = [
    "DEFAULT_MAX_PENDING",
    "DEFAULT_SYNC_PERIOD",
    "STRICT_TIMEOUT",
    "ClusterRateLimiter",
    "RateSync",
    "StrictRateLimiter",
    "default_cap",
]

log = logging.getLogger("lbnode.cluster.ratelimit")

#: Seconds between two rate_delta batches of one node.
DEFAULT_SYNC_PERIOD: Final = 0.05
#: Deltas held while Redis is unreachable; beyond it the oldest are dropped (and counted).
DEFAULT_MAX_PENDING: Final = 100_000
#: Deltas per rate_delta event (a larger batch is split; normally one event).
MAX_DELTAS_PER_EVENT: Final = 5_000
#: Timeout of one strict-mode script call (seconds).
STRICT_TIMEOUT: Final = 0.1
#: How long one XREAD BLOCK of the follower waits (seconds).
FOLLOW_BLOCK: Final = 1.0
# Float slack when comparing an estimate with a limit (as the policy module does).
_EPS: Final = 1e-9


def _ceil(seconds: float) -> int:
    return max(0, math.ceil(seconds - 1e-9))


def default_cap(limit: int, live_nodes: int) -> int:
    """Unsynced admissions of one key that trigger an immediate sync.

    ``max(1, limit // (10 * live_nodes))``: a tenth of a node's fair share.
    """
    return max(1, limit // (10 * max(1, live_nodes)))


def _decide(store: MemoryCounterStore, limit: int, key: str, now: float) -> Decision:
    """The admit/refuse decision of ``RateLimiter`` for ``limit`` on ``store``."""
    used = store.count(key, now)
    if used + 1 <= limit + _EPS:
        store.add(key, 1, now)
        remaining = max(0, math.floor(limit - used - 1 + _EPS))
        return Decision(True, limit, remaining, _ceil(store.time_until(key, now, 0.0)))
    wait = max(1, _ceil(store.time_until(key, now, limit - 1)))
    return Decision(False, limit, 0, wait, wait)


class ClusterRateLimiter(RateLimiter):
    """A ``RateLimiter`` on a store shared with the cluster through ``RateSync``.

    Same synchronous API (``check_request``, ``check``, ``key_of``,
    ``config``, ``store``); ``now`` is monotonic seconds as for
    ``RateLimiter``. ``cap``: unsynced admissions of a key that call
    ``on_cap`` (None: ``default_cap(limit, view.live_nodes)``, re-evaluated as
    nodes come and go).
    """

    __slots__ = ("view", "on_cap", "cap", "local", "_offset", "_half_width", "_deny")

    is_async = False

    def __init__(
        self,
        config: RateLimit,
        store: MemoryCounterStore | None,
        view: ClusterView,
        on_cap: Callable[[], None],
        *,
        cap: int | None = None,
    ) -> None:
        if store is None:
            store = MemoryCounterStore(
                config.interval, max_keys=config.max_keys, track_unsynced=True
            )
        super().__init__(config, store)
        self.store: MemoryCounterStore = store
        self.view = view
        self.on_cap = on_cap
        self.cap = cap
        # This node's admissions while degraded, against the local share only.
        self.local = MemoryCounterStore(config.interval, buckets=store.buckets,
                                        max_keys=config.max_keys)  # fmt: skip
        self._offset = view.clock_offset
        self._half_width = store.interval / store.buckets / 2
        self._deny = config.on_store_error == "deny"

    def __repr__(self) -> str:
        return f"ClusterRateLimiter(limit={self.limit}, interval={self.store.interval:g})"

    def _check(self, key: str, now: float) -> Decision:
        t = now + self._offset
        view = self.view
        if view.degraded:
            if self._deny:
                return Decision(False, self.limit, 0, 1, 1)
            return self._local_share(key, t, view)
        decision = RateLimiter._check(self, key, t)
        if decision.allowed:
            cap = self.cap
            if cap is None:
                cap = default_cap(self.limit, view.live_nodes)
            if self.store.unsynced(key) >= cap:
                self.on_cap()
        return decision

    def share(self) -> int:
        """This node's share of the limit while degraded: ``ceil(limit / live_nodes)``."""
        return -(-self.limit // self.view.share_divisor)

    def check_local_share(self, key: str, now: float) -> Decision:
        """Decide ``key`` against the local share only (the degraded/fallback decision).

        The headers then announce the share as the limit: it is what this
        node enforces. Admissions are also added to the shared store as
        unsynced deltas, for the other nodes once Redis is back.
        """
        return self._local_share(key, now + self._offset, self.view)

    def _local_share(self, key: str, t: float, view: ClusterView) -> Decision:
        share = -(-self.limit // view.share_divisor)
        decision = _decide(self.local, share, key, t)
        if decision.allowed:
            self.store.add(key, 1, t)
        return decision

    def fold_remote(self, key: str, n: int, bucket_start: float) -> None:
        """Fold ``n`` admissions another node made in the bucket starting at ``bucket_start``
        (cluster time = epoch seconds); placed at the middle of the bucket."""
        self.store.add_remote(key, n, bucket_start + self._half_width)


class _Pending:
    """A delta waiting to be shipped: (limiter, key, n, bucket_start, worthless_after)."""

    __slots__ = ("limiter", "key", "n", "start", "stale_at")

    def __init__(self, limiter: str, key: str, n: int, start: float, stale_at: float) -> None:
        self.limiter = limiter
        self.key = key
        self.n = n
        self.start = start
        self.stale_at = stale_at


class RateSyncStats:
    """Counters of one ``RateSync`` (for /metrics)."""

    __slots__ = ("events_sent", "deltas_sent", "deltas_dropped", "deltas_stale", "send_errors",
                 "events_received", "deltas_folded", "deltas_unknown_limiter",
                 "follow_errors")  # fmt: skip

    def __init__(self) -> None:
        self.events_sent = 0
        self.deltas_sent = 0
        self.deltas_dropped = 0  # over the pending budget during an outage
        self.deltas_stale = 0  # older than their window by the time they could be sent
        self.send_errors = 0
        self.events_received = 0
        self.deltas_folded = 0
        self.deltas_unknown_limiter = 0
        self.follow_errors = 0

    def snapshot(self) -> dict[str, int]:
        return {s: getattr(self, s) for s in RateSyncStats.__slots__}


class RateSync:
    """Ships this node's rate-limit deltas for one load balancer and folds the others'.

    ``limiters()`` returns the current limiters by name (rule name, ``""`` for
    the LB-level one), e.g. ``lambda: runtime_slot.current.limiters_by_name()``;
    entries that are not ``ClusterRateLimiter`` (strict ones) are ignored.
    ``cap``: if set, overrides the unsynced cap of every limiter synced.
    ``clock``: epoch seconds (``at`` of the events, MINID trimming, staleness).
    """

    def __init__(
        self,
        client: RedisClient,
        lb_name: str,
        node_id: str,
        limiters: Callable[[], dict[str, RateLimiter]],
        *,
        sync_period: float = DEFAULT_SYNC_PERIOD,
        cap: int | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if sync_period <= 0:
            raise ValueError("sync_period must be positive")
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.client = client
        self.lb_name = lb_name
        self.node_id = node_id
        self.stream = state_stream(lb_name)
        self.sync_period = sync_period
        self.cap = cap
        self.max_pending = max_pending
        self.stats = RateSyncStats()
        self.skipped = SkipCounter(logger=log)
        self._limiters = limiters
        self._clock = clock
        self._pending: deque[_Pending] = deque()
        self._wake = trio.Event()
        self._retention = STATE_RETENTION
        #: Set once the follower knows where the stream ends (it folds what comes after).
        self.ready = trio.Event()

    def wake(self) -> None:
        """Ship the pending deltas now rather than at the end of the period (``on_cap``)."""
        self._wake.set()

    def _current(self) -> dict[str, ClusterRateLimiter]:
        return {
            n: lim for n, lim in self._limiters().items() if isinstance(lim, ClusterRateLimiter)
        }

    # -- shipping ------------------------------------------------------------------------------

    def collect(self) -> int:
        """Drain every limiter's unsynced deltas into the pending queue; how many were added.

        The queue is bounded by ``max_pending``: the oldest deltas beyond it
        are dropped and counted (``stats.deltas_dropped``).
        """
        now = self._clock()
        added = 0
        longest = 0.0
        pending = self._pending
        for name, lim in self._current().items():
            if self.cap is not None:
                lim.cap = self.cap
            interval = lim.store.interval
            longest = max(longest, interval)
            width = interval / lim.store.buckets
            for key, n, start in lim.store.drain_unsynced():
                pending.append(_Pending(name, key, n, start, start + width + interval))
                added += 1
        self._retention = max(STATE_RETENTION, 2 * longest)
        over = len(pending) - self.max_pending
        for _ in range(max(0, over)):
            pending.popleft()
        if over > 0:
            self.stats.deltas_dropped += over
        # Deltas whose admissions have all left every window are worthless.
        while pending and pending[0].stale_at <= now:
            pending.popleft()
            self.stats.deltas_stale += 1
        return added

    async def flush(self) -> int:
        """Send the pending deltas (one ``rate_delta`` event per ``MAX_DELTAS_PER_EVENT``).

        Returns the number of deltas sent. Raises ``RedisError`` with the
        unsent ones still pending (a ``ReplyError`` drops the batch instead:
        retrying a command Redis refused would fail for ever).
        """
        sent = 0
        pending = self._pending
        while pending:
            now = self._clock()
            batch = list(itertools.islice(pending, MAX_DELTAS_PER_EVENT))
            event = RateDelta(
                lb=self.lb_name, origin=self.node_id, at=now, node=self.node_id,
                deltas=tuple((d.limiter, d.key, d.n, d.start) for d in batch),
            )  # fmt: skip
            minid = f"{max(0, int((now - self._retention) * 1000))}-0"
            args: list[str] = ["XADD", self.stream, "MINID", "~", minid, "*"]
            for field, value in encode(event).items():
                args += (field, value)
            try:
                await self.client.execute(*args)
            except ReplyError as exc:
                log.error("rate sync %s: XADD refused (%s); %d deltas dropped",
                          self.lb_name, exc, len(batch))  # fmt: skip
                self.stats.deltas_dropped += len(batch)
                self._drop_head(len(batch))
                continue
            # (A RedisTimeout may hide an XADD that did happen: the retry then
            # counts those admissions twice, erring towards refusing.)
            self._drop_head(len(batch))
            sent += len(batch)
            self.stats.events_sent += 1
            self.stats.deltas_sent += len(batch)
        return sent

    def _drop_head(self, n: int) -> None:
        pending = self._pending
        for _ in range(min(n, len(pending))):
            pending.popleft()

    @property
    def retention(self) -> float:
        """Seconds of ``lb:{NAME}:state`` kept by the ``MINID`` trimming: 2 min or 2x the
        longest interval synced."""
        return self._retention

    @property
    def pending(self) -> int:
        """Deltas drained but not yet sent."""
        return len(self._pending)

    async def _ship_loop(self) -> None:
        backoff = Backoff(min(self.sync_period, 2.0), 2.0)
        failing = False
        while True:
            with trio.move_on_after(self.sync_period):
                await self._wake.wait()
            self._wake = trio.Event()
            self.collect()
            if not self._pending:
                continue
            try:
                await self.flush()
            except (RedisUnavailable, RedisTimeout) as exc:
                self.stats.send_errors += 1
                if not failing:
                    log.warning("rate sync %s: cannot send deltas (%s); holding up to %d",
                                self.lb_name, exc, self.max_pending)  # fmt: skip
                failing = True
                await trio.sleep(backoff.next())
                continue
            if failing:
                log.info("rate sync %s: sending deltas again", self.lb_name)
                failing = False
            backoff.reset()

    # -- following -----------------------------------------------------------------------------

    def fold(self, event: RateDelta) -> int:
        """Fold another node's ``rate_delta`` into the matching stores; deltas folded."""
        if event.origin == self.node_id or event.node == self.node_id:
            return 0
        self.stats.events_received += 1
        limiters = self._current()
        folded = 0
        for name, key, n, start in event.deltas:
            lim = limiters.get(name)
            if lim is None:
                self.stats.deltas_unknown_limiter += 1
                continue
            if n <= 0:
                continue
            lim.fold_remote(key, n, start)
            folded += 1
        self.stats.deltas_folded += folded
        return folded

    async def _follow_loop(self) -> None:
        backoff = Backoff(0.05, 2.0)
        reader = RedisEventLog(self.client, skipped=self.skipped)
        failing = False
        try:
            while True:
                try:
                    # After a (re)connect: from the stream's current end ("$"), resolved
                    # once so nothing appended between two reads is missed.
                    positions = {self.stream: await stream_tail(self.client, self.stream)}
                    self.ready.set()
                    while True:
                        for _stream, _id, event in await reader.read(
                            positions, block=FOLLOW_BLOCK, count=1000
                        ):
                            if isinstance(event, RateDelta):
                                self.fold(event)
                        if failing:
                            log.info("rate sync %s: following %s again", self.lb_name, self.stream)
                            failing = False
                        backoff.reset()
                except RedisError as exc:
                    self.stats.follow_errors += 1
                    if not failing:
                        log.warning("rate sync %s: cannot follow %s (%s)",
                                    self.lb_name, self.stream, exc)  # fmt: skip
                    failing = True
                    await trio.sleep(backoff.next())
        finally:
            with trio.CancelScope(shield=True):
                await reader.aclose()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ship and follow until cancelled (``started()`` at once; survives Redis outages)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ship_loop)
            nursery.start_soon(self._follow_loop)
            task_status.started()


# -- strict mode -------------------------------------------------------------------------------

#: KEYS[1] the sorted set; ARGV limit, window (microseconds), unique member.
#: Returns {admitted 0/1, count after, oldest relevant admission (us), now (us)}.
STRICT_SCRIPT: Final = """
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local count = redis.call('ZCARD', key)
if count < limit then
  redis.call('ZADD', key, now, ARGV[3])
  redis.call('PEXPIRE', key, math.ceil(window / 1000))
  return {1, count + 1, now, now}
end
local first = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
return {0, count, tonumber(first[2]), now}
"""


class StrictRateLimiter:
    """Exact cluster-wide limit: one atomic Lua script on Redis a decision.

    ``await acheck_request(req, now)`` / ``await acheck(key, now)``; ``now``
    (monotonic) only serves the fallback. ``fallback`` decides while Redis
    cannot (its local share for a ``ClusterRateLimiter``, its own window for
    a plain ``RateLimiter``); ``timeout`` bounds the Redis call.
    """

    __slots__ = ("config", "client", "lb_name", "name", "view", "fallback", "limit", "timeout",
                 "key_spec", "stats_errors", "_script", "_prefix", "_window_us", "_reset",
                 "_member", "_seq", "_deny", "_on_missing", "_enabled", "_unlimited")  # fmt: skip

    is_async = True

    def __init__(
        self,
        config: RateLimit,
        client: RedisClient,
        lb_name: str,
        view: ClusterView,
        fallback: ClusterRateLimiter | RateLimiter,
        *,
        name: str = "",
        timeout: float = STRICT_TIMEOUT,
    ) -> None:
        self.config = config
        self.client = client
        self.lb_name = lb_name
        self.name = name
        self.view = view
        self.fallback = fallback
        self.limit: int = config.limit
        self.timeout = timeout
        self.key_spec = fallback.key_spec
        self.stats_errors = 0
        self._script = Script(client, STRICT_SCRIPT)
        self._prefix = ratelimit_key(lb_name, name, "")
        self._window_us = max(1, round(config.interval * 1_000_000))
        self._reset = _ceil(config.interval)  # an admitted request is the newest: T to empty
        # Members are unique across nodes, processes and limiter instances.
        self._member = f"{view.node_id}:{secrets.token_hex(6)}:"
        self._seq = itertools.count()
        self._deny = config.on_store_error == "deny"
        self._on_missing: str = config.on_missing_key
        self._enabled: bool = config.enabled
        self._unlimited = Decision(True, self.limit, self.limit, 0, None, limited=False)

    def __repr__(self) -> str:
        return f"StrictRateLimiter({self._prefix!r}, limit={self.limit})"

    @property
    def store(self) -> object:
        """The fallback's store (what a local view of this limit holds)."""
        return self.fallback.store

    def key_of(self, req: RequestView) -> str | None:
        """The rate-limit key of ``req`` (None when missing or empty)."""
        return self.key_spec.extract(req)

    async def acheck_request(self, req: RequestView, now: float) -> Decision:
        """``await acheck(self.key_of(req), now)``."""
        return await self.acheck(self.key_spec.extract(req), now)

    async def acheck(self, key: str | None, now: float) -> Decision:
        """Admit (and record in Redis) or refuse one request of ``key``."""
        if not self._enabled:
            return self._unlimited
        if key is None:
            keyless = keyless_decision(self.config, self._unlimited)
            if keyless is not None:
                return keyless
            key = ""
        if self.view.degraded:
            return self._store_error(key, now)
        member = self._member + str(next(self._seq))
        try:
            reply = await self._script(
                (self._prefix + key,), (self.limit, self._window_us, member), timeout=self.timeout
            )
        except (RedisUnavailable, RedisTimeout, ReplyError) as exc:
            self.stats_errors += 1
            if isinstance(exc, ReplyError):
                log.error("strict rate limit %s: script failed: %s", self._prefix, exc)
            return self._store_error(key, now)
        admitted, count, oldest, server_now = reply
        limit = self.limit
        if admitted:
            return Decision(True, limit, max(0, limit - count), self._reset)
        wait = max(1, _ceil((oldest + self._window_us - server_now) / 1_000_000))
        return Decision(False, limit, 0, wait, wait)

    def _store_error(self, key: str, now: float) -> Decision:
        if self._deny:
            return Decision(False, self.limit, 0, 1, 1)
        fallback = self.fallback
        if isinstance(fallback, ClusterRateLimiter):
            return fallback.check_local_share(key, now)
        return fallback.check(key, now)
