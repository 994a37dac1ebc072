from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbnode.policy.outlier import Ejection, OutlierDetector

GROUP = ["a", "b", "c", "d"]


def fail(d: OutlierDetector, target: str, n: int, now: float, kind: str = "5xx") -> list[Ejection]:
    out = []
    for _ in range(n):
        if (e := d.observe(target, False, kind, now)) is not None:
            out.append(e)
    return out


def test_five_consecutive_failures_eject_at_once() -> None:
    d = OutlierDetector(GROUP)
    assert fail(d, "a", 4, 10.0) == []
    assert not d.is_ejected("a", 10.0)
    e = d.observe("a", False, "connect", 10.0)
    reason = "5 consecutive failures (last: connect failure), ejected for 30s"
    assert e == Ejection("a", 10.0, 40.0, 1, reason)
    assert d.is_ejected("a", 10.0) and d.is_ejected("a", 39.999)
    assert not d.is_ejected("a", 40.0)
    assert d.ejected(20.0) == ["a"] and d.ejected_until("a") == 40.0
    assert d.ejected_until("b") is None


# (outcomes as "F"ail/"S"uccess, ejected after the last one?)
SEQUENCES = [
    ("FFFFF", True),
    ("FFFFSFFFF", False),  # a success resets the count
    ("FFFFSFFFFF", True),
    ("SSSSSSSS", False),
    ("FFFF", False),
]


@pytest.mark.parametrize(("outcomes", "ejected"), SEQUENCES)
def test_consecutive_counting(outcomes: str, ejected: bool) -> None:
    d = OutlierDetector(GROUP)
    for i, c in enumerate(outcomes):
        ok = c == "S"
        d.observe("a", ok, "ok" if ok else "5xx", float(i))
    assert d.is_ejected("a", float(len(outcomes))) is ejected


def test_outcomes_while_ejected_are_ignored() -> None:
    d = OutlierDetector(GROUP, consecutive=2)
    assert len(fail(d, "a", 2, 0.0)) == 1
    assert fail(d, "a", 10, 1.0) == []  # in-flight requests finishing
    assert d.times_ejected("a", 1.0) == 1


def test_ejection_time_grows_with_the_count_up_to_the_cap() -> None:
    d = OutlierDetector(GROUP, consecutive=1, decay_interval=1e9)
    now, durations = 0.0, []
    for _ in range(12):
        (e,) = fail(d, "a", 1, now)
        durations.append(e.until - e.at)
        now = e.until
    assert durations == [30.0 * n for n in range(1, 11)] + [300.0, 300.0]


def test_the_count_decays_after_healthy_periods() -> None:
    d = OutlierDetector(GROUP, consecutive=1)  # decay every 30 s un-ejected
    (e1,) = fail(d, "a", 1, 0.0)  # until 30
    (e2,) = fail(d, "a", 1, 30.0)  # times 2, until 90
    assert e2.until == 90.0
    assert d.times_ejected("a", 90.0) == 2
    assert d.times_ejected("a", 119.9) == 2
    assert d.times_ejected("a", 120.0) == 1
    (e3,) = fail(d, "a", 1, 125.0)  # 1 + 1 = 2nd multiplier: 60 s
    assert (e3.times, e3.until) == (2, 185.0)
    assert d.times_ejected("a", 185.0 + 29.0) == 2
    assert d.times_ejected("a", 185.0 + 59.0) == 1
    assert d.times_ejected("a", 185.0 + 60.0) == 0  # two intervals: both decrements
    (e4,) = fail(d, "a", 1, 1000.0)
    assert (e4.times, e4.until) == (1, 1030.0)


def test_decay_does_not_depend_on_how_often_it_is_asked() -> None:
    a = OutlierDetector(GROUP, consecutive=1)
    b = OutlierDetector(GROUP, consecutive=1)
    for d in (a, b):
        fail(d, "a", 1, 0.0)
        fail(d, "a", 1, 30.0)
        fail(d, "a", 1, 90.0)  # times 3, until 180
    for t in range(180, 300, 7):
        a.times_ejected("a", float(t))
    assert a.times_ejected("a", 300.0) == b.times_ejected("a", 300.0) == 0


@pytest.mark.parametrize(
    ("size", "percent", "cap"),
    [(1, 50, 0), (2, 50, 1), (3, 50, 1), (4, 50, 2), (10, 50, 5), (10, 100, 10), (10, 0, 0)],
)
def test_never_more_than_max_ejection_percent(size: int, percent: float, cap: int) -> None:
    targets = [f"t{i}" for i in range(size)]
    d = OutlierDetector(targets, consecutive=1, max_ejection_percent=percent)
    assert d.max_ejected() == cap
    for t in targets:
        fail(d, t, 1, 0.0)
    assert d.ejected_count(0.0) == cap


def test_a_refused_ejection_happens_once_room_frees_up() -> None:
    d = OutlierDetector(["a", "b"], consecutive=3)
    assert len(fail(d, "a", 3, 0.0)) == 1
    assert fail(d, "b", 5, 1.0) == []  # 1 of 2 already out
    assert not d.is_ejected("b", 1.0)
    # a is back at 30; b's failures still stand at the threshold: one more ejects it
    (e,) = fail(d, "b", 1, 30.0)
    assert e.target == "b" and d.is_ejected("b", 30.0)


def test_set_targets_keeps_history_and_resizes_the_group() -> None:
    d = OutlierDetector(["a", "b"], consecutive=1)
    fail(d, "a", 1, 0.0)
    d.set_targets(["a", "b", "c", "d"])
    assert d.targets() == ["a", "b", "c", "d"] and d.is_ejected("a", 1.0)
    assert len(fail(d, "b", 1, 1.0)) == 1  # now 2 of 4 may be out
    d.set_targets(["c"])
    assert d.ejected(2.0) == [] and not d.is_ejected("a", 2.0)
    assert d.observe("a", False, "5xx", 3.0) is None  # not in the group any more


def test_bad_arguments() -> None:
    d = OutlierDetector(GROUP)
    with pytest.raises(ValueError):
        d.observe("a", False, "4xx", 0.0)
    for kw in ({"consecutive": 0}, {"base_ejection": 0.0}, {"max_ejection": 1.0},
               {"max_ejection_percent": 101}, {"decay_interval": 0.0}):  # fmt: skip
        with pytest.raises(ValueError):
            OutlierDetector(GROUP, **kw)


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 6),
    steps=st.lists(st.tuples(st.integers(0, 5), st.booleans(), st.floats(0.0, 20.0)),
                   max_size=80),
)  # fmt: skip
def test_the_cap_and_the_maximum_time_always_hold(
    size: int, steps: list[tuple[int, bool, float]]
) -> None:
    targets = [f"t{i}" for i in range(size)]
    d = OutlierDetector(targets, consecutive=2, base_ejection=10.0, max_ejection=40.0)
    now = 0.0
    for i, ok, dt in steps:
        now += dt
        e = d.observe(targets[i % size], ok, "ok" if ok else "connect", now)
        if e is not None:
            assert not ok and 0 < e.until - e.at <= 40.0
        assert d.ejected_count(now) <= d.max_ejected()
