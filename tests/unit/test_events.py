"""Tests for lbshared.events: the envelope, every event type's round trip, malformed entries
(each refused with its reason), the skip counter, snapshots and heartbeats."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbshared.config import LoadBalancer
from lbshared.events import (
    EVENT_TYPES,
    BadEvent,
    Envelope,
    Heartbeat,
    LbConfig,
    LbDeleted,
    Pin,
    RateDelta,
    RegistryNotice,
    SkipCounter,
    Snapshot,
    Unpin,
    config_event,
    decode,
    decode_notice,
    encode,
    validate_event,
)

LB = LoadBalancer.model_validate({
    "name": "api-lb",
    "listeners": [{"protocol": "http", "port": 8080}],
    "targets": [{"id": "api-1", "address": "127.0.0.1:9001", "weight": 50}],
    "rate_limit": {"limit": 10, "interval": "1s"},
    "rules": {"v2": {"path": "/v2/*", "targets": ["api-1"]}},
})  # fmt: skip

EVENTS = [
    LbConfig(lb="api-lb", origin="lbctl", at=1700000000.25, version=7, config=LB),
    LbDeleted(lb="api-lb", origin="lbctl", at=1700000001.0, version=8),
    RateDelta(lb="api-lb", origin="node-a", at=1.5, node="node-a",
              deltas=(("", "10.0.0.1", 3, 1700000000.0), ("v2", "k", 1, 1700000000.5))),
    Pin(lb="api-lb", origin="node-b", at=2.0, rule="v2", session="abc", target="api-1", ttl=3600),
    Unpin(lb="api-lb", origin="node-b", at=0.1 + 0.2, rule="", session="abc"),
    *(validate_event(e) for e in (  # the health issue's types
        {"type": "probe_verdict", "lb": "api-lb", "origin": "node-a", "at": 3.0,
         "target": "api-1", "prober": "node-a", "state": "unhealthy", "reason": "connect refused"},
        {"type": "outcome_delta", "lb": "api-lb", "origin": "node-a", "at": 3.5, "node": "node-a",
         "deltas": [["api-1", 7, 2, 1700000000.1]]},
        {"type": "health_override", "lb": "api-lb", "origin": "lbctl", "at": 4.0,
         "target": "api-1", "mode": "down"},
        {"type": "healthy", "lb": "api-lb", "origin": "node-a", "at": 5.0, "target": "api-1",
         "reason": "2 of 2 probers report healthy", "generation": 2, "node": "node-a"},
        {"type": "unhealthy", "lb": "api-lb", "origin": "node-b", "at": 5.5, "target": "api-1",
         "reason": "override down", "generation": 1, "node": "node-b"},
        {"type": "circuit_open", "lb": "api-lb", "origin": "node-a", "at": 6.0, "target": "api-1",
         "reason": "error rate 60%", "generation": 1, "node": "node-a", "transition": "trip",
         "wait": 30.0},
        {"type": "circuit_half_open", "lb": "api-lb", "origin": "node-c", "at": 7.0,
         "target": "api-1", "generation": 2, "node": "node-c", "transition": "probe"},
        {"type": "circuit_closed", "lb": "api-lb", "origin": "node-c", "at": 8.0,
         "target": "api-1", "generation": 3, "node": "node-c", "transition": "close"},
    )),
]  # fmt: skip


def _bytes(fields: dict[str, str]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in fields.items()}


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_round_trip_str_and_bytes(event: Any) -> None:
    fields = encode(event)
    assert all(isinstance(v, str) for v in fields.values())
    assert list(fields) == ["v", "type", "lb", "origin", "at", "data"]
    assert decode(fields) == event
    assert decode(_bytes(fields)) == event


def test_every_known_type_has_a_round_trip_case() -> None:
    assert {e.type for e in EVENTS} == set(EVENT_TYPES)


def test_encoded_fields_exactly() -> None:
    assert encode(EVENTS[1]) == {
        "v": "1", "type": "lb_deleted", "lb": "api-lb", "origin": "lbctl",
        "at": "1700000001.0", "data": '{"version":8}',
    }  # fmt: skip
    pin = encode(EVENTS[3])
    assert json.loads(pin["data"]) == {"rule": "v2", "session": "abc", "target": "api-1",
                                       "ttl": 3600.0}  # fmt: skip


def test_lb_config_carries_the_file_form() -> None:
    data = json.loads(encode(EVENTS[0])["data"])
    assert data["version"] == 7
    assert data["config"]["name"] == "api-lb"
    assert data["config"]["rate_limit"] == {"limit": 10, "interval": "1s"}
    assert "timeouts" not in data["config"]  # defaults omitted, as lb_to_dict writes


def test_at_round_trips_exactly() -> None:
    event = EVENTS[4]
    assert decode(encode(event)).at == 0.1 + 0.2


def test_unknown_extra_envelope_fields_are_tolerated() -> None:
    fields = {**encode(EVENTS[1]), "trace": "x"}
    assert decode(fields) == EVENTS[1]


def _with(**changes: Any) -> dict[str, str]:
    fields = dict(encode(EVENTS[1]))
    for key, value in changes.items():
        if value is None:
            del fields[key]
        else:
            fields[key] = value
    return fields


MALFORMED = [
    ("no v", _with(v=None), "missing field"),
    ("no data", _with(data=None), "missing field"),
    ("v 2", _with(v="2"), "unknown version"),
    ("unknown type", _with(type="node_rebooted"), "unknown type"),
    ("bad json", _with(data="{version: 8"), "bad JSON"),
    ("data a list", _with(data="[8]"), "invalid payload"),
    ("data repeats lb", _with(data='{"version": 8, "lb": "other"}'), "invalid payload"),
    ("version 0", _with(data='{"version": 0}'), "invalid payload"),
    ("no version", _with(data="{}"), "invalid payload"),
    ("extra payload key", _with(data='{"version": 8, "x": 1}'), "invalid payload"),
    ("at not a number", _with(at="noon"), "invalid payload"),
    ("at infinite", _with(at="inf"), "invalid payload"),
    ("empty lb", _with(lb=""), "invalid payload"),
    ("config names another lb", {**encode(EVENTS[0]), "lb": "other"}, "invalid payload"),
    (
        "invalid config",
        {
            **encode(EVENTS[0]),
            "data": '{"version": 7, "config": {"name": "api-lb",'
            ' "targets": [{"id": "t", "address": "nope"}]}}',
        },
        "invalid payload",
    ),
    (
        "rate delta short tuple",
        {**encode(EVENTS[2]), "data": '{"node": "n", "deltas": [["", "k"]]}'},
        "invalid payload",
    ),
]


@pytest.mark.parametrize(
    ("fields", "reason"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_entries_raise_bad_event(fields: dict[str, str], reason: str) -> None:
    with pytest.raises(BadEvent) as info:
        decode(fields)
    assert info.value.reason == reason


def test_non_utf8_field_is_bad_event() -> None:
    fields = _bytes(encode(EVENTS[1]))
    fields[b"origin"] = b"\xff\xfe"
    with pytest.raises(BadEvent) as info:
        decode(fields)
    assert info.value.reason == "invalid payload"


def test_bad_event_message() -> None:
    assert str(BadEvent("unknown type", "'x'")) == "unknown type: 'x'"
    assert str(BadEvent("bad JSON")) == "bad JSON"


def test_envelope_from_fields_and_back() -> None:
    fields = encode(EVENTS[1])
    env = Envelope.from_fields(_bytes(fields))
    assert env.type == "lb_deleted"
    assert env.to_fields() == fields


def test_validate_event_uses_the_type_discriminator() -> None:
    event = validate_event({"type": "unpin", "lb": "x", "origin": "n", "at": 1, "rule": "",
                            "session": "s"})  # fmt: skip
    assert isinstance(event, Unpin)


def test_config_event_helper() -> None:
    assert config_event("api-lb", 3, LB, "n", 1.0) == LbConfig(
        lb="api-lb", origin="n", at=1.0, version=3, config=LB
    )
    assert config_event("api-lb", 4, None, "n", 1.0) == LbDeleted(
        lb="api-lb", origin="n", at=1.0, version=4
    )


def test_events_are_frozen() -> None:
    with pytest.raises(ValueError):
        EVENTS[1].version = 9  # type: ignore[attr-defined]


_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)


@given(
    lb=_text.filter(bool), origin=_text.filter(bool), session=_text, rule=_text, target=_text,
    ttl=st.floats(min_value=0.001, max_value=1e9), at=st.floats(min_value=0, max_value=4e9),
    deltas=st.lists(st.tuples(_text, _text, st.integers(-(2**53), 2**53),
                              st.floats(min_value=0, max_value=4e9)), max_size=5),
)  # fmt: skip
def test_round_trip_property(lb: str, origin: str, session: str, rule: str, target: str,
                             ttl: float, at: float,
                             deltas: list[tuple[str, str, int, float]]) -> None:  # fmt: skip
    for event in (
        Pin(lb=lb, origin=origin, at=at, rule=rule, session=session, target=target, ttl=ttl),
        Unpin(lb=lb, origin=origin, at=at, rule=rule, session=session),
        RateDelta(lb=lb, origin=origin, at=at, node=origin, deltas=tuple(deltas)),
    ):
        assert decode(encode(event)) == event
        assert decode(_bytes(encode(event))) == event


# -- SkipCounter --------------------------------------------------------------------------------


def test_skip_counter_counts_by_reason_and_logs_sparingly(caplog: pytest.LogCaptureFixture) -> None:
    counter = SkipCounter(log_first=2, log_every=5)
    with caplog.at_level(logging.WARNING, logger="lbshared.events"):
        for i in range(10):
            reason = "unknown type" if i % 2 else "bad JSON"
            counter.skip("lb:{a}:state", f"{i}-0", BadEvent(reason, "x"))
    assert counter.total == 10
    assert counter.by_reason == {"bad JSON": 5, "unknown type": 5}
    logged = [r.getMessage() for r in caplog.records]
    # the first two, then the 5th and 10th
    assert len(logged) == 4
    assert "0-0 in lb:{a}:state (bad JSON: x; 1 skipped so far)" in logged[0]
    assert "10 skipped so far" in logged[3]


# -- snapshots and heartbeats -------------------------------------------------------------------


def test_snapshot_parse_and_event() -> None:
    raw = json.dumps({"stream_id": "5-0", "version": 7, "config": {"name": "api-lb"}})
    snap = Snapshot.from_json(raw)
    assert snap.version == 7 and snap.stream_id == "5-0"
    assert snap.config == LoadBalancer(name="api-lb")
    assert snap.to_event("api-lb") == LbConfig(
        lb="api-lb", origin="snapshot", at=0.0, version=7, config=LoadBalancer(name="api-lb")
    )
    deleted = Snapshot.from_json(b'{"stream_id":"6-0","version":8,"config":null}')
    assert deleted.config is None
    assert deleted.to_event("api-lb") == LbDeleted(lb="api-lb", origin="snapshot", at=0, version=8)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("{", "bad JSON"),
        ('{"version": 1}', "invalid payload"),
        ('{"version": 1, "stream_id": "1-0", "config": {"listeners": 3}}', "invalid payload"),
    ],
)
def test_bad_snapshot(raw: str, reason: str) -> None:
    with pytest.raises(BadEvent) as info:
        Snapshot.from_json(raw)
    assert info.value.reason == reason


def test_heartbeat() -> None:
    raw = json.dumps({"id": "n1", "address": "10.0.0.1", "admin": "127.0.0.1:9901",
                      "last_heartbeat": 100.0, "config_version": 4, "degraded": True,
                      "started_at": 50.0, "pid": 12, "version": "0.1.0", "future": 1})  # fmt: skip
    beat = Heartbeat.model_validate_json(raw)
    assert (beat.id, beat.config_version, beat.degraded) == ("n1", 4, True)
    assert beat.live(102.9) and not beat.live(103.0)
    assert Heartbeat.model_validate_json(beat.to_json()) == beat


# -- registry notices ---------------------------------------------------------------------------


def test_registry_notice() -> None:
    fields = {b"type": b"lb_deleted", b"lb": b"api-lb", b"version": b"12"}
    assert decode_notice(fields) == RegistryNotice(type="lb_deleted", lb="api-lb", version=12)
    assert decode_notice({"type": "lb_config", "lb": "x", "version": "1"}).type == "lb_config"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"type": "lb_config", "lb": "x"}, "missing field"),
        ({"type": "lb_moved", "lb": "x", "version": "1"}, "invalid payload"),
        ({"type": "lb_config", "lb": "x", "version": "one"}, "invalid payload"),
        ({b"type": b"lb_config", b"lb": b"\xff", b"version": b"1"}, "invalid payload"),
    ],
)
def test_bad_registry_notice(fields: dict[Any, Any], reason: str) -> None:
    with pytest.raises(BadEvent) as info:
        decode_notice(fields)
    assert info.value.reason == reason
