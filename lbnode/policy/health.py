"""Health decisions: per-prober hysteresis, the cluster's vote, slow start.

Theory of operation
-------------------
Active health checking has three pure layers; the probes themselves (I/O)
live in ``lbnode.probes`` and the assignment of targets to probers in
``lbnode.policy.assignment``.

1. ``Hysteresis`` - one per (prober node, target). Every probe round ends in
   one observation ``observe(ok, reason, now)``. The machine counts
   consecutive successes and consecutive failures (a success zeroes the
   failures and vice versa) and changes state only when a count reaches its
   threshold (HAProxy's ``rise``/``fall``)::

       HYSTERESIS_TRANSITIONS = {
           HEALTHY:   {FALL: UNHEALTHY},   # unhealthy_threshold failures in a row
           UNHEALTHY: {RISE: HEALTHY},     # healthy_threshold successes in a row
       }

   The table is the whole machine: ``fire(event, ...)`` looks the event up
   in the current state's row and raises ``HealthStateError`` (state and
   counters unchanged) when it is not there - RISE while healthy, FALL
   while unhealthy. ``observe`` only fires an event the counters have
   earned, so it never raises. A ``Transition`` is returned exactly when the
   state changed; the prober publishes it (its "verdict") for the cluster.
   An unhealthy verdict carries the last failure's reason verbatim
   (``connect refused``, ``timeout after 2s``,
   ``status 503, expected 200-399``, ``body did not match``).

2. ``ClusterHealth`` - the fold of the probers' verdicts into one view per
   target, the same on every node that folds the same events. Per target it
   keeps the current prober set (from ``assignment.probers_for`` over the
   live nodes), every node's latest verdict, an operator override and the
   resulting view. The vote:

   * Only verdicts of the *current* probers count. Verdicts of other nodes
     are kept (a node that leaves and comes back is counted again as it
     last said) until ``forget_node``.
   * A current prober that has published no verdict votes for the current
     view: no news is no change. So a prober that takes over a target does
     not flip it; it speaks up when its own hysteresis disagrees.
   * The target is **unhealthy iff a strict majority of its current probers
     votes unhealthy**. Ties go to healthy: with R = 2 probers both must say
     unhealthy to take a target down, and one healthy verdict brings it back
     (a single prober's broken network path cannot take a target out; two
     that agree can). With R = 1 the one prober decides; with R = 3, two.
   * Before any verdict the view is the target's ``initial_state``.
   * An override ``up``/``down`` wins over the vote; ``auto`` hands back to
     the vote, which kept being folded underneath.

   Every call that changes the *effective* state (override applied, else
   the vote) returns one ``ClusterTransition``; calls that change nothing
   visible return ``None``. Folding the same calls in the same order on
   every node therefore yields the same transitions, and the node that
   commits a transition to the shared log (compare-and-set on the view) is
   the one that publishes the ``healthy``/``unhealthy`` event: exactly one
   per change, cluster-wide. A node that learns the committed outcome
   rather than computing it calls ``adopt``.

   Seeding a prober: when a node starts probing a target, create its
   ``Hysteresis`` in ``ClusterHealth.seed_state(target, node)`` - that
   node's own last verdict if the cluster still holds one, else the
   current view - so that any disagreement with what the cluster believes
   about this prober is published.

3. ``SlowStart`` - after a target turns healthy again its weight ramps up
   linearly over ``duration``, from 10 % (so it does get traffic) to 100 %.
   ``ClusterHealth`` records ``healthy_since`` only on an unhealthy ->
   healthy change, so targets that were never down start at full weight.

Times are monotonic float seconds passed in by the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from lbshared.config import HealthCheck

__all__ = [
    "FALL",
    "HEALTHY",
    "HYSTERESIS_TRANSITIONS",
    "OVERRIDES",
    "RISE",
    "UNHEALTHY",
    "ClusterHealth",
    "ClusterTransition",
    "HealthStateError",
    "Hysteresis",
    "SlowStart",
    "TargetView",
    "Transition",
]

HealthState = Literal["healthy", "unhealthy"]
Override = Literal["up", "down", "auto"]

HEALTHY: Final = "healthy"
UNHEALTHY: Final = "unhealthy"
#: Hysteresis events: enough successes in a row / enough failures in a row.
RISE: Final = "rise"
FALL: Final = "fall"

#: state -> {event: next state}. Anything not listed is illegal.
HYSTERESIS_TRANSITIONS: Final[Mapping[str, Mapping[str, str]]] = {
    HEALTHY: {FALL: UNHEALTHY},
    UNHEALTHY: {RISE: HEALTHY},
}

#: Operator overrides; ``auto`` means none.
OVERRIDES: Final = ("up", "down", "auto")
_OVERRIDE_STATE: Final[Mapping[str, str]] = {"up": HEALTHY, "down": UNHEALTHY}
_STATES: Final = (HEALTHY, UNHEALTHY)


class HealthStateError(Exception):
    """An event the current state does not accept; nothing was changed."""


def _check_state(state: str) -> None:
    if state not in _STATES:
        raise ValueError(f"{state!r} is not a health state (healthy or unhealthy)")


@dataclass(frozen=True, slots=True)
class Transition:
    """One prober's verdict changed: ``previous`` -> ``state`` at ``at``."""

    previous: str
    state: str
    reason: str
    at: float


class Hysteresis:
    """Consecutive-count hysteresis of one prober about one target (see module doc)."""

    __slots__ = (
        "state", "since", "successes", "failures", "last_reason",
        "healthy_threshold", "unhealthy_threshold",
    )  # fmt: skip

    def __init__(
        self,
        healthy_threshold: int = 2,
        unhealthy_threshold: int = 3,
        *,
        state: str = HEALTHY,
        since: float = 0.0,
    ) -> None:
        if healthy_threshold < 1 or unhealthy_threshold < 1:
            raise ValueError("thresholds must be at least 1")
        _check_state(state)
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self.state: str = state
        #: Time of the last transition (or of creation).
        self.since = since
        #: Consecutive successes / failures up to now.
        self.successes = 0
        self.failures = 0
        #: Reason of the latest observation ("" after a success).
        self.last_reason = ""

    @classmethod
    def from_config(cls, hc: HealthCheck, now: float, state: str | None = None) -> Hysteresis:
        """Thresholds from a ``HealthCheck``; ``state`` defaults to its ``initial_state``."""
        return cls(hc.healthy_threshold, hc.unhealthy_threshold,
                   state=state or hc.initial_state, since=now)  # fmt: skip

    def observe(self, ok: bool, reason: str, now: float) -> Transition | None:
        """Count one probe round; return the transition it caused, if any."""
        if ok:
            self.successes += 1
            self.failures = 0
            self.last_reason = ""
            if self.state == UNHEALTHY and self.successes >= self.healthy_threshold:
                n = self.successes
                return self.fire(RISE, f"{n} successful probe{'s' if n > 1 else ''} in a row", now)
        else:
            self.failures += 1
            self.successes = 0
            self.last_reason = reason
            if self.state == HEALTHY and self.failures >= self.unhealthy_threshold:
                return self.fire(FALL, reason, now)
        return None

    def fire(self, event: str, reason: str, now: float) -> Transition:
        """Apply ``event`` by the table; ``HealthStateError`` if the state does not accept it."""
        target = HYSTERESIS_TRANSITIONS[self.state].get(event)
        if target is None:
            raise HealthStateError(f"can't {event} while {self.state}")
        previous, self.state, self.since = self.state, target, now
        return Transition(previous, target, reason, now)


# -- the cluster's vote ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterTransition:
    """The cluster's view of ``target`` changed (what the ``healthy``/``unhealthy`` event says)."""

    target: str
    previous: str
    state: str
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class TargetView:
    """A snapshot of one target's health as the cluster sees it."""

    target: str
    state: str  # effective: override if any, else the vote
    since: float  # when ``state`` last changed
    reason: str  # why it is in ``state``
    override: str  # up, down or auto
    voted: str  # the vote alone, ignoring the override
    healthy_since: float | None  # last unhealthy -> healthy change; None if never down
    probers: tuple[str, ...]
    verdicts: Mapping[str, str]  # verdicts of the current probers that have one


class _Target:
    __slots__ = ("probers", "verdicts", "reasons", "voted", "vote_reason",
                 "override", "state", "since", "reason", "healthy_since")  # fmt: skip

    def __init__(self, initial: str, now: float) -> None:
        self.probers: tuple[str, ...] = ()
        self.verdicts: dict[str, str] = {}
        self.reasons: dict[str, str] = {}
        self.voted = initial
        self.vote_reason = "initial state"
        self.override = "auto"
        self.state = initial
        self.since = now
        self.reason = "initial state"
        self.healthy_since: float | None = None


class ClusterHealth:
    """Fold of per-prober verdicts and overrides into one view per target (see module doc)."""

    __slots__ = ("initial_state", "_targets")

    def __init__(self, initial_state: str = HEALTHY) -> None:
        _check_state(initial_state)
        self.initial_state = initial_state
        self._targets: dict[str, _Target] = {}

    # -- membership --------------------------------------------------------------------

    def add_target(
        self,
        target: str,
        now: float,
        *,
        probers: Iterable[str] = (),
        initial_state: str | None = None,
    ) -> None:
        """Start tracking ``target`` in ``initial_state`` (default: this fold's). Idempotent."""
        if target in self._targets:
            return
        state = initial_state or self.initial_state
        _check_state(state)
        t = self._targets[target] = _Target(state, now)
        t.probers = tuple(dict.fromkeys(probers))

    def remove_target(self, target: str) -> None:
        """Forget ``target`` (a removed target; re-adding starts afresh)."""
        self._targets.pop(target, None)

    def targets(self) -> list[str]:
        """Tracked target keys, in insertion order."""
        return list(self._targets)

    def set_probers(
        self, target: str, probers: Iterable[str], now: float
    ) -> ClusterTransition | None:
        """Replace ``target``'s prober set (membership changed) and re-count the vote."""
        t = self._targets[target]
        t.probers = tuple(dict.fromkeys(probers))
        return self._revote(target, t, now, "")

    def forget_node(self, node: str, now: float) -> list[ClusterTransition]:
        """Drop every verdict of ``node`` (gone for good) and take it out of every prober set."""
        out = []
        for key, t in self._targets.items():
            had = t.verdicts.pop(node, None) is not None
            t.reasons.pop(node, None)
            if node in t.probers:
                t.probers = tuple(p for p in t.probers if p != node)
                had = True
            if had and (tr := self._revote(key, t, now, "")) is not None:
                out.append(tr)
        return out

    # -- inputs ------------------------------------------------------------------------

    def record_verdict(
        self, target: str, prober: str, state: str, reason: str, now: float
    ) -> ClusterTransition | None:
        """Fold one prober's published transition (its new state and reason)."""
        _check_state(state)
        t = self._targets.get(target)
        if t is None:
            return None  # a verdict about a target removed meanwhile
        t.verdicts[prober] = state
        t.reasons[prober] = reason
        if prober not in t.probers:
            return None  # kept, but counts only once the node is a prober again
        return self._revote(target, t, now, reason)

    def set_override(self, target: str, override: str, now: float) -> ClusterTransition | None:
        """``up``/``down`` pin the state whatever the probes say; ``auto`` releases it."""
        if override not in OVERRIDES:
            raise ValueError(f"{override!r} is not an override (up, down or auto)")
        t = self._targets[target]
        t.override = override
        if override == "auto":
            return self._settle(target, t, now, t.vote_reason)
        return self._settle(target, t, now, f"override {override}")

    def adopt(self, target: str, state: str, reason: str, now: float) -> ClusterTransition | None:
        """Take a committed cluster outcome as the vote (another node computed it)."""
        _check_state(state)
        t = self._targets[target]
        t.voted, t.vote_reason = state, reason
        return self._settle(target, t, now, reason)

    # -- queries -----------------------------------------------------------------------

    def state(self, target: str) -> str:
        """Effective state of ``target``: ``healthy`` or ``unhealthy``."""
        return self._targets[target].state

    def is_healthy(self, target: str) -> bool:
        """True when ``target`` may take traffic as far as health goes."""
        return self._targets[target].state == HEALTHY

    def seed_state(self, target: str, node: str) -> str:
        """Initial state for ``node``'s ``Hysteresis`` when it starts probing ``target``."""
        t = self._targets[target]
        return t.verdicts.get(node, t.voted)

    def view(self, target: str) -> TargetView:
        """A snapshot of ``target`` (for status pages and ``lbctl health``)."""
        t = self._targets[target]
        verdicts = {p: t.verdicts[p] for p in t.probers if p in t.verdicts}
        return TargetView(target, t.state, t.since, t.reason, t.override, t.voted,
                          t.healthy_since, t.probers, verdicts)  # fmt: skip

    # -- the fold ----------------------------------------------------------------------

    def _revote(self, key: str, t: _Target, now: float, reason: str) -> ClusterTransition | None:
        n = len(t.probers)
        down = 0
        for p in t.probers:
            # A prober without a verdict votes for the current view.
            if t.verdicts.get(p, t.voted) == UNHEALTHY:
                down += 1
        voted = UNHEALTHY if n and 2 * down > n else HEALTHY if n else t.voted
        if voted == t.voted:
            return None
        if voted == UNHEALTHY:
            # Name the failure the majority saw (the latest reason of a down voter).
            why = reason or next(
                (t.reasons[p] for p in t.probers if t.verdicts.get(p) == UNHEALTHY), ""
            )
            t.vote_reason = f"{why} ({down} of {n} probers)" if why else f"{down} of {n} probers"
        else:
            up = n - down
            t.vote_reason = f"{up} of {n} probers report healthy"
        t.voted = voted
        return self._settle(key, t, now, t.vote_reason)

    def _settle(self, key: str, t: _Target, now: float, reason: str) -> ClusterTransition | None:
        state = _OVERRIDE_STATE.get(t.override, t.voted)
        if state == t.state:
            return None
        previous, t.state, t.since, t.reason = t.state, state, now, reason
        if state == HEALTHY:
            t.healthy_since = now
        return ClusterTransition(key, previous, state, reason, now)


# -- slow start --------------------------------------------------------------------------


class SlowStart:
    """Linear weight ramp after a target turns healthy: ``max(10 %, elapsed / duration)``."""

    __slots__ = ("duration", "min_factor")

    def __init__(self, duration: float | None, min_factor: float = 0.1) -> None:
        if not 0.0 < min_factor <= 1.0:
            raise ValueError("min_factor must be in (0, 1]")
        self.duration = duration or 0.0
        self.min_factor = min_factor

    def weight_factor(self, now: float, healthy_since: float | None) -> float:
        """Factor in ``(0, 1]`` to multiply the target's weight by at ``now``."""
        if healthy_since is None or self.duration <= 0.0:
            return 1.0
        ramp = (now - healthy_since) / self.duration
        if ramp >= 1.0:
            return 1.0
        return ramp if ramp > self.min_factor else self.min_factor

    def ramping(self, now: float, healthy_since: float | None) -> bool:
        """True while the ramp is still below full weight."""
        return self.weight_factor(now, healthy_since) < 1.0
