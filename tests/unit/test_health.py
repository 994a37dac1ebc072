from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbnode.policy.health import (
    FALL,
    HEALTHY,
    HYSTERESIS_TRANSITIONS,
    RISE,
    UNHEALTHY,
    ClusterHealth,
    ClusterTransition,
    HealthStateError,
    Hysteresis,
    SlowStart,
    Transition,
)
from lbshared.config import HealthCheck

# ------------------------------------------------------------------ Hysteresis: the table

ALL_CASES = [(s, e) for s in (HEALTHY, UNHEALTHY) for e in (RISE, FALL)]


@pytest.mark.parametrize(("state", "event"), ALL_CASES)
def test_every_state_event_pair_follows_the_table(state: str, event: str) -> None:
    h = Hysteresis(2, 3, state=state, since=5.0)
    h.observe(False, "connect refused", 6.0)  # some counter state that must survive
    before = (h.state, h.since, h.successes, h.failures, h.last_reason)
    expected = HYSTERESIS_TRANSITIONS[state].get(event)
    if expected is None:
        with pytest.raises(HealthStateError):
            h.fire(event, "why", 10.0)
        assert (h.state, h.since, h.successes, h.failures, h.last_reason) == before
    else:
        tr = h.fire(event, "why", 10.0)
        assert tr == Transition(state, expected, "why", 10.0)
        assert (h.state, h.since) == (expected, 10.0)


def test_the_table_is_exactly_rise_and_fall() -> None:
    assert HYSTERESIS_TRANSITIONS == {HEALTHY: {FALL: UNHEALTHY}, UNHEALTHY: {RISE: HEALTHY}}


# ------------------------------------------------------------------ Hysteresis: observations

# (healthy_threshold, unhealthy_threshold, initial, outcomes, index -> new state)
SEQUENCES = [
    (2, 3, HEALTHY, "FFF", {2: UNHEALTHY}),
    (2, 3, HEALTHY, "FFSFF", {}),  # a success in between resets the failures
    (2, 3, HEALTHY, "FFSFFF", {5: UNHEALTHY}),
    (2, 3, HEALTHY, "FFFFFF", {2: UNHEALTHY}),  # only one transition
    (2, 3, HEALTHY, "FFFSS", {2: UNHEALTHY, 4: HEALTHY}),
    (2, 3, HEALTHY, "FFFSFSS", {2: UNHEALTHY, 6: HEALTHY}),
    (1, 1, HEALTHY, "FSFS", {0: UNHEALTHY, 1: HEALTHY, 2: UNHEALTHY, 3: HEALTHY}),
    (2, 3, UNHEALTHY, "SS", {1: HEALTHY}),
    (2, 3, UNHEALTHY, "SFS", {}),
    (3, 2, UNHEALTHY, "SSSFF", {2: HEALTHY, 4: UNHEALTHY}),
    (2, 3, HEALTHY, "SSSS", {}),
    (2, 3, UNHEALTHY, "FFFF", {}),
]


@pytest.mark.parametrize(("rise", "fall", "initial", "outcomes", "changes"), SEQUENCES)
def test_consecutive_counts_and_thresholds(
    rise: int, fall: int, initial: str, outcomes: str, changes: dict[int, str]
) -> None:
    h = Hysteresis(rise, fall, state=initial, since=0.0)
    got = {}
    state = initial
    for i, c in enumerate(outcomes):
        tr = h.observe(c == "S", "" if c == "S" else f"fail {i}", float(i + 1))
        if tr is not None:
            assert (tr.previous, tr.at) == (state, float(i + 1))
            state = tr.state
            got[i] = tr.state
            assert h.since == float(i + 1)
    assert got == changes
    assert h.state == state


def test_unhealthy_transition_carries_the_last_failure_reason() -> None:
    h = Hysteresis(2, 2)
    assert h.observe(False, "connect refused", 1.0) is None
    tr = h.observe(False, "timeout after 2s", 2.0)
    assert tr == Transition(HEALTHY, UNHEALTHY, "timeout after 2s", 2.0)
    assert h.last_reason == "timeout after 2s"
    assert (h.successes, h.failures) == (0, 2)
    h.observe(True, "", 3.0)
    tr = h.observe(True, "", 4.0)
    assert tr == Transition(UNHEALTHY, HEALTHY, "2 successful probes in a row", 4.0)
    assert h.last_reason == ""


def test_from_config_uses_thresholds_and_initial_state() -> None:
    hc = HealthCheck(healthy_threshold=4, unhealthy_threshold=1, initial_state="unhealthy")
    h = Hysteresis.from_config(hc, 7.0)
    assert (h.healthy_threshold, h.unhealthy_threshold, h.state, h.since) == (4, 1, UNHEALTHY, 7.0)
    assert Hysteresis.from_config(hc, 7.0, state=HEALTHY).state == HEALTHY


@pytest.mark.parametrize("kw", [{"healthy_threshold": 0}, {"unhealthy_threshold": 0},
                                {"state": "sick"}])  # fmt: skip
def test_bad_arguments_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Hysteresis(**kw)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    rise=st.integers(1, 4),
    fall=st.integers(1, 4),
    initial=st.sampled_from([HEALTHY, UNHEALTHY]),
    outcomes=st.lists(st.booleans(), max_size=40),
)
def test_hysteresis_matches_a_reference_model(
    rise: int, fall: int, initial: str, outcomes: list[bool]
) -> None:
    h = Hysteresis(rise, fall, state=initial)
    state, run_ok, run = initial, None, 0
    for i, ok in enumerate(outcomes):
        run = run + 1 if run_ok is ok else 1
        run_ok = ok
        expect = state
        if ok and state == UNHEALTHY and run >= rise:
            expect = HEALTHY
        elif not ok and state == HEALTHY and run >= fall:
            expect = UNHEALTHY
        tr = h.observe(ok, "bad", float(i))
        assert (tr is not None) == (expect != state)
        state = expect
        assert h.state == state


# ------------------------------------------------------------------ ClusterHealth


def cluster(probers: list[str], *, initial: str = HEALTHY) -> ClusterHealth:
    ch = ClusterHealth(initial)
    ch.add_target("t", 0.0, probers=probers)
    return ch


def test_initial_state_until_verdicts_exist() -> None:
    assert cluster(["a", "b"]).state("t") == HEALTHY
    down = cluster(["a", "b"], initial=UNHEALTHY)
    assert down.state("t") == UNHEALTHY and not down.is_healthy("t")
    ch = ClusterHealth()
    ch.add_target("t", 0.0, initial_state=UNHEALTHY)
    assert ch.view("t").state == UNHEALTHY
    ch.add_target("t", 1.0, initial_state=HEALTHY)  # idempotent
    assert ch.view("t").state == UNHEALTHY


def test_two_probers_need_both_to_take_a_target_down() -> None:
    ch = cluster(["a", "b"])
    assert ch.record_verdict("t", "a", UNHEALTHY, "connect refused", 1.0) is None
    assert ch.state("t") == HEALTHY  # 1 of 2 is a tie: healthy
    tr = ch.record_verdict("t", "b", UNHEALTHY, "timeout after 2s", 2.0)
    assert tr == ClusterTransition(
        "t", HEALTHY, UNHEALTHY, "timeout after 2s (2 of 2 probers)", 2.0
    )
    assert ch.view("t").since == 2.0
    # the same verdict again changes nothing
    assert ch.record_verdict("t", "b", UNHEALTHY, "timeout after 2s", 3.0) is None
    # one healthy verdict makes it a tie again: healthy
    tr = ch.record_verdict("t", "a", HEALTHY, "2 successful probes in a row", 4.0)
    assert tr == ClusterTransition("t", UNHEALTHY, HEALTHY, "1 of 2 probers report healthy", 4.0)
    view = ch.view("t")
    assert (view.state, view.since, view.healthy_since) == (HEALTHY, 4.0, 4.0)
    assert view.verdicts == {"a": HEALTHY, "b": UNHEALTHY}


@pytest.mark.parametrize(
    ("n", "down_votes", "expected"),
    [(1, 1, UNHEALTHY), (1, 0, HEALTHY), (2, 1, HEALTHY), (2, 2, UNHEALTHY),
     (3, 1, HEALTHY), (3, 2, UNHEALTHY), (4, 2, HEALTHY), (4, 3, UNHEALTHY),
     (5, 2, HEALTHY), (5, 3, UNHEALTHY)],
)  # fmt: skip
def test_strict_majority_of_explicit_verdicts(n: int, down_votes: int, expected: str) -> None:
    probers = [f"n{i}" for i in range(n)]
    ch = cluster(probers)
    for i, p in enumerate(probers):
        ch.record_verdict("t", p, UNHEALTHY if i < down_votes else HEALTHY, "x", 1.0)
    assert ch.state("t") == expected


def test_verdicts_of_non_probers_are_kept_but_not_counted() -> None:
    ch = cluster(["a", "b"])
    assert ch.record_verdict("t", "c", UNHEALTHY, "connect refused", 1.0) is None
    assert ch.record_verdict("t", "a", UNHEALTHY, "connect refused", 2.0) is None
    assert ch.state("t") == HEALTHY
    assert ch.view("t").verdicts == {"a": UNHEALTHY}
    # c becomes a prober instead of b: two unhealthy votes out of two
    tr = ch.set_probers("t", ["a", "c"], 3.0)
    assert tr is not None and tr.state == UNHEALTHY and tr.at == 3.0
    assert tr.reason == "connect refused (2 of 2 probers)"


def test_a_new_prober_without_a_verdict_votes_for_the_current_view() -> None:
    ch = cluster(["a", "b"])
    ch.record_verdict("t", "a", UNHEALTHY, "r", 1.0)
    ch.record_verdict("t", "b", UNHEALTHY, "r", 1.0)
    # b leaves, c joins without a verdict: no news is no change
    assert ch.set_probers("t", ["a", "c"], 2.0) is None
    assert ch.state("t") == UNHEALTHY
    assert ch.seed_state("t", "c") == UNHEALTHY  # c's hysteresis starts where the view is
    assert ch.seed_state("t", "b") == UNHEALTHY  # b's own last verdict
    tr = ch.record_verdict("t", "c", HEALTHY, "ok", 3.0)
    assert tr is not None and tr.state == HEALTHY


def test_seed_state_prefers_the_nodes_own_verdict() -> None:
    ch = cluster(["a", "b"])
    ch.record_verdict("t", "a", UNHEALTHY, "r", 1.0)
    assert ch.state("t") == HEALTHY
    assert ch.seed_state("t", "a") == UNHEALTHY
    assert ch.seed_state("t", "z") == HEALTHY


def test_losing_a_down_voter_can_bring_a_target_back() -> None:
    ch = cluster(["a", "b", "c"])
    ch.record_verdict("t", "a", UNHEALTHY, "r", 1.0)
    assert ch.record_verdict("t", "b", UNHEALTHY, "r", 1.0) is not None
    ch.record_verdict("t", "c", HEALTHY, "ok", 1.0)
    tr = ch.set_probers("t", ["a", "c", "d"], 5.0)  # b gone; d abstains (votes unhealthy)
    assert tr is None
    tr = ch.set_probers("t", ["c", "d"], 6.0)  # 0 explicit down, d abstains: 1 of 2
    assert tr == ClusterTransition("t", UNHEALTHY, HEALTHY, "1 of 2 probers report healthy", 6.0)


def test_no_probers_keeps_the_view() -> None:
    ch = cluster(["a"])
    ch.record_verdict("t", "a", UNHEALTHY, "r", 1.0)
    assert ch.state("t") == UNHEALTHY
    assert ch.set_probers("t", [], 2.0) is None
    assert ch.state("t") == UNHEALTHY


def test_forget_node_drops_its_verdicts_everywhere() -> None:
    ch = ClusterHealth()
    for t in ("t1", "t2"):
        ch.add_target(t, 0.0, probers=["a"])
        ch.record_verdict(t, "a", UNHEALTHY, "r", 1.0)
    assert [ch.state(t) for t in ("t1", "t2")] == [UNHEALTHY, UNHEALTHY]
    ch.set_probers("t1", ["a", "b"], 2.0)
    out = ch.forget_node("a", 3.0)
    # t1: b alone abstains -> the view stays; t2: no probers left -> the view stays
    assert out == []
    assert ch.seed_state("t1", "a") == UNHEALTHY  # now from the view, the verdict is gone
    assert ch.view("t1").probers == ("b",)
    ch.record_verdict("t1", "b", HEALTHY, "ok", 4.0)
    assert ch.state("t1") == HEALTHY


def test_overrides_win_and_auto_hands_back_to_the_vote() -> None:
    ch = cluster(["a"])
    tr = ch.set_override("t", "down", 1.0)
    assert tr == ClusterTransition("t", HEALTHY, UNHEALTHY, "override down", 1.0)
    assert ch.view("t").override == "down"
    # probes go on underneath; the effective state does not move
    assert ch.record_verdict("t", "a", UNHEALTHY, "connect refused", 2.0) is None
    assert ch.view("t").voted == UNHEALTHY
    tr = ch.set_override("t", "up", 3.0)
    assert tr == ClusterTransition("t", UNHEALTHY, HEALTHY, "override up", 3.0)
    assert ch.record_verdict("t", "a", HEALTHY, "ok", 4.0) is None
    assert ch.record_verdict("t", "a", UNHEALTHY, "status 503, expected 200-399", 5.0) is None
    tr = ch.set_override("t", "auto", 6.0)
    assert tr == ClusterTransition(
        "t", HEALTHY, UNHEALTHY, "status 503, expected 200-399 (1 of 1 probers)", 6.0
    )
    assert ch.set_override("t", "down", 7.0) is None  # already unhealthy
    with pytest.raises(ValueError):
        ch.set_override("t", "maybe", 8.0)
    assert ch.view("t").override == "down"


def test_adopt_takes_a_committed_outcome() -> None:
    ch = cluster(["a", "b"])
    tr = ch.adopt("t", UNHEALTHY, "status 503, expected 200 (2 of 2 probers)", 1.0)
    assert tr is not None and tr.state == UNHEALTHY
    assert ch.adopt("t", UNHEALTHY, "again", 2.0) is None
    assert ch.view("t").since == 1.0


def test_remove_target_and_late_verdicts() -> None:
    ch = cluster(["a"])
    ch.remove_target("t")
    assert ch.targets() == []
    assert ch.record_verdict("t", "a", UNHEALTHY, "r", 1.0) is None
    with pytest.raises(ValueError):
        ch.record_verdict("t", "a", "sick", "r", 1.0)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("verdict"), st.sampled_from("abcde"),
                  st.sampled_from([HEALTHY, UNHEALTHY])),
        st.tuples(st.just("probers"), st.lists(st.sampled_from("abcde"), max_size=4)),
        st.tuples(st.just("override"), st.sampled_from(["up", "down", "auto"])),
    ),
    max_size=40,
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(initial=st.sampled_from([HEALTHY, UNHEALTHY]), ops=OPS)
def test_the_fold_emits_exactly_one_transition_per_change(
    initial: str, ops: list[tuple[Any, ...]]
) -> None:
    a, b = ClusterHealth(initial), ClusterHealth(initial)
    for ch in (a, b):
        ch.add_target("t", 0.0, probers=["a", "b"])
    for i, op in enumerate(ops):
        now = float(i + 1)
        outs = []
        for ch in (a, b):
            before = ch.state("t")
            if op[0] == "verdict":
                tr = ch.record_verdict("t", op[1], op[2], "why", now)
            elif op[0] == "probers":
                tr = ch.set_probers("t", op[1], now)
            else:
                tr = ch.set_override("t", op[1], now)
            after = ch.state("t")
            assert (tr is not None) == (before != after)
            if tr is not None:
                assert (tr.previous, tr.state, tr.at) == (before, after, now)
            outs.append(tr)
        assert outs[0] == outs[1]  # the same inputs fold to the same events
        view = a.view("t")
        if view.override != "auto":
            assert view.state == {"up": HEALTHY, "down": UNHEALTHY}[view.override]
        else:
            assert view.state == view.voted
        # the rule: explicit down votes over half -> unhealthy; explicit up votes >= half -> healthy
        n = len(view.probers)
        down = sum(v == UNHEALTHY for v in view.verdicts.values())
        up = sum(v == HEALTHY for v in view.verdicts.values())
        if n and 2 * down > n:
            assert view.voted == UNHEALTHY
        if n and 2 * up >= n:
            assert view.voted == HEALTHY


# ------------------------------------------------------------------ SlowStart

RAMP = [
    (None, 100.0, 50.0, 1.0),  # off
    (60.0, 100.0, None, 1.0),  # never down: full weight
    (60.0, 100.0, 100.0, 0.1),  # just turned healthy: the minimum
    (60.0, 103.0, 100.0, 0.1),  # 5 % of the ramp: still the minimum
    (60.0, 130.0, 100.0, 0.5),
    (60.0, 145.0, 100.0, 0.75),
    (60.0, 160.0, 100.0, 1.0),
    (60.0, 1e6, 100.0, 1.0),
    (60.0, 90.0, 100.0, 0.1),  # clock before the change
]


@pytest.mark.parametrize(("duration", "now", "since", "factor"), RAMP)
def test_slow_start_ramps_linearly_from_ten_percent(
    duration: float | None, now: float, since: float | None, factor: float
) -> None:
    ss = SlowStart(duration)
    assert ss.weight_factor(now, since) == pytest.approx(factor)
    assert ss.ramping(now, since) == (factor < 1.0)


@settings(max_examples=100, deadline=None)
@given(st.floats(0.1, 1e4), st.floats(-1e4, 1e5), st.floats(-1e4, 1e4))
def test_slow_start_factor_is_in_range_and_monotonic(d: float, t: float, since: float) -> None:
    ss = SlowStart(d)
    f = ss.weight_factor(t, since)
    assert 0.1 <= f <= 1.0
    assert ss.weight_factor(t + 1.0, since) >= f


def test_slow_start_refuses_a_bad_minimum() -> None:
    with pytest.raises(ValueError):
        SlowStart(10.0, min_factor=0.0)
