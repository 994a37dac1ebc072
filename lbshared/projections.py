"""Projections: pure reducers that fold events into state, the same way on every node.

Theory of operation
-------------------
Config changes are events (``LbConfig``, ``LbDeleted``), each carrying a
version taken from ``INCR lb:seq``: globally unique and increasing. The
config of the cluster is what you get by folding them, and folding is
designed so that *how* a node saw the events does not matter:

* For each load balancer only the event with the highest version counts. An
  event whose version is not above the one held for its name is ignored, so
  replays (a reconnect re-reading part of a stream, a snapshot followed by
  the stream it summarises) are harmless, and events of different load
  balancers commute.
* A deletion is remembered as a *tombstone* (name -> version of the
  deletion), so an older ``LbConfig`` replayed after it cannot bring the load
  balancer back.

With unique versions the fold is a max per name, hence commutative,
associative and idempotent: any interleaving of any replays of the same
events gives the same ``ConfigState``. (Two events for one name with the
same version cannot come from ``publish_config``; if they did, the first one
folded would win.)

``ConfigState`` is immutable; ``fold_config`` returns a new one (or the same
object when the event changes nothing, so ``new is old`` is a cheap "nothing
to do" test for the node). Config events are rare, so copying the small
per-name maps on a change costs nothing that matters.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from lbshared.config import Config, LoadBalancer
from lbshared.events import LbConfig, LbDeleted

__all__ = ["EMPTY", "ConfigProjection", "ConfigState", "changed_names", "fold_all", "fold_config"]


@dataclass(frozen=True, slots=True)
class ConfigState:
    """The cluster's config as folded so far.

    ``lbs`` maps each existing load balancer's name to ``(version, LoadBalancer)``;
    ``deleted`` maps each deleted name to the version of its deletion (a
    tombstone); ``version`` is the highest config version folded (deletions
    included): the node's "applied config version".
    """

    lbs: Mapping[str, tuple[int, LoadBalancer]] = field(default_factory=dict)
    deleted: Mapping[str, int] = field(default_factory=dict)
    version: int = 0

    def held_version(self, name: str) -> int:
        """The version held for ``name``: its config's, its deletion's, or 0."""
        entry = self.lbs.get(name)
        if entry is not None:
            return entry[0]
        return self.deleted.get(name, 0)

    def get(self, name: str) -> LoadBalancer | None:
        """The load balancer named ``name``, if it exists."""
        entry = self.lbs.get(name)
        return entry[1] if entry is not None else None

    def __contains__(self, name: object) -> bool:
        return name in self.lbs

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.lbs))

    def __len__(self) -> int:
        return len(self.lbs)

    def to_config(self) -> Config:
        """The existing load balancers as one ``Config``, sorted by name.

        Each load balancer was validated on its own when it was published;
        the cross-checks between load balancers (a port used by two of them)
        are not run again here, so a cluster that ended up that way still
        yields its config and the node reports the clash when it binds.
        """
        lbs = [self.lbs[name][1] for name in sorted(self.lbs)]
        return Config.model_construct(load_balancers=lbs)


#: The state before any event.
EMPTY = ConfigState()


def fold_config(state: ConfigState, event: Any) -> ConfigState:
    """Fold one event into ``state``; anything but a newer config event returns ``state`` itself."""
    if isinstance(event, LbConfig):
        name = event.lb
        if event.version <= state.held_version(name):
            return state
        lbs = dict(state.lbs)
        lbs[name] = (event.version, event.config)
        deleted = state.deleted
        if name in deleted:
            deleted = {k: v for k, v in deleted.items() if k != name}
        return ConfigState(lbs, deleted, max(state.version, event.version))
    if isinstance(event, LbDeleted):
        name = event.lb
        if event.version <= state.held_version(name):
            return state
        lbs = {k: v for k, v in state.lbs.items() if k != name}
        deleted = {**state.deleted, name: event.version}
        return ConfigState(lbs, deleted, max(state.version, event.version))
    return state


def fold_all(events: Iterable[Any], state: ConfigState = EMPTY) -> ConfigState:
    """Fold ``events`` in order, starting from ``state``."""
    for event in events:
        state = fold_config(state, event)
    return state


def changed_names(old: ConfigState, new: ConfigState) -> tuple[set[str], set[str]]:
    """``(created or replaced, removed)`` names between two states: what a node must rebuild."""
    changed = {name for name, entry in new.lbs.items() if old.lbs.get(name) != entry}
    removed = {name for name in old.lbs if name not in new.lbs}
    return changed, removed


class ConfigProjection:
    """The config fold as an object: ``initial`` and ``fold(state, event)``."""

    initial = EMPTY

    @staticmethod
    def fold(state: ConfigState, event: Any) -> ConfigState:
        """See ``fold_config``."""
        return fold_config(state, event)
