"""What this node knows about the cluster, read by the shared-state code.

``ClusterView`` is one small mutable object per node, shared by every
limiter and pin store of every load balancer the node serves. The node's
heartbeat/connection code writes it (``degraded`` when Redis cannot be
reached, ``live_nodes`` from the heartbeat table); the data path only reads
it, with plain attribute loads, so flipping ``degraded`` takes effect on the
very next request.

``clock_offset`` maps this node's monotonic clock onto epoch time: the
rate-limit windows of ``cluster`` mode run on ``monotonic() + clock_offset``
("cluster time"), which never jumps (it is the monotonic clock) yet is
aligned with every other node's buckets to within their NTP skew, so a
``rate_delta`` bucket start sent by one node lands in the same sub-bucket on
another (see ``lbnode.cluster.ratelimit``). It is computed once, when the
view is built; tests pass ``0.0`` and drive a fake clock.

``stream_tail`` is what the shared-state followers (rate deltas, pin
notices) use to start reading ``lb:{NAME}:state`` "from now on" after each
(re)connect.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lbshared.redis_trio import RedisClient

__all__ = ["ClusterView", "stream_tail"]


class ClusterView:
    """This node's id, whether Redis is reachable, and how many nodes are live."""

    __slots__ = ("node_id", "degraded", "live_nodes", "clock_offset")

    def __init__(
        self,
        node_id: str,
        degraded: bool = False,
        live_nodes: int = 1,
        clock_offset: float | None = None,
    ) -> None:
        self.node_id = node_id
        #: True while Redis is unreachable: shared state degrades to per-node decisions.
        self.degraded = degraded
        #: Live nodes (heartbeats under 3 s old), this one included; at least 1.
        self.live_nodes = live_nodes
        #: epoch seconds - monotonic seconds, fixed for the life of the process.
        self.clock_offset = (
            time.time() - time.monotonic() if clock_offset is None else float(clock_offset)
        )

    def __repr__(self) -> str:
        return (
            f"ClusterView({self.node_id!r}, degraded={self.degraded}, "
            f"live_nodes={self.live_nodes})"
        )

    @property
    def share_divisor(self) -> int:
        """``live_nodes`` clamped to at least 1 (the heartbeat table may be empty)."""
        n = self.live_nodes
        return n if n > 1 else 1


async def stream_tail(client: RedisClient, stream: str) -> str:
    """The id of the last entry of ``stream`` (``"0-0"`` if none): what ``"$"`` means now.

    The shared-state followers resolve ``"$"`` once after each (re)connect and
    read on from that id, so nothing appended between two reads is missed.
    """
    last = await client.execute("XREVRANGE", stream, "+", "-", "COUNT", "1")
    if not last:
        return "0-0"
    entry_id = last[0][0]
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
