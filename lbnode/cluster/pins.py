"""Sticky-session pins shared by the cluster: a session pinned on one node sticks on all.

Theory of operation
-------------------
The data path talks to an ``AsyncPinStore`` (``get``, ``pin_if_absent``,
``refresh``, ``unpin``; keys ``"rule:session"`` as ``StickyPolicy.key``
builds them, times monotonic seconds). Two implementations:

``LocalPinStore``
    The standalone node's: the sans-IO ``MemoryPinStore`` behind async
    methods that never suspend.

``SharedPinStore``
    Redis is the truth, one STRING per session,
    ``lb:{NAME}:sticky:<rule>:<session>`` = target id with ``PX`` = the
    sticky ttl; a local ``MemoryPinStore`` is this node's cache of it.

    * ``get``: the cache first. On a miss, ``GET`` + ``PTTL`` (one pipelined
      round trip, ``timeout`` 100 ms): a cache miss is the one place the
      request path waits on Redis. A hit is cached for the key's remaining
      TTL (measured after the call, so the cache never outlives Redis).
    * ``pin_if_absent``: ``SET key target NX GET PX ttl`` + ``PTTL``: the
      first writer wins in Redis, and the reply names the winner whether it
      was us or an earlier pin; the winner is cached and returned, so every
      node converges on one target per session. A pin we created is
      announced with a ``pin`` notice on ``lb:{NAME}:state`` so the other
      nodes' caches warm before the session reaches them.
    * ``refresh`` (sliding TTL of an active session): the cache's TTL at
      once; the ``PEXPIRE`` is queued and sent by the flusher task, batched
      and de-duplicated (never awaited by a request). A ``PEXPIRE`` that
      finds no key (Redis lost it) re-creates it ``NX`` from the cache.
    * ``unpin``: out of the cache, then ``DEL`` awaited (short timeout) so
      that a ``pin_if_absent`` that follows (a re-pin after the target
      failed) is ordered after it; an ``unpin`` notice clears the other
      caches. A ``DEL`` that fails is queued for the flusher to retry.

    Other nodes' notices are applied by a small follower task: ``pin``
    caches the pin (replacing what the cache held: the sender won the
    ``SET NX``), ``unpin`` drops it. Notices are hints; a lost one only
    costs a read-through.

    Redis unreachable (``view.degraded``, or a call raising
    ``RedisUnavailable``/``RedisTimeout``/any ``RedisError``): the store
    answers from the cache and pins into the cache, never raising to the
    data path. Sessions first seen on another node during the outage are
    balanced afresh there (the price of availability). When Redis comes back
    *empty* (restarted without persistence), ``republish()`` writes every
    live cached pin back with ``SET NX PX <remaining ttl>`` (a pin some node
    re-created meanwhile wins, and the cache adopts it), so sessions in use
    keep their targets.

``run()`` is the background task (flusher + notice follower) of one
``SharedPinStore``; the node starts one per load balancer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from lbnode.policy.sticky import MemoryPinStore
from lbshared.events import Pin, SkipCounter, Unpin, encode
from lbshared.redis_trio import Backoff, RedisError, ReplyError
from lbshared.store import STATE_RETENTION, RedisEventLog, state_stream

from .view import ClusterView, stream_tail

if TYPE_CHECKING:
    from lbshared.events import Event
    from lbshared.redis_trio import RedisClient

__all__ = [
    "PIN_TIMEOUT",
    "AsyncPinStore",
    "LocalPinStore",
    "PinStoreStats",
    "SharedPinStore",
]

log = logging.getLogger("lbnode.cluster.pins")

#: Timeout of a read-through, a pin or an unpin on the request path (seconds).
PIN_TIMEOUT: Final = 0.1
#: Seconds between two flushes of queued refreshes, retried deletes and notices.
FLUSH_PERIOD: Final = 0.2
#: Queued refreshes/deletes/notices kept while Redis is unreachable.
MAX_PENDING: Final = 100_000
#: Commands per pipeline of the flusher and of republish().
BATCH: Final = 1000
#: How long a key found without a TTL (someone SET it by hand) is cached.
NO_TTL_CACHE: Final = 60.0
#: How long one XREAD BLOCK of the notice follower waits (seconds).
FOLLOW_BLOCK: Final = 1.0


class AsyncPinStore(Protocol):
    """Where the data path finds and records session pins (times: monotonic seconds)."""

    async def get(self, key: str, now: float) -> str | None:
        """The pinned target id, or None."""
        ...

    async def pin_if_absent(self, key: str, target_id: str, ttl: float, now: float) -> str:
        """Pin ``key`` to ``target_id`` unless a pin exists; return the winner."""
        ...

    async def refresh(self, key: str, ttl: float, now: float) -> None:
        """Extend a live pin to ``ttl`` after ``now`` (sliding expiry)."""
        ...

    async def unpin(self, key: str) -> None:
        """Remove the pin."""
        ...


class LocalPinStore:
    """``AsyncPinStore`` over an in-process ``MemoryPinStore`` (standalone nodes)."""

    __slots__ = ("local",)

    def __init__(self, local: MemoryPinStore | None = None) -> None:
        self.local = local if local is not None else MemoryPinStore()

    async def get(self, key: str, now: float) -> str | None:
        """The pinned target id, or None."""
        return self.local.get(key, now)

    async def pin_if_absent(self, key: str, target_id: str, ttl: float, now: float) -> str:
        """Pin ``key`` to ``target_id`` unless a pin exists; return the winner."""
        return self.local.pin_if_absent(key, target_id, ttl, now)

    async def refresh(self, key: str, ttl: float, now: float) -> None:
        """Extend a live pin to ``ttl`` after ``now``."""
        self.local.refresh(key, ttl, now)

    async def unpin(self, key: str) -> None:
        """Remove the pin."""
        self.local.unpin(key)


class PinStoreStats:
    """Counters of one ``SharedPinStore`` (for /metrics)."""

    __slots__ = ("cache_hits", "reads", "read_misses", "pins_won", "pins_lost", "fallbacks",
                 "refreshes_sent", "recreated", "deletes_retried", "notices_sent",
                 "notices_applied", "republished", "dropped")  # fmt: skip

    def __init__(self) -> None:
        for name in PinStoreStats.__slots__:
            setattr(self, name, 0)

    def snapshot(self) -> dict[str, int]:
        return {s: getattr(self, s) for s in PinStoreStats.__slots__}


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class SharedPinStore:
    """``AsyncPinStore`` on Redis with a local cache; see the module's theory of operation.

    ``local`` is the cache (carry it over a config rebuild); ``timeout``
    bounds each request-path call; ``notices`` publishes and follows
    ``pin``/``unpin`` notices; ``retention``: the ``MINID`` trimming of the
    state stream on each notice (pass ``RateSync.retention`` so both writers
    trim alike); ``clock`` is the data path's monotonic clock, ``wall_clock``
    epoch seconds (event times, stream trimming).
    """

    def __init__(
        self,
        client: RedisClient,
        lb_name: str,
        view: ClusterView,
        local: MemoryPinStore | None = None,
        *,
        timeout: float = PIN_TIMEOUT,
        flush_period: float = FLUSH_PERIOD,
        notices: bool = True,
        max_pending: int = MAX_PENDING,
        retention: float = STATE_RETENTION,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.lb_name = lb_name
        self.view = view
        self.local = local if local is not None else MemoryPinStore()
        self.timeout = timeout
        self.flush_period = flush_period
        self.notices = notices
        self.max_pending = max_pending
        self.retention = retention
        self.stream = state_stream(lb_name)
        self.prefix = f"lb:{{{lb_name}}}:sticky:"  # + "rule:session" = lbshared.store.sticky_key
        self.stats = PinStoreStats()
        self.skipped = SkipCounter(logger=log)
        self._clock = clock
        self._wall = wall_clock
        self._refresh: dict[str, int] = {}  # key -> ttl ms, for the flusher
        self._deletes: dict[str, None] = {}  # keys whose DEL failed (ordered set)
        self._notices: list[dict[str, str]] = []
        self._failing = False
        #: Set once the notice follower knows where the stream ends.
        self.ready = trio.Event()

    def __repr__(self) -> str:
        return f"SharedPinStore({self.lb_name!r}, cached={len(self.local)})"

    # -- the request path ----------------------------------------------------------------------

    async def get(self, key: str, now: float) -> str | None:
        """The pinned target id: the cache, else Redis (cached for its remaining TTL), else None."""
        local = self.local
        pinned = local.get(key, now)
        if pinned is not None:
            self.stats.cache_hits += 1
            return pinned
        if self.view.degraded:
            self.stats.fallbacks += 1
            return None
        rk = self.prefix + key
        self.stats.reads += 1
        try:
            value, pttl = await self.client.pipeline((("GET", rk), ("PTTL", rk)), self.timeout)
        except RedisError as exc:
            self._fallback("read", exc)
            return None
        self._failing = False
        if value is None or isinstance(value, ReplyError):
            self.stats.read_misses += 1
            return None
        target = _text(value)
        ttl = self._ttl_of(pttl)
        if ttl is None:
            return target  # it expired between GET and PTTL: use it, do not cache it
        return self._cache(key, target, ttl, now)

    async def pin_if_absent(self, key: str, target_id: str, ttl: float, now: float) -> str:
        """Pin ``key`` to ``target_id`` unless a pin exists (cache or Redis); return the winner."""
        local = self.local
        cached = local.get(key, now)
        if cached is not None:
            return cached
        if self.view.degraded:
            self.stats.fallbacks += 1
            return local.pin_if_absent(key, target_id, ttl, now)
        rk = self.prefix + key
        ttl_ms = max(1, round(ttl * 1000))
        try:
            previous, pttl = await self.client.pipeline(
                (("SET", rk, target_id, "NX", "GET", "PX", ttl_ms), ("PTTL", rk)), self.timeout
            )
        except RedisError as exc:
            self._fallback("pin", exc)
            return local.pin_if_absent(key, target_id, ttl, now)
        if isinstance(previous, ReplyError):
            self._fallback("pin", previous)
            return local.pin_if_absent(key, target_id, ttl, now)
        self._failing = False
        if previous is None:
            self.stats.pins_won += 1
            if self.notices:
                rule, _, session = key.partition(":")
                self._notice(Pin(
                    lb=self.lb_name, origin=self.view.node_id, at=self._wall(),
                    rule=rule, session=session, target=target_id, ttl=ttl,
                ))  # fmt: skip
            return self._cache(key, target_id, ttl, now)
        self.stats.pins_lost += 1
        winner = _text(previous)
        remaining = self._ttl_of(pttl)
        return self._cache(key, winner, ttl if remaining is None else remaining, now)

    async def refresh(self, key: str, ttl: float, now: float) -> None:
        """Extend the pin in the cache now and in Redis at the next flush."""
        if self.local.refresh(key, ttl, now) and not self.view.degraded:
            refresh = self._refresh
            if key not in refresh and len(refresh) >= self.max_pending:
                self.stats.dropped += 1  # republish() covers it if Redis lost the key
                return
            refresh[key] = max(1, round(ttl * 1000))

    async def unpin(self, key: str) -> None:
        """Remove the pin from the cache and from Redis (``DEL`` retried later if it fails)."""
        self.local.unpin(key)
        self._refresh.pop(key, None)
        if self.view.degraded:
            self._queue_delete(key)
            return
        try:
            await self.client.execute("DEL", self.prefix + key, timeout=self.timeout)
        except RedisError as exc:
            self._fallback("unpin", exc)
            self._queue_delete(key)
            return
        self._unpin_notice(key)

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _ttl_of(pttl: Any) -> float | None:
        if not isinstance(pttl, int):
            return None
        if pttl > 0:
            return pttl / 1000
        return NO_TTL_CACHE if pttl == -1 else None

    def _cache(self, key: str, target: str, ttl: float, now: float) -> str:
        """Cache Redis's answer, replacing whatever the cache held meanwhile."""
        local = self.local
        local.unpin(key)
        local.pin_if_absent(key, target, ttl, now)
        return target

    def _fallback(self, what: str, exc: BaseException) -> None:
        self.stats.fallbacks += 1
        if not self._failing:
            log.warning("sticky %s: %s fell back on the local cache (%s)", self.lb_name, what, exc)
            self._failing = True

    def _queue_delete(self, key: str) -> None:
        deletes = self._deletes
        deletes[key] = None
        if len(deletes) > self.max_pending:
            del deletes[next(iter(deletes))]
            self.stats.dropped += 1

    def _notice(self, event: Pin | Unpin) -> None:
        if len(self._notices) >= self.max_pending:
            self.stats.dropped += 1
            return
        self._notices.append(encode(event))

    def _unpin_notice(self, key: str) -> None:
        if self.notices:
            rule, _, session = key.partition(":")
            self._notice(Unpin(lb=self.lb_name, origin=self.view.node_id, at=self._wall(),
                               rule=rule, session=session))  # fmt: skip

    def _xadd(self, fields: dict[str, str], minid: str) -> list[str]:
        args = ["XADD", self.stream, "MINID", "~", minid, "*"]
        for field, value in fields.items():
            args += (field, value)
        return args

    # -- background ----------------------------------------------------------------------------

    async def flush(self) -> int:
        """Send the queued refreshes, deletes and notices; commands sent.

        Raises ``RedisError`` if Redis fails; the deletes are then kept for
        the next flush (refreshes and notices are dropped: the cache still
        has the pins, and ``republish`` restores them if Redis lost them).
        """
        refresh, self._refresh = self._refresh, {}
        deletes, self._deletes = self._deletes, {}
        notices, self._notices = self._notices, []
        minid = f"{max(0, int((self._wall() - self.retention) * 1000))}-0"
        commands: list[Sequence[Any]] = [("DEL", self.prefix + k) for k in deletes]
        keys = list(refresh)
        commands += [("PEXPIRE", self.prefix + k, ms) for k, ms in refresh.items()]
        commands += [self._xadd(fields, minid) for fields in notices]
        try:
            replies = await self._pipelined(commands)
        except RedisError:
            for k in deletes:
                if k not in self._deletes:
                    self._queue_delete(k)
            raise
        self.stats.deletes_retried += len(deletes)
        for k in deletes:
            self._unpin_notice(k)
        self.stats.refreshes_sent += len(keys)
        self.stats.notices_sent += len(notices)
        # PEXPIRE 0: the key is gone from Redis (lost, or expired) while we still serve it.
        lost = [k for k, r in zip(keys, replies[len(deletes):], strict=False) if r == 0]
        if lost:
            now = self._clock()
            redo: list[Sequence[Any]] = []
            for k in lost:
                entry = self.local._pins.get(k)  # noqa: SLF001 - our cache, read for its expiry
                if entry is not None and entry[1] > now:
                    redo.append(("SET", self.prefix + k, entry[0], "NX", "PX",
                                 max(1, round((entry[1] - now) * 1000))))  # fmt: skip
            redone = await self._pipelined(redo)
            self.stats.recreated += sum(1 for r in redone if r == b"OK")
        return len(commands)

    async def _pipelined(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        replies: list[Any] = []
        for i in range(0, len(commands), BATCH):
            replies += await self.client.pipeline(commands[i : i + BATCH])
        return replies

    async def republish(self) -> int:
        """Write every live cached pin back to Redis (``SET NX PX remaining``); how many.

        For the node to call when Redis comes back (empty after a restart).
        The deletes queued during the outage are sent first; then a pin that
        exists in Redis is left alone and the cache adopts it. Never raises:
        on a Redis error it logs and returns what it restored.
        """
        try:
            await self.flush()  # DELs queued during the outage first: they must not be adopted
        except RedisError as exc:
            log.warning("sticky %s: republish could not flush (%s)", self.lb_name, exc)
            return 0
        now = self._clock()
        entries = [
            (k, target, exp)
            for k, (target, exp) in list(self.local._pins.items())  # noqa: SLF001
            if exp > now
        ]
        restored = 0
        try:
            for i in range(0, len(entries), BATCH):
                chunk = entries[i : i + BATCH]
                replies = await self.client.pipeline(
                    [("SET", self.prefix + k, target, "NX", "GET", "PX",
                      max(1, round((exp - now) * 1000))) for k, target, exp in chunk]
                )  # fmt: skip
                for (k, target, exp), reply in zip(chunk, replies, strict=True):
                    if reply is None:
                        restored += 1
                    elif isinstance(reply, bytes) and _text(reply) != target:
                        self._cache(k, _text(reply), max(0.001, exp - now), now)
        except RedisError as exc:
            log.warning("sticky %s: republish stopped after %d pins (%s)",
                        self.lb_name, restored, exc)  # fmt: skip
        self.stats.republished += restored
        if restored:
            log.info("sticky %s: republished %d pins", self.lb_name, restored)
        return restored

    def apply(self, event: Event) -> bool:
        """Apply another node's ``pin``/``unpin`` notice to the cache; whether it did."""
        if event.origin == self.view.node_id:
            return False
        if isinstance(event, Pin):
            key = f"{event.rule}:{event.session}"
            self._cache(key, event.target, event.ttl, self._clock())
        elif isinstance(event, Unpin):
            self.local.unpin(f"{event.rule}:{event.session}")
        else:
            return False
        self.stats.notices_applied += 1
        return True

    async def _flush_loop(self) -> None:
        backoff = Backoff(min(self.flush_period, 2.0), 2.0)
        while True:
            await trio.sleep(self.flush_period)
            if self.view.degraded or not (self._refresh or self._deletes or self._notices):
                continue
            try:
                await self.flush()
            except RedisError as exc:
                self._fallback("flush", exc)
                await trio.sleep(backoff.next())
                continue
            if self._failing:
                log.info("sticky %s: Redis answers again", self.lb_name)
                self._failing = False
            backoff.reset()

    async def _follow_loop(self) -> None:
        backoff = Backoff(0.05, 2.0)
        reader = RedisEventLog(self.client, skipped=self.skipped)
        try:
            while True:
                try:
                    positions = {self.stream: await stream_tail(self.client, self.stream)}
                    self.ready.set()
                    while True:
                        for _stream, _id, event in await reader.read(
                            positions, block=FOLLOW_BLOCK, count=1000
                        ):
                            self.apply(event)
                        backoff.reset()
                except RedisError:
                    await trio.sleep(backoff.next())
        finally:
            with trio.CancelScope(shield=True):
                await reader.aclose()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush queued work and apply the other nodes' notices until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flush_loop)
            if self.notices:
                nursery.start_soon(self._follow_loop)
            task_status.started()
