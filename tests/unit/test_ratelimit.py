from __future__ import annotations

import bisect
import tracemalloc
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbnode.policy.ratelimit import (
    CounterStore,
    Decision,
    MemoryCounterStore,
    RateLimiter,
    StoreUnavailable,
)
from lbnode.policy.request import RequestView
from lbshared.config import RateLimit


def limiter(limit: int, interval: float = 60.0, **kw: object) -> RateLimiter:
    return RateLimiter(RateLimit(limit=limit, interval=interval, **kw))  # type: ignore[arg-type]


# ------------------------------------------------------------ decision basics


def test_fresh_key_counts_the_current_request() -> None:
    rl = limiter(3, 10.0)
    d = rl.check("c", 100.0)
    assert (d.allowed, d.limit, d.remaining, d.retry_after) == (True, 3, 2, None)
    # back to a full quota once this admission has left the window
    assert d.reset == 10
    assert d.headers() == [
        (b"RateLimit-Limit", b"3"),
        (b"RateLimit-Remaining", b"2"),
        (b"RateLimit-Reset", b"10"),
    ]


def test_remaining_counts_down_then_refuses_with_retry_after() -> None:
    rl = limiter(3, 10.0)  # sub-buckets of 1 s
    got = [rl.check("c", t) for t in (100.0, 100.2, 100.4, 100.6, 100.8)]
    assert [d.allowed for d in got] == [True, True, True, False, False]
    assert [d.remaining for d in got] == [2, 1, 0, 0, 0]
    refused = got[3]
    # The first admission (100.0) leaves the window at 110.0: 9.4 s, rounded up.
    assert refused.retry_after == 10
    assert refused.reset == 10
    assert refused.headers() == [
        (b"RateLimit-Limit", b"3"),
        (b"RateLimit-Remaining", b"0"),
        (b"RateLimit-Reset", b"10"),
        (b"Retry-After", b"10"),
    ]
    assert not rl.check("c", 109.99).allowed
    assert rl.check("c", 110.0).allowed
    assert not rl.check("c", 110.1).allowed  # 100.2 has not left yet


RETRY_AFTER = [
    # (admission times, refused-at, expected Retry-After) with limit 1, interval 10
    ([0.0], 1.0, 9),  # free at exactly 10.0: 9 s, not 10
    ([0.0], 1.5, 9),  # 8.5 s -> 9
    ([0.0], 9.5, 1),  # 0.5 s -> 1
    ([0.0], 9.999, 1),  # 0.001 s -> 1 (never 0)
    ([0.5], 0.5, 10),  # same instant: 10 s
    ([3.3], 3.31, 10),  # 9.99 s (less one tick of rounding) -> 10
]


@pytest.mark.parametrize("admitted, refused_at, expected", RETRY_AFTER)
def test_retry_after_rounds_up(admitted: list[float], refused_at: float, expected: int) -> None:
    rl = limiter(1, 10.0)
    for t in admitted:
        assert rl.check("c", t).allowed
    d = rl.check("c", refused_at)
    assert not d.allowed
    assert d.retry_after == expected
    assert d.reset == expected
    # retrying after Retry-After works; a bit earlier does not
    assert not rl.check("c", refused_at + expected - 1.0).allowed
    assert rl.check("c", refused_at + expected).allowed


@pytest.mark.parametrize(
    "limit, interval",
    [(10, 10.0), (7, 1.0), (100, 60.0), (1000, 60.0), (3, 0.5)],
)
def test_twice_the_limit_gets_exactly_limit_per_window(limit: int, interval: float) -> None:
    """A steady sender at 2x the limit, fake clock, six windows."""
    rl = limiter(limit, interval)
    rate = 2 * limit
    dt = interval / rate
    per_window = [0] * 6
    admitted: list[float] = []
    for i in range(rate * 6):
        t = 1000.0 * interval + i * dt + dt / 7  # off the bucket edges
        if rl.check("client", t).allowed:
            per_window[int((t - 1000.0 * interval) // interval)] += 1
            admitted.append(t)
    assert per_window == [limit] * 6
    # and in every sliding window too (evenly spaced admissions: exact)
    worst = max(bisect.bisect_left(admitted, a + interval) - j for j, a in enumerate(admitted))
    assert worst == limit


@pytest.mark.parametrize("start", [0.0, 0.5, 7.0, 1000.0, 1234.567])
@pytest.mark.parametrize("limit, interval", [(100, 60.0), (3, 10.0), (1, 1.0), (60, 60.0)])
def test_twice_the_limit_whatever_the_phase(start: float, limit: int, interval: float) -> None:
    """Windows not aligned with the sub-buckets: still exactly limit per window."""
    rl = limiter(limit, interval)
    dt = interval / (2 * limit)
    per_window = [0] * 5
    for i in range(2 * limit * 5):
        t = start + i * dt
        if rl.check("client", t).allowed:
            per_window[int((t - start) // interval)] += 1
    assert per_window == [limit] * 5


@given(
    gaps=st.lists(st.floats(0.0, 3.0, allow_nan=False), min_size=1, max_size=120),
    limit=st.integers(1, 8),
)
@settings(max_examples=150, deadline=None)
def test_sliding_window_bound_and_retry_after_property(gaps: list[float], limit: int) -> None:
    interval = 10.0
    width = interval / 10
    rl = limiter(limit, interval)
    t = 50.0
    admitted: list[float] = []
    for gap in gaps:
        t += gap
        d = rl.check("k", t)
        if d.allowed:
            admitted.append(t)
            assert 0 <= d.remaining < limit
            assert d.retry_after is None
        else:
            assert d.retry_after is not None and d.retry_after >= 1
            assert d.remaining == 0
    # Documented bound: any window of length T - tick holds at most
    # limit + max(c - 2, 0), c the largest count of one sub-bucket.
    buckets: dict[int, int] = {}
    for a in admitted:
        buckets[int(a // width)] = buckets.get(int(a // width), 0) + 1
    c = max(buckets.values(), default=0)
    tick = width / 256
    worst = max(
        (bisect.bisect_left(admitted, a + interval - tick) - j for j, a in enumerate(admitted)),
        default=0,
    )
    assert worst <= limit + max(c - 2, 0)


@given(gaps=st.lists(st.floats(0.0, 2.0, allow_nan=False), min_size=1, max_size=60))
@settings(max_examples=100, deadline=None)
def test_retry_after_is_never_too_early(gaps: list[float]) -> None:
    rl = limiter(3, 10.0)
    t = 0.0
    for gap in gaps:
        t += gap
        d = rl.check("k", t)
        if not d.allowed:
            assert d.retry_after is not None
            probe = RateLimiter(rl.config, _copy_store(rl.store))
            assert probe.check("k", t + d.retry_after).allowed


def _copy_store(store: CounterStore) -> MemoryCounterStore:
    assert isinstance(store, MemoryCounterStore)
    clone = MemoryCounterStore(store.interval, buckets=store.buckets, max_keys=store.max_keys)
    for key, rec in store._keys.items():
        clone._keys[key] = array("q", rec)
    return clone


def test_reset_means_full_quota_again() -> None:
    rl = limiter(5, 10.0)
    d = None
    for t in (0.0, 2.5, 4.2):
        d = rl.check("k", t)
    # the newest admission leaves the window at 14.2 (less a rounding tick)
    assert d is not None and d.allowed and d.remaining == 2 and d.reset == 10
    assert rl.store.count("k", 4.2 + d.reset) == 0.0
    assert rl.check("k", 4.2 + d.reset).remaining == 4


def test_keys_are_independent() -> None:
    rl = limiter(1, 10.0)
    assert rl.check("a", 0.0).allowed
    assert not rl.check("a", 0.1).allowed
    assert rl.check("b", 0.1).allowed


# ---------------------------------------------------------- missing keys etc.


def test_missing_key_allow_means_no_limiting() -> None:
    rl = limiter(1, 10.0, on_missing_key="allow")
    for i in range(5):
        d = rl.check(None, float(i))
        assert d.allowed and not d.limited
        assert d.headers() == []


def test_missing_key_deny_refuses() -> None:
    rl = limiter(1, 10.0, on_missing_key="deny")
    d = rl.check(None, 0.0)
    assert not d.allowed
    assert d.retry_after == 10
    assert (b"Retry-After", b"10") in d.headers()
    assert rl.check("someone", 0.0).allowed


def test_missing_key_shared_pools_keyless_requests() -> None:
    rl = limiter(2, 10.0, on_missing_key="shared")
    assert [rl.check(None, 0.0).allowed for _ in range(3)] == [True, True, False]
    assert rl.check("", 0.0).allowed is False  # the shared key is ""
    assert rl.check("x", 0.0).allowed


def test_disabled_limit_allows_everything() -> None:
    rl = limiter(1, 10.0, enabled=False)
    assert all(rl.check("k", 0.0).allowed for _ in range(10))
    assert rl.check("k", 0.0).headers() == []


class BrokenStore:
    interval = 10.0

    def add(self, key: str, n: int, now: float) -> None:
        raise StoreUnavailable("down")

    def count(self, key: str, now: float) -> float:
        raise StoreUnavailable("down")

    def time_until(self, key: str, now: float, at_most: float) -> float:
        raise StoreUnavailable("down")


@pytest.mark.parametrize("policy, allowed", [("allow", True), ("deny", False)])
def test_store_errors_follow_on_store_error(policy: str, allowed: bool) -> None:
    rl = RateLimiter(RateLimit(limit=1, interval=10.0, on_store_error=policy), BrokenStore())  # type: ignore[arg-type]
    d = rl.check("k", 0.0)
    assert d.allowed is allowed
    if not allowed:
        assert d.retry_after == 1


def test_key_of_request() -> None:
    rl = limiter(1, 10.0, key="header:X-Api-Key")
    with_key = RequestView(b"GET", b"/", [(b"x-api-key", b"k1")], "1.2.3.4")
    without = RequestView(b"GET", b"/", [], "1.2.3.4")
    assert rl.key_of(with_key) == "k1"
    assert rl.key_of(without) is None
    assert rl.check_request(with_key, 0.0).allowed
    assert not rl.check_request(with_key, 0.1).allowed
    assert rl.check_request(without, 0.1).allowed  # on_missing_key: allow


def test_decision_equality_and_repr() -> None:
    assert Decision(True, 5, 4, 11) == Decision(True, 5, 4, 11)
    assert Decision(True, 5, 4, 11) != Decision(True, 5, 3, 11)
    assert "remaining=4" in repr(Decision(True, 5, 4, 11))


# ------------------------------------------------------------------ the store


def test_count_is_a_sliding_window() -> None:
    s = MemoryCounterStore(10.0)  # 10 buckets of 1 s
    for t in (100.0, 100.25, 100.5, 100.75):
        s.add("k", 1, t)
    assert s.count("k", 100.9) == 4
    assert s.count("k", 109.99) == 4
    assert s.count("k", 110.0) == pytest.approx(3.0)  # 100.0 has left
    assert s.count("k", 110.25) == pytest.approx(2.0)
    assert s.count("k", 110.375) == pytest.approx(1.5)  # interpolated between steps
    assert s.count("k", 110.5) == pytest.approx(1.0)
    assert s.count("k", 110.75) == 0.0
    assert s.count("missing", 0.0) == 0.0


def test_burst_at_one_instant_leaves_at_once() -> None:
    s = MemoryCounterStore(10.0)
    s.add("k", 4, 100.5)
    assert s.count("k", 110.49) == 4
    assert s.count("k", 110.5) == 0


def test_time_until() -> None:
    s = MemoryCounterStore(10.0)
    for t in (100.0, 100.25, 100.5, 100.75):
        s.add("k", 1, t)
    s.add("k", 2, 105.5)
    assert s.time_until("k", 106.0, 6.0) == 0.0
    assert s.time_until("k", 106.0, 5.0) == pytest.approx(110.0 - 106.0)
    assert s.time_until("k", 106.0, 3.0) == pytest.approx(110.5 - 106.0)
    assert s.time_until("k", 106.0, 2.5) == pytest.approx(110.625 - 106.0)
    assert s.time_until("k", 106.0, 2.0) == pytest.approx(110.75 - 106.0)
    assert s.time_until("k", 106.0, 1.0) == pytest.approx(115.5 - 106.0)
    assert s.time_until("k", 106.0, 0.0) == pytest.approx(115.5 - 106.0)
    assert s.time_until("missing", 106.0, 0.0) == 0.0
    assert s.time_until("missing", 106.0, 3.0) == 0.0


def test_idle_keys_expire() -> None:
    s = MemoryCounterStore(10.0)
    for i in range(50):
        s.add(f"k{i}", 1, 0.0)
    assert len(s) == 50
    # Still counted at 10.5 (bucket 0 half drained) -> nothing purged
    assert s.purge(10.5) == 0
    assert s.purge(11.0) == 50
    assert len(s) == 0
    # adds purge a few idle keys from the cold end on their own
    for i in range(50):
        s.add(f"k{i}", 1, 0.0)
    s.add("new0", 1, 100.0)
    assert len(s) == 50 - 4 + 1
    for i in range(1, 20):
        s.add(f"new{i}", 1, 100.0)
    assert len(s) == 20


def test_key_budget_under_a_million_distinct_keys() -> None:
    max_keys = 2000
    s = MemoryCounterStore(60.0, max_keys=max_keys)
    for i in range(1_000_000):
        s.add(f"client-{i}", 1, i * 1e-5)
        if i % 100_000 == 0:
            assert len(s) <= max_keys
    assert len(s) == max_keys
    # the survivors are the most recent keys
    assert "client-999999" in s and "client-0" not in s
    # Steady state: what a further flood of 50,000 keys leaves allocated is
    # max_keys records (tracemalloc only sees blocks allocated while tracing,
    # and it is slow, so it watches just this tail of the flood).
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for i in range(1_000_000, 1_050_000):
            s.add(f"client-{i}", 1, i * 1e-5)
        grown = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert len(s) == max_keys
    assert grown < 600 * max_keys  # ~360 B a record; 50,000 records would be ~18 MB


def test_flood_evicts_least_recently_admitted() -> None:
    s = MemoryCounterStore(60.0, max_keys=3)
    s.add("a", 1, 0.0)
    s.add("b", 1, 0.0)
    s.add("c", 1, 0.0)
    s.add("a", 1, 1.0)  # a is fresh again
    s.add("d", 1, 2.0)  # evicts b
    assert "b" not in s and all(k in s for k in "acd")


def test_bytes_per_key_is_bounded() -> None:
    n = 100_000
    keys = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(n)]
    s = MemoryCounterStore(60.0, max_keys=n)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for k in keys:
            s.add(k, 1, 1000.0)
        per_key = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert len(s) == n
    assert per_key < 450, per_key  # ~360 measured (key strings not included)


def test_add_remote_folds_other_nodes_in() -> None:
    s = MemoryCounterStore(10.0)
    rl = RateLimiter(RateLimit(limit=5, interval=10.0), s)
    s.add_remote("k", 4, 99.3)  # another node admitted 4
    assert rl.check("k", 100.0).allowed
    assert not rl.check("k", 100.1).allowed
    # remote deltas older than the window are ignored
    s.add_remote("old", 3, 10.0)
    s.add_remote("old", 3, 200.0)
    s.add_remote("old", 5, 150.0)
    assert s.count("old", 200.5) == 3
    # a remote clock slightly ahead counts too (conservatively)
    s.add_remote("ahead", 2, 300.0)
    assert s.count("ahead", 299.0) == 2


def test_unsynced_admissions_are_countable_and_drained() -> None:
    s = MemoryCounterStore(10.0, track_unsynced=True)
    s.add("a", 1, 100.2)
    s.add("a", 2, 100.7)
    s.add("a", 1, 101.5)
    s.add("b", 5, 101.5)
    s.add_remote("a", 10, 101.0)  # remote deltas are not ours to ship
    assert s.unsynced("a") == 4
    assert s.unsynced("b") == 5
    assert s.unsynced("zzz") == 0
    assert sorted(s.drain_unsynced()) == [("a", 1, 101.0), ("a", 3, 100.0), ("b", 5, 101.0)]
    assert s.unsynced("a") == 0
    assert s.drain_unsynced() == []
    # counts are untouched by draining
    assert s.count("a", 101.6) == 14


def test_unsynced_deltas_stay_bounded() -> None:
    s = MemoryCounterStore(10.0, max_keys=10, track_unsynced=True)
    for i in range(1000):
        s.add("a", 1, float(i))
        s.add(f"k{i}", 1, float(i))
    assert len(s._unsynced) <= 10
    assert len(s._unsynced.get("a", {})) <= 11  # only buckets still in the window


def test_store_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        MemoryCounterStore(0.0)
    with pytest.raises(ValueError):
        MemoryCounterStore(1.0, buckets=0)
    with pytest.raises(ValueError):
        MemoryCounterStore(1.0, max_keys=0)


def test_limiter_builds_its_store_from_config() -> None:
    rl = limiter(10, 30.0, max_keys=7)
    assert isinstance(rl.store, MemoryCounterStore)
    assert rl.store.interval == 30.0 and rl.store.max_keys == 7
