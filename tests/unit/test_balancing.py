"""Tests for lbnode.policy.balancing: one section per algorithm."""

from __future__ import annotations

import collections
import importlib
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbnode.policy.balancing import (
    ALGORITHMS,
    Backend,
    ConsistentHash,
    CustomAlgorithm,
    LeastConnections,
    Metrics,
    PowerOfTwoChoices,
    RoundRobin,
    SmoothWeightedRoundRobin,
    WeightedRandom,
    is_algorithm_name,
    load_custom_algorithm,
    make_algorithm,
    stable_hash,
)

REPO = Path(__file__).resolve().parents[2]


def backends(*weights: int) -> list[Backend]:
    """Targets a, b, c, ... with the given weights."""
    return [Backend(chr(ord("a") + i), w) for i, w in enumerate(weights)]


def picks(algo: object, targets: list[Backend], n: int, key: str | None = None) -> str:
    """The ids of n selections, concatenated (ids are one letter)."""
    out = []
    for _ in range(n):
        t = algo.select(targets, key)  # type: ignore[attr-defined]
        out.append(t.id if t is not None else "-")
    return "".join(out)


weights_st = st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=7)


# --------------------------------------------------------------------------
# common behaviour
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@pytest.mark.parametrize("key", [None, "k1"])
def test_empty_targets_select_none(name: str, key: str | None) -> None:
    algo = make_algorithm(name, rng=random.Random(1))
    assert algo.select([], key) is None
    assert algo.select([], key) is None


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@pytest.mark.parametrize("key", [None, "k1"])
def test_all_zero_weight_selects_none(name: str, key: str | None) -> None:
    algo = make_algorithm(name, rng=random.Random(1))
    assert algo.select(backends(0, 0, 0), key) is None


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_builtins_share_the_protocol(name: str) -> None:
    algo = make_algorithm(name)
    assert type(algo) is ALGORITHMS[name]
    assert algo.wants_record is False
    t = Backend("a")
    algo.record(t, Metrics(active_connections=3))  # accepted, and a no-op
    assert algo.select([t], "k") is t
    assert t == Backend("a")


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(ALGORITHMS)),
    weights=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=6),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_selection_is_a_member_with_positive_weight(
    name: str, weights: list[int], seed: int
) -> None:
    targets = backends(*weights)
    algo = make_algorithm(name, rng=random.Random(seed))
    rng = random.Random(seed)
    for i in range(40):
        for t in targets:
            t.active = rng.randrange(4)
        got = algo.select(targets, f"key-{i}" if i % 2 else None)
        if all(w == 0 for w in weights):
            assert got is None
        else:
            assert got is not None and got in targets and got.weight > 0


def test_metrics_is_frozen_with_defaults() -> None:
    m = Metrics(active_connections=2)
    assert (m.active_connections, m.latency, m.error) == (2, None, False)
    with pytest.raises(AttributeError):
        m.error = True  # type: ignore[misc]


# --------------------------------------------------------------------------
# round robin
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "n", "expected"),
    [
        ((100,), 3, "aaa"),
        ((100, 100, 100), 7, "abcabca"),
        ((1, 500, 3), 6, "abcabc"),  # weights are ignored
        ((100, 0, 100), 4, "acac"),  # ...except that 0 drains
        ((0, 0, 100), 3, "ccc"),
    ],
)
def test_round_robin_table(weights: tuple[int, ...], n: int, expected: str) -> None:
    assert picks(RoundRobin(), backends(*weights), n) == expected


def test_round_robin_wraps_when_the_set_shrinks() -> None:
    rr = RoundRobin()
    a, b, c = backends(1, 1, 1)
    assert picks(rr, [a, b, c], 2) == "ab"
    assert picks(rr, [a], 2) == "aa"
    assert picks(rr, [a, b], 4) == "baba"


@given(n=st.integers(min_value=1, max_value=20), rounds=st.integers(min_value=1, max_value=5))
def test_round_robin_cycles_exactly(n: int, rounds: int) -> None:
    targets = [Backend(f"t{i}") for i in range(n)]
    rr = RoundRobin()
    got = [rr.select(targets) for _ in range(n * rounds)]
    assert got == targets * rounds


# --------------------------------------------------------------------------
# smooth weighted round robin
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "cycle"),
    [
        ((5, 1, 1), "aabacaa"),  # nginx's documented sequence
        ((1, 1, 1), "abc"),
        ((2, 1), "aba"),
        ((3, 0, 1), "aaca"),
        ((4, 2), "abaaba"),
    ],
)
def test_wrr_table(weights: tuple[int, ...], cycle: str) -> None:
    assert picks(SmoothWeightedRoundRobin(), backends(*weights), 3 * len(cycle)) == cycle * 3


@given(weights=weights_st)
def test_wrr_each_cycle_is_exact_and_interleaved(weights: list[int]) -> None:
    targets = backends(*weights)
    total = sum(weights)
    wrr = SmoothWeightedRoundRobin()
    seq = picks(wrr, targets, 2 * total)
    # Exact: each cycle picks each target weight times, and cycles repeat.
    assert seq[:total] == seq[total:]
    counts = collections.Counter(seq[:total])
    assert {t.id: counts[t.id] for t in targets} == {t.id: t.weight for t in targets}
    # Interleaved: every prefix is less than two picks away from the ideal
    # share (smooth WRR stays within about one), ruling out the long runs
    # ("aaaaaaab") of plain weighted round robin.
    running: collections.Counter[str] = collections.Counter()
    for k, tid in enumerate(seq[:total], start=1):
        running[tid] += 1
        for t in targets:
            assert abs(running[t.id] * total - k * t.weight) < 2 * total


@settings(deadline=None)
@given(
    weights=st.lists(st.integers(min_value=1, max_value=20), min_size=2, max_size=6),
    history=st.lists(st.lists(st.booleans(), min_size=6, max_size=6), max_size=40),
)
def test_wrr_recovers_after_targets_leave_and_return(
    weights: list[int], history: list[list[bool]]
) -> None:
    targets = backends(*weights)
    total = sum(weights)
    wrr = SmoothWeightedRoundRobin()
    for present in history:
        wrr.select([t for t, p in zip(targets, present, strict=False) if p])
    seq = picks(wrr, targets, 3 * total)
    # Back on the full set, proportions hold at once: any window of one cycle
    # is within one pick of exact, and the running total never drifts.
    for start in range(2 * total + 1):
        window = collections.Counter(seq[start : start + total])
        for t in targets:
            assert abs(window[t.id] - t.weight) <= 1
    running: collections.Counter[str] = collections.Counter()
    for k, tid in enumerate(seq, start=1):
        running[tid] += 1
        for t in targets:
            assert abs(running[t.id] * total - k * t.weight) <= 2 * total


def test_wrr_state_is_keyed_by_id_not_position() -> None:
    wrr = SmoothWeightedRoundRobin()
    a, b, c = backends(5, 1, 1)
    assert picks(wrr, [a, b, c], 7) == "aabacaa"
    # Same targets, different order: the cycle continues per id.
    assert sorted(picks(wrr, [c, a, b], 7)) == sorted("aabacaa")


# --------------------------------------------------------------------------
# least connections
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ([("a", 100, 3), ("b", 100, 1), ("c", 100, 2)], "b"),
        ([("a", 100, 0), ("b", 100, 9)], "a"),
        # (active + 1) / weight: 4/200 < 3/100
        ([("a", 100, 2), ("b", 200, 3)], "b"),
        # idle targets: the heavier one first (HAProxy's +1)
        ([("a", 100, 0), ("b", 300, 0)], "b"),
        ([("a", 0, 0), ("b", 100, 50)], "b"),  # weight 0 is never picked
    ],
)
def test_least_connections_table(targets: list[tuple[str, int, int]], expected: str) -> None:
    chosen = LeastConnections().select([Backend(*t) for t in targets])
    assert chosen is not None and chosen.id == expected


def test_least_connections_rotates_ties() -> None:
    lc = LeastConnections()
    targets = backends(100, 100, 100)
    assert picks(lc, targets, 6) == "abcabc"
    targets[1].active = 5
    assert picks(lc, targets, 4) == "acac"
    targets[1].active = 0
    targets[0].active = targets[2].active = 2
    assert picks(lc, targets, 2) == "bb"


@given(
    spec=st.lists(
        st.tuples(st.integers(min_value=1, max_value=500), st.integers(min_value=0, max_value=50)),
        min_size=1,
        max_size=10,
    )
)
def test_least_connections_picks_a_minimum(spec: list[tuple[int, int]]) -> None:
    targets = [Backend(f"t{i}", w, a) for i, (w, a) in enumerate(spec)]
    lc = LeastConnections()

    def load(t: Backend) -> Fraction:
        return Fraction(t.active + 1, t.weight)

    best = min(load(t) for t in targets)
    seen = set()
    for _ in range(len(targets)):
        got = lc.select(targets)
        assert got is not None
        assert load(got) == best
        seen.add(got.id)
    # Every tied target gets its turn within one round.
    assert seen == {t.id for t in targets if load(t) == best}


# --------------------------------------------------------------------------
# random and power of two
# --------------------------------------------------------------------------


def test_random_respects_weights() -> None:
    targets = backends(100, 200, 300, 400)
    algo = WeightedRandom(random.Random(12345))
    n = 100_000
    counts = collections.Counter(picks(algo, targets, n))
    for t in targets:
        assert counts[t.id] / n == pytest.approx(t.weight / 1000, abs=0.01)


def test_random_is_deterministic_with_a_seed() -> None:
    targets = backends(1, 2, 3)
    one = picks(WeightedRandom(random.Random(7)), targets, 50)
    two = picks(WeightedRandom(random.Random(7)), targets, 50)
    assert one == two
    assert set(one) == {"a", "b", "c"}


@settings(deadline=None)
@given(
    loads=st.lists(st.integers(min_value=0, max_value=20), min_size=2, max_size=8),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_power_of_two_never_picks_the_unique_most_loaded(loads: list[int], seed: int) -> None:
    targets = [Backend(f"t{i}", 100, a) for i, a in enumerate(loads)]
    top = max(loads)
    p2c = PowerOfTwoChoices(random.Random(seed))
    for _ in range(100):
        got = p2c.select(targets)
        assert got is not None
        if loads.count(top) == 1:
            assert got.active != top
    # With two targets, the less loaded always wins.
    pair = targets[:2]
    if pair[0].active != pair[1].active:
        winner = min(pair, key=lambda t: t.active)
        assert all(p2c.select(pair) is winner for _ in range(20))


def test_power_of_two_distribution() -> None:
    n = 20_000
    p2c = PowerOfTwoChoices(random.Random(99))

    def shares(targets: list[Backend]) -> dict[str, float]:
        counts = collections.Counter(picks(p2c, targets, n))
        return {t.id: counts[t.id] / n for t in targets}

    # Equal load and weight: ties keep the first (uniform) draw.
    assert shares(backends(100, 100, 100, 100)) == pytest.approx(
        {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}, abs=0.015
    )
    # The least loaded of four wins whenever it is one of the two drawn:
    # 1 - (3/4 * 2/3) = half the time.
    targets = backends(100, 100, 100, 100)
    for t, active in zip(targets, [1, 5, 5, 5], strict=True):
        t.active = active
    assert shares(targets)["a"] == pytest.approx(0.5, abs=0.015)
    # Weights count twice: a heavy target is drawn more often (0.5 + 0.5 * 0.6)
    # and, at equal active counts, is the less loaded of any pair.
    got = shares(backends(300, 100, 100, 100))
    assert got == pytest.approx({"a": 0.8, "b": 0.2 / 3, "c": 0.2 / 3, "d": 0.2 / 3}, abs=0.015)


# --------------------------------------------------------------------------
# consistent hash
# --------------------------------------------------------------------------

KEYS = [f"client-{i}" for i in range(10_000)]


def assign(ch: ConsistentHash, targets: list[Backend]) -> dict[str, str]:
    out = {}
    for k in KEYS:
        t = ch.select(targets, k)
        assert t is not None
        out[k] = t.id
    return out


def test_stable_hash_is_pinned() -> None:
    # A different hash would remap every sticky client on upgrade.
    assert stable_hash("") == 0xE4A6A0577479B2B4
    assert stable_hash("client-1") == stable_hash("client-1")
    assert stable_hash("client-1") != stable_hash("client-2")


def test_consistent_hash_same_key_same_target_across_instances() -> None:
    targets = [Backend(f"api-{i}") for i in range(5)]
    one = assign(ConsistentHash(), targets)
    # A second instance, fed the targets in another order.
    two = assign(ConsistentHash(), list(reversed(targets)))
    assert one == two
    assert set(one.values()) == {t.id for t in targets}


def test_consistent_hash_same_across_processes() -> None:
    code = textwrap.dedent(
        """
        from lbnode.policy.balancing import Backend, ConsistentHash
        ch = ConsistentHash()
        ts = [Backend(f"api-{i}") for i in range(4)]
        print(",".join(ch.select(ts, f"user-{i}").id for i in range(64)))
        """
    )
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(proc.stdout)
    ch = ConsistentHash()
    ts = [Backend(f"api-{i}") for i in range(4)]
    owners = [ch.select(ts, f"user-{i}") for i in range(64)]
    here = ",".join(t.id for t in owners if t is not None) + "\n"
    assert outputs == {here}


def test_consistent_hash_adding_a_target_moves_few_keys_all_to_it() -> None:
    four = [Backend(f"api-{i}") for i in range(4)]
    five = four + [Backend("api-new")]
    ch = ConsistentHash()
    before = assign(ch, four)
    after = assign(ch, five)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert 0.10 <= len(moved) / len(KEYS) <= 0.30
    assert all(after[k] == "api-new" for k in moved)


def test_consistent_hash_removing_a_target_moves_only_its_keys() -> None:
    targets = [Backend(f"api-{i}") for i in range(5)]
    ch = ConsistentHash()
    before = assign(ch, targets)
    gone = targets.pop(2)
    after = assign(ch, targets)
    for k in KEYS:
        if before[k] != gone.id:
            assert after[k] == before[k]
        else:
            assert after[k] != gone.id
    # ... and back again: every key returns to where it was.
    targets.insert(2, gone)
    assert assign(ch, targets) == before


def test_consistent_hash_follows_weights_and_weight_changes() -> None:
    targets = [Backend("a", 100), Backend("b", 300)]
    ch = ConsistentHash()
    counts = collections.Counter(assign(ch, targets).values())
    assert counts["b"] / len(KEYS) == pytest.approx(0.75, abs=0.06)
    # A weight change (same ids, same length) invalidates the cached ring.
    targets[0].weight = 0
    assert set(assign(ch, targets).values()) == {"b"}


def test_consistent_hash_without_key_is_round_robin() -> None:
    targets = backends(100, 100, 100)
    assert picks(ConsistentHash(), targets, 6, key=None) == "abcabc"


@settings(deadline=None, max_examples=40)
@given(
    ids=st.sets(st.text("abcdefgh0123", min_size=1, max_size=6), min_size=2, max_size=6),
    key=st.text(max_size=20),
)
def test_consistent_hash_ignores_removal_of_other_targets(ids: set[str], key: str) -> None:
    targets = [Backend(i) for i in sorted(ids)]
    ch = ConsistentHash()
    owner = ch.select(targets, key)
    assert owner is not None
    for other in targets:
        if other is not owner:
            rest = [t for t in targets if t is not other]
            assert ch.select(rest, key) is owner


# --------------------------------------------------------------------------
# registry and custom algorithms
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("round_robin", True),
        ("weighted_round_robin", True),
        ("least_connections", True),
        ("random", True),
        ("power_of_two", True),
        ("consistent_hash", True),
        ("examples.custom_algorithm:LeastConnections", True),
        ("mod:Cls", True),
        ("pkg.mod:Outer.Inner", True),
        ("roundrobin", False),
        ("", False),
        ("mod:", False),
        (":Cls", False),
        ("pkg..mod:Cls", False),
        ("pkg.mod:Cls:extra", False),
        ("my-mod:Cls", False),
    ],
)
def test_is_algorithm_name(name: str, ok: bool) -> None:
    assert is_algorithm_name(name) is ok


def test_make_algorithm_unknown_name() -> None:
    with pytest.raises(ValueError) as exc:
        make_algorithm("fastest")
    assert str(exc.value) == (
        "unknown algorithm 'fastest': expected one of round_robin, weighted_round_robin, "
        "least_connections, random, power_of_two, consistent_hash or 'package.module:Class'"
    )


def test_make_algorithm_passes_the_rng() -> None:
    targets = backends(1, 1, 1, 1)
    one = picks(make_algorithm("random", rng=random.Random(5)), targets, 40)
    two = picks(make_algorithm("random", rng=random.Random(5)), targets, 40)
    assert one == two
    p2c = make_algorithm("power_of_two", rng=random.Random(5))
    assert picks(p2c, targets, 40) == picks(PowerOfTwoChoices(random.Random(5)), targets, 40)


def test_example_least_connections_loads_and_records() -> None:
    algo = make_algorithm("examples.custom_algorithm:LeastConnections")
    assert isinstance(algo, CustomAlgorithm)
    assert algo.wants_record is True
    a, b, c = backends(100, 100, 100)
    assert algo.select([a, b, c]) is a
    algo.record(a, Metrics(active_connections=4))
    algo.record(b, Metrics(active_connections=2, latency=0.01))
    assert algo.select([a, b, c]) is c
    algo.record(c, Metrics(active_connections=9, latency=0.2, error=True))
    assert algo.select([a, b, c]) is b
    assert algo.select([]) is None


PLUGINS = {
    "lbplug_ok": """
        class KeyOnly:
            def select(self, targets):
                return targets[-1] if targets else None

        class WithKey:
            def __init__(self):
                self.seen = []
            def select(self, targets, key=None):
                self.seen.append(key)
                return targets[0] if targets else None
            def record(self, target, metrics):
                self.seen.append(metrics.active_connections)

        class OptOut(WithKey):
            wants_record = False

        class NeedsArgs:
            def __init__(self, size):
                pass
            def select(self, targets, key=None):
                return None

        class Boom:
            def __init__(self):
                raise RuntimeError("no config")

        class NoSelect:
            pass

        class SelectAttr:
            select = 3

        class BadRecord:
            record = "x"
            def select(self, targets, key=None):
                return None

        NOT_CALLABLE = 42
    """,
    "lbplug_broken_dep": "import lbplug_missing_dependency\n",
    "lbplug_raises": "raise RuntimeError('half-configured')\n",
}


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, body in PLUGINS.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield
    for name in PLUGINS:
        sys.modules.pop(name, None)


def test_custom_select_without_key_and_without_record(plugins: None) -> None:
    algo = load_custom_algorithm("lbplug_ok:KeyOnly")
    assert algo.wants_record is False
    a, b = backends(1, 1)
    assert algo.select([a, b], "k") is b
    algo.record(a, Metrics(1))  # a no-op, not an error


def test_custom_select_with_key_and_record(plugins: None) -> None:
    algo = make_algorithm("lbplug_ok:WithKey")
    assert isinstance(algo, CustomAlgorithm)
    assert algo.wants_record is True
    a = Backend("a")
    assert algo.select([a], "user-1") is a
    algo.record(a, Metrics(7))
    assert algo.inner.seen == ["user-1", 7]  # type: ignore[attr-defined]
    assert make_algorithm("lbplug_ok:OptOut").wants_record is False


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lbplug_nope.mod:Cls", "module 'lbplug_nope.mod' not found"),
        ("lbplug_ok.sub:Cls", "module 'lbplug_ok.sub' not found"),
        (
            "lbplug_broken_dep:Cls",
            "importing module 'lbplug_broken_dep' failed: ModuleNotFoundError: "
            "No module named 'lbplug_missing_dependency'",
        ),
        (
            "lbplug_raises:Cls",
            "importing module 'lbplug_raises' failed: RuntimeError: half-configured",
        ),
        ("lbplug_ok:Missing", "module 'lbplug_ok' has no attribute 'Missing'"),
        ("lbplug_ok:KeyOnly.nested", "'KeyOnly' has no attribute 'nested'"),
        ("lbplug_ok:NOT_CALLABLE", "'NOT_CALLABLE' is not callable"),
        (
            "lbplug_ok:NeedsArgs",
            "NeedsArgs() failed: TypeError: NeedsArgs.__init__() missing 1 required "
            "positional argument: 'size'",
        ),
        ("lbplug_ok:Boom", "Boom() failed: RuntimeError: no config"),
        ("lbplug_ok:NoSelect", "NoSelect has no callable 'select' method"),
        ("lbplug_ok:SelectAttr", "SelectAttr has no callable 'select' method"),
        ("lbplug_ok:BadRecord", "BadRecord.record is not callable"),
        ("no_colon", "expected 'package.module:Name'"),
    ],
)
def test_custom_algorithm_errors(plugins: None, spec: str, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        load_custom_algorithm(spec)
    assert str(exc.value) == f"cannot load algorithm {spec!r}: {message}"
