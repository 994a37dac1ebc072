"""The timer wheel behind the data path's timeouts, on a fake clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbnode.policy.timers import TimerWheel


class T:
    def __init__(self, name: str = "") -> None:
        self.name = name
        self.timer_slot = 0

    def fire(self) -> None:  # the wheel never calls it; the node's task does
        raise AssertionError("fired by the wheel")

    def __repr__(self) -> str:
        return f"T({self.name})"


def test_a_timer_fires_once_its_deadline_has_passed_and_not_before() -> None:
    w = TimerWheel(now=100.0, resolution=0.05)
    t = T()
    w.arm(t, 100.5)
    assert w.expire(100.49) == []
    assert w.expire(100.5) == [t]
    assert t.timer_slot == 0 and len(w) == 0
    assert w.expire(101.0) == []  # once


def test_disarmed_and_rearmed_timers() -> None:
    w = TimerWheel(now=0.0, resolution=0.1)
    a, b = T("a"), T("b")
    w.arm(a, 1.0)
    w.arm(b, 1.0)
    w.disarm(a)
    w.disarm(a)  # twice is harmless
    assert w.expire(1.0) == [b]
    w.arm(a, 2.0)
    w.arm(a, 5.0)  # re-arming moves it
    assert w.expire(4.9) == []
    assert w.expire(5.0) == [a]


def test_a_deadline_already_past_fires_on_the_next_tick_and_inf_never() -> None:
    w = TimerWheel(now=10.0, resolution=0.05)
    w.expire(12.0)
    late, never = T("late"), T("never")
    w.arm(late, 11.0)  # in the past
    w.arm(never, math.inf)
    assert never.timer_slot == 0 and len(w) == 1
    assert w.expire(12.0) == []  # the slot of "now" has already expired...
    assert w.expire(12.05) == [late]  # ...so it fires one slot later


def test_a_long_stall_fires_everything_due_in_deadline_order() -> None:
    w = TimerWheel(now=0.0, resolution=0.01)
    ts = [T(str(i)) for i in range(5)]
    for i, t in enumerate(ts):
        w.arm(t, 1000.0 + i)  # far apart: expire walks the buckets
    keep = T("keep")
    w.arm(keep, 5000.0)
    assert w.expire(4000.0) == ts
    assert len(w) == 1


@given(
    deadlines=st.lists(st.floats(min_value=0.0, max_value=50.0), min_size=1, max_size=40),
    ticks=st.lists(st.floats(min_value=0.001, max_value=3.0), min_size=1, max_size=60),
    resolution=st.sampled_from([0.01, 0.05, 0.25]),
)
def test_never_early_never_more_than_a_slot_plus_a_tick_late(
    deadlines: list[float], ticks: list[float], resolution: float
) -> None:
    w = TimerWheel(now=0.0, resolution=resolution)
    timers = [T(str(i)) for i in range(len(deadlines))]
    for t, d in zip(timers, deadlines, strict=True):
        w.arm(t, d)
    fired_at: dict[int, float] = {}
    now = 0.0
    for step in ticks + [60.0]:  # the last tick is past every deadline
        prev, now = now, now + step
        for t in w.expire(now):
            i = int(t.name)  # type: ignore[attr-defined]  # the wheel returns Timers
            assert i not in fired_at
            fired_at[i] = now
            assert now >= deadlines[i]  # never early
            # Late by at most one slot, plus the time since the previous tick.
            assert prev < deadlines[i] + resolution + 1e-9
    assert sorted(fired_at) == list(range(len(deadlines)))
    assert len(w) == 0


def test_resolution_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TimerWheel(now=0.0, resolution=0)
