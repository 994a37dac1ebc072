"""The live health event feed: bounded history plus bounded subscribers.

Every health or breaker transition the node learns (from its own decisions
in standalone mode, from the cluster's health streams in cluster mode) is
published here as one JSON-ready dict ``{"id", "type", "lb", "target",
"reason", "at", "node"}``. ``id`` is the stream id (``ms-seq``), the token a
subscriber resumes from.

A subscriber gets a bounded queue. Publishing never waits: a subscriber
whose queue is full is cut off (its iterator raises ``FeedOverflow``), so a
slow websocket client can never slow the node. History is bounded too; a
resume token older than the history (or than the cluster stream, which the
cluster agent serves through ``history``) yields what is still kept.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

FEED_TYPES = ("healthy", "unhealthy", "circuit_open", "circuit_half_open", "circuit_closed")
HISTORY = 1000
QUEUE_SIZE = 256

FeedEvent = dict[str, Any]


class FeedOverflow(Exception):
    """The subscriber fell too far behind and was disconnected."""


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return (0, 0)


class Subscription:
    def __init__(self, feed: HealthFeed, lb: str | None, size: int) -> None:
        self.feed = feed
        self.lb = lb
        self.send, self.recv = trio.open_memory_channel[FeedEvent](size)
        self.overflowed = False

    def offer(self, event: FeedEvent) -> None:
        if self.overflowed or (self.lb is not None and event.get("lb") != self.lb):
            return
        try:
            self.send.send_nowait(event)
        except trio.WouldBlock:
            self.overflowed = True
            self.send.close()

    def close(self) -> None:
        self.feed._subs.discard(self)
        self.send.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> FeedEvent:
        # A plain iterator, not an async generator: a subscriber cancelled
        # mid-iteration leaves nothing to finalise.
        try:
            return await self.recv.receive()
        except trio.EndOfChannel:
            if self.overflowed:
                raise FeedOverflow("subscriber queue full") from None
            raise StopAsyncIteration from None


class HealthFeed:
    """In-process pub/sub of health events."""

    def __init__(self, node_id: str, history: int = HISTORY) -> None:
        self.node_id = node_id
        self._history: deque[FeedEvent] = deque(maxlen=history)
        self._subs: set[Subscription] = set()
        self._seq = itertools.count()
        self._last_ms = 0
        # The cluster agent replaces this with a reader of the Redis streams.
        self.history_source: Callable[[str, str | None], Awaitable[list[FeedEvent]]] | None = None

    def next_id(self) -> str:
        ms = max(int(time.time() * 1000), self._last_ms)
        if ms != self._last_ms:
            self._last_ms = ms
            self._seq = itertools.count()
        return f"{ms}-{next(self._seq)}"

    def publish(self, event: FeedEvent) -> None:
        """Deliver one event (with its ``id``) to history and subscribers."""
        if "id" not in event:
            event = {"id": self.next_id(), **event}
        self._history.append(event)
        for sub in list(self._subs):
            sub.offer(event)
            if sub.overflowed:
                self._subs.discard(sub)

    def emit(self, type_: str, lb: str, target: str, reason: str, node: str | None = None) -> FeedEvent:
        event = {
            "id": self.next_id(),
            "type": type_,
            "lb": lb,
            "target": target,
            "reason": reason,
            "at": round(time.time(), 3),
            "node": node or self.node_id,
        }
        self.publish(event)
        return event

    async def history(self, since: str, lb: str | None = None) -> list[FeedEvent]:
        """Kept events after ``since`` ("0": all of them), oldest first."""
        if self.history_source is not None:
            return await self.history_source(since, lb)
        after = _id_key(since)
        return [
            e
            for e in self._history
            if _id_key(e["id"]) > after and (lb is None or e.get("lb") == lb)
        ]

    def subscribe(self, lb: str | None = None, size: int = QUEUE_SIZE) -> Subscription:
        sub = Subscription(self, lb, size)
        self._subs.add(sub)
        return sub

    @property
    def subscribers(self) -> int:
        return len(self._subs)
