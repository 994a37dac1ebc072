"""A custom balancing algorithm: the reference document's LeastConnections.

Load it from the config with::

    algorithm: "examples.custom_algorithm:LeastConnections"

The class is imported once and instantiated without arguments. It needs a
``select`` method; ``record`` is optional. Because this one defines
``record``, the data path reports request starts and ends to it, and it keeps
its own view of each target's open connections instead of reading
``target.active`` (the built-in ``least_connections`` reads ``active``
directly and is the one to use in production; this file shows the plug-in
interface).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from lbnode.policy.balancing import Metrics, TargetLike

T = TypeVar("T", bound=TargetLike)


class LeastConnections:
    """Pick the target with the fewest connections last reported."""

    wants_record = True

    def __init__(self) -> None:
        self.connections: dict[str, int] = {}

    def select(self, targets: Sequence[T], key: str | None = None) -> T | None:
        """The target with the fewest recorded connections (first on ties)."""
        if not targets:
            return None
        get = self.connections.get
        return min(targets, key=lambda t: get(t.id, 0))

    def record(self, target: TargetLike, metrics: Metrics) -> None:
        """Remember the connection count the data path reports."""
        self.connections[target.id] = metrics.active_connections
