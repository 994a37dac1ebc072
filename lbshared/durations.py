"""Durations as operators write them: ``500ms``, ``10s``, ``1.5s``, ``5m``, ``1h``, ``1d``.

A bare number (YAML int or float, or a numeric string) means seconds. The
value is always held as ``float`` seconds. Parsing goes through ``Decimal`` so
that ``"100ms"`` is the float nearest to 0.1, exactly as ``0.1`` is, and
``format_duration`` is its exact inverse: ``parse_duration(format_duration(x))
== x`` for every finite ``x >= 0``.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, localcontext

__all__ = ["DURATION_PATTERN", "DURATION_HINT", "parse_duration", "format_duration"]

#: Milliseconds per unit suffix; no suffix means seconds.
UNITS: dict[str, int] = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}

#: The accepted string form (also published in the JSON schema).
DURATION_PATTERN = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)(ms|s|m|h|d)?$"
_DURATION_RE = re.compile(DURATION_PATTERN)

#: Appended to every "not a duration" message.
DURATION_HINT = "(use 500ms, 10s, 5m, 1h)"


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value)


def _from_millis(number: Decimal, millis_per_unit: int) -> float:
    # Wide precision so the only rounding is the final one to float.
    with localcontext() as ctx:
        ctx.prec = 400
        return float(number * millis_per_unit / 1000)


def parse_duration(value: object) -> float:
    """Return ``value`` as float seconds, or raise ``ValueError`` naming it.

    Accepts ints and floats (seconds) and strings such as ``"500ms"``,
    ``"10s"``, ``"1.5s"``, ``"5m"``, ``"1h"``, ``"1d"`` or ``"30"``.
    Negative, infinite and NaN values are refused.
    """
    if isinstance(value, bool):
        raise ValueError(f"{_show(value)} is not a duration {DURATION_HINT}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{_show(value)} is not a duration {DURATION_HINT}")
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if match is not None:
            seconds = _from_millis(Decimal(match.group(1)), UNITS[match.group(3) or "s"])
            if math.isfinite(seconds):
                return seconds
    raise ValueError(f"{_show(value)} is not a duration {DURATION_HINT}")


def format_duration(seconds: float) -> str:
    """The shortest exact string for ``seconds`` that ``parse_duration`` reads back.

    Whole milliseconds that are not whole seconds give ``"500ms"``; whole
    seconds give ``"10s"`` below a minute or when not whole minutes, then
    ``"5m"``, then ``"1h"``. Anything finer than a millisecond is written
    in plain decimal seconds (``"0.0005s"``).
    """
    if isinstance(seconds, bool) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{seconds!r} is not a duration")
    exact = Decimal(repr(float(seconds)))  # the shortest decimal that reads back as `seconds`
    with localcontext() as ctx:
        ctx.prec = 400
        scaled = exact * 1000
    if scaled == scaled.to_integral_value():
        millis = int(scaled)
        if millis % 1000:
            return f"{millis}ms"
        whole = millis // 1000
        if whole < 60 or whole % 60:
            return f"{whole}s"
        minutes = whole // 60
        if minutes < 60 or minutes % 60:
            return f"{minutes}m"
        return f"{minutes // 60}h"
    return f"{format(exact, 'f')}s"
