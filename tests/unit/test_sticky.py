from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbnode.policy.request import RequestView
from lbnode.policy.sticky import (
    CookieAction,
    MemoryPinStore,
    PinStore,
    SessionChange,
    StickyPolicy,
    parse_set_cookie,
)
from lbshared.config import StickySession

# ------------------------------------------------------------------ pin store


def test_memory_store_satisfies_protocol() -> None:
    store: PinStore = MemoryPinStore()
    assert store.get("k", 0.0) is None


def test_pin_lifecycle() -> None:
    s = MemoryPinStore()
    assert s.get("r:s1", 0.0) is None
    assert s.pin_if_absent("r:s1", "t1", ttl=10.0, now=0.0) == "t1"
    assert s.get("r:s1", 5.0) == "t1"
    assert s.get("r:s1", 9.999) == "t1"
    assert s.get("r:s1", 10.0) is None  # expired at now + ttl
    assert len(s) == 0  # expired entry dropped on read


def test_refresh_extends_ttl() -> None:
    s = MemoryPinStore()
    s.pin_if_absent("k", "t1", 10.0, 0.0)
    assert s.refresh("k", 10.0, 8.0) is True
    assert s.get("k", 17.0) == "t1"  # would have expired at 10
    assert s.get("k", 18.0) is None
    assert s.refresh("k", 10.0, 18.0) is False  # too late: nothing to refresh
    assert s.refresh("missing", 10.0, 0.0) is False


def test_get_does_not_extend_ttl() -> None:
    s = MemoryPinStore()
    s.pin_if_absent("k", "t1", 10.0, 0.0)
    assert s.get("k", 9.0) == "t1"
    assert s.get("k", 10.5) is None


def test_first_writer_wins() -> None:
    s = MemoryPinStore()
    assert s.pin_if_absent("k", "t1", 10.0, 0.0) == "t1"
    assert s.pin_if_absent("k", "t2", 10.0, 1.0) == "t1"
    assert s.get("k", 2.0) == "t1"
    # ... until the pin expires; then the next writer wins
    assert s.pin_if_absent("k", "t2", 10.0, 10.0) == "t2"
    assert s.get("k", 11.0) == "t2"


def test_unpin() -> None:
    s = MemoryPinStore()
    s.pin_if_absent("k", "t1", 10.0, 0.0)
    assert s.unpin("k") is True
    assert s.get("k", 1.0) is None
    assert s.unpin("k") is False
    assert s.pin_if_absent("k", "t2", 10.0, 1.0) == "t2"


def test_lru_bound() -> None:
    s = MemoryPinStore(max_entries=3)
    for i in range(3):
        s.pin_if_absent(f"k{i}", f"t{i}", 100.0, 0.0)
    assert s.get("k0", 1.0) == "t0"  # k0 is now the most recently used
    s.pin_if_absent("k3", "t3", 100.0, 2.0)  # evicts k1, the least recently used
    assert len(s) == 3
    assert s.get("k1", 3.0) is None
    assert [s.get(k, 3.0) for k in ("k0", "k2", "k3")] == ["t0", "t2", "t3"]
    for i in range(1000):
        s.pin_if_absent(f"flood{i}", "t", 100.0, 4.0)
    assert len(s) == 3


def test_refresh_and_first_writer_touch_lru() -> None:
    s = MemoryPinStore(max_entries=2)
    s.pin_if_absent("a", "t", 100.0, 0.0)
    s.pin_if_absent("b", "t", 100.0, 0.0)
    s.refresh("a", 100.0, 1.0)
    s.pin_if_absent("c", "t", 100.0, 2.0)
    assert s.get("a", 3.0) == "t" and s.get("b", 3.0) is None
    s.pin_if_absent("a", "other", 100.0, 4.0)  # existing pin: touched, not replaced
    s.pin_if_absent("d", "t", 100.0, 5.0)
    assert s.get("a", 6.0) == "t" and s.get("c", 6.0) is None


def test_expired_pins_are_purged() -> None:
    s = MemoryPinStore()
    for i in range(10):
        s.pin_if_absent(f"k{i}", "t", 10.0 if i % 2 else 100.0, 0.0)
    assert s.purge_expired(50.0) == 5
    assert len(s) == 5
    # an insert also drops an expired pin at the cold end
    s2 = MemoryPinStore()
    s2.pin_if_absent("old", "t", 1.0, 0.0)
    s2.pin_if_absent("new", "t", 1.0, 5.0)
    assert len(s2) == 1


def test_store_rejects_bad_bound() -> None:
    with pytest.raises(ValueError):
        MemoryPinStore(max_entries=0)


@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["pin", "get", "refresh", "unpin"]), st.integers(0, 5)),
        max_size=60,
    ),
    bound=st.integers(1, 4),
)
def test_store_never_exceeds_bound_and_pins_are_stable(
    ops: list[tuple[str, int]], bound: int
) -> None:
    s = MemoryPinStore(max_entries=bound)
    model: dict[str, str] = {}
    for step, (op, k) in enumerate(ops):
        key, now = f"k{k}", float(step)
        if op == "pin":
            before = s.get(key, now)
            winner = s.pin_if_absent(key, f"t{step}", 1000.0, now)
            # a live pin is never replaced; an absent (or evicted) one is set
            assert winner == (before if before is not None else f"t{step}")
            model[key] = winner
        elif op == "get":
            got = s.get(key, now)
            if got is not None:
                assert got == model[key]
        elif op == "refresh":
            s.refresh(key, 1000.0, now)
        else:
            s.unpin(key)
            model.pop(key, None)
        assert len(s) <= bound


# ------------------------------------------------------------- StickyPolicy


def req(*headers: tuple[bytes, bytes]) -> RequestView:
    return RequestView(b"GET", b"/", list(headers), "192.0.2.1")


def test_policy_from_config_and_key() -> None:
    p = StickyPolicy.from_config("api_v2", StickySession(cookie="session_id", ttl="30m"))
    assert (p.rule_name, p.cookie, p.ttl) == ("api_v2", "session_id", 1800.0)
    assert p.key("abc") == "api_v2:abc"


def test_policy_validates() -> None:
    with pytest.raises(ValueError):
        StickyPolicy("r", "", 10.0)
    with pytest.raises(ValueError):
        StickyPolicy("r", "sid", 0.0)


SESSION_OF_REQUEST = [
    ([(b"cookie", b"session_id=abc")], "abc"),
    ([(b"cookie", b"a=1; session_id=abc; b=2")], "abc"),
    ([(b"cookie", b"a=1"), (b"cookie", b"session_id=xyz")], "xyz"),
    ([(b"cookie", b"session_id=first"), (b"cookie", b"session_id=second")], "first"),
    ([(b"cookie", b"SESSION_ID=abc")], None),  # cookie names are case-sensitive
    ([(b"cookie", b"session_id=")], None),  # empty: no session
    ([(b"cookie", b"other_session_id=abc")], None),
    ([], None),
]


@pytest.mark.parametrize("headers, expected", SESSION_OF_REQUEST)
def test_session_of_request(headers: list[tuple[bytes, bytes]], expected: str | None) -> None:
    assert StickyPolicy("r", "session_id", 60.0).session_of_request(req(*headers)) == expected


SET = CookieAction.SET
CLEAR = CookieAction.CLEAR

SET_COOKIE = [
    # response headers, expected change
    ([(b"set-cookie", b"session_id=abc")], SessionChange(SET, "abc")),
    ([(b"set-cookie", b"session_id=abc; Path=/; HttpOnly; Secure")], SessionChange(SET, "abc")),
    ([(b"set-cookie", b'session_id="q v"; Path=/')], SessionChange(SET, "q v")),
    ([(b"set-cookie", b"  session_id = abc ;Path=/")], SessionChange(SET, "abc")),
    # other cookies, several headers: only ours counts, the last one wins
    (
        [
            (b"set-cookie", b"theme=dark"),
            (b"set-cookie", b"session_id=one"),
            (b"content-type", b"text/html"),
            (b"set-cookie", b"session_id=two; Max-Age=3600"),
            (b"set-cookie", b"lang=en"),
        ],
        SessionChange(SET, "two"),
    ),
    ([(b"set-cookie", b"my_session_id=abc")], None),
    ([(b"set-cookie", b"x=session_id")], None),
    ([(b"set-cookie", b"Session_Id=abc")], None),
    ([(b"x-set-cookie", b"session_id=abc")], None),
    ([(b"set-cookie", b"session_id")], None),  # no '=': not a cookie
    ([], None),
    # deletions
    ([(b"set-cookie", b"session_id=abc; Max-Age=0")], SessionChange(CLEAR, "abc")),
    ([(b"set-cookie", b"session_id=abc; max-age=-1")], SessionChange(CLEAR, "abc")),
    ([(b"set-cookie", b"session_id=; Path=/")], SessionChange(CLEAR, "")),
    (
        [(b"set-cookie", b"session_id=x; Expires=Thu, 01 Jan 1970 00:00:00 GMT")],
        SessionChange(CLEAR, "x"),
    ),
    (
        [(b"set-cookie", b"session_id=x; expires=Thu, 01-Jan-1970 00:00:01 GMT; Path=/")],
        SessionChange(CLEAR, "x"),
    ),
    # the other date forms browsers accept (RFC 850, asctime)
    (
        [(b"set-cookie", b"session_id=x; expires=Sunday, 06-Nov-94 08:49:37 GMT")],
        SessionChange(CLEAR, "x"),
    ),
    (
        [(b"set-cookie", b"session_id=x; expires=Sun Nov  6 08:49:37 1994")],
        SessionChange(CLEAR, "x"),
    ),
    (
        [(b"set-cookie", b"session_id=x; expires=Sun Nov  6 08:49:37 2094")],
        SessionChange(SET, "x"),
    ),
    # Max-Age wins over Expires, both ways
    (
        [(b"set-cookie", b"session_id=x; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=60")],
        SessionChange(SET, "x"),
    ),
    (
        [(b"set-cookie", b"session_id=x; Max-Age=0; Expires=Fri, 01 Jan 2100 00:00:00 GMT")],
        SessionChange(CLEAR, "x"),
    ),
    # an invalid Max-Age is ignored (RFC 6265 5.2.2)
    ([(b"set-cookie", b"session_id=x; Max-Age=abc")], SessionChange(SET, "x")),
    ([(b"set-cookie", b"session_id=x; Max-Age=1e3")], SessionChange(SET, "x")),
    ([(b"set-cookie", b"session_id=x; Expires=not a date")], SessionChange(SET, "x")),
    (
        [(b"set-cookie", b"session_id=x; Expires=Fri, 01 Jan 2100 00:00:00 GMT")],
        SessionChange(SET, "x"),
    ),
    # a later deletion beats an earlier set (and vice versa)
    (
        [(b"set-cookie", b"session_id=a"), (b"set-cookie", b"session_id=a; Max-Age=0")],
        SessionChange(CLEAR, "a"),
    ),
    (
        [(b"set-cookie", b"session_id=; Max-Age=0"), (b"set-cookie", b"session_id=new")],
        SessionChange(SET, "new"),
    ),
]


@pytest.mark.parametrize("headers, expected", SET_COOKIE)
def test_response_cookie(
    headers: list[tuple[bytes, bytes]], expected: SessionChange | None
) -> None:
    p = StickyPolicy("r", "session_id", 60.0)
    assert p.response_cookie(headers) == expected
    # the plain-string form returns only new sessions
    want = expected.session if expected is not None and expected.action is SET else None
    assert p.session_set_by_response(headers) == want


def test_expires_against_a_wall_clock() -> None:
    p = StickyPolicy("r", "sid", 60.0)
    headers = [(b"set-cookie", b"sid=x; Expires=Wed, 01 Jan 2025 00:00:00 GMT")]
    jan_2025 = 1735689600.0
    assert p.response_cookie(headers, wall_now=jan_2025 - 1) == SessionChange(SET, "x")
    assert p.response_cookie(headers, wall_now=jan_2025) == SessionChange(CLEAR, "x")
    assert p.session_set_by_response(headers, wall_now=jan_2025 + 1) is None
    # without a wall clock only the pre-2000 deletion idiom counts as expired
    assert p.response_cookie(headers) == SessionChange(SET, "x")


def test_parse_set_cookie() -> None:
    assert parse_set_cookie(b"a=b; Path=/; HttpOnly; SameSite=Lax") == (
        "a",
        "b",
        {"path": "/", "httponly": "", "samesite": "Lax"},
    )
    assert parse_set_cookie("a=b=c") == ("a", "b=c", {})
    assert parse_set_cookie(b"=b") is None
    assert parse_set_cookie(b"ab") is None


def test_full_sticky_flow() -> None:
    """Request without a session -> balanced; response sets one -> pinned; next request sticks."""
    p = StickyPolicy("api", "session_id", 60.0)
    store = MemoryPinStore()
    first = req()
    assert p.session_of_request(first) is None
    session = p.session_set_by_response([(b"set-cookie", b"session_id=s1; Path=/")])
    assert session == "s1"
    assert store.pin_if_absent(p.key(session), "t2", p.ttl, 0.0) == "t2"
    second = req((b"cookie", b"session_id=s1"))
    s = p.session_of_request(second)
    assert s is not None and store.get(p.key(s), 30.0) == "t2"
    assert store.refresh(p.key(s), p.ttl, 30.0)
    assert store.get(p.key(s), 80.0) == "t2"
    # logout: the backend clears the cookie -> unpin the request's session
    change = p.response_cookie([(b"set-cookie", b"session_id=; Max-Age=0")])
    assert change is not None and change.action is CookieAction.CLEAR
    assert store.unpin(p.key(s))
    assert store.get(p.key(s), 81.0) is None
