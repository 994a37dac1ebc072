"""Weighted traffic splits (canaries): does this rule take this client?

Theory of operation
-------------------
A rule with ``weight: N`` takes N percent of the requests it matches; the
rest fall through to later rules and finally to the load balancer's own
targets. The choice must be *sticky per client* and *identical on every
node*, so it is not random: the split key (``split_key``: ``client_ip`` by
default, or ``cookie:NAME`` / ``header:NAME`` / any key of
``lbnode.policy.keys``) is hashed together with the rule's name into a bucket
``0 .. 9999``, and the rule takes the request when ``bucket < N * 100``.

* Stable across processes and restarts: BLAKE2b (8-byte digest) of
  ``rule_name + "\\0" + key`` as UTF-8, not Python's salted ``hash()``.
* Independent per rule: the rule name is part of the hash input, so a
  client in the 10 % of one canary is not automatically in the 10 % of the
  next one.
* Monotonic in N: a client in the canary at 10 % stays in it when the
  operator raises the weight to 20 % (its bucket does not move).
* Missing key value (no such cookie yet): the client IP is used instead, so
  a first visit is still split deterministically.

The 64-bit digest reduced modulo 10,000 has a bias below 10^-15; over
100,000 distinct clients the share taken is within a fraction of a
percentage point of N (binomial standard deviation at most 0.16 points).
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Final

from .keys import KeySpec
from .request import RequestView

__all__ = ["SPLIT_BUCKETS", "Split", "split_bucket"]

#: Buckets a key hashes into; weight N percent takes buckets below N * 100.
SPLIT_BUCKETS: Final = 10_000


def split_bucket(rule_name: str, key: str) -> int:
    """The split bucket (0..9999) of ``key`` for rule ``rule_name``."""
    digest = blake2b(f"{rule_name}\0{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SPLIT_BUCKETS


class Split:
    """The weight check of one rule. Immutable; build once per config."""

    __slots__ = ("rule_name", "weight", "key_spec", "_threshold", "_client_ip_key")

    rule_name: str
    weight: int
    key_spec: KeySpec
    _threshold: int
    _client_ip_key: bool

    def __init__(self, rule_name: str, weight: int, split_key: str | KeySpec = "client_ip") -> None:
        if not 0 <= weight <= 100:
            raise ValueError(f"weight must be 0..100, got {weight}")
        spec = split_key if isinstance(split_key, KeySpec) else KeySpec.parse(split_key)
        object.__setattr__(self, "rule_name", rule_name)
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "key_spec", spec)
        object.__setattr__(self, "_threshold", weight * (SPLIT_BUCKETS // 100))
        object.__setattr__(self, "_client_ip_key", spec.kind == "client_ip")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Split is immutable")

    def __repr__(self) -> str:
        return f"Split({self.rule_name!r}, {self.weight}, {str(self.key_spec)!r})"

    def key_of(self, req: RequestView) -> str:
        """The split key of ``req``, falling back to the client IP."""
        if self._client_ip_key:
            return req.client_ip
        return self.key_spec.extract(req) or req.client_ip

    def takes_key(self, key: str) -> bool:
        """True if the rule takes a client whose split key is ``key``."""
        threshold = self._threshold
        if threshold >= SPLIT_BUCKETS:
            return True
        if threshold <= 0:
            return False
        return split_bucket(self.rule_name, key) < threshold

    def takes(self, req: RequestView) -> bool:
        """True if the rule takes ``req`` (its conditions already matched)."""
        return self.takes_key(self.key_of(req))
