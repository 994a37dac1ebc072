"""Circuit breaker per target: a sliding error-rate window and a three-state machine.

Theory of operation
-------------------
States and transitions, as data (``BREAKER_TRANSITIONS``)::

    CLOSED    --trip-->     OPEN        error rate >= threshold, calls >= min_requests
    OPEN      --probe-->    HALF_OPEN   the open wait has elapsed
    HALF_OPEN --close-->    CLOSED      every trial request succeeded
    HALF_OPEN --reopen-->   OPEN        a trial request failed; the wait doubles

Each transition has its method (``open``, ``half_open``, ``close``,
``reopen``); an event the current state does not accept, or one whose
precondition does not hold yet (``half_open`` before the wait is over,
``close`` before the trials succeeded), raises ``BreakerStateError`` and
changes nothing. ``due(now)`` names the transition that is due, if any, and
``step(now)`` applies it: a standalone node calls ``step`` after recording
outcomes; the cluster layer calls ``due``, makes the transition a
compare-and-set in Redis on ``generation`` (incremented by every transition)
and, if it won, applies it and publishes the returned ``BreakerEvent``
(``circuit_open``, ``circuit_half_open``, ``circuit_closed``). Nodes that
learn a committed transition from the log call ``adopt(event, now)``.

The data path asks ``allows(now)``: closed -> yes; open -> no; half-open ->
yes while a trial slot is free. A request sent as a trial must take its slot
with ``allow_trial()`` and report its outcome with ``record(ok, now,
trial=True)`` (a timeout counts as an error), or the breaker stays half-open.

Window. ``interval`` T is cut into ``B`` sub-buckets (default 10) of width
``w = T / B``; bucket ``i`` covers ``[i*w, (i+1)*w)`` and a ring of ``B``
slots holds ``(i, ok, errors)``. The window at ``now`` (bucket ``k``) is the
buckets ``k-B+1 .. k``: every outcome of the last ``T - w`` seconds counts,
none older than ``T`` does. Counts are plain sums, hence mergeable: the
cluster feeds other nodes' outcomes with ``add_counts(ok, errors,
bucket_time)`` (``bucket_time`` in this breaker's clock) and every node sees
the cluster-wide rate. An add to a bucket older than the slot's current one
is dropped (it has left the window). Closing clears the window so stale
errors cannot trip it again at once; outcomes of sub-buckets before the one
holding the close are dropped from then on (those of that sub-bucket itself
still count: at most ``w`` seconds of stale outcomes).

Waits: the first open lasts ``half_open_timeout``; each reopen doubles the
wait, capped at ``max_wait`` (default 10 x ``half_open_timeout``); closing
resets it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from lbshared.config import CircuitBreaker

__all__ = [
    "BREAKER_TRANSITIONS",
    "CLOSED",
    "DEFAULT_BUCKETS",
    "DEFAULT_TRIALS",
    "HALF_OPEN",
    "OPEN",
    "Breaker",
    "BreakerEvent",
    "BreakerStateError",
]

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"

TRIP: Final = "trip"
PROBE: Final = "probe"
CLOSE: Final = "close"
REOPEN: Final = "reopen"

#: state -> {event: next state}. Anything not listed is illegal.
BREAKER_TRANSITIONS: Final[Mapping[str, Mapping[str, str]]] = {
    CLOSED: {TRIP: OPEN},
    OPEN: {PROBE: HALF_OPEN},
    HALF_OPEN: {CLOSE: CLOSED, REOPEN: OPEN},
}
#: The event type each transition publishes.
EVENT_TYPES: Final[Mapping[str, str]] = {
    TRIP: "circuit_open",
    PROBE: "circuit_half_open",
    CLOSE: "circuit_closed",
    REOPEN: "circuit_open",
}
_STATE_OF_TYPE: Final[Mapping[str, str]] = {
    "circuit_open": OPEN, "circuit_half_open": HALF_OPEN, "circuit_closed": CLOSED,
}  # fmt: skip

#: Sub-buckets per interval.
DEFAULT_BUCKETS: Final = 10
#: Trial requests in half-open; all must succeed to close.
DEFAULT_TRIALS: Final = 3
#: Cap of the doubling open wait, in multiples of half_open_timeout.
MAX_WAIT_FACTOR: Final = 10.0


class BreakerStateError(Exception):
    """A transition the current state does not accept (or not yet); nothing was changed."""


@dataclass(frozen=True, slots=True)
class BreakerEvent:
    """A committed transition: what the shared log records and the event feed shows."""

    type: str  # circuit_open | circuit_half_open | circuit_closed
    transition: str  # trip | probe | close | reopen
    reason: str
    at: float
    generation: int  # the breaker's generation after this transition
    wait: float  # for circuit_open: how long it stays open; else 0


def _secs(x: float) -> str:
    return f"{x:g}s"


class Breaker:
    """One target's circuit breaker (see module doc)."""

    __slots__ = (
        "threshold", "min_requests", "interval", "half_open_timeout", "max_wait", "trials",
        "buckets", "_width", "_idx", "_ok", "_err", "_floor",
        "state", "generation", "since", "open_until", "wait",
        "trials_started", "trial_successes", "trial_failures",
    )  # fmt: skip

    def __init__(
        self,
        threshold: float = 0.5,
        min_requests: int = 100,
        interval: float = 60.0,
        half_open_timeout: float = 30.0,
        *,
        trials: int = DEFAULT_TRIALS,
        max_wait: float | None = None,
        buckets: int = DEFAULT_BUCKETS,
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        if min_requests < 1 or trials < 1 or buckets < 1:
            raise ValueError("min_requests, trials and buckets must be at least 1")
        if interval <= 0 or half_open_timeout <= 0:
            raise ValueError("interval and half_open_timeout must be positive")
        self.threshold = threshold
        self.min_requests = min_requests
        self.interval = interval
        self.half_open_timeout = half_open_timeout
        self.max_wait = max_wait if max_wait is not None else MAX_WAIT_FACTOR * half_open_timeout
        self.trials = trials
        self.buckets = buckets
        self._width = interval / buckets
        self._idx = [-1 << 62] * buckets  # bucket index held by each ring slot
        self._ok = [0] * buckets
        self._err = [0] * buckets
        self._floor = -1 << 62  # outcomes of buckets below this are dropped
        self.state: str = CLOSED
        self.generation = 0
        self.since = 0.0
        self.open_until = 0.0
        #: The wait of the current (or next) open period.
        self.wait = half_open_timeout
        self.trials_started = 0
        self.trial_successes = 0
        self.trial_failures = 0

    @classmethod
    def from_config(cls, cb: CircuitBreaker, **kw: object) -> Breaker:
        """A breaker for a ``CircuitBreaker`` config block (``enabled`` is the caller's)."""
        return cls(cb.threshold, cb.min_requests, cb.interval, cb.half_open_timeout,
                   **kw)  # type: ignore[arg-type]  # fmt: skip

    # -- window ------------------------------------------------------------------------

    def bucket_of(self, t: float) -> int:
        """Index of the sub-bucket holding time ``t``."""
        return int(t // self._width)

    def _add(self, i: int, ok: int, errors: int) -> None:
        if i < self._floor:
            return
        s = i % self.buckets
        held = self._idx[s]
        if held != i:
            if held > i:
                return  # older than the window of a newer bucket already here
            self._idx[s] = i
            self._ok[s] = ok
            self._err[s] = errors
        else:
            self._ok[s] += ok
            self._err[s] += errors

    def add_counts(self, ok: int, errors: int, bucket_time: float) -> None:
        """Merge outcomes counted elsewhere (other nodes) into the bucket of ``bucket_time``."""
        if ok < 0 or errors < 0:
            raise ValueError("counts must not be negative")
        self._add(self.bucket_of(bucket_time), ok, errors)

    def counts(self, now: float) -> tuple[int, int]:
        """``(ok, errors)`` in the window ending at ``now``."""
        k = self.bucket_of(now)
        lo = k - self.buckets
        ok = err = 0
        idx, oks, errs = self._idx, self._ok, self._err
        for s in range(self.buckets):
            if lo < idx[s] <= k:
                ok += oks[s]
                err += errs[s]
        return ok, err

    def should_open(self, now: float) -> bool:
        """Closed, at least ``min_requests`` calls in the window and error rate >= threshold."""
        if self.state != CLOSED:
            return False
        ok, err = self.counts(now)
        calls = ok + err
        return calls >= self.min_requests and err >= self.threshold * calls

    def _rate_reason(self, now: float) -> str:
        ok, err = self.counts(now)
        calls = ok + err
        pct = int(100 * err / calls + 0.5) if calls else 0
        return f"error rate {pct}% over {_secs(self.interval)} ({err}/{calls})"

    # -- data path ---------------------------------------------------------------------

    def allows(self, now: float) -> bool:
        """May a request go to this target now? (Half-open: while a trial slot is free.)"""
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            return False
        return self.trials_started < self.trials

    def allow_trial(self) -> bool:
        """Take a half-open trial slot; False when all are taken."""
        if self.state != HALF_OPEN:
            raise BreakerStateError(f"no trials while {self.state}")
        if self.trials_started >= self.trials:
            return False
        self.trials_started += 1
        return True

    def record(self, ok: bool, now: float, *, trial: bool = False) -> None:
        """Count one outcome (error = 5xx, connect failure or timeout).

        ``trial=True`` for a request that took a slot with ``allow_trial``;
        only those decide a half-open breaker (stragglers sent before it
        opened just count in the window).
        """
        if trial and self.state == HALF_OPEN:
            if ok:
                self.trial_successes += 1
            else:
                self.trial_failures += 1
        # _add inlined: this runs once per proxied request.
        i = int(now // self._width)
        if i < self._floor:
            return
        s = i % self.buckets
        held = self._idx[s]
        if held != i:
            if held > i:
                return
            self._idx[s] = i
            self._ok[s] = self._err[s] = 0
        if ok:
            self._ok[s] += 1
        else:
            self._err[s] += 1

    # -- transitions -------------------------------------------------------------------

    def due(self, now: float) -> str | None:
        """The transition due at ``now`` (``trip``, ``probe``, ``close``, ``reopen``) or None."""
        state = self.state
        if state == CLOSED:
            return TRIP if self.should_open(now) else None
        if state == OPEN:
            return PROBE if now >= self.open_until else None
        if self.trial_failures:
            return REOPEN
        if self.trial_successes >= self.trials:
            return CLOSE
        return None

    def step(self, now: float) -> BreakerEvent | None:
        """Apply the due transition, if any."""
        due = self.due(now)
        if due is None:
            return None
        return _METHODS[due](self, now)

    def _fire(self, event: str, now: float, reason: str, wait: float = 0.0) -> BreakerEvent:
        self.state = BREAKER_TRANSITIONS[self.state][event]
        self.generation += 1
        self.since = now
        if self.state == OPEN:
            self.open_until = now + wait
        self.trials_started = self.trial_successes = self.trial_failures = 0
        return BreakerEvent(EVENT_TYPES[event], event, reason, now, self.generation, wait)

    def _check(self, event: str) -> None:
        if event not in BREAKER_TRANSITIONS[self.state]:
            raise BreakerStateError(f"can't {event} while {self.state}")

    def open(self, now: float, reason: str | None = None) -> BreakerEvent:
        """closed -> open for ``half_open_timeout``; the reason defaults to the window's rate."""
        self._check(TRIP)
        self.wait = self.half_open_timeout
        return self._fire(TRIP, now, reason or self._rate_reason(now), self.wait)

    def half_open(self, now: float) -> BreakerEvent:
        """open -> half_open, once the wait is over."""
        self._check(PROBE)
        if now < self.open_until:
            raise BreakerStateError(f"open for {_secs(self.open_until - now)} more")
        reason = f"open for {_secs(self.wait)}, trying {self.trials} request" + (
            "s" if self.trials > 1 else ""
        )
        return self._fire(PROBE, now, reason)

    def close(self, now: float) -> BreakerEvent:
        """half_open -> closed, once every trial succeeded; the window starts empty."""
        self._check(CLOSE)
        if self.trial_failures or self.trial_successes < self.trials:
            raise BreakerStateError(
                f"{self.trial_successes} of {self.trials} trials succeeded,"
                f" {self.trial_failures} failed"
            )
        n = self.trial_successes
        event = self._fire(CLOSE, now, f"{n} trial request{'s' if n > 1 else ''} succeeded")
        self.wait = self.half_open_timeout
        self._clear(now)
        return event

    def reopen(self, now: float, reason: str | None = None) -> BreakerEvent:
        """half_open -> open with the wait doubled (capped at ``max_wait``)."""
        self._check(REOPEN)
        self.wait = min(self.wait * 2, self.max_wait)
        why = reason or "trial request failed"
        return self._fire(REOPEN, now, f"{why}, open for {_secs(self.wait)}", self.wait)

    def adopt(self, event: BreakerEvent, now: float) -> bool:
        """Take a transition committed by another node; False if not newer than ours.

        The open wait restarts at ``now`` (local clock) for ``event.wait``.
        """
        if event.generation <= self.generation:
            return False
        state = _STATE_OF_TYPE[event.type]
        self.state = state
        self.generation = event.generation
        self.since = now
        self.trials_started = self.trial_successes = self.trial_failures = 0
        if state == OPEN:
            self.wait = event.wait
            self.open_until = now + event.wait
        elif state == CLOSED:
            self.wait = self.half_open_timeout
            self._clear(now)
        return True

    def _clear(self, now: float) -> None:
        self._floor = self.bucket_of(now)
        for s in range(self.buckets):
            self._ok[s] = self._err[s] = 0
            self._idx[s] = -1 << 62


_METHODS: Final = {
    TRIP: Breaker.open,
    PROBE: Breaker.half_open,
    CLOSE: Breaker.close,
    REOPEN: Breaker.reopen,
}
