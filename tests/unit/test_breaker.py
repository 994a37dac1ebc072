from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbnode.policy.breaker import (
    BREAKER_TRANSITIONS,
    CLOSED,
    HALF_OPEN,
    OPEN,
    Breaker,
    BreakerEvent,
    BreakerStateError,
)
from lbshared.config import CircuitBreaker


def snapshot(b: Breaker) -> tuple[object, ...]:
    return (b.state, b.generation, b.since, b.open_until, b.wait, b.trials_started,
            b.trial_successes, b.trial_failures, b.counts(b.since + 1.0))  # fmt: skip


def feed(b: Breaker, ok: int, errors: int, now: float) -> None:
    for _ in range(ok):
        b.record(True, now)
    for _ in range(errors):
        b.record(False, now)


def in_state(state: str, *, trials_ok: int = 0, trials_failed: int = 0) -> Breaker:
    """A breaker (threshold 0.5, 10 requests, 60 s window, 30 s wait) driven into ``state``."""
    b = Breaker(0.5, 10, 60.0, 30.0, trials=3)
    if state == CLOSED:
        feed(b, 3, 2, 100.0)  # some history that must survive a refused transition
        return b
    feed(b, 5, 5, 100.0)
    b.open(100.0)
    if state == HALF_OPEN:
        b.half_open(130.0)
        for _ in range(trials_ok + trials_failed):
            assert b.allow_trial()
        for _ in range(trials_ok):
            b.record(True, 131.0, trial=True)
        for _ in range(trials_failed):
            b.record(False, 131.0, trial=True)
    return b


# ------------------------------------------------------------------ the transition table

METHODS = {"trip": Breaker.open, "probe": Breaker.half_open, "close": Breaker.close,
           "reopen": Breaker.reopen}  # fmt: skip


def test_the_table() -> None:
    assert BREAKER_TRANSITIONS == {
        CLOSED: {"trip": OPEN},
        OPEN: {"probe": HALF_OPEN},
        HALF_OPEN: {"close": CLOSED, "reopen": OPEN},
    }


@pytest.mark.parametrize("state", [CLOSED, OPEN, HALF_OPEN])
@pytest.mark.parametrize("transition", list(METHODS))
def test_every_transition_in_every_state(state: str, transition: str) -> None:
    # Preconditions met where they exist: the wait is over, every trial succeeded.
    b = in_state(state, trials_ok=3)
    before = snapshot(b)
    now = 200.0
    target = BREAKER_TRANSITIONS[state].get(transition)
    if target is None:
        with pytest.raises(BreakerStateError):
            METHODS[transition](b, now)
        assert snapshot(b) == before
    else:
        event = METHODS[transition](b, now)
        assert b.state == target
        assert b.generation == before[1] + 1 == event.generation  # type: ignore[operator]
        assert (event.transition, event.at, b.since) == (transition, now, now)
        assert event.type == {OPEN: "circuit_open", HALF_OPEN: "circuit_half_open",
                              CLOSED: "circuit_closed"}[target]  # fmt: skip


@pytest.mark.parametrize(
    ("state", "call", "kwargs"),
    [(OPEN, Breaker.half_open, {}),  # the wait is not over (open at 100, wait 30)
     (HALF_OPEN, Breaker.close, {"trials_ok": 2}),  # not every trial done
     (HALF_OPEN, Breaker.close, {"trials_ok": 2, "trials_failed": 1})],
)  # fmt: skip
def test_unmet_preconditions_raise_and_change_nothing(
    state: str, call: object, kwargs: dict[str, int]
) -> None:
    b = in_state(state, **kwargs)
    before = snapshot(b)
    with pytest.raises(BreakerStateError):
        call(b, 129.9)  # type: ignore[operator]
    assert snapshot(b) == before


def test_allow_trial_outside_half_open_raises() -> None:
    for state in (CLOSED, OPEN):
        b = in_state(state)
        before = snapshot(b)
        with pytest.raises(BreakerStateError):
            b.allow_trial()
        assert snapshot(b) == before


# ------------------------------------------------------------------ opening


def test_opens_on_error_rate_with_the_documented_reason() -> None:
    b = Breaker(0.5, 100, 60.0, 30.0)
    feed(b, 76, 124, 10.0)
    assert b.counts(10.0) == (76, 124)
    assert b.should_open(10.0) and b.due(10.0) == "trip"
    event = b.step(10.0)
    assert event == BreakerEvent("circuit_open", "trip", "error rate 62% over 60s (124/200)",
                                 10.0, 1, 30.0)  # fmt: skip
    assert (b.state, b.open_until) == (OPEN, 40.0)
    assert not b.should_open(10.0)  # only a closed breaker opens


@pytest.mark.parametrize(
    ("ok", "errors", "opens"),
    [(50, 49, False),  # 99 calls < min_requests
     (50, 50, True),  # exactly the threshold with exactly min_requests
     (51, 49, False),  # 49 % < 50 %
     (0, 100, True),
     (1000, 0, False)],
)  # fmt: skip
def test_should_open_boundaries(ok: int, errors: int, opens: bool) -> None:
    b = Breaker(0.5, 100, 60.0, 30.0)
    feed(b, ok, errors, 5.0)
    assert b.should_open(5.0) is opens
    assert (b.due(5.0) == "trip") is opens


def test_outcomes_leave_the_window() -> None:
    b = Breaker(0.5, 4, 10.0, 30.0)  # sub-buckets of 1 s
    feed(b, 0, 4, 100.5)
    assert b.should_open(100.5)
    assert b.counts(109.99) == (0, 4)  # bucket 100 is still one of the last ten
    assert b.counts(110.0) == (0, 0)
    assert not b.should_open(110.0)


def test_add_counts_merges_other_nodes_outcomes() -> None:
    b = Breaker(0.5, 100, 60.0, 30.0)
    feed(b, 40, 10, 30.0)
    b.add_counts(20, 50, 25.0)  # another node's bucket
    b.add_counts(100, 100, -40.0)  # long gone: ignored
    assert b.counts(30.0) == (60, 60)
    assert b.should_open(30.0)
    with pytest.raises(ValueError):
        b.add_counts(-1, 0, 30.0)


def test_a_late_add_to_a_bucket_already_recycled_is_dropped() -> None:
    b = Breaker(0.5, 1, 10.0, 30.0)
    b.record(False, 15.0)  # bucket 15 takes ring slot 5
    b.add_counts(7, 7, 5.0)  # bucket 5, same slot, older than the window: dropped
    assert b.counts(15.0) == (0, 1)


# ------------------------------------------------------------------ half-open, close, reopen


def test_full_cycle_with_step() -> None:
    b = Breaker(0.5, 10, 60.0, 30.0, trials=3)
    feed(b, 0, 10, 0.0)
    opened = b.step(0.0)
    assert opened is not None and opened.type == "circuit_open"
    assert not b.allows(0.0) and b.step(29.9) is None
    half = b.step(30.0)
    assert half == BreakerEvent("circuit_half_open", "probe",
                                "open for 30s, trying 3 requests", 30.0, 2, 0.0)  # fmt: skip
    assert b.allows(30.0)
    assert [b.allow_trial() for _ in range(4)] == [True, True, True, False]
    assert not b.allows(30.0)  # every slot taken
    b.record(False, 30.1)  # a straggler sent before the breaker opened: not a trial
    for _ in range(3):
        assert b.step(30.5) is None
        b.record(True, 30.5, trial=True)
    closed = b.step(31.0)
    assert closed == BreakerEvent("circuit_closed", "close", "3 trial requests succeeded",
                                  31.0, 3, 0.0)  # fmt: skip
    assert b.allows(31.0)
    assert b.counts(31.0) == (0, 0)  # the window starts empty after closing
    b.add_counts(0, 50, 29.0)  # outcomes of sub-buckets before the close are dropped
    assert b.counts(31.0) == (0, 0)
    b.add_counts(1, 2, 30.0)  # the close's own sub-bucket (30-36 s) still counts
    assert b.counts(31.0) == (1, 2)


def test_reopen_doubles_the_wait_up_to_the_cap_and_close_resets_it() -> None:
    b = Breaker(0.5, 1, 60.0, 30.0, trials=1)  # cap 300 s
    b.record(False, 0.0)
    assert b.step(0.0) is not None
    now, waits = 0.0, []
    for _ in range(6):
        now = b.open_until
        assert b.step(now) is not None  # half-open
        assert b.allow_trial()
        b.record(False, now, trial=True)
        event = b.step(now)
        assert event is not None and event.transition == "reopen"
        waits.append(event.wait)
        assert b.open_until == now + event.wait
    assert waits == [60.0, 120.0, 240.0, 300.0, 300.0, 300.0]
    assert event is not None and event.reason == "trial request failed, open for 300s"
    b.step(b.open_until)
    b.allow_trial()
    b.record(True, b.open_until, trial=True)
    assert b.step(b.open_until) is not None and b.state == CLOSED
    assert b.wait == 30.0
    b.record(False, b.open_until + 1)
    event = b.step(b.open_until + 1)
    assert event is not None and event.wait == 30.0


def test_adopt_applies_only_newer_generations() -> None:
    a = Breaker(0.5, 1, 60.0, 30.0)
    b = Breaker(0.5, 1, 60.0, 30.0)
    a.record(False, 0.0)
    opened = a.step(0.0)
    assert opened is not None
    assert b.adopt(opened, 5.0)  # b's clock differs: the wait restarts at its now
    assert (b.state, b.generation, b.open_until) == (OPEN, 1, 35.0)
    assert not b.adopt(opened, 6.0)  # already applied
    half = a.step(30.0)
    assert half is not None and b.adopt(half, 36.0) and b.state == HALF_OPEN
    a.allow_trial()
    a.record(True, 31.0, trial=True)
    a.allow_trial()
    a.record(True, 31.0, trial=True)
    a.allow_trial()
    a.record(True, 31.0, trial=True)
    closed = a.step(31.0)
    assert closed is not None and b.adopt(closed, 37.0)
    assert (b.state, b.generation, b.wait) == (CLOSED, 3, 30.0)


def test_from_config() -> None:
    cb = CircuitBreaker.model_validate(
        {"threshold": 0.25, "min_requests": 7, "interval": "10s", "half_open_timeout": "5s"}
    )
    b = Breaker.from_config(cb)
    assert (b.threshold, b.min_requests, b.interval, b.half_open_timeout, b.max_wait) == (
        0.25, 7, 10.0, 5.0, 50.0)  # fmt: skip


@pytest.mark.parametrize("kw", [{"threshold": 0.0}, {"threshold": 1.5}, {"min_requests": 0},
                                {"interval": 0.0}, {"trials": 0}])  # fmt: skip
def test_bad_arguments_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Breaker(**kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ window math (properties)

EVENTS = st.lists(
    st.tuples(st.floats(0.0, 200.0), st.integers(0, 5), st.integers(0, 5)), max_size=60
)


@settings(max_examples=300, deadline=None)
@given(events=EVENTS, interval=st.sampled_from([1.0, 10.0, 60.0]),
       buckets=st.integers(1, 12), extra=st.floats(0.0, 100.0))  # fmt: skip
def test_window_counts_match_a_full_log(
    events: list[tuple[float, int, int]], interval: float, buckets: int, extra: float
) -> None:
    b = Breaker(0.5, 1, interval, 30.0, buckets=buckets)
    for t, ok, err in events:  # any order: remote adds arrive late
        b.add_counts(ok, err, t)
    now = max((t for t, _, _ in events), default=0.0) + extra
    w = interval / buckets
    k = now // w  # bucket i holds [i*w, (i+1)*w) by exact float floor division
    inside = [(ok, err) for t, ok, err in events if k - buckets < t // w <= k]
    assert b.counts(now) == (sum(o for o, _ in inside), sum(e for _, e in inside))
    # the guarantees in words: the last T - w seconds always count, nothing older than T does
    ok, err = b.counts(now)
    eps = 1e-9 * max(now, 1.0)  # bucket edges computed in floats
    recent = [(o, e) for t, o, e in events if now - (interval - w) + eps < t <= now]
    old = [(o, e) for t, o, e in events if t <= now - interval - eps]
    total = sum(o + e for _, o, e in events)
    assert sum(o + e for o, e in recent) <= ok + err <= total - sum(o + e for o, e in old)


@settings(max_examples=200, deadline=None)
@given(ok=st.integers(0, 300), err=st.integers(0, 300), threshold=st.floats(0.01, 1.0),
       min_requests=st.integers(1, 400))  # fmt: skip
def test_should_open_is_the_rate_rule(
    ok: int, err: int, threshold: float, min_requests: int
) -> None:
    b = Breaker(threshold, min_requests, 60.0, 30.0)
    b.add_counts(ok, err, 10.0)
    calls = ok + err
    assert b.should_open(10.0) == (calls >= min_requests and err >= threshold * calls)
