"""Balancing algorithms: which target serves the next request.

Theory of operation
-------------------
Every algorithm is a small object with two methods (the ``Algorithm``
protocol)::

    select(targets, key=None) -> target | None
    record(target, metrics) -> None

``targets`` is the *currently eligible* subset (healthy, breaker closed, in
the rule's target list) in config order. It may differ from one call to the
next as targets fail and recover, so every algorithm keeps its state keyed by
target id (or recomputes it when the set changes), never by list position
alone. ``select`` returns None only when nothing is selectable: an empty
``targets``, or every target at weight 0. Weight 0 means "drain" for every
built-in, as in HAProxy: such a target is never picked.

The data path owns ``target.active`` (requests in flight) and calls
``record`` at request start (``latency=None``) and end only when the
algorithm's ``wants_record`` is true. The built-ins read ``active`` directly
and keep ``wants_record = False``, so the hot path pays nothing for them.

The algorithms, by config name:

``round_robin``
    Index arithmetic over the given list; ignores weights (except that weight
    0 is skipped). A shrinking list just wraps the index.
``weighted_round_robin``
    nginx's smooth weighted round robin. Each pick adds every target's weight
    to its ``current`` value, picks the largest and subtracts the total from
    it. Over ``sum(weights)`` picks each target is picked exactly ``weight``
    times, spread out (5,1,1 gives a a b a c a a). The values live in a dict
    keyed by target id. For an unchanged set they always sum to 0; when the
    set changes (a target leaves with its value, or comes back with a stale
    one) the sum drifts from 0, which the pick loop notices for free, and the
    drift is spread back over the present targets in proportion to weight,
    so the invariant holds again and the proportions recover at once.
``least_connections``
    The target with the lowest ``(active + 1) / weight`` (compared by
    cross-multiplying integers). The ``+1`` is HAProxy's: it makes weights
    matter when targets are idle, so a weight-200 target takes work before a
    weight-100 one. Ties go to the first tied target after the previous
    pick, so equal targets rotate instead of the first one taking every tie.
``random``
    Weighted random over the given targets, with an injectable
    ``random.Random`` so tests are deterministic.
``power_of_two``
    Two distinct targets drawn weighted at random; the less loaded of the two
    (same measure as least connections) wins. Close to least connections in
    quality, but several balancers (our nodes) reading stale counts do not
    all herd onto the same idle target.
``consistent_hash``
    A hash ring with 160 virtual nodes per 100 weight, placed by blake2b
    (64-bit digests, identical across processes, machines and Python
    versions; Python's ``hash()`` is salted per process). The ring is built
    over the ids and weights of the current set and reused until they change;
    the check is one pass comparing ids and weights. A key maps to the first
    point clockwise of its hash; recent keys' positions are memoised until
    the ring changes. Because a target's points depend only on its id and
    weight, adding a target moves only the keys the new points take (about
    1/(N+1)) and removing one moves only its own keys. A request with no key
    (``key=None``) falls back to round robin.
``"package.module:Class"``
    Imported once, instantiated without arguments, wrapped in
    ``CustomAlgorithm`` (which adapts a ``select(targets)`` without ``key``
    and an absent ``record``).

Hot path: ``select`` allocates nothing per call beyond integers (no lists,
no tuples); the consistent hash hashes a key (one digest) only on a memo
miss.
"""

from __future__ import annotations

import hashlib
import inspect
import random
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Protocol, TypeVar

from .keys import is_import_spec, load_object

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "Backend",
    "ConsistentHash",
    "CustomAlgorithm",
    "LeastConnections",
    "Metrics",
    "PowerOfTwoChoices",
    "RoundRobin",
    "SmoothWeightedRoundRobin",
    "TargetLike",
    "WeightedRandom",
    "is_algorithm_name",
    "load_custom_algorithm",
    "make_algorithm",
    "stable_hash",
]


class TargetLike(Protocol):
    """What an algorithm reads from a target (read-only)."""

    @property
    def id(self) -> str: ...

    @property
    def weight(self) -> int: ...

    @property
    def active(self) -> int:
        """Requests in flight to this target (maintained by the data path)."""
        ...


T = TypeVar("T", bound=TargetLike)


@dataclass(slots=True)
class Backend:
    """A plain target for tests and embedding."""

    id: str
    weight: int = 100
    active: int = 0


@dataclass(slots=True, frozen=True)
class Metrics:
    """What the data path reports to ``record``.

    ``latency`` is None at request start and the total seconds at the end;
    ``error`` is true when the request failed (connect error, 5xx, timeout).
    """

    active_connections: int
    latency: float | None = None
    error: bool = False


class Algorithm(Protocol):
    """The protocol every balancing algorithm implements."""

    @property
    def wants_record(self) -> bool:
        """Whether the data path should call ``record``."""
        ...

    def select(self, targets: Sequence[T], key: str | None = None) -> T | None:
        """Pick one of ``targets``; None only when nothing is selectable."""
        ...

    def record(self, target: TargetLike, metrics: Metrics) -> None:
        """Observe a request start or end on ``target``."""
        ...


def stable_hash(data: str) -> int:
    """A 64-bit hash of ``data`` that is the same in every process."""
    return int.from_bytes(
        hashlib.blake2b(data.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big"
    )


class _NoRecord:
    """Mixin: built-ins read ``active`` directly and need no callbacks."""

    __slots__ = ()
    wants_record: ClassVar[bool] = False

    def record(self, target: TargetLike, metrics: Metrics) -> None:
        """No-op; this algorithm keeps no per-request statistics."""


# --------------------------------------------------------------------------
# round robin
# --------------------------------------------------------------------------


class RoundRobin(_NoRecord):
    """Rotate over the given targets; weights are ignored (0 is skipped)."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def select(self, targets: Sequence[T], key: str | None = None) -> T | None:
        n = len(targets)
        if n == 0:
            return None
        i = self._next
        if i >= n:  # the set shrank since the last call
            i %= n
        t = targets[i]
        if t.weight <= 0:
            # Rare: a drained target. Walk on to the next selectable one.
            for _ in range(n - 1):
                i += 1
                if i == n:
                    i = 0
                t = targets[i]
                if t.weight > 0:
                    break
            else:
                return None
        self._next = i + 1
        return t


# --------------------------------------------------------------------------
# smooth weighted round robin
# --------------------------------------------------------------------------


class SmoothWeightedRoundRobin(_NoRecord):
    """nginx's smooth weighted round robin, with state keyed by target id."""

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def select(self, targets: Sequence[T], key: str | None = None) -> T | None:
        current = self._current
        total = 0
        drift = 0
        best: T | None = None
        best_value = 0
        for t in targets:
            w = t.weight
            if w <= 0:
                continue
            tid = t.id
            value = current.get(tid, 0)
            drift += value
            value += w
            current[tid] = value
            total += w
            if best is None or value > best_value:
                best = t
                best_value = value
        if best is None:
            return None
        if drift:
            best = self._rebalance(targets, drift, total)
        current[best.id] -= total
        return best

    def _rebalance(self, targets: Sequence[T], drift: int, total: int) -> T:
        """Restore sum(current) == total over the present targets, then pick.

        Runs only when the set changed since the last call. The drift is
        taken from each target in proportion to its weight (the rounding
        remainder from the first one), which keeps the targets' positions
        relative to each other and avoids restarting the cycle, so frequent
        changes do not favour the heaviest target.
        """
        current = self._current
        remainder = drift
        first: str | None = None
        for t in targets:
            w = t.weight
            if w <= 0:
                continue
            share = drift * w // total
            current[t.id] -= share
            remainder -= share
            if first is None:
                first = t.id
        assert first is not None
        current[first] -= remainder
        best: T | None = None
        best_value = 0
        for t in targets:
            if t.weight <= 0:
                continue
            value = current[t.id]
            if best is None or value > best_value:
                best = t
                best_value = value
        assert best is not None
        # Forget ids that have been gone for good (config changes), keeping
        # the dict bounded; targets that merely went unhealthy stay.
        if len(current) > 4 * len(targets) + 64:
            present = {t.id for t in targets}
            for tid in [k for k in current if k not in present]:
                del current[tid]
        return best


# --------------------------------------------------------------------------
# least connections
# --------------------------------------------------------------------------


class LeastConnections(_NoRecord):
    """Lowest (active + 1) / weight; ties rotate."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def select(self, targets: Sequence[T], key: str | None = None) -> T | None:
        n = len(targets)
        if n == 0:
            return None
        i = self._next
        if i >= n:
            i %= n
        best: T | None = None
        best_load = 0  # (active + 1) of best
        best_weight = 1
        best_index = 0
        for _ in range(n):
            t = targets[i]
            w = t.weight
            if w > 0:
                load = t.active + 1
                # load / w < best_load / best_weight, without division.
                if best is None or load * best_weight < best_load * w:
                    best = t
                    best_load = load
                    best_weight = w
                    best_index = i
            i += 1
            if i == n:
                i = 0
        if best is None:
            return None
        self._next = best_index + 1
        return best


# --------------------------------------------------------------------------
# weighted random and power of two choices
# --------------------------------------------------------------------------


def _weighted_pick(targets: Sequence[T], total: int, r: float, skip: T | None = None) -> T | None:
    """The target at cumulative weight position ``r`` in [0, total)."""
    last: T | None = None
    for t in targets:
        w = t.weight
        if w <= 0 or t is skip:
            continue
        if r < w:
            return t
        r -= w
        last = t
    return last  # float rounding pushed r past the end


class WeightedRandom(_NoRecord):
    """Pick at random with probability proportional to weight."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def select(self, targets: Sequence[T], key: str | None = None) -> T | None:
        total = 0
        for t in targets:
            w = t.weight
            if w > 0:
                total += w
        if total == 0:
            return None
        return _weighted_pick(targets, total, self._rng.random() * total)


class PowerOfTwoChoices(_NoRecord):
    """Draw two distinct targets (weighted); take the less loaded."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def select(self, targets: Sequence[T], key: str | None = None) -> T | None:
        total = 0
        count = 0
        for t in targets:
            w = t.weight
            if w > 0:
                total += w
                count += 1
        if count == 0:
            return None
        rnd = self._rng.random
        a = _weighted_pick(targets, total, rnd() * total)
        assert a is not None
        if count == 1:
            return a
        wa = a.weight
        b = _weighted_pick(targets, total - wa, rnd() * (total - wa), skip=a)
        assert b is not None
        wb = b.weight
        # (active+1)/weight, cross-multiplied; a tie keeps the first draw.
        if (b.active + 1) * wa < (a.active + 1) * wb:
            return b
        return a


# --------------------------------------------------------------------------
# consistent hashing
# --------------------------------------------------------------------------

#: Virtual nodes per 100 units of weight.
VNODES_PER_100: Final = 160
#: Above this many ring points, the density halves (as often as needed), so a
#: ring of heavy targets stays small. The scale only changes when the total
#: weight crosses a power-of-two boundary, which keeps remapping rare.
MAX_RING_POINTS: Final = 1 << 18
#: Keys whose ring position is remembered per instance (cleared when full or
#: when the ring changes, so memory stays bounded whatever the keys).
KEY_MEMO_SIZE: Final = 4096


class ConsistentHash(_NoRecord):
    """A hash ring over the current targets; key None -> round robin."""

    __slots__ = (
        "_ids",
        "_weights",
        "_points",
        "_owners",
        "_fallback",
        "_vnodes_per_100",
        "_memo",
    )

    def __init__(self, vnodes_per_100: int = VNODES_PER_100) -> None:
        if vnodes_per_100 < 1:
            raise ValueError("vnodes_per_100 must be at least 1")
        self._vnodes_per_100 = vnodes_per_100
        self._ids: list[str] = []
        self._weights: list[int] = []
        self._points: list[int] = []  # sorted hash positions
        self._owners: list[int] = []  # index into targets, parallel to _points
        self._fallback = RoundRobin()
        # key -> index into targets for the current ring. Client keys repeat,
        # and a hit skips the blake2b digest and the bisect.
        self._memo: dict[str, int] = {}

    def select(self, targets: Sequence[T], key: str | None = None) -> T | None:
        if key is None:
            return self._fallback.select(targets)
        if len(targets) != len(self._ids):
            self._build(targets)
        else:
            for t, tid, w in zip(targets, self._ids, self._weights, strict=True):
                if t.id != tid or t.weight != w:
                    self._build(targets)
                    break
        memo = self._memo
        index = memo.get(key)
        if index is None:
            points = self._points
            if not points:
                return None
            i = bisect_right(points, stable_hash(key))
            if i == len(points):
                i = 0
            index = self._owners[i]
            if len(memo) >= KEY_MEMO_SIZE:
                memo.clear()
            memo[key] = index
        return targets[index]

    def _build(self, targets: Sequence[TargetLike]) -> None:
        self._memo.clear()
        self._ids = [t.id for t in targets]
        self._weights = [t.weight for t in targets]
        total_weight = sum(w for w in self._weights if w > 0)
        per_100 = self._vnodes_per_100
        scale = 1
        while total_weight * per_100 // (100 * scale) > MAX_RING_POINTS:
            scale *= 2
        ring: list[tuple[int, str, int]] = []
        for index, (tid, w) in enumerate(zip(self._ids, self._weights, strict=True)):
            if w <= 0:
                continue
            vnodes = max(1, (w * per_100 + 50 * scale) // (100 * scale))
            for v in range(vnodes):
                # The id breaks (astronomically rare) ties, so the ring does
                # not depend on config order.
                ring.append((stable_hash(f"{tid}#{v}"), tid, index))
        ring.sort()
        self._points = [p for p, _, _ in ring]
        self._owners = [index for _, _, index in ring]


# --------------------------------------------------------------------------
# custom algorithms
# --------------------------------------------------------------------------


def _accepts_key(select: Callable[..., Any]) -> bool:
    """Whether ``select`` can be called as ``select(targets, key)``."""
    try:
        sig = inspect.signature(select)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind(None, None)
    except TypeError:
        return False
    return True


class CustomAlgorithm:
    """Adapts a user class to the ``Algorithm`` protocol.

    ``select(targets)`` without a ``key`` parameter is accepted; a missing
    ``record`` becomes a no-op. ``wants_record`` is the object's own
    ``wants_record`` when it has one, else true exactly when it has a
    callable ``record``.
    """

    __slots__ = ("inner", "spec", "wants_record", "_select", "_record", "_pass_key")

    def __init__(self, inner: object, spec: str = "") -> None:
        select = getattr(inner, "select", None)
        if not callable(select):
            raise TypeError(f"{type(inner).__name__} has no callable 'select' method")
        record = getattr(inner, "record", None)
        if record is not None and not callable(record):
            raise TypeError(f"{type(inner).__name__}.record is not callable")
        self.inner = inner
        self.spec = spec
        self._select: Callable[..., Any] = select
        self._record: Callable[[TargetLike, Metrics], None] | None = record
        self._pass_key = _accepts_key(select)
        self.wants_record: bool = bool(getattr(inner, "wants_record", record is not None))

    def select(self, targets: Sequence[T], key: str | None = None) -> T | None:
        """Delegate to the wrapped object's ``select``."""
        if self._pass_key:
            return self._select(targets, key)  # type: ignore[no-any-return]
        return self._select(targets)  # type: ignore[no-any-return]

    def record(self, target: TargetLike, metrics: Metrics) -> None:
        """Delegate to the wrapped object's ``record``, if it has one."""
        if self._record is not None:
            self._record(target, metrics)

    def __repr__(self) -> str:
        return f"CustomAlgorithm({self.spec or type(self.inner).__name__!r})"


def load_custom_algorithm(spec: str) -> CustomAlgorithm:
    """Import ``package.module:Class``, instantiate it, and wrap it.

    Raises ``ValueError("cannot load algorithm 'SPEC': ...")`` on any problem.
    """
    factory = load_object(spec, "algorithm")
    prefix = f"cannot load algorithm {spec!r}: "
    name = spec.partition(":")[2]
    try:
        inner = factory()  # type: ignore[operator]
    except Exception as exc:
        raise ValueError(prefix + f"{name}() failed: {type(exc).__name__}: {exc}") from exc
    try:
        return CustomAlgorithm(inner, spec)
    except TypeError as exc:
        raise ValueError(prefix + str(exc)) from None


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------

#: Built-in algorithms by config name.
ALGORITHMS: Final[dict[str, type]] = {
    "round_robin": RoundRobin,
    "weighted_round_robin": SmoothWeightedRoundRobin,
    "least_connections": LeastConnections,
    "random": WeightedRandom,
    "power_of_two": PowerOfTwoChoices,
    "consistent_hash": ConsistentHash,
}

_USES_RNG: Final = frozenset({WeightedRandom, PowerOfTwoChoices})


def is_algorithm_name(name: str) -> bool:
    """True for a built-in name or a syntactically valid ``pkg.mod:Class``.

    Nothing is imported; ``make_algorithm`` reports load errors.
    """
    return name in ALGORITHMS or is_import_spec(name)


def make_algorithm(name: str, rng: random.Random | None = None) -> Algorithm:
    """A fresh algorithm instance for the config name ``name``.

    ``rng`` seeds the randomised algorithms (``random``, ``power_of_two``);
    the others ignore it. Raises ``ValueError`` for an unknown name or a
    custom class that cannot be loaded.
    """
    cls: type[Any] | None = ALGORITHMS.get(name)
    if cls is not None:
        algorithm: Algorithm = cls(rng) if cls in _USES_RNG else cls()
        return algorithm
    if is_import_spec(name):
        return load_custom_algorithm(name)
    raise ValueError(
        f"unknown algorithm {name!r}: expected one of {', '.join(ALGORITHMS)} "
        "or 'package.module:Class'"
    )
