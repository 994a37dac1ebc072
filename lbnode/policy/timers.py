"""Coarse deadlines for the data path's waits: a timer wheel (pure, clock passed in).

A proxied request waits twice: for the client's next request (the idle or
request-header timeout) and for the upstream's answer (the upstream response
timeout). A trio cancel scope per wait costs about 9 µs to enter and leave,
which was close to a tenth of a node's CPU per request. Instead, each
connection enters one cancel scope for its whole life, and its waits only
``arm`` and ``disarm`` a deadline here: O(1), a set insertion and removal in
the bucket of the deadline's time slot. One task per node calls ``expire``
every ``resolution`` seconds and fires what is due, which cancels that
connection's scope. HAProxy and nginx time their connections the same way
(timers checked by the event loop, not a timer per operation).

A timer fires no earlier than its deadline and at most one slot plus one
tick of the calling task after it: 0.1 s late with the default resolution.

Timers are any objects with a writable ``timer_slot`` attribute (0 when not
armed) and a ``fire()`` method; the wheel never calls ``fire`` itself.
"""

from __future__ import annotations

import math
from typing import Protocol

#: Seconds per slot; also how often the node's timer task runs.
RESOLUTION = 0.05


class Timer(Protocol):
    timer_slot: int

    def fire(self) -> None: ...


class TimerWheel:
    __slots__ = ("resolution", "_buckets", "_done")

    def __init__(self, now: float, resolution: float = RESOLUTION) -> None:
        if resolution <= 0:
            raise ValueError("resolution must be positive")
        self.resolution = resolution
        self._buckets: dict[int, set[Timer]] = {}
        self._done = math.floor(now / resolution)  # every slot up to this one has expired

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def arm(self, timer: Timer, deadline: float) -> None:
        """Fire ``timer`` once ``deadline`` has passed (re-arming moves it)."""
        if timer.timer_slot:
            self.disarm(timer)
        if deadline == math.inf:
            return
        # The first slot whose start is at or past the deadline.
        slot = max(math.ceil(deadline / self.resolution), self._done + 1)
        bucket = self._buckets.get(slot)
        if bucket is None:
            bucket = self._buckets[slot] = set()
        bucket.add(timer)
        timer.timer_slot = slot

    def disarm(self, timer: Timer) -> None:
        slot = timer.timer_slot
        if slot:
            bucket = self._buckets.get(slot)
            if bucket is not None:
                bucket.discard(timer)
                if not bucket:
                    del self._buckets[slot]
            timer.timer_slot = 0

    def expire(self, now: float) -> list[Timer]:
        """The timers whose deadline has passed by ``now``, disarmed."""
        upto = math.floor(now / self.resolution)
        if upto <= self._done:
            return []
        if upto - self._done <= len(self._buckets):
            due = [s for s in range(self._done + 1, upto + 1) if s in self._buckets]
        else:  # a long gap (a stalled loop, a test clock): walk the buckets instead
            due = sorted(s for s in self._buckets if s <= upto)
        self._done = upto
        fired: list[Timer] = []
        for s in due:
            for timer in self._buckets.pop(s):
                timer.timer_slot = 0
                fired.append(timer)
        return fired
