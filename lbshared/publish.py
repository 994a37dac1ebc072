"""Publishing config changes: one compare-and-set per change, for lbctl and for seeding nodes.

Theory of operation
-------------------
A config change of load balancer NAME (create, replace, delete) is:

1. ``seq = INCR lb:seq``: the change's version, unique and increasing over
   the whole cluster.
2. ``PUBLISH_SCRIPT`` (one Lua script, so atomic; its keys share the hash tag
   ``{NAME}``, so it also runs on Redis Cluster): if ``lb:{NAME}:meta``'s
   ``version`` is not the version the caller read (``expected_version``,
   0 for "never applied"), it answers ``conflict`` and changes nothing.
   Otherwise it appends the ``lb_config``/``lb_deleted`` event to
   ``lb:{NAME}:config`` (trimming it by time, ``MINID ~``), writes the
   snapshot with the new entry's stream id and bumps the meta version.
   The stream, the snapshot and the version therefore always agree.
3. The registry: ``lb:registry`` NAME -> version (removed on delete), updated
   by ``REGISTRY_SCRIPT`` only if this version is newer than the one there,
   and a notice on ``lb:registry:events``. These keys live in other slots,
   so this step is separate; if another change of NAME overtook ours in
   between, the registry is re-synced from NAME's snapshot.

A conflict raises ``VersionConflict(current)``: someone changed NAME since the
caller read it. The caller decides: ``lbctl apply`` re-reads and retries (a
whole replacement, so the last writer wins); read-modify-write commands
re-read the config and re-apply their change; a node seeding an empty cluster
gives up (someone else seeded it).

If ``lb:seq`` ever falls behind a load balancer's version (a restored or
hand-edited Redis), the script answers ``stale`` rather than publish a
version that nodes would ignore; ``lb:seq`` is then moved past it and the
publish retried.

The same script text and argument builder serve both clients: redis-py's
synchronous ``redis.Redis`` (``publish_config``, used by lbctl) and the trio
``RedisClient`` (``apublish_config``, used by nodes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from lbshared.config import ConfigError, LoadBalancer, lb_to_dict
from lbshared.errors import validation_problems
from lbshared.events import ENVELOPE_VERSION, LbConfig, LbDeleted, encode_data
from lbshared.store import (
    CONFIG_RETENTION,
    DEFAULT_MAXLEN,
    REGISTRY_EVENTS_KEY,
    REGISTRY_KEY,
    SEQ_KEY,
    config_stream,
    meta_key,
    snapshot_key,
)

if TYPE_CHECKING:
    import redis

    from lbshared.redis_trio import RedisClient

__all__ = [
    "PUBLISH_SCRIPT", "REGISTRY_SCRIPT", "VersionConflict", "adelete_lb", "apublish_config",
    "delete_lb", "publish_config",
]  # fmt: skip

#: KEYS = [lb:{N}:meta, lb:{N}:config, lb:{N}:snapshot]; ARGV = [expected_version, seq,
#: origin, now, type, data_json, snapshot_json_without_stream_id, minid].
#: Returns the new stream id, or {"conflict", current} / {"stale", current}.
PUBLISH_SCRIPT = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0') or 0
if current ~= tonumber(ARGV[1]) then
  return {'conflict', tostring(current)}
end
local seq = tonumber(ARGV[2])
if seq <= current then
  return {'stale', tostring(current)}
end
local name = string.match(KEYS[1], '^lb:{(.*)}:meta$')
local id = redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[8], '*',
  'v', '@V@', 'type', ARGV[5], 'lb', name, 'origin', ARGV[3], 'at', ARGV[4], 'data', ARGV[6])
redis.call('SET', KEYS[3], '{"stream_id":"' .. id .. '",' .. string.sub(ARGV[7], 2))
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'updated_at', ARGV[4], 'updated_by', ARGV[3])
return id
""".replace("@V@", ENVELOPE_VERSION)

#: KEYS = [lb:registry]; ARGV = [name, version, "set" | "del"]: applied only if newer.
REGISTRY_SCRIPT = """
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') or 0
if tonumber(ARGV[2]) <= current then
  return 0
end
if ARGV[3] == 'set' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"""

#: Attempts at moving a stale ``lb:seq`` forward before giving up.
_STALE_ATTEMPTS = 3


class VersionConflict(Exception):
    """The load balancer's version is ``current``, not the one the caller expected."""

    def __init__(self, name: str, expected: int, current: int) -> None:
        self.name = name
        self.expected = expected
        self.current = current
        super().__init__(name, expected, current)

    def __str__(self) -> str:
        return (f"{self.name!r} is at version {self.current}, not {self.expected}"
                " (changed by someone else meanwhile)")  # fmt: skip


def _checked(name: str, config: LoadBalancer | Mapping[str, Any] | None) -> LoadBalancer | None:
    """The config validated; ``ConfigError``/``ValueError`` if it cannot be published."""
    if config is None:
        return None
    if not isinstance(config, LoadBalancer):
        try:
            config = LoadBalancer.model_validate(dict(config))
        except ValidationError as exc:
            raise ConfigError(validation_problems(exc, LoadBalancer)) from None
    if config.name != name:
        raise ValueError(f"the config names {config.name!r}, not {name!r}")
    return config


def _script_args(
    name: str,
    config: LoadBalancer | None,
    expected: int,
    seq: int,
    origin: str,
    now: float,
    retention: float,
) -> tuple[list[str], list[str]]:
    """``(KEYS, ARGV)`` of ``PUBLISH_SCRIPT`` for one change."""
    event: LbConfig | LbDeleted
    if config is None:
        event = LbDeleted(lb=name, origin=origin, at=now, version=seq)
        body = None
    else:
        event = LbConfig(lb=name, origin=origin, at=now, version=seq, config=config)
        body = lb_to_dict(config)
    snapshot = json.dumps({"version": seq, "config": body}, separators=(",", ":"))
    minid = f"{max(0, int((now - retention) * 1000))}-0"
    keys = [meta_key(name), config_stream(name), snapshot_key(name)]
    args = [str(expected), str(seq), origin, repr(float(now)), event.type, encode_data(event),
            snapshot, minid]  # fmt: skip
    return keys, args


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _outcome(reply: Any) -> tuple[str, int | str]:
    """The script's reply as ``("ok", stream_id)``, ``("conflict", n)`` or ``("stale", n)``."""
    if isinstance(reply, list):
        return _text(reply[0]), int(reply[1])
    return "ok", _text(reply)


def _registry_update(name: str, version: int, deleted: bool) -> tuple[list[str], list[str]]:
    return [REGISTRY_KEY], [name, str(version), "del" if deleted else "set"]


def _registry_notice(name: str, version: int, deleted: bool) -> list[str]:
    kind = "lb_deleted" if deleted else "lb_config"
    return ["XADD", REGISTRY_EVENTS_KEY, "MAXLEN", "~", str(DEFAULT_MAXLEN), "*",
            "type", kind, "lb", name, "version", str(version)]  # fmt: skip


def _snapshot_state(raw: Any) -> tuple[int, bool] | None:
    """``(version, deleted)`` from a stored snapshot's JSON, ``None`` if unreadable."""
    try:
        data = json.loads(raw)
        return int(data["version"]), data.get("config") is None
    except (TypeError, ValueError, KeyError):
        return None


# -- redis-py (synchronous) --------------------------------------------------------------------


def publish_config(
    r: redis.Redis,
    name: str,
    config: LoadBalancer | Mapping[str, Any] | None,
    expected_version: int,
    origin: str,
    *,
    now: float | None = None,
    retention: float = CONFIG_RETENTION,
) -> tuple[int, str]:
    """Publish ``config`` (``None``: delete) for ``name`` if it is still at ``expected_version``.

    Returns ``(version, stream_id)`` of the change; raises ``VersionConflict``,
    ``ConfigError`` for an invalid config, and redis-py's errors.
    """
    body = _checked(name, config)
    script = r.register_script(PUBLISH_SCRIPT)
    seq = int(r.incr(SEQ_KEY))
    for _ in range(_STALE_ATTEMPTS):
        at = time.time() if now is None else now
        keys, args = _script_args(name, body, expected_version, seq, origin, at, retention)
        kind, value = _outcome(script(keys=keys, args=args))
        if kind == "ok":
            _sync_registry(r, name, seq, body is None)
            return seq, str(value)
        if kind == "conflict":
            raise VersionConflict(name, expected_version, int(value))
        seq = int(r.incrby(SEQ_KEY, int(value) - seq + 1))
    raise RuntimeError(f"{SEQ_KEY} stays behind the version of {name!r}")


def delete_lb(
    r: redis.Redis, name: str, expected_version: int, origin: str, **kw: Any
) -> tuple[int, str]:
    """Delete ``name`` if it is still at ``expected_version``; see ``publish_config``."""
    return publish_config(r, name, None, expected_version, origin, **kw)


def _sync_registry(r: redis.Redis, name: str, version: int, deleted: bool) -> None:
    registry = r.register_script(REGISTRY_SCRIPT)
    keys, args = _registry_update(name, version, deleted)
    registry(keys=keys, args=args)
    r.execute_command(*_registry_notice(name, version, deleted))  # type: ignore[no-untyped-call]
    meta_version = r.hget(meta_key(name), "version")
    if meta_version is not None and int(meta_version) != version:
        # Overtaken between our script and our registry write: make the registry
        # say what the newest change says.
        state = _snapshot_state(r.get(snapshot_key(name)))
        if state is not None:
            keys, args = _registry_update(name, state[0], state[1])
            registry(keys=keys, args=args)


# -- RedisClient (trio) ------------------------------------------------------------------------


async def apublish_config(
    client: RedisClient,
    name: str,
    config: LoadBalancer | Mapping[str, Any] | None,
    expected_version: int,
    origin: str,
    *,
    now: float | None = None,
    retention: float = CONFIG_RETENTION,
) -> tuple[int, str]:
    """``publish_config`` over the trio ``RedisClient`` (a node seeding an empty cluster)."""
    body = _checked(name, config)
    script = await client.script(PUBLISH_SCRIPT)
    seq = int(await client.execute("INCR", SEQ_KEY))
    for _ in range(_STALE_ATTEMPTS):
        at = time.time() if now is None else now
        keys, args = _script_args(name, body, expected_version, seq, origin, at, retention)
        kind, value = _outcome(await script(keys, args))
        if kind == "ok":
            await _async_sync_registry(client, name, seq, body is None)
            return seq, str(value)
        if kind == "conflict":
            raise VersionConflict(name, expected_version, int(value))
        seq = int(await client.execute("INCRBY", SEQ_KEY, str(int(value) - seq + 1)))
    raise RuntimeError(f"{SEQ_KEY} stays behind the version of {name!r}")


async def adelete_lb(
    client: RedisClient, name: str, expected_version: int, origin: str, **kw: Any
) -> tuple[int, str]:
    """``delete_lb`` over the trio ``RedisClient``."""
    return await apublish_config(client, name, None, expected_version, origin, **kw)


async def _async_sync_registry(client: RedisClient, name: str, version: int, deleted: bool) -> None:
    registry = await client.script(REGISTRY_SCRIPT)
    keys, args = _registry_update(name, version, deleted)
    await registry(keys, args)
    await client.execute(*_registry_notice(name, version, deleted))
    meta_version = await client.execute("HGET", meta_key(name), "version")
    if meta_version is not None and int(meta_version) != version:
        state = _snapshot_state(await client.execute("GET", snapshot_key(name)))
        if state is not None:
            keys, args = _registry_update(name, state[0], state[1])
            await registry(keys, args)
