"""Tests for lbshared.projections: the config fold's rules (table-driven) and its algebra
(hypothesis): order, replays and independent folders all give the same state."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbshared.config import Config, LoadBalancer
from lbshared.events import LbConfig, LbDeleted, Pin
from lbshared.projections import (
    EMPTY,
    ConfigProjection,
    ConfigState,
    changed_names,
    fold_all,
    fold_config,
)

NAMES = ("a", "b", "c")
# A few distinct configs per name, built once (validation is the slow part).
VARIANTS = {
    name: [
        LoadBalancer.model_validate({
            "name": name,
            "listeners": [{"port": 8000 + 10 * i + k}],
            "targets": [{"id": f"t{j}", "address": f"127.0.0.1:{9000 + j}"} for j in range(k + 1)],
        })
        for k in range(3)
    ]
    for i, name in enumerate(NAMES)
}  # fmt: skip


def cfg(name: str, version: int, variant: int = 0) -> LbConfig:
    return LbConfig(lb=name, origin="t", at=0.0, version=version, config=VARIANTS[name][variant])


def dele(name: str, version: int) -> LbDeleted:
    return LbDeleted(lb=name, origin="t", at=0.0, version=version)


# -- the rules, one by one ---------------------------------------------------------------------

CASES: list[tuple[str, list[Any], dict[str, tuple[int, int]], dict[str, int], int]] = [
    # (case, events, expected lbs as name -> (version, variant), expected tombstones, version)
    ("nothing", [], {}, {}, 0),
    ("create", [cfg("a", 1)], {"a": (1, 0)}, {}, 1),
    ("newer replaces", [cfg("a", 1), cfg("a", 2, 1)], {"a": (2, 1)}, {}, 2),
    ("older ignored", [cfg("a", 2, 1), cfg("a", 1)], {"a": (2, 1)}, {}, 2),
    ("same version ignored", [cfg("a", 2, 1), cfg("a", 2, 2)], {"a": (2, 1)}, {}, 2),
    ("delete", [cfg("a", 1), dele("a", 2)], {}, {"a": 2}, 2),
    ("old delete ignored", [cfg("a", 3), dele("a", 2)], {"a": (3, 0)}, {}, 3),
    ("no resurrection", [dele("a", 5), cfg("a", 4)], {}, {"a": 5}, 5),
    ("recreate after delete", [cfg("a", 1), dele("a", 2), cfg("a", 3, 2)], {"a": (3, 2)}, {}, 3),
    ("delete of unknown name", [dele("b", 4)], {}, {"b": 4}, 4),
    ("others untouched", [cfg("a", 1), cfg("b", 2), dele("a", 3)], {"b": (2, 0)}, {"a": 3}, 3),
    ("non-config events ignored",
     [cfg("a", 1), Pin(lb="a", origin="n", at=0, rule="", session="s", target="t0", ttl=1)],
     {"a": (1, 0)}, {}, 1),
]  # fmt: skip


@pytest.mark.parametrize(
    ("events", "lbs", "deleted", "version"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_fold_rules(events: list[Any], lbs: dict[str, tuple[int, int]], deleted: dict[str, int],
                    version: int) -> None:  # fmt: skip
    state = fold_all(events)
    assert dict(state.lbs) == {n: (v, VARIANTS[n][k]) for n, (v, k) in lbs.items()}
    assert dict(state.deleted) == deleted
    assert state.version == version


def test_ignored_event_returns_the_same_state_object() -> None:
    state = fold_all([cfg("a", 5)])
    assert fold_config(state, cfg("a", 4)) is state
    assert fold_config(state, dele("a", 5)) is state
    assert fold_config(state, "not an event") is state


def test_state_accessors() -> None:
    state = fold_all([cfg("b", 1), cfg("a", 2, 1), dele("c", 3)])
    assert list(state) == ["a", "b"] and len(state) == 2
    assert "a" in state and "c" not in state
    assert state.get("a") is VARIANTS["a"][1] and state.get("c") is None
    assert (state.held_version("a"), state.held_version("c"), state.held_version("z")) == (2, 3, 0)
    config = state.to_config()
    assert isinstance(config, Config)
    assert [lb.name for lb in config.load_balancers] == ["a", "b"]


def test_to_config_keeps_load_balancers_whose_ports_clash() -> None:
    a = LoadBalancer.model_validate({"name": "a", "listeners": [{"port": 80}]})
    b = LoadBalancer.model_validate({"name": "b", "listeners": [{"port": 80}]})
    state = fold_all([LbConfig(lb="a", origin="t", at=0, version=1, config=a),
                      LbConfig(lb="b", origin="t", at=0, version=2, config=b)])  # fmt: skip
    assert [lb.name for lb in state.to_config().load_balancers] == ["a", "b"]


def test_changed_names() -> None:
    old = fold_all([cfg("a", 1), cfg("b", 2)])
    new = fold_all([cfg("c", 5)], fold_all([dele("b", 4)], fold_all([cfg("a", 3, 1)], old)))
    assert changed_names(old, new) == ({"a", "c"}, {"b"})
    assert changed_names(new, new) == (set(), set())


def test_state_is_immutable() -> None:
    state = fold_all([cfg("a", 1)])
    with pytest.raises(AttributeError):
        state.version = 3  # type: ignore[misc]
    fold_config(state, cfg("a", 2))
    assert state.lbs["a"][0] == 1  # folding made a new state, the old one is as it was


# -- the algebra (hypothesis) ------------------------------------------------------------------


@st.composite
def event_logs(draw: st.DrawFn, max_size: int = 25) -> list[Any]:
    """Config events with globally unique versions, as INCR lb:seq hands them out."""
    shapes = draw(st.lists(st.tuples(st.sampled_from(NAMES), st.booleans(), st.integers(0, 2)),
                           max_size=max_size))  # fmt: skip
    versions = draw(st.lists(st.integers(1, 10_000), min_size=len(shapes), max_size=len(shapes),
                             unique=True))  # fmt: skip
    return [dele(name, v) if is_delete else cfg(name, v, k)
            for (name, is_delete, k), v in zip(shapes, versions, strict=True)]  # fmt: skip


def model(events: list[Any]) -> ConfigState:
    """What the fold must equal: per name, the event with the highest version."""
    best: dict[str, Any] = {}
    for event in events:
        if event.lb not in best or event.version > best[event.lb].version:
            best[event.lb] = event
    lbs = {n: (e.version, e.config) for n, e in best.items() if isinstance(e, LbConfig)}
    deleted = {n: e.version for n, e in best.items() if isinstance(e, LbDeleted)}
    return ConfigState(lbs, deleted, max((e.version for e in events), default=0))


@given(event_logs())
def test_fold_equals_highest_version_per_name(events: list[Any]) -> None:
    assert fold_all(events) == model(events)


@given(event_logs())
def test_independent_folders_agree(events: list[Any]) -> None:
    one = fold_all(events)
    other = ConfigProjection.initial
    for event in events:
        other = ConfigProjection.fold(other, event)
    assert one == other


@given(event_logs(), st.data())
def test_replays_of_any_prefix_change_nothing(events: list[Any], data: st.DataObject) -> None:
    k = data.draw(st.integers(0, len(events)))
    j = data.draw(st.integers(0, k))
    state = fold_all(events)
    assert fold_all(events[:k] + events) == state  # a reader that restarted from the beginning
    assert fold_all(events[j:], fold_all(events[:k])) == state  # resumed from an older id
    assert fold_all(events, state) == state  # everything again


@given(event_logs(), st.randoms(use_true_random=False))
def test_order_across_load_balancers_does_not_matter(events: list[Any], rnd: Any) -> None:
    # Interleave the per-name subsequences at random, each keeping its own order.
    queues = {name: [e for e in events if e.lb == name] for name in NAMES}
    mixed: list[Any] = []
    while any(queues.values()):
        name = rnd.choice([n for n, q in queues.items() if q])
        mixed.append(queues[name].pop(0))
    assert fold_all(mixed) == fold_all(events)


@given(event_logs(), st.randoms(use_true_random=False))
def test_any_order_gives_the_same_state(events: list[Any], rnd: Any) -> None:
    shuffled = list(events)
    rnd.shuffle(shuffled)
    assert fold_all(shuffled) == fold_all(events)


def test_empty_state() -> None:
    assert EMPTY == ConfigState()
    assert EMPTY.version == 0 and len(EMPTY) == 0
    assert EMPTY.to_config().load_balancers == []
