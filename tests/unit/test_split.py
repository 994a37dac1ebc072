from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbnode.policy.keys import KeySpec
from lbnode.policy.request import RequestView
from lbnode.policy.split import SPLIT_BUCKETS, Split, split_bucket


def ip(i: int) -> str:
    return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


def view(client_ip: str, headers: list[tuple[bytes, bytes]] | None = None) -> RequestView:
    return RequestView(b"GET", b"/", headers or [], client_ip)


def test_bucket_is_a_fixed_function() -> None:
    # Pinned values: the hash must never change between releases, or every
    # canary user would be reshuffled on upgrade (and nodes running different
    # versions would disagree).
    assert [split_bucket("canary", f"10.0.0.{i}") for i in range(3)] == [3358, 66, 6714]


def test_pinned_values_are_blake2b() -> None:
    from hashlib import blake2b

    digest = blake2b(b"canary\x0010.0.0.1", digest_size=8).digest()
    assert split_bucket("canary", "10.0.0.1") == int.from_bytes(digest, "big") % 10_000


@pytest.mark.parametrize("weight", [1, 10, 50, 90])
def test_share_within_one_point_over_100k_clients(weight: int) -> None:
    split = Split("canary", weight)
    n = 100_000
    taken = sum(split.takes_key(ip(i)) for i in range(n))
    assert abs(taken / n * 100 - weight) < 1.0


@pytest.mark.parametrize("weight", [1, 10, 50, 90])
def test_share_with_cookie_split_key(weight: int) -> None:
    split = Split("beta", weight, "cookie:uid")
    n = 100_000
    taken = sum(
        split.takes(view("192.0.2.1", [(b"cookie", f"uid=user-{i}".encode())])) for i in range(n)
    )
    assert abs(taken / n * 100 - weight) < 1.0


def test_deterministic_across_independent_objects() -> None:
    a = Split("canary", 30)
    b = Split("canary", 30, KeySpec.parse("client_ip"))
    clients = [ip(i) for i in range(5000)]
    assert [a.takes(view(c)) for c in clients] == [b.takes(view(c)) for c in clients]
    # and across repeated requests of one client
    assert len({a.takes(view("10.1.2.3")) for _ in range(20)}) == 1


def test_rules_split_independently() -> None:
    a, b = Split("canary-a", 50), Split("canary-b", 50)
    clients = [ip(i) for i in range(10_000)]
    both = sum(a.takes_key(c) and b.takes_key(c) for c in clients)
    # independent halves overlap on about a quarter, not on half
    assert 2000 < both < 3000


def test_raising_the_weight_keeps_existing_canary_users() -> None:
    low, high = Split("canary", 10), Split("canary", 20)
    clients = [ip(i) for i in range(10_000)]
    assert all(high.takes_key(c) for c in clients if low.takes_key(c))


@pytest.mark.parametrize("weight, expected", [(0, False), (100, True)])
def test_extreme_weights(weight: int, expected: bool) -> None:
    split = Split("r", weight)
    assert all(split.takes_key(ip(i)) is expected for i in range(1000))


def test_missing_split_key_falls_back_to_client_ip() -> None:
    split = Split("r", 50, "header:X-User")
    with_header = view("10.0.0.1", [(b"x-user", b"alice")])
    without = view("10.0.0.1")
    assert split.key_of(with_header) == "alice"
    assert split.key_of(without) == "10.0.0.1"
    assert split.takes(without) == split.takes_key("10.0.0.1")
    empty = view("10.0.0.1", [(b"x-user", b"")])
    assert split.key_of(empty) == "10.0.0.1"


def test_same_user_same_answer_from_any_ip() -> None:
    split = Split("r", 50, "cookie:uid")
    answers = {split.takes(view(ip(i), [(b"cookie", b"uid=u-42")])) for i in range(50)}
    assert len(answers) == 1


def test_validation_and_immutability() -> None:
    with pytest.raises(ValueError):
        Split("r", 101)
    with pytest.raises(ValueError):
        Split("r", -1)
    with pytest.raises(ValueError):
        Split("r", 10, "bogus key")
    split = Split("r", 10)
    with pytest.raises(AttributeError):
        split.weight = 20
    assert repr(split) == "Split('r', 10, 'client_ip')"


@given(key=st.text(max_size=40), rule=st.text(max_size=20))
def test_bucket_range(key: str, rule: str) -> None:
    assert 0 <= split_bucket(rule, key) < SPLIT_BUCKETS
