"""Which live nodes probe which target: rendezvous (highest random weight) hashing.

Theory of operation
-------------------
Each target is probed by ``r`` of the live nodes (``health_check.probers``,
default 2), so the probe load of the cluster is ``targets x r`` per interval
whatever the number of nodes. Every node computes the same assignment from
the same inputs, with no coordination: for a target key ``t`` and each live
node ``n`` the score is ``blake2b(n NUL t)`` (64 bits, the same in every
process - Python's ``hash`` is salted per process and would not do), and the
probers of ``t`` are the ``min(r, len(nodes))`` nodes with the highest
scores (ties, vanishingly rare, broken by node id).

Why rendezvous hashing: a node's score for a target does not depend on the
other nodes, so

* removing a node changes only the targets it probed: each of them gains
  the next-best node, and no other assignment moves;
* adding a node moves only the targets where it scores in the top ``r``:
  about ``r / (n + 1)`` of all (target, prober) assignments;
* each node probes about ``targets * r / n`` targets.

Target keys should be unique cluster-wide, e.g. ``"api-lb/api-1"``, so that
equal target ids in different load balancers spread independently.

``Assigner`` keeps the per-node hash state for a fixed membership (a node
prefix hashed once, copied per target), for the loop that recomputes every
assignment when membership changes; the functions are one-shot shorthands.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Sequence

__all__ = ["Assigner", "probers_for", "score", "targets_for"]

_DIGEST_SIZE = 8


def score(node_id: str, target_key: str) -> int:
    """The rendezvous score of ``node_id`` for ``target_key`` (stable across processes)."""
    h = hashlib.blake2b(node_id.encode() + b"\0", digest_size=_DIGEST_SIZE)
    h.update(target_key.encode())
    return int.from_bytes(h.digest(), "big")


class Assigner:
    """Rendezvous assignment over one set of live nodes (see module doc)."""

    __slots__ = ("nodes", "r", "_prefixes")

    def __init__(self, live_nodes: Iterable[str], r: int) -> None:
        if r < 1:
            raise ValueError("r must be at least 1")
        #: Distinct live nodes, in the order given.
        self.nodes: tuple[str, ...] = tuple(dict.fromkeys(live_nodes))
        self.r = r
        self._prefixes = [
            (n, hashlib.blake2b(n.encode() + b"\0", digest_size=_DIGEST_SIZE)) for n in self.nodes
        ]

    def probers_for(self, target_key: str) -> list[str]:
        """The ``min(r, nodes)`` probers of ``target_key``, best score first."""
        key = target_key.encode()
        scored = []
        for node, prefix in self._prefixes:
            h = prefix.copy()
            h.update(key)
            scored.append((int.from_bytes(h.digest(), "big"), node))
        if self.r >= len(scored):
            scored.sort(reverse=True)
            return [n for _, n in scored]
        return [n for _, n in heapq.nlargest(self.r, scored)]

    def targets_for(self, node_id: str, targets: Iterable[str]) -> list[str]:
        """The targets (in the order given) that ``node_id`` probes."""
        if node_id not in self.nodes:
            return []
        return [t for t in targets if node_id in self.probers_for(t)]

    def assignment(self, targets: Iterable[str]) -> dict[str, list[str]]:
        """Every target's probers."""
        return {t: self.probers_for(t) for t in targets}


def probers_for(target_key: str, live_nodes: Sequence[str], r: int) -> list[str]:
    """The ``min(r, len(set(live_nodes)))`` nodes that probe ``target_key``, best first."""
    return Assigner(live_nodes, r).probers_for(target_key)


def targets_for(
    node_id: str, targets: Iterable[str], live_nodes: Sequence[str], r: int
) -> list[str]:
    """The targets that ``node_id`` probes when ``live_nodes`` are live."""
    return Assigner(live_nodes, r).targets_for(node_id, targets)
