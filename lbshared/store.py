"""The event log: append events to named streams and read them back by resume id.

Theory of operation
-------------------
A node sees the cluster through one interface, ``EventLog``:

* ``append(stream, event) -> id`` writes one event; ``id`` is ``"ms-seq"``
  like a Redis stream id: milliseconds, then a sequence within the
  millisecond. Ids of one stream only grow.
* ``read(positions, block=..., count=...)`` returns ``(stream, id, event)``
  for the entries *after* the id given per stream (``"0"``: from the start,
  ``"$"``: only entries appended from now on), at most ``count`` per stream,
  waiting up to ``block`` seconds for the first one when none is ready.
  ``positions`` is updated in place to the last id read of each stream -
  bad entries included, which are skipped and counted in ``skipped`` - so a
  reader loops on the same dict and never re-reads or misses an entry.
* ``first_id(stream)`` is the oldest id still kept. A reader whose resume id
  is older has possibly missed trimmed entries and must reload from the
  snapshot instead (``load_snapshot``).

``MemoryEventLog`` is the standalone node's log: plain lists per stream, a
bounded number of entries kept per stream, readers woken by a ``trio.Event``
that each append sets and replaces (no polling). ``RedisEventLog`` is the
cluster's: ``XADD`` with the trimming the contract gives each kind of stream,
``XREAD`` (``BLOCK`` on a dedicated connection), entries decoded with
``lbshared.events.decode``.

``RedisEventLog`` does not hide Redis trouble: ``RedisUnavailable`` and
``RedisTimeout`` from ``lbshared.redis_trio`` reach the caller, whose follow
loop backs off and retries from the same ``positions`` (nothing is lost: the
ids are the resume tokens). Entries of ``lb:registry:events`` are not
envelope events; ``read`` returns them as ``RegistryNotice`` objects, so a
node can follow the registry and its config streams in one blocking read.

The Redis key layout (``docs/architecture.md``, the cluster contract) is
spelled out once here as functions, so no module formats a key by hand.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

import trio

from lbshared.events import (
    BadEvent,
    Event,
    Heartbeat,
    RegistryNotice,
    SkipCounter,
    Snapshot,
    decode,
    decode_notice,
    encode,
)
from lbshared.projections import EMPTY, ConfigState, fold_config
from lbshared.redis_trio import ReplyError

if TYPE_CHECKING:
    from lbshared.redis_trio import BlockingConnection, RedisClient

__all__ = [
    "CONFIG_RETENTION", "DEFAULT_MAXLEN", "LIVE_WINDOW", "NODES_KEY", "NODE_EXPIRY",
    "REGISTRY_EVENTS_KEY", "REGISTRY_KEY", "SEQ_KEY", "STATE_RETENTION", "EventLog",
    "MemoryEventLog", "Record", "RedisEventLog", "config_stream", "format_id", "health_stream",
    "load_config_state", "load_heartbeats", "load_registry", "load_snapshot", "meta_key",
    "parse_id", "ratelimit_key", "snapshot_key", "state_stream", "sticky_key",
]  # fmt: skip

#: What a read returns per entry: an event, or (from ``lb:registry:events`` only) a notice.
Record = Event | RegistryNotice

# -- the key layout ----------------------------------------------------------------------------

#: ``INCR`` gives every config change its version.
SEQ_KEY = "lb:seq"
#: HASH name -> version of every existing load balancer.
REGISTRY_KEY = "lb:registry"
#: STREAM of {type, lb, version} notifications of config changes.
REGISTRY_EVENTS_KEY = "lb:registry:events"
#: HASH node id -> JSON heartbeat.
NODES_KEY = "lb:nodes"

#: Config streams keep this many seconds of history (trimmed on every XADD).
CONFIG_RETENTION = 7 * 86400.0
#: Shared-state streams keep this many seconds.
STATE_RETENTION = 120.0
#: Other streams (health, registry events) keep about this many entries.
DEFAULT_MAXLEN = 10_000
#: A node is live while its last heartbeat is younger than this (seconds).
LIVE_WINDOW = 3.0
#: Heartbeats older than this (seconds) are deleted by whoever reads them.
NODE_EXPIRY = 60.0


def meta_key(name: str) -> str:
    """HASH version, updated_at, updated_by of load balancer ``name``."""
    return f"lb:{{{name}}}:meta"


def config_stream(name: str) -> str:
    """STREAM of ``name``'s config events."""
    return f"lb:{{{name}}}:config"


def snapshot_key(name: str) -> str:
    """STRING JSON snapshot of ``name`` after its last config event."""
    return f"lb:{{{name}}}:snapshot"


def state_stream(name: str) -> str:
    """STREAM of ``name``'s shared-state deltas (rate limits, pins)."""
    return f"lb:{{{name}}}:state"


def health_stream(name: str) -> str:
    """STREAM of ``name``'s health and breaker transitions."""
    return f"lb:{{{name}}}:health"


def sticky_key(name: str, rule: str, session: str) -> str:
    """STRING target id of a sticky session (``rule`` ``""`` = the LB-level block)."""
    return f"lb:{{{name}}}:sticky:{rule}:{session}"


def ratelimit_key(name: str, limiter: str, key: str) -> str:
    """Strict-mode rate-limit sorted set (``limiter`` ``""`` = the LB-level limit)."""
    return f"lb:{{{name}}}:rl:{limiter}:{key}"


def stats_key(name: str) -> str:
    """HASH node id -> JSON stats summary of ``name`` (for lbctl status/metrics)."""
    return f"lb:{{{name}}}:stats"


def healthstate_key(name: str) -> str:
    """HASH of committed health and breaker generations and states of ``name``'s targets."""
    return f"lb:{{{name}}}:healthstate"


def overrides_key(name: str) -> str:
    """HASH target -> ``up``/``down`` of ``name`` (absent = ``auto``)."""
    return f"lb:{{{name}}}:overrides"


def trial_key(name: str, target: str) -> str:
    """STRING: the node holding the half-open trial lease of ``target``."""
    return f"lb:{{{name}}}:trial:{target}"


def parse_id(entry_id: str) -> tuple[int, int]:
    """``"ms-seq"`` (or ``"ms"``, seq 0) -> ``(ms, seq)``; ``ValueError`` if malformed."""
    ms, dash, seq = entry_id.partition("-")
    if not (ms.isascii() and ms.isdigit()) or (dash and not (seq.isascii() and seq.isdigit())):
        raise ValueError(f"{entry_id!r} is not a stream id (ms-seq)")
    return int(ms), int(seq) if dash else 0


def format_id(pair: tuple[int, int]) -> str:
    """``(ms, seq)`` -> ``"ms-seq"``."""
    return f"{pair[0]}-{pair[1]}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# -- the interface -----------------------------------------------------------------------------


class EventLog(Protocol):
    """Named append-only streams of events (see the module docstring)."""

    skipped: SkipCounter

    async def append(self, stream: str, event: Event) -> str:
        """Append ``event`` to ``stream``; return its id."""
        ...

    async def read(
        self, positions: dict[str, str], *, block: float | None = None, count: int = 1000
    ) -> list[tuple[str, str, Record]]:
        """Entries after ``positions[stream]`` per stream; advances ``positions`` in place."""
        ...

    async def first_id(self, stream: str) -> str | None:
        """The oldest id kept in ``stream``; ``None`` when it is empty or does not exist."""
        ...


def _wait_seconds(block: float | None) -> float:
    """``block`` as a non-negative number of seconds (``None`` and 0: do not wait)."""
    if block is None:
        return 0.0
    if math.isnan(block) or block < 0:
        raise ValueError(f"block must be None or >= 0 seconds, not {block!r}")
    return block


# -- in process --------------------------------------------------------------------------------


class _Stream:
    """One in-memory stream: entries ``[start:]`` of ``entries`` are the kept ones."""

    __slots__ = ("keys", "entries", "start", "last")

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []
        self.entries: list[tuple[str, Record]] = []
        self.start = 0
        self.last = (0, 0)

    def after(self, pos: tuple[int, int], count: int) -> list[tuple[str, Record]]:
        i = max(bisect.bisect_right(self.keys, pos), self.start)
        return self.entries[i : i + count]


class MemoryEventLog:
    """The in-process event log of a standalone node (and of tests).

    Each stream keeps its last ``maxlen`` entries (``maxlen_for(stream)``
    may give a stream its own bound). ``clock`` gives epoch seconds for the
    ids. Events are kept as objects: nothing is encoded, so ``skipped`` stays
    at zero; it exists for the interface.
    """

    def __init__(
        self,
        *,
        maxlen: int = DEFAULT_MAXLEN,
        maxlen_for: Callable[[str], int | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        self.maxlen = maxlen
        self._maxlen_for = maxlen_for
        self._clock = clock
        self._streams: dict[str, _Stream] = {}
        self._changed = trio.Event()
        self.skipped = SkipCounter()

    def _bound(self, stream: str) -> int:
        if self._maxlen_for is not None:
            bound = self._maxlen_for(stream)
            if bound is not None:
                return max(1, bound)
        return self.maxlen

    async def append(self, stream: str, event: Event) -> str:
        """Append ``event``; wake every waiting reader."""
        await trio.lowlevel.checkpoint()
        s = self._streams.get(stream)
        if s is None:
            s = self._streams[stream] = _Stream()
        ms = int(self._clock() * 1000)
        key = (ms, 0) if ms > s.last[0] else (s.last[0], s.last[1] + 1)
        entry_id = format_id(key)
        s.keys.append(key)
        s.entries.append((entry_id, event))
        s.last = key
        overflow = len(s.keys) - s.start - self._bound(stream)
        if overflow > 0:
            s.start += overflow
            if s.start >= 1024 and s.start * 2 >= len(s.keys):
                del s.keys[: s.start]
                del s.entries[: s.start]
                s.start = 0
        self._changed.set()
        self._changed = trio.Event()
        return entry_id

    def _collect(self, positions: dict[str, str], count: int) -> list[tuple[str, str, Record]]:
        out: list[tuple[str, str, Record]] = []
        for stream, pos in positions.items():
            s = self._streams.get(stream)
            if s is None:
                continue
            batch = s.after(parse_id(pos), count)
            if batch:
                out.extend((stream, entry_id, event) for entry_id, event in batch)
                positions[stream] = batch[-1][0]
        return out

    async def read(
        self, positions: dict[str, str], *, block: float | None = None, count: int = 1000
    ) -> list[tuple[str, str, Record]]:
        """See ``EventLog.read``; ``block`` in seconds (``math.inf``: until an entry comes)."""
        wait = _wait_seconds(block)
        if count < 1:
            raise ValueError("count must be at least 1")
        for stream, pos in positions.items():
            if pos == "$":
                s = self._streams.get(stream)
                positions[stream] = format_id(s.last if s is not None else (0, 0))
            else:
                parse_id(pos)
        await trio.lowlevel.checkpoint()
        out = self._collect(positions, count)
        if out or wait == 0:
            return out
        with trio.move_on_after(wait):
            while True:
                await self._changed.wait()
                out = self._collect(positions, count)
                if out:
                    return out
        return out

    async def first_id(self, stream: str) -> str | None:
        """See ``EventLog.first_id``."""
        await trio.lowlevel.checkpoint()
        s = self._streams.get(stream)
        if s is None or s.start >= len(s.entries):
            return None
        return s.entries[s.start][0]


# -- Redis -------------------------------------------------------------------------------------


def _pairs(reply: Any) -> Iterable[tuple[Any, Any]]:
    """A RESP2 flat ``[k, v, k, v]`` list or a RESP3 map as ``(k, v)`` pairs."""
    if isinstance(reply, dict):
        return reply.items()
    if reply is None:
        return ()
    return zip(reply[0::2], reply[1::2], strict=True)


def _stream_batches(reply: Any) -> Iterable[tuple[Any, Any]]:
    """XREAD's reply (RESP2 list of [name, entries] or RESP3 map) as ``(name, entries)``."""
    if reply is None:
        return ()
    if isinstance(reply, dict):
        return reply.items()
    return ((item[0], item[1]) for item in reply)


class RedisEventLog:
    """The cluster's event log on Redis streams, over ``lbshared.redis_trio.RedisClient``.

    Trimming on ``append`` follows the stream's kind: config streams keep
    ``config_retention`` seconds (``MINID ~``), state streams
    ``state_retention`` seconds, every other stream about ``maxlen`` entries
    (``MAXLEN ~``). The ``MINID`` horizon is measured on the *server's*
    clock - the time in the id of this log's latest append - never on the
    node's: a node whose clock runs minutes ahead of Redis would otherwise trim
    away the entries it just wrote. (So the very first append trims nothing.)
    Entries that do not decode are skipped and counted in ``skipped``.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        config_retention: float = CONFIG_RETENTION,
        state_retention: float = STATE_RETENTION,
        maxlen: int = DEFAULT_MAXLEN,
        skipped: SkipCounter | None = None,
    ) -> None:
        self.client = client
        self.config_retention = config_retention
        self.state_retention = state_retention
        self.maxlen = maxlen
        self.skipped = skipped if skipped is not None else SkipCounter()
        self._server_ms: int | None = None
        self._idle: list[tuple[AbstractAsyncContextManager[BlockingConnection],
                               BlockingConnection]] = []  # fmt: skip
        self._closed = False

    def trim_args(self, stream: str) -> list[str]:
        """The ``XADD`` trimming arguments for ``stream`` (see the class docstring)."""
        if stream.endswith(":config"):
            retention = self.config_retention
        elif stream.endswith(":state"):
            retention = self.state_retention
        else:
            return ["MAXLEN", "~", str(self.maxlen)]
        if self._server_ms is None:
            return []
        return ["MINID", "~", f"{max(0, self._server_ms - int(retention * 1000))}-0"]

    async def append(self, stream: str, event: Event) -> str:
        """``XADD`` ``event`` to ``stream`` with its trimming; return the id.

        Config changes go through ``lbshared.publish`` instead, which also
        keeps the version and the snapshot in step.
        """
        fields = encode(event)
        args: list[str] = ["XADD", stream, *self.trim_args(stream), "*"]
        for key, value in fields.items():
            args += (key, value)
        entry_id = _text(await self.client.execute(*args))
        ms = parse_id(entry_id)[0]
        if self._server_ms is None or ms > self._server_ms:
            self._server_ms = ms
        return entry_id

    async def read(
        self, positions: dict[str, str], *, block: float | None = None, count: int = 1000
    ) -> list[tuple[str, str, Record]]:
        """See ``EventLog.read``; a blocking read uses a dedicated connection."""
        wait = _wait_seconds(block)
        if count < 1:
            raise ValueError("count must be at least 1")
        if not positions:
            return []
        for stream, pos in positions.items():
            if pos == "$":
                # Resolved now, so entries appended between this read and the next are not lost.
                last = await self.client.execute("XREVRANGE", stream, "+", "-", "COUNT", "1")
                positions[stream] = _text(last[0][0]) if last else "0-0"
            else:
                parse_id(pos)
        deadline = trio.current_time() + wait
        while True:
            streams = list(positions)
            ids = [positions[s] for s in streams]
            remaining = deadline - trio.current_time()
            if wait == 0 or remaining <= 0:
                reply = await self.client.execute(
                    "XREAD", "COUNT", str(count), "STREAMS", *streams, *ids
                )
            else:
                ms = "0" if math.isinf(remaining) else str(max(1, math.ceil(remaining * 1000)))
                reply = await self._blocking_call(
                    math.inf if math.isinf(remaining) else remaining + self.client.call_timeout,
                    "XREAD", "BLOCK", ms, "COUNT", str(count), "STREAMS", *streams, *ids,
                )  # fmt: skip
            out, advanced = self._decode_reply(reply, positions)
            if out or not advanced or wait == 0 or trio.current_time() >= deadline:
                return out  # else: only bad entries came; wait on for good ones

    async def _blocking_call(self, limit: float, *args: str) -> Any:
        """Run a blocking command on a pooled dedicated connection (one per concurrent reader)."""
        if self._idle:
            cm, conn = self._idle.pop()
        else:
            cm = self.client.blocking()
            conn = await cm.__aenter__()
        reusable = False
        try:
            reply = await conn.execute(*args, timeout=limit)
            reusable = True
            return reply
        except ReplyError:
            reusable = True  # an error reply leaves the connection in step
            raise
        finally:
            if reusable and not conn.closed and not self._closed:
                self._idle.append((cm, conn))
            else:
                with trio.CancelScope(shield=True):
                    await cm.__aexit__(None, None, None)

    async def aclose(self) -> None:
        """Close the idle blocking connections (the shared client is the caller's to close)."""
        self._closed = True
        idle, self._idle = self._idle, []
        with trio.CancelScope(shield=True):
            for cm, _conn in idle:
                await cm.__aexit__(None, None, None)

    def _decode_reply(
        self, reply: Any, positions: dict[str, str]
    ) -> tuple[list[tuple[str, str, Record]], bool]:
        out: list[tuple[str, str, Record]] = []
        advanced = False
        for raw_name, entries in _stream_batches(reply):
            stream = _text(raw_name)
            for raw_id, raw_fields in entries or ():
                entry_id = _text(raw_id)
                positions[stream] = entry_id
                advanced = True
                try:
                    if raw_fields is None:
                        raise BadEvent("missing field", "entry has no fields")
                    fields = dict(_pairs(raw_fields))
                    event = (
                        decode_notice(fields) if stream == REGISTRY_EVENTS_KEY else decode(fields)
                    )
                except BadEvent as exc:
                    self.skipped.skip(stream, entry_id, exc)
                    continue
                except ValueError:  # an odd-length field list
                    self.skipped.skip(stream, entry_id, BadEvent("missing field", "odd fields"))
                    continue
                out.append((stream, entry_id, event))
        return out, advanced

    async def first_id(self, stream: str) -> str | None:
        """The oldest id kept in ``stream`` (``XRANGE - + COUNT 1``)."""
        reply = await self.client.execute("XRANGE", stream, "-", "+", "COUNT", "1")
        if not reply:
            return None
        return _text(reply[0][0])


# -- snapshots, registry, heartbeats -----------------------------------------------------------


async def load_snapshot(client: RedisClient, name: str) -> Snapshot | None:
    """``lb:{NAME}:snapshot``, or ``None`` if there is none; ``BadEvent`` if it is malformed."""
    raw = await client.execute("GET", snapshot_key(name))
    if raw is None:
        return None
    return Snapshot.from_json(raw)


async def load_registry(client: RedisClient) -> dict[str, int]:
    """``lb:registry``: name -> version of every existing load balancer (bad values skipped)."""
    out: dict[str, int] = {}
    for raw_name, raw_version in _pairs(await client.execute("HGETALL", REGISTRY_KEY)):
        try:
            out[_text(raw_name)] = int(raw_version)
        except ValueError:
            continue
    return out


async def load_config_state(
    client: RedisClient, skipped: SkipCounter | None = None
) -> tuple[ConfigState, dict[str, str]]:
    """The cluster's config from the registry and snapshots, and where to follow each stream.

    Returns the folded state and ``{config_stream(name): snapshot stream_id}``
    for every registered load balancer, ready for ``EventLog.read``. A
    malformed snapshot is counted in ``skipped`` and its stream followed
    from ``"0"`` (the whole kept history) instead.
    """
    state = EMPTY
    positions: dict[str, str] = {}
    for name in sorted(await load_registry(client)):
        try:
            snapshot = await load_snapshot(client, name)
        except BadEvent as exc:
            if skipped is not None:
                skipped.skip(snapshot_key(name), "-", exc)
            snapshot = None
        if snapshot is None:
            positions[config_stream(name)] = "0"
            continue
        state = fold_config(state, snapshot.to_event(name))
        positions[config_stream(name)] = snapshot.stream_id
    return state, positions


async def load_heartbeats(
    client: RedisClient, now: float, *, expiry: float = NODE_EXPIRY
) -> list[Heartbeat]:
    """The heartbeats in ``lb:nodes`` sorted by id; entries older than ``expiry`` are deleted."""
    beats: list[Heartbeat] = []
    stale: list[str] = []
    for raw_id, raw in _pairs(await client.execute("HGETALL", NODES_KEY)):
        node_id = _text(raw_id)
        try:
            beat = Heartbeat.model_validate_json(raw)
        except ValueError:
            continue
        if now - beat.last_heartbeat >= expiry:
            stale.append(node_id)
        else:
            beats.append(beat)
    if stale:
        await client.execute("HDEL", NODES_KEY, *stale)
    return sorted(beats, key=lambda b: b.id)
