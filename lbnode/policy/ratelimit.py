"""Rate limiting: sliding-window counters and the admit/429 decision.

Theory of operation
-------------------
A ``RateLimit{limit, interval, key, ...}`` admits at most ``limit`` requests
per key in any ``interval`` seconds. Refused requests are not counted (a
client that keeps hammering is refused only while its *admitted* requests
fill the window; it is not locked out for ever). A request is admitted when
``est + 1 <= limit``, ``est`` the estimated admissions in the sliding window
``(now - T, now]``.

Counting: sub-buckets, each with the span of its admissions.
The interval ``T`` is cut into ``B`` sub-buckets of width ``b = T / B``
(``B = 10`` by default); bucket ``i`` covers ``[i*b, (i+1)*b)`` and keeps
its count ``c[i]`` plus the times of its first and last admission
(``f[i]``, ``l[i]``, stored as offsets in 1/256 of a bucket, rounded down).
At ``now``, in bucket ``k``, the window start ``w = now - T`` falls inside
bucket ``k-B``; with ``c, f, l`` that bucket's::

    est(now) = c[k-B+1] + ... + c[k] + part
    part     = c                                 if w <  f
               (c - 1) * (l - w) / (l - f)       if f <= w < l
               0                                 if w >= l

Whole buckets are exact; only the one straddling the window start is
estimated, as ``c`` admissions evenly spaced from ``f`` to ``l``: the first
leaves the window when ``w`` reaches ``f`` and the others one by one until
``l``, ``part`` interpolating linearly between those steps. (Plain
sub-bucket interpolation spreads ``c`` over the whole bucket
``[i*b, (i+1)*b)`` and the two-window estimate is that with ``B = 1``: both
release an admission up to a whole bucket early or late, which over-admits
after a burst that started mid-bucket and, for small limits, loses an
admission per interval. Keeping the span fixes both for one int per bucket.)

Estimate error, precisely. Let ``true`` be the admissions really in
``(w, now]`` and ``x`` those of bucket ``k-B`` among them.

* ``w < f`` or ``w >= l``: ``part == x``, the estimate is exact.
* ``f <= w < l``: the bucket's first admission has left and its last has
  not, so ``1 <= x <= c - 1``, while ``0 < part <= c - 1``: hence
  ``|est - true| = |part - x| < c - 1``. Between consecutive admissions,
  ``part`` stays within ``(x - 1, x]`` when they are evenly spaced, so the
  admit decision (``est <= limit - 1``) is then exactly the one a full log
  of timestamps would make: a steady sender, of any rate and phase, and a
  bucket holding a single admission (``c = 1``) are handled exactly.
* Consequence: any window of length ``T`` holds at most
  ``limit + max(c - 2, 0)`` admissions, ``c`` the count of the sub-bucket
  straddling its start (at most the admissions of ``1/B`` of an interval of
  a steady client; at most ``limit`` if the whole quota was burst into one
  sub-bucket). Under-admission is bounded the same way.
* Offsets rounded down to a ``tick = T / (256 * B)`` (0.04 % of the window
  with ``B = 10``) release an admission up to one tick early: the bound
  holds for windows of length ``T - tick``. Rounding down (not up) keeps an
  exact replay exact: a request arriving exactly ``T`` after an admission
  finds its slot free.

So a client sending at a steady ``2 * limit`` per interval is admitted
exactly ``limit`` times in every interval, the first one (a burst of
``limit``) included, whatever the phase of its requests against the buckets.

Memory. The in-process store keeps, per key, one ``array('q')`` of
``2 + 2 * (B + 1)`` int64 (newest bucket, running total, and per ring slot
the count and ``first << 8 | last``) in an ``OrderedDict`` ordered by last
admission. Because every key shares one interval, that order is also expiry
order: a key is idle once ``k > newest + B``, and idle keys are dropped from
the cold end on every ``add`` (a few at a time) or by ``purge(now)``. If
``max_keys`` live keys exist, adding a new one evicts the least recently
admitted key (which then starts from an empty window: under such a flood
the limiter errs towards admitting, never towards unbounded memory). About
360 bytes per key (tracemalloc, 100k keys, ``B = 10``, key strings
excluded).

Cluster. Other nodes' admissions are folded in with
``add_remote(key, n, bucket_time)`` (``bucket_time`` in this store's clock;
the cluster layer converts; their exact times being unknown, they are
spread over the whole bucket). With ``track_unsynced=True`` the store keeps
the local admissions not yet shipped, per key and bucket: ``unsynced(key)``
counts them and ``drain_unsynced()`` hands them over as
``(key, n, bucket_start)`` deltas. Deltas older than the window are
worthless and dropped, so that side table stays bounded too.

Headers (draft-ietf-httpapi-ratelimit-headers): ``RateLimit-Limit``,
``RateLimit-Remaining`` (counts the current request: the first request of a
fresh key sees ``limit - 1``), ``RateLimit-Reset`` (whole seconds, rounded
up: for an admitted request, until the window is empty again, i.e. the full
quota is back; for a refused one, until one request fits) and, on a 429,
``Retry-After`` (whole seconds, rounded up, at least 1).

A key that cannot be extracted follows ``on_missing_key``: ``allow`` (no
limiting, no headers), ``deny`` (429, Retry-After one interval), ``shared``
(all keyless requests share the key ``""``). A store raising
``StoreUnavailable`` follows ``on_store_error``.
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from typing import TYPE_CHECKING, Final, Protocol

from .keys import KeySpec
from .request import RequestView

if TYPE_CHECKING:
    from lbshared.config import RateLimit

__all__ = [
    "DEFAULT_BUCKETS",
    "CounterStore",
    "Decision",
    "MemoryCounterStore",
    "RateLimiter",
    "StoreUnavailable",
]

#: Sub-buckets per interval.
DEFAULT_BUCKETS: Final = 10
# Keys expired from the cold end per add() (bounds the per-request cost).
_PURGE_PER_ADD: Final = 4
# Float slack when comparing the estimate with the limit.
_EPS: Final = 1e-9
# Resolution of the first/last admission offsets kept per sub-bucket.
_TICKS: Final = 256


class StoreUnavailable(Exception):
    """A counter store cannot answer (raised by remote stores; never in-process)."""


class CounterStore(Protocol):
    """Sliding-window counters per key. ``now`` is monotonic seconds."""

    interval: float

    def add(self, key: str, n: int, now: float) -> None:
        """Record ``n`` local admissions for ``key`` at ``now``."""
        ...

    def count(self, key: str, now: float) -> float:
        """The estimated admissions for ``key`` in the window ending at ``now``."""
        ...

    def time_until(self, key: str, now: float, at_most: float) -> float:
        """Seconds from ``now`` until ``count(key) <= at_most`` with no new adds."""
        ...


class MemoryCounterStore:
    """In-process sliding-window counters, bounded to ``max_keys`` keys."""

    __slots__ = (
        "interval",
        "buckets",
        "max_keys",
        "_width",
        "_tick",
        "_ring",
        "_blank",
        "_keys",
        "_unsynced",
        "_track",
    )

    def __init__(
        self,
        interval: float,
        *,
        buckets: int = DEFAULT_BUCKETS,
        max_keys: int = 100_000,
        track_unsynced: bool = False,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        if buckets < 1:
            raise ValueError("buckets must be at least 1")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.interval = float(interval)
        self.buckets = buckets
        self.max_keys = max_keys
        self._width = self.interval / buckets
        self._tick = self._width / _TICKS  # resolution of first/last offsets
        self._ring = buckets + 1  # B window buckets + the straddling one
        self._blank = array("q", bytes(8 * (2 + 2 * self._ring)))
        # key -> record (below); least recently admitted first.
        self._keys: OrderedDict[str, array[int]] = OrderedDict()
        self._track = track_unsynced
        # key -> {bucket index: local admissions not yet drained}
        self._unsynced: dict[str, dict[int, int]] = {}

    # A record is one array of int64 (no per-number objects), R = B + 1 ring
    # slots, i % R the slot of bucket i:
    #   [0]            newest bucket index the ring has been advanced to
    #   [1]            sum of the ring's counts
    #   [2 + s]        count of the bucket in slot s
    #   [2 + R + s]    its first and last admission as first << 8 | last, in
    #                  ticks (1/256 of a bucket) from its start, rounded down

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    # -- ring maintenance --------------------------------------------------

    def _advance(self, rec: array[int], k: int) -> None:
        """Move ``rec``'s newest bucket to ``k``, zeroing buckets that left the ring."""
        last = rec[0]
        if k <= last:
            return
        ring = self._ring
        if k - last >= ring:
            for i in range(2, ring + 2):
                rec[i] = 0
            rec[1] = 0
        else:
            total = rec[1]
            for i in range(last + 1, k + 1):
                slot = 2 + i % ring
                total -= rec[slot]
                rec[slot] = 0
            rec[1] = total
        rec[0] = k

    def _purge_head(self, k: int, limit: int) -> None:
        keys, nb = self._keys, self.buckets
        for _ in range(limit):
            if not keys:
                return
            key = next(iter(keys))
            if k - keys[key][0] <= nb:
                return
            del keys[key]

    def _record(self, key: str, k: int) -> array[int]:
        """The record of ``key`` advanced to bucket ``k``, created if needed."""
        keys = self._keys
        rec = keys.get(key)
        if rec is not None:
            keys.move_to_end(key)
            self._advance(rec, k)
            return rec
        rec = array("q", self._blank)
        rec[0] = k
        keys[key] = rec
        while len(keys) > self.max_keys:
            keys.popitem(last=False)
        return rec

    def _put(self, rec: array[int], j: int, n: int, first: int, last: int) -> None:
        """Add ``n`` admissions spread over ticks ``first..last`` of bucket ``j``."""
        ring = self._ring
        if j <= rec[0] - ring:
            return  # older than the ring: outside every window we still answer
        s = 2 + j % ring
        if rec[s]:
            span = rec[s + ring]
            first = min(first, span >> 8)
            last = max(last, span & 0xFF)
        rec[s + ring] = first << 8 | last
        rec[s] += n
        rec[1] += n

    def _span(self, rec: array[int], j: int) -> tuple[float, float]:
        """(first, last) admission times of bucket ``j`` (ticks rounded down)."""
        span = rec[2 + j % self._ring + self._ring]
        base, tick = j * self._width, self._tick
        return base + (span >> 8) * tick, base + (span & 0xFF) * tick

    # -- the CounterStore interface ----------------------------------------

    def add(self, key: str, n: int, now: float) -> None:
        """Record ``n`` local admissions for ``key`` at ``now``."""
        width = self._width
        k = int(now // width)
        self._purge_head(k, _PURGE_PER_ADD)
        rec = self._record(key, k)
        tick = int((now - k * width) / self._tick)
        tick = 0 if tick < 0 else _TICKS - 1 if tick >= _TICKS else tick
        self._put(rec, k, n, tick, tick)
        if self._track:
            unsynced = self._unsynced
            pending = unsynced.get(key)
            if pending is None:
                if len(unsynced) >= self.max_keys:
                    del unsynced[next(iter(unsynced))]
                pending = unsynced[key] = {}
            pending[k] = pending.get(k, 0) + n
            if len(pending) > self._ring:
                for old in [i for i in pending if i <= k - self._ring]:
                    del pending[old]

    def count(self, key: str, now: float) -> float:
        """The estimated admissions for ``key`` in the window ending at ``now``."""
        rec = self._keys.get(key)
        if rec is None:
            return 0.0
        k = int(now // self._width)
        if k - rec[0] > self.buckets:
            return 0.0
        if k < rec[0]:
            # Remote deltas from a clock ahead of ours: count everything held.
            return float(rec[1])
        self._advance(rec, k)
        j = k - self.buckets
        c = rec[2 + j % self._ring]
        if not c:
            return float(rec[1])
        first, last = self._span(rec, j)
        start = now - self.interval  # the window is (start, now]
        if start >= last:
            return float(rec[1] - c)
        if start < first:
            return float(rec[1])
        # c admissions evenly spaced over [first, last]: the first has left at
        # start == first, the rest leave linearly until last.
        return rec[1] - c + (c - 1) * (last - start) / (last - first)

    def time_until(self, key: str, now: float, at_most: float) -> float:
        """Seconds from ``now`` until ``count(key) <= at_most`` with no new adds."""
        width, ring, nb, interval = self._width, self._ring, self.buckets, self.interval
        if at_most <= 0.0:
            # Empty once the last admission of the newest non-empty bucket has left.
            rec = self._keys.get(key)
            if rec is not None:
                newest = rec[0]
                for j in range(newest, newest - ring, -1):
                    if rec[2 + j % ring]:
                        return max(0.0, self._span(rec, j)[1] + interval - now)
            return 0.0
        if self.count(key, now) <= at_most + _EPS:
            return 0.0
        rec = self._keys[key]
        newest = rec[0]
        k = max(int(now // width), newest)
        # While bucket j is current, bucket j-B (count c) drains linearly over
        # [first + T, last + T]; what remains is S_j = sum of j-B+1 .. j.
        held = rec[1]  # sum of buckets k-B .. k
        for j in range(k, k + nb + 1):
            oldest = j - nb
            c = rec[2 + oldest % ring] if oldest > newest - ring else 0
            floor = held - c
            if floor <= at_most + _EPS:
                if c <= 0:
                    return max(0.0, j * width - now)
                first, last = self._span(rec, oldest)
                room = at_most - floor  # what may remain of bucket j-B's c
                if room >= c - _EPS:
                    when = max(now, j * width)
                elif room >= c - 1 - _EPS:
                    when = first + interval
                elif last <= first:
                    when = last + interval
                else:
                    when = last + interval - max(room, 0.0) * (last - first) / (c - 1)
                return max(0.0, when - now)
            held = floor
        return max(0.0, (k + nb + 1) * width - now)

    # -- cluster hooks -------------------------------------------------------

    def add_remote(self, key: str, n: int, bucket_time: float) -> None:
        """Fold ``n`` admissions another node made in the bucket holding ``bucket_time``.

        ``bucket_time`` is in this store's clock (the cluster layer converts).
        Their exact times are unknown, so they are spread over the whole bucket.
        """
        j = int(bucket_time // self._width)
        rec = self._record(key, j)
        self._put(rec, j, n, 0, _TICKS - 1)

    def unsynced(self, key: str) -> int:
        """Local admissions for ``key`` not yet handed to ``drain_unsynced``."""
        pending = self._unsynced.get(key)
        return sum(pending.values()) if pending else 0

    def drain_unsynced(self) -> list[tuple[str, int, float]]:
        """Take the local deltas as ``(key, n, bucket_start_time)`` and forget them."""
        width = self._width
        out = [
            (key, n, i * width)
            for key, pending in self._unsynced.items()
            for i, n in pending.items()
        ]
        self._unsynced = {}
        return out

    def purge(self, now: float) -> int:
        """Drop every idle key; returns how many (housekeeping, O(dropped))."""
        before = len(self._keys)
        self._purge_head(int(now // self._width), before)
        return before - len(self._keys)


class Decision:
    """The answer for one request. ``headers()`` gives what to send back."""

    __slots__ = ("allowed", "limit", "remaining", "reset", "retry_after", "limited")

    def __init__(
        self,
        allowed: bool,
        limit: int,
        remaining: int,
        reset: int,
        retry_after: int | None = None,
        limited: bool = True,
    ) -> None:
        self.allowed = allowed
        self.limit = limit
        self.remaining = remaining
        self.reset = reset
        self.retry_after = retry_after
        self.limited = limited

    def __repr__(self) -> str:
        return (
            f"Decision(allowed={self.allowed}, limit={self.limit}, remaining={self.remaining}, "
            f"reset={self.reset}, retry_after={self.retry_after}, limited={self.limited})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in Decision.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def headers(self) -> list[tuple[bytes, bytes]]:
        """RateLimit-Limit/-Remaining/-Reset, plus Retry-After when refused.

        Empty when the request was not subject to the limit.
        """
        if not self.limited:
            return []
        out = [
            (b"RateLimit-Limit", b"%d" % self.limit),
            (b"RateLimit-Remaining", b"%d" % self.remaining),
            (b"RateLimit-Reset", b"%d" % self.reset),
        ]
        if not self.allowed and self.retry_after is not None:
            out.append((b"Retry-After", b"%d" % self.retry_after))
        return out


def _ceil(seconds: float) -> int:
    # Round up to whole seconds, ignoring float noise just above an integer.
    return max(0, math.ceil(seconds - 1e-9))


def keyless_decision(config: RateLimit, unlimited: Decision) -> Decision | None:
    """The ``on_missing_key`` decision for a request without a key value:
    admitted (allow), refused for an interval (deny), or None (shared: the
    caller counts it under the key "")."""
    if config.on_missing_key == "allow":
        return unlimited
    if config.on_missing_key == "deny":
        wait = _ceil(config.interval)
        return Decision(False, config.limit, 0, wait, max(1, wait))
    return None


class RateLimiter:
    """Admit or refuse requests under one ``RateLimit`` config."""

    #: The data path calls ``check_request`` (False) or awaits ``acheck_request`` (True).
    is_async = False

    __slots__ = (
        "config",
        "store",
        "limit",
        "key_spec",
        "_on_missing",
        "_on_store_error",
        "_enabled",
        "_unlimited",
    )

    def __init__(self, config: RateLimit, store: CounterStore | None = None) -> None:
        self.config = config
        self.limit: int = config.limit
        self.store: CounterStore = (
            store
            if store is not None
            else MemoryCounterStore(config.interval, max_keys=config.max_keys)
        )
        self.key_spec = KeySpec.parse(config.key)
        self._on_missing: str = config.on_missing_key
        self._on_store_error: str = config.on_store_error
        self._enabled: bool = config.enabled
        self._unlimited = Decision(True, self.limit, self.limit, 0, None, limited=False)

    def key_of(self, req: RequestView) -> str | None:
        """The rate-limit key of ``req`` (None when missing or empty)."""
        return self.key_spec.extract(req)

    def check_request(self, req: RequestView, now: float) -> Decision:
        """``check(self.key_of(req), now)``."""
        return self.check(self.key_spec.extract(req), now)

    def check(self, key: str | None, now: float) -> Decision:
        """Admit (and count) or refuse one request of ``key`` at ``now``."""
        if not self._enabled:
            return self._unlimited
        if key is None:
            keyless = keyless_decision(self.config, self._unlimited)
            if keyless is not None:
                return keyless
            key = ""
        try:
            return self._check(key, now)
        except StoreUnavailable:
            if self._on_store_error == "deny":
                return Decision(False, self.limit, 0, 1, 1)
            return self._unlimited

    def _check(self, key: str, now: float) -> Decision:
        store, limit = self.store, self.limit
        used = store.count(key, now)
        if used + 1 <= limit + _EPS:
            store.add(key, 1, now)
            remaining = max(0, math.floor(limit - used - 1 + _EPS))
            reset = _ceil(store.time_until(key, now, 0.0))
            return Decision(True, limit, remaining, reset)
        wait = max(1, _ceil(store.time_until(key, now, limit - 1)))
        return Decision(False, limit, 0, wait, wait)
