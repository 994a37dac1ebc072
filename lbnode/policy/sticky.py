"""Sticky sessions: which target a session is pinned to.

Theory of operation
-------------------
A rule (or the load balancer itself) with ``sticky_session: {cookie, ttl}``
pins each session to one target, the way HAProxy's
``stick store-response res.cook(session_id)`` / ``stick match
req.cook(session_id)`` pair does:

1. Request: ``StickyPolicy.session_of_request(req)`` reads the session cookie.
   If there is one, the data path looks ``policy.key(session)`` up in the pin
   store; a pin to a target that is still eligible (healthy, breaker closed,
   part of the rule's targets) wins over the balancing algorithm, and the
   data path calls ``store.refresh`` so an active session never expires
   (sliding TTL, like HAProxy's ``expire`` on a stick table).
2. Response: ``StickyPolicy.response_cookie(headers)`` looks for a
   ``Set-Cookie`` of the session cookie. ``SET`` with a new session id: the
   data path calls ``store.pin_if_absent(key, target_id, ttl, now)`` and uses
   the returned target (another node may have pinned it first: the first
   writer wins, everyone converges on its answer). ``CLEAR`` (``Max-Age`` of
   zero or less, an ``Expires`` in the past, or an empty value): the backend
   ended the session, so the data path unpins the *request's* session key.

The store key is ``f"{rule}:{session}"``; the Redis layout prefixes it with
``lb:{<lb>}:sticky:``. By convention the load-balancer-level block uses the
rule name ``""``.

``PinStore`` is the interface; ``MemoryPinStore`` is the in-process
implementation: a dict in least-recently-used order with a TTL per entry and
at most ``max_entries`` pins (the least recently used go first, and an
expired entry met at the cold end is dropped on every insert so idle pins do
not linger). The interface is synchronous; a Redis-backed store for the
cluster wraps a local ``MemoryPinStore`` as its cache and does the network
round trip outside the decision code.

Set-Cookie parsing follows RFC 6265 section 5.2: the first ``name=value``
pair is the cookie, attribute names are case-insensitive, ``Max-Age`` wins
over ``Expires``, an unparseable ``Max-Age`` is ignored, a value in double
quotes is unquoted, and when several ``Set-Cookie`` headers set the same name
the last one wins. ``Expires`` is wall-clock time, which this module never
reads: pass ``wall_now`` (seconds since the epoch) to compare against it;
without it only dates before 2000-01-01 (the customary
``Thu, 01 Jan 1970 00:00:00 GMT`` deletion idiom) count as expired.
"""

from __future__ import annotations

import calendar
import enum
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol

from .request import RequestView

if TYPE_CHECKING:
    from lbshared.config import StickySession

__all__ = [
    "CookieAction",
    "MemoryPinStore",
    "PinStore",
    "SessionChange",
    "StickyPolicy",
    "parse_set_cookie",
]

Headers = Sequence[tuple[bytes, bytes]]

# Without a wall clock, an Expires before this (2000-01-01T00:00:00Z) is a deletion.
_EXPIRED_BEFORE: Final = 946684800.0


class PinStore(Protocol):
    """Where session pins live. Times are monotonic seconds (``now``)."""

    def get(self, key: str, now: float) -> str | None:
        """The pinned target id, or None if absent or expired."""
        ...

    def pin_if_absent(self, key: str, target_id: str, ttl: float, now: float) -> str:
        """Pin ``key`` to ``target_id`` unless a live pin exists; return the winner."""
        ...

    def refresh(self, key: str, ttl: float, now: float) -> bool:
        """Extend a live pin to expire ``ttl`` after ``now``; False if none."""
        ...

    def unpin(self, key: str) -> bool:
        """Remove the pin; False if there was none."""
        ...


class MemoryPinStore:
    """In-process pin store: TTL per entry, LRU-bounded to ``max_entries``."""

    __slots__ = ("max_entries", "_pins")

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        # key -> (target_id, expires_at); order = least recently used first.
        self._pins: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pins)

    def _live(self, key: str, now: float) -> tuple[str, float] | None:
        entry = self._pins.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._pins[key]
            return None
        return entry

    def get(self, key: str, now: float) -> str | None:
        """The pinned target id, or None if absent or expired."""
        entry = self._live(key, now)
        if entry is None:
            return None
        self._pins.move_to_end(key)
        return entry[0]

    def pin_if_absent(self, key: str, target_id: str, ttl: float, now: float) -> str:
        """Pin ``key`` to ``target_id`` unless a live pin exists; return the winner."""
        entry = self._live(key, now)
        pins = self._pins
        if entry is not None:
            pins.move_to_end(key)
            return entry[0]
        pins[key] = (target_id, now + ttl)
        # Drop one expired pin at the cold end, then enforce the bound.
        if len(pins) > 1:
            oldest = next(iter(pins))
            if pins[oldest][1] <= now:
                del pins[oldest]
        while len(pins) > self.max_entries:
            pins.popitem(last=False)
        return target_id

    def refresh(self, key: str, ttl: float, now: float) -> bool:
        """Extend a live pin to expire ``ttl`` after ``now``; False if none."""
        entry = self._live(key, now)
        if entry is None:
            return False
        self._pins[key] = (entry[0], now + ttl)
        self._pins.move_to_end(key)
        return True

    def unpin(self, key: str) -> bool:
        """Remove the pin; False if there was none."""
        return self._pins.pop(key, None) is not None

    def purge_expired(self, now: float) -> int:
        """Drop every expired pin (a full scan, for periodic housekeeping)."""
        dead = [k for k, (_, exp) in self._pins.items() if exp <= now]
        for k in dead:
            del self._pins[k]
        return len(dead)


class CookieAction(enum.Enum):
    """What a response's Set-Cookie does to the session."""

    SET = "set"
    CLEAR = "clear"


class SessionChange(NamedTuple):
    """A Set-Cookie of the session cookie: the action and the cookie value."""

    action: CookieAction
    session: str


def parse_set_cookie(value: bytes | str) -> tuple[str, str, dict[str, str]] | None:
    """Split one Set-Cookie value into (name, value, {attribute: value}).

    Attribute names are lower-cased; valueless attributes map to ``""``.
    The cookie value is unquoted. None if there is no ``name=`` pair.
    """
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    first, _, rest = text.partition(";")
    name, eq, val = first.partition("=")
    name = name.strip()
    if not eq or not name:
        return None
    val = val.strip()
    if len(val) >= 2 and val[0] == '"' and val[-1] == '"':
        val = val[1:-1]
    attrs: dict[str, str] = {}
    if rest:
        for part in rest.split(";"):
            k, _, v = part.partition("=")
            k = k.strip().lower()
            if k:
                attrs[k] = v.strip()
    return name, val, attrs


def _max_age(raw: str) -> int | None:
    # RFC 6265 5.2.2: first char DIGIT or "-", the rest DIGITs; else ignore.
    if not raw or not (raw[0].isdigit() or raw[0] == "-"):
        return None
    digits = raw[1:] if raw[0] == "-" else raw
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    return int(raw)


_MONTHS: Final = "jan feb mar apr may jun jul aug sep oct nov dec".split()
# RFC 6265 5.1.1 delimiters: everything but digits, letters, ':' and some others.
_DATE_DELIMS: Final = re.compile(r"[\x09\x20-\x2f\x3b-\x40\x5b-\x60\x7b-\x7e]+")
_TIME: Final = re.compile(r"(\d{1,2}):(\d{1,2}):(\d{1,2})(?:\D.*)?$")
_DIGITS_PREFIX: Final = re.compile(r"(\d+)(?:\D.*)?$")


def _expires(raw: str) -> float | None:
    """Parse a cookie date as RFC 6265 5.1.1 does; epoch seconds or None."""
    hms: tuple[int, int, int] | None = None
    day = month = year = None
    for token in _DATE_DELIMS.split(raw):
        if not token:
            continue
        if hms is None and (m := _TIME.match(token)):
            hms = (int(m[1]), int(m[2]), int(m[3]))
            continue
        digits = _DIGITS_PREFIX.match(token)
        if day is None and digits and len(digits[1]) <= 2:
            day = int(digits[1])
            continue
        if month is None and token[:3].lower() in _MONTHS:
            month = _MONTHS.index(token[:3].lower()) + 1
            continue
        if year is None and digits and 2 <= len(digits[1]) <= 4:
            year = int(digits[1])
            year += 1900 if 70 <= year <= 99 else 2000 if year <= 69 else 0
            continue
    if hms is None or day is None or month is None or year is None:
        return None
    hour, minute, second = hms
    if not (1 <= day <= 31 and year >= 1601 and hour <= 23 and minute <= 59 and second <= 59):
        return None
    return float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))


def _is_deletion(val: str, attrs: dict[str, str], wall_now: float | None) -> bool:
    if not val:
        return True
    if "max-age" in attrs:
        age = _max_age(attrs["max-age"])
        if age is not None:
            return age <= 0
    if "expires" in attrs:
        when = _expires(attrs["expires"])
        if when is not None:
            return when <= (wall_now if wall_now is not None else _EXPIRED_BEFORE)
    return False


class StickyPolicy:
    """The pure half of sticky sessions for one rule: cookie in, cookie out."""

    __slots__ = ("rule_name", "cookie", "ttl", "_prefix", "_bcookie")

    def __init__(self, rule_name: str, cookie: str, ttl: float) -> None:
        if not cookie:
            raise ValueError("sticky session cookie name is empty")
        if ttl <= 0:
            raise ValueError("sticky session ttl must be positive")
        self.rule_name = rule_name
        self.cookie = cookie
        self.ttl = float(ttl)
        self._prefix = rule_name + ":"
        self._bcookie = cookie.encode("latin-1")

    @classmethod
    def from_config(cls, rule_name: str, sticky: StickySession) -> StickyPolicy:
        """Build from a config ``StickySession`` block."""
        return cls(rule_name, sticky.cookie, sticky.ttl)

    def __repr__(self) -> str:
        return f"StickyPolicy({self.rule_name!r}, {self.cookie!r}, {self.ttl!r})"

    def key(self, session: str) -> str:
        """The pin-store key of ``session``: ``f"{rule}:{session}"``."""
        return self._prefix + session

    def session_of_request(self, req: RequestView) -> str | None:
        """The session id the request carries (its cookie), or None."""
        return req.cookies.get(self.cookie) or None

    def response_cookie(
        self, headers: Headers, wall_now: float | None = None
    ) -> SessionChange | None:
        """What the response's Set-Cookie headers do to the session, if anything.

        The last Set-Cookie of the session cookie wins. ``wall_now`` (epoch
        seconds) lets ``Expires`` be compared with the real date.
        """
        found: tuple[str, dict[str, str]] | None = None
        needle = self._bcookie
        for name, value in headers:
            if name != b"set-cookie" or needle not in value:
                continue
            parsed = parse_set_cookie(value)
            if parsed is not None and parsed[0] == self.cookie:
                found = (parsed[1], parsed[2])
        if found is None:
            return None
        val, attrs = found
        if _is_deletion(val, attrs, wall_now):
            return SessionChange(CookieAction.CLEAR, val)
        return SessionChange(CookieAction.SET, val)

    def session_set_by_response(
        self, headers: Headers, wall_now: float | None = None
    ) -> str | None:
        """The new session id a response sets, or None (also for a deletion).

        Use ``response_cookie`` to tell a deletion (unpin) from no cookie.
        """
        change = self.response_cookie(headers, wall_now)
        if change is None or change.action is CookieAction.CLEAR:
            return None
        return change.session
