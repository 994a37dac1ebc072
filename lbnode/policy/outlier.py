"""Passive outlier detection: eject a target locally after consecutive failures (Envoy-style).

Theory of operation
-------------------
Real traffic is the fastest probe. Every upstream exchange ends in
``observe(target, ok, kind, now)`` with ``kind`` one of ``connect`` (the
connection failed), ``5xx`` (the target answered 5xx) or ``ok``. A success
zeroes the target's count of consecutive failures; a failure increments it,
and at ``consecutive`` (default 5) the target is ejected at once, on this
node only (no round trip to the cluster: the active probes and the breaker
share that job), for::

    ejection time = min(base_ejection * times_ejected, max_ejection)

i.e. 30 s, 60 s, 90 s, ... up to 300 s with the defaults. ``is_ejected``
answers by comparing ``now`` with the stored end time: the target comes
back by itself, with a clean failure count.

Decay (Envoy's multiplier decrement): each full ``decay_interval`` (default
``base_ejection``) a target spends un-ejected takes one off its
``times_ejected``, so a target that failed once long ago starts again from
the base time while a flapping one keeps climbing. Decay is computed
lazily from stored times, so results do not depend on how often it is
called.

One detector serves one group of targets (a load balancer's, or a rule's
target set): ejecting more than ``max_ejection_percent`` (default 50) of the
group's targets at a time is refused (the failure count stays at the
threshold, so the next failure tries again). The cap is ``floor(n * pct /
100)``: a group of one target is never ejected (better to try it than to
have nothing), a group of two ejects at most one.

The path of a success is two dict lookups and a store; counting the
currently ejected targets happens only when one reaches the threshold.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = ["KINDS", "Ejection", "OutlierDetector"]

#: Outcome kinds of ``observe``.
KINDS: Final = ("connect", "5xx", "ok")
_KIND_TEXT: Final = {"connect": "connect failure", "5xx": "5xx response"}


@dataclass(frozen=True, slots=True)
class Ejection:
    """A target was ejected until ``until`` (its ``times``-th ejection)."""

    target: str
    at: float
    until: float
    times: int
    reason: str


class _Record:
    __slots__ = ("failures", "last_kind", "until", "times", "decay_from")

    def __init__(self) -> None:
        self.failures = 0
        self.last_kind = ""
        self.until = float("-inf")
        self.times = 0
        self.decay_from = 0.0


class OutlierDetector:
    """Consecutive-failure ejection for one group of targets (see module doc)."""

    __slots__ = ("consecutive", "base_ejection", "max_ejection", "max_ejection_percent",
                 "decay_interval", "_records")  # fmt: skip

    def __init__(
        self,
        targets: Iterable[str] = (),
        *,
        consecutive: int = 5,
        base_ejection: float = 30.0,
        max_ejection: float = 300.0,
        max_ejection_percent: float = 50.0,
        decay_interval: float | None = None,
    ) -> None:
        if consecutive < 1:
            raise ValueError("consecutive must be at least 1")
        if base_ejection <= 0 or max_ejection < base_ejection:
            raise ValueError("need 0 < base_ejection <= max_ejection")
        if not 0 <= max_ejection_percent <= 100:
            raise ValueError("max_ejection_percent must be in [0, 100]")
        self.consecutive = consecutive
        self.base_ejection = base_ejection
        self.max_ejection = max_ejection
        self.max_ejection_percent = max_ejection_percent
        self.decay_interval = decay_interval if decay_interval is not None else base_ejection
        if self.decay_interval <= 0:
            raise ValueError("decay_interval must be positive")
        self._records: dict[str, _Record] = {t: _Record() for t in targets}

    # -- the group -----------------------------------------------------------------------

    def set_targets(self, targets: Iterable[str]) -> None:
        """Make the group exactly ``targets``; kept targets keep their history."""
        old = self._records
        self._records = {t: old.get(t) or _Record() for t in targets}

    def targets(self) -> list[str]:
        """The group's targets."""
        return list(self._records)

    def max_ejected(self) -> int:
        """How many of the group's targets may be ejected at once."""
        return int(len(self._records) * self.max_ejection_percent // 100)

    # -- outcomes --------------------------------------------------------------------------

    def observe(self, target_id: str, ok: bool, kind: str, now: float) -> Ejection | None:
        """Count one exchange with ``target_id``; return the ejection it caused, if any.

        Unknown targets and outcomes arriving while the target is ejected
        (requests already in flight) are ignored.
        """
        rec = self._records.get(target_id)
        if rec is None or now < rec.until:
            return None
        if ok:
            rec.failures = 0
            return None
        if kind not in _KIND_TEXT:
            raise ValueError(f"{kind!r} is not a failure kind (connect or 5xx)")
        rec.failures += 1
        rec.last_kind = kind
        if rec.failures < self.consecutive:
            return None
        if self.ejected_count(now) >= self.max_ejected():
            return None
        self._decay(rec, now)
        rec.times += 1
        duration = min(self.base_ejection * rec.times, self.max_ejection)
        rec.until = rec.decay_from = now + duration
        n, rec.failures = rec.failures, 0
        what = _KIND_TEXT[kind]
        reason = f"{n} consecutive failures (last: {what}), ejected for {duration:g}s"
        return Ejection(target_id, now, rec.until, rec.times, reason)

    def _decay(self, rec: _Record, now: float) -> None:
        if rec.times and now >= rec.decay_from:
            steps = int((now - rec.decay_from) // self.decay_interval)
            if steps:
                taken = min(steps, rec.times)
                rec.times -= taken
                rec.decay_from += taken * self.decay_interval

    # -- queries ---------------------------------------------------------------------------

    def is_ejected(self, target_id: str, now: float) -> bool:
        """True while ``target_id`` is ejected."""
        rec = self._records.get(target_id)
        return rec is not None and now < rec.until

    def ejected_until(self, target_id: str) -> float | None:
        """End of ``target_id``'s latest ejection, or None if never ejected."""
        rec = self._records.get(target_id)
        return None if rec is None or rec.until == float("-inf") else rec.until

    def ejected(self, now: float) -> list[str]:
        """Targets ejected at ``now``."""
        return [t for t, r in self._records.items() if now < r.until]

    def ejected_count(self, now: float) -> int:
        """How many targets are ejected at ``now``."""
        return sum(1 for r in self._records.values() if now < r.until)

    def times_ejected(self, target_id: str, now: float) -> int:
        """The ejection multiplier of ``target_id`` at ``now`` (after decay)."""
        rec = self._records[target_id]
        self._decay(rec, now)
        return rec.times
