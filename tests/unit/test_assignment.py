from __future__ import annotations

import hashlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbnode.policy.assignment import Assigner, probers_for, score, targets_for

TARGETS = [f"api-lb/t{i}" for i in range(2000)]
NODE_IDS = st.lists(st.text("abcdefgh0123456789-", min_size=1, max_size=8), min_size=1,
                    max_size=8, unique=True)  # fmt: skip


def test_the_score_is_pinned_across_processes_and_versions() -> None:
    # Every node must compute the same assignment: the hash may never change silently.
    assert score("node-1", "api-lb/api-1") == 7296753506796349479
    digest = hashlib.blake2b(b"node-1\0api-lb/api-1", digest_size=8).digest()
    assert score("node-1", "api-lb/api-1") == int.from_bytes(digest, "big")
    assert probers_for("api-lb/api-1", ["node-1", "node-2", "node-3"], 2) == ["node-2", "node-1"]


@pytest.mark.parametrize(("n", "r", "expected"), [(0, 2, 0), (1, 2, 1), (2, 2, 2), (5, 2, 2),
                                                  (5, 1, 1), (3, 5, 3)])  # fmt: skip
def test_min_r_n_distinct_probers(n: int, r: int, expected: int) -> None:
    nodes = [f"n{i}" for i in range(n)]
    got = probers_for("lb/t", nodes, r)
    assert len(got) == len(set(got)) == expected
    assert set(got) <= set(nodes)


def test_duplicates_and_order_of_live_nodes_do_not_matter() -> None:
    a = probers_for("lb/t", ["n1", "n2", "n3", "n4"], 2)
    assert probers_for("lb/t", ["n4", "n3", "n2", "n1", "n3"], 2) == a


def test_r_must_be_positive() -> None:
    with pytest.raises(ValueError):
        probers_for("lb/t", ["a"], 0)


@settings(max_examples=100, deadline=None)
@given(nodes=NODE_IDS, r=st.integers(1, 4), key=st.text(max_size=20))
def test_probers_are_the_top_r_scores(nodes: list[str], r: int, key: str) -> None:
    got = probers_for(key, nodes, r)
    assert len(got) == len(set(got)) == min(r, len(nodes))
    ranked = sorted(nodes, key=lambda n: score(n, key), reverse=True)
    assert got == ranked[: len(got)]


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 8), r=st.integers(1, 3), salt=st.text("xyz", max_size=3))
def test_load_is_targets_times_r_over_n(n: int, r: int, salt: str) -> None:
    nodes = [f"{salt}node-{i}" for i in range(n)]
    assigner = Assigner(nodes, r)
    loads = {node: 0 for node in nodes}
    for t in TARGETS:
        for p in assigner.probers_for(t):
            loads[p] += 1
    assert sum(loads.values()) == len(TARGETS) * min(r, n)
    expected = len(TARGETS) * min(r, n) / n
    for node in nodes:
        assert loads[node] == len(assigner.targets_for(node, TARGETS))
        # each target picks this node with p = r/n: within 5 standard deviations
        q = min(r, n) / n
        assert abs(loads[node] - expected) <= 5 * math.sqrt(len(TARGETS) * q * (1 - q)) + 1


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 7), r=st.integers(1, 3), gone=st.integers(0, 6))
def test_removing_a_node_moves_only_its_assignments(n: int, r: int, gone: int) -> None:
    nodes = [f"node-{i}" for i in range(n)]
    leaver = nodes[gone % n]
    before = Assigner(nodes, r).assignment(TARGETS[:500])
    after = Assigner([x for x in nodes if x != leaver], r).assignment(TARGETS[:500])
    for t in before:
        if leaver not in before[t]:
            assert after[t] == before[t]
        else:
            kept = [p for p in before[t] if p != leaver]
            assert [p for p in after[t] if p in kept] == kept  # the others stay, in order
            assert len(after[t]) == min(r, n - 1)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(2, 7), r=st.integers(1, 3))
def test_adding_a_node_moves_about_r_over_n_plus_1(n: int, r: int) -> None:
    nodes = [f"node-{i}" for i in range(n)]
    before = Assigner(nodes, r).assignment(TARGETS)
    after = Assigner([*nodes, "newcomer"], r).assignment(TARGETS)
    changed = 0
    for t in TARGETS:
        if after[t] != before[t]:
            # the only change a newcomer can cause: it takes a place in the top r
            assert "newcomer" in after[t]
            assert set(after[t]) - {"newcomer"} <= set(before[t])
            changed += 1
        else:
            assert "newcomer" not in after[t]
    p = min(r, n + 1) / (n + 1)
    assert abs(changed / len(TARGETS) - p) <= 5 * math.sqrt(p * (1 - p) / len(TARGETS))


def test_targets_for_agrees_with_probers_for() -> None:
    nodes = ["a", "b", "c"]
    keys = TARGETS[:50]
    for node in nodes:
        mine = targets_for(node, keys, nodes, 2)
        assert mine == [t for t in keys if node in probers_for(t, nodes, 2)]
    assert targets_for("zzz", keys, nodes, 2) == []
