"""Shared state across the nodes of a cluster: rate limits and sticky pins.

* ``view``: ``ClusterView``, what this node knows (its id, whether Redis is
  reachable, how many nodes are live, its cluster clock offset).
* ``ratelimit``: ``ClusterRateLimiter`` + ``RateSync`` (``cluster`` mode:
  local decisions, deltas batched on ``lb:{NAME}:state``) and
  ``StrictRateLimiter`` (``strict`` mode: one atomic Redis script a request).
* ``pins``: ``AsyncPinStore`` for the data path; ``LocalPinStore``
  (standalone) and ``SharedPinStore`` (Redis with a local cache).

See docs/cluster.md ("Shared rate limits", "Sticky sessions") for the bounds and
the failure modes.
"""

from __future__ import annotations

from .pins import AsyncPinStore, LocalPinStore, SharedPinStore
from .ratelimit import ClusterRateLimiter, RateSync, StrictRateLimiter, default_cap
from .view import ClusterView

__all__ = [
    "AsyncPinStore",
    "ClusterRateLimiter",
    "ClusterView",
    "LocalPinStore",
    "RateSync",
    "SharedPinStore",
    "StrictRateLimiter",
    "default_cap",
]
