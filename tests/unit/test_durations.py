"""Tests for lbshared.durations: reading and writing ``500ms``/``10s``/``5m``/``1h``."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbshared.durations import DURATION_PATTERN, format_duration, parse_duration

PARSED = [
    ("500ms", 0.5),
    ("100ms", 0.1),
    ("1ms", 0.001),
    ("10s", 10.0),
    ("1.5s", 1.5),
    ("0.25s", 0.25),
    (".5s", 0.5),
    ("5m", 300.0),
    ("1.5m", 90.0),
    ("1h", 3600.0),
    ("1d", 86400.0),
    ("0s", 0.0),
    ("30", 30.0),
    ("2.5", 2.5),
    (" 2s ", 2.0),
    (10, 10.0),
    (0, 0.0),
    (1.5, 1.5),
]


@pytest.mark.parametrize(("text", "seconds"), PARSED)
def test_parse(text: object, seconds: float) -> None:
    got = parse_duration(text)
    assert got == seconds
    assert type(got) is float


BAD = [
    ("10 sec", "'10 sec'"),
    ("10 s", "'10 s'"),
    ("10S", "'10S'"),
    ("1w", "'1w'"),
    ("", "''"),
    ("s", "'s'"),
    ("-1s", "'-1s'"),
    ("1e3s", "'1e3s'"),
    ("1,5s", "'1,5s'"),
    ("ten seconds", "'ten seconds'"),
    (-1, "-1"),
    (-0.5, "-0.5"),
    (float("inf"), "inf"),
    (float("nan"), "nan"),
    (True, "true"),
    (None, "null"),
    ([1], "[1]"),
]


@pytest.mark.parametrize(("value", "shown"), BAD)
def test_parse_refuses_with_the_value_named(value: object, shown: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) == f"{shown} is not a duration (use 500ms, 10s, 5m, 1h)"


FORMATTED = [
    (0.5, "500ms"),
    (0.1, "100ms"),
    (0.001, "1ms"),
    (1.5, "1500ms"),
    (0.0, "0s"),
    (1.0, "1s"),
    (10.0, "10s"),
    (59.0, "59s"),
    (60.0, "1m"),
    (61.0, "61s"),
    (90.0, "90s"),
    (300.0, "5m"),
    (3540.0, "59m"),
    (3600.0, "1h"),
    (3660.0, "61m"),
    (5400.0, "90m"),
    (86400.0, "24h"),
    (0.0005, "0.0005s"),
    (1e-7, "0.0000001s"),
    (2, "2s"),
]


@pytest.mark.parametrize(("seconds", "text"), FORMATTED)
def test_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [-1.0, math.inf, math.nan])
def test_format_refuses_what_is_not_a_duration(seconds: float) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        format_duration(seconds)


@given(st.integers(min_value=0, max_value=10**15))
def test_whole_milliseconds_round_trip(millis: int) -> None:
    seconds = millis / 1000
    text = format_duration(seconds)
    assert parse_duration(text) == seconds
    assert re.match(r"^[0-9]+(ms|s|m|h)$", text), text


@given(st.floats(min_value=0, allow_nan=False, allow_infinity=False))
def test_any_float_round_trips(seconds: float) -> None:
    text = format_duration(seconds)
    assert re.match(DURATION_PATTERN, text), text
    assert parse_duration(text) == seconds


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["ms", "s", "m", "h"]))
def test_formatting_a_parsed_whole_unit_gives_the_same_time(number: int, unit: str) -> None:
    seconds = parse_duration(f"{number}{unit}")
    assert parse_duration(format_duration(seconds)) == seconds
    assert len(format_duration(seconds)) <= len(f"{number}{unit}")
