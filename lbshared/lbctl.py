"""``lbctl``: the cluster's control command (``docs/lbctl.md`` documents every command).

Theory of operation
-------------------
lbctl talks to Redis only, never to nodes: it reads the registry, the
snapshots, the config streams and the heartbeats, and it changes config
through ``lbshared.publish`` - the compare-and-set every node also obeys.
It uses redis-py's synchronous client with 2 s socket timeouts and no
retries, so an unreachable Redis fails fast with one line.

Every change is validated here first, with the same models the nodes use;
an invalid config is refused with one line per problem and nothing is
published. Writes retry on a version conflict (someone else changed the
load balancer between our read and our write): ``apply`` and ``delete``
simply re-read the version, read-modify-write commands (``targets add`` and
``targets remove``) re-read the config and redo their change; after
``MAX_ATTEMPTS`` conflicts in a row the command gives up.

Output: tables (``rich``) for people, ``--json`` for programs; every
failure is one line on stderr, ``lbctl: ...``, and a non-zero exit code:

* 0 - done;
* 1 - refused or failed: invalid config, unknown load balancer or target,
  conflicts that would not settle, a Redis error reply;
* 2 - usage: bad arguments or URL;
* 3 - Redis unreachable (refused, timed out, bad credentials).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NoReturn

import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from lbshared.config import Config, ConfigError, LoadBalancer, lb_to_dict, load_config, parse_config
from lbshared.events import (
    HEALTH_EVENT_MODELS,
    BadEvent,
    HealthOverride,
    Heartbeat,
    LbConfig,
    Snapshot,
    decode,
    encode,
)
from lbshared.publish import VersionConflict, publish_config
from lbshared.redis_url import RedisAddress, parse_url
from lbshared.store import (
    LIVE_WINDOW,
    NODE_EXPIRY,
    NODES_KEY,
    REGISTRY_EVENTS_KEY,
    REGISTRY_KEY,
    STATE_RETENTION,
    config_stream,
    health_stream,
    healthstate_key,
    meta_key,
    overrides_key,
    parse_id,
    snapshot_key,
    state_stream,
)

__all__ = ["DEFAULT_URL", "EXIT_FAILED", "EXIT_UNREACHABLE", "EXIT_USAGE", "Failure", "main", "run"]

#: Used when neither ``--redis`` nor ``LB_REDIS_URL`` is given.
DEFAULT_URL = "redis://127.0.0.1:6379/0"
#: Socket connect and read timeout of every Redis call (seconds).
SOCKET_TIMEOUT = 2.0
#: Writes give up after this many version conflicts in a row.
MAX_ATTEMPTS = 5
#: ``origin`` of the events lbctl writes.
ORIGIN = "lbctl"
#: How long one ``XREAD BLOCK`` of ``events --follow`` waits (ms); under SOCKET_TIMEOUT.
FOLLOW_BLOCK_MS = 1000

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

_CONNECT_ERROR_RE = re.compile(r"^Error -?\d+ connecting to \S+\.\s+(.*?)\.?$")
_CONFIG_SUFFIX = ":config"
_CONFIG_PREFIX = "lb:{"


class Failure(Exception):
    """A command failed: ``message`` goes to stderr after ``lbctl: ``, ``code`` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _no_lb(name: str) -> Failure:
    return Failure(f"no load balancer named {name!r}")




class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``lbctl: ...``, exit 2) instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        raise Failure(f"{message} (see '{self.prog} --help')", EXIT_USAGE)


# -- Redis access ------------------------------------------------------------------------------


def connect(address: RedisAddress) -> redis.Redis:
    """redis-py's client for ``address``: 2 s timeouts, no retries (fail fast, one line)."""
    return redis.Redis(
        host=address.host, port=address.port, db=address.db, username=address.username,
        password=address.password, ssl=address.tls, socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT, retry=Retry(NoBackoff(), 0),
    )  # fmt: skip


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _redis_failure(exc: redis.RedisError, address: RedisAddress) -> Failure:
    """One line for a redis-py error, with the URL's password hidden."""
    where = address.redacted
    message = str(exc).strip()
    if isinstance(exc, redis.AuthenticationError):
        return Failure(f"Redis at {where} refused the credentials: {message}", EXIT_UNREACHABLE)
    if isinstance(exc, redis.TimeoutError):
        return Failure(f"cannot reach Redis at {where}: timed out", EXIT_UNREACHABLE)
    if isinstance(exc, redis.ConnectionError):
        m = _CONNECT_ERROR_RE.match(message)
        reason = m.group(1) if m else message
        return Failure(f"cannot reach Redis at {where}: {reason}", EXIT_UNREACHABLE)
    if isinstance(exc, redis.ResponseError):
        return Failure(f"Redis at {where} answered: {message}", EXIT_FAILED)
    if isinstance(exc, redis.exceptions.InvalidResponse):
        return Failure(f"cannot reach Redis at {where}: not a Redis server ({message})",
                       EXIT_UNREACHABLE)  # fmt: skip
    return Failure(f"Redis at {where}: {message}", EXIT_UNREACHABLE)


def _read_lb(r: redis.Redis, name: str) -> tuple[int, LoadBalancer | None]:
    """``(version, config)`` of ``name`` as one consistent read (``None``: absent or deleted)."""
    pipe = r.pipeline(transaction=True)
    pipe.hget(meta_key(name), "version")
    pipe.get(snapshot_key(name))
    raw_version, raw_snapshot = pipe.execute()
    version = int(raw_version) if raw_version is not None else 0
    if raw_snapshot is None:
        return version, None
    try:
        snapshot = Snapshot.from_json(raw_snapshot)
    except BadEvent as exc:
        raise Failure(f"the snapshot of {name!r} is unreadable ({exc})") from None
    return version, snapshot.config


def _read_all(r: redis.Redis, warn: Callable[[str], None]) -> dict[str, tuple[int, LoadBalancer]]:
    """Every registered load balancer: name -> (version, config), sorted by name."""
    keys: Any = r.hkeys(REGISTRY_KEY)
    names = sorted(_text(n) for n in keys)
    if not names:
        return {}
    raws: Any = r.mget([snapshot_key(n) for n in names])
    out: dict[str, tuple[int, LoadBalancer]] = {}
    for name, raw in zip(names, raws, strict=True):
        if raw is None:
            continue
        try:
            snapshot = Snapshot.from_json(raw)
        except BadEvent as exc:
            warn(f"skipped {name!r}: unreadable snapshot ({exc})")
            continue
        if snapshot.config is not None:
            out[name] = (snapshot.version, snapshot.config)
    return out


def _change(
    r: redis.Redis,
    name: str,
    make: Callable[[int, LoadBalancer | None], LoadBalancer | None],
) -> int:
    """Read ``name``, publish ``make(version, current)`` with compare-and-set, retry on conflict."""
    for _ in range(MAX_ATTEMPTS):
        version, current = _read_lb(r, name)
        new = make(version, current)
        try:
            return publish_config(r, name, new, version, ORIGIN)[0]
        except VersionConflict:
            continue
    raise Failure(f"{name!r} kept changing under us ({MAX_ATTEMPTS} conflicts in a row); try again")


# -- helpers -----------------------------------------------------------------------------------


def _listeners(lb: LoadBalancer) -> list[str]:
    return [f"{lst.protocol}:{lst.port}" for lst in lb.listeners]


def _targets(lb: LoadBalancer) -> list[str]:
    return [t.id for t in lb.targets]


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]], out: IO[str]) -> None:
    """A borderless table (rich), as wide as its content, no trailing blanks."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False, padding=(0, 3, 0, 0))
    for column in columns:
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console = Console(width=100_000, color_system=None, highlight=False, emoji=False)
    with console.capture() as capture:
        console.print(table)
    out.write("".join(line.rstrip() + "\n" for line in capture.get().splitlines()))


def _json(value: Any, out: IO[str], indent: int | None = 2) -> None:
    out.write(json.dumps(value, indent=indent) + "\n")


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _problems_line(problems: Sequence[str]) -> str:
    return "; ".join(p.removeprefix("load_balancers[0].") for p in problems)


def _validated(name: str, data: dict[str, Any]) -> LoadBalancer:
    """``data`` (file form of one load balancer) validated as a file would be; one-line Failure."""
    try:
        return parse_config({"load_balancers": [data]}).load_balancers[0]
    except ConfigError as exc:
        raise Failure(f"invalid config for {name!r}: {_problems_line(exc.problems)}") from None


# -- commands ----------------------------------------------------------------------------------


class Ctl:
    """What a command needs: the parsed arguments, a Redis connection, output streams, a clock."""

    def __init__(self, args: argparse.Namespace, address: RedisAddress,
                 connector: Callable[[RedisAddress], redis.Redis], stdout: IO[str],
                 stderr: IO[str], clock: Callable[[], float]) -> None:  # fmt: skip
        self.args = args
        self.address = address
        self._connector = connector
        self._redis: redis.Redis | None = None
        self.out = stdout
        self.err = stderr
        self.clock = clock

    @property
    def r(self) -> redis.Redis:
        if self._redis is None:
            self._redis = self._connector(self.address)
        return self._redis

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()

    def say(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def warn(self, line: str) -> None:
        self.err.write(f"lbctl: {line}\n")
        self.err.flush()


def cmd_apply(ctl: Ctl) -> int:
    """Create or replace, whole, each load balancer the file names; ``--prune`` deletes the rest."""
    path: str = ctl.args.file
    try:
        if path == "-":
            config = parse_config(sys.stdin.read(), source="<stdin>", base_dir=Path.cwd())
        else:
            config = load_config(path)
    except ConfigError as exc:
        raise _invalid(path, exc.problems) from None
    existing = _read_all(ctl.r, ctl.warn)
    _check_ports(config, existing, prune=ctl.args.prune, path=path)
    pruned = sorted(set(existing) - {lb.name for lb in config.load_balancers})
    first: list[str] = []
    if ctl.args.prune:
        # Load balancers whose ports the file takes over go first, so no two ever share a
        # port; the others go last, so nothing is left unserved in between.
        wanted = {lst.port for lb in config.load_balancers for lst in lb.listeners}
        first = [n for n in pruned if any(lst.port in wanted for lst in existing[n][1].listeners)]
        _prune(ctl, first)
    for lb in config.load_balancers:
        version = _change(ctl.r, lb.name, _replace_with(lb))
        ctl.say(f"applied {lb.name} version {version}")
    if ctl.args.prune:
        _prune(ctl, [n for n in pruned if n not in first])
    return EXIT_OK


def _prune(ctl: Ctl, names: Sequence[str]) -> None:
    for name in names:
        try:
            version = _change(ctl.r, name, _delete_existing(name))
        except _Gone:
            continue
        ctl.say(f"deleted {name} version {version}")


def _check_ports(
    config: Config, existing: dict[str, tuple[int, LoadBalancer]], *, prune: bool, path: str
) -> None:
    """Refuse a file whose listener ports clash with load balancers it leaves in place."""
    if prune:
        return
    named = {lb.name for lb in config.load_balancers}
    owners = {lst.port: name for name, (_v, lb) in existing.items() if name not in named
              for lst in lb.listeners}  # fmt: skip
    problems = []
    for i, lb in enumerate(config.load_balancers):
        for j, listener in enumerate(lb.listeners):
            owner = owners.get(listener.port)
            if owner is not None:
                problems.append(
                    f"load_balancers[{i}].listeners[{j}].port: port {listener.port}"
                    f" is already used by load balancer {owner!r} in the cluster"
                )
    if problems:
        raise _invalid(path, problems)


def _invalid(path: str, problems: Sequence[str]) -> Failure:
    """``invalid config FILE:`` and then one indented line per problem."""
    return Failure("\n".join([f"invalid config {path}:", *(f"  {p}" for p in problems)]))


def _replace_with(lb: LoadBalancer) -> Callable[[int, LoadBalancer | None], LoadBalancer]:
    def make(_version: int, _current: LoadBalancer | None) -> LoadBalancer:
        return lb

    return make


class _Gone(Exception):
    """The load balancer to delete was deleted meanwhile."""


def _delete_existing(name: str) -> Callable[[int, LoadBalancer | None], None]:
    def make(_version: int, current: LoadBalancer | None) -> None:
        if current is None:
            raise _Gone(name)

    return make


def cmd_list(ctl: Ctl) -> int:
    """Every load balancer: name, version, listeners, targets."""
    lbs = _read_all(ctl.r, ctl.warn)
    if ctl.args.json:
        rows = [{"name": name, "version": version, "listeners": _listeners(lb),
                 "targets": _targets(lb)} for name, (version, lb) in lbs.items()]  # fmt: skip
        _json(rows, ctl.out)
    else:
        _table(["NAME", "VERSION", "LISTENERS", "TARGETS"],
               [[name, str(version), ", ".join(_listeners(lb)) or "-",
                 ", ".join(_targets(lb)) or "-"] for name, (version, lb) in lbs.items()],
               ctl.out)  # fmt: skip
    return EXIT_OK


def cmd_get(ctl: Ctl) -> int:
    """One load balancer in file form, with its version."""
    name: str = ctl.args.name
    version, lb = _read_lb(ctl.r, name)
    if lb is None:
        raise _no_lb(name)
    body = lb_to_dict(lb)
    if ctl.args.json:
        _json({"name": body.pop("name"), "version": version, **body}, ctl.out)
    else:
        text = yaml.safe_dump({"load_balancers": [body]}, sort_keys=False, allow_unicode=True)
        ctl.out.write(f"# {name} version {version}\n{text}")
    return EXIT_OK


def cmd_delete(ctl: Ctl) -> int:
    """Delete one load balancer."""
    name: str = ctl.args.name

    def make(_version: int, current: LoadBalancer | None) -> None:
        if current is None:
            raise _no_lb(name)

    ctl.say(f"deleted {name} version {_change(ctl.r, name, make)}")
    return EXIT_OK


def cmd_targets_add(ctl: Ctl) -> int:
    """Add a target to a load balancer (read-modify-write)."""
    name: str = ctl.args.name
    target_id: str = ctl.args.id
    target: dict[str, Any] = {"id": target_id, "address": ctl.args.address}
    if ctl.args.weight is not None:
        target["weight"] = ctl.args.weight

    def make(_version: int, current: LoadBalancer | None) -> LoadBalancer:
        if current is None:
            raise _no_lb(name)
        if any(t.id == target_id for t in current.targets):
            raise Failure(f"load balancer {name!r} already has a target {target_id!r}")
        body = lb_to_dict(current)
        body["targets"] = [*body.get("targets", []), target]
        return _validated(name, body)

    version = _change(ctl.r, name, make)
    ctl.say(f"added target {target_id} to {name} version {version}")
    return EXIT_OK


def cmd_targets_remove(ctl: Ctl) -> int:
    """Remove a target from a load balancer (read-modify-write)."""
    name: str = ctl.args.name
    target_id: str = ctl.args.id

    def make(_version: int, current: LoadBalancer | None) -> LoadBalancer:
        if current is None:
            raise _no_lb(name)
        if not any(t.id == target_id for t in current.targets):
            raise Failure(f"no target {target_id!r} in load balancer {name!r}")
        body = lb_to_dict(current)
        body["targets"] = [t for t in body.get("targets", []) if t["id"] != target_id]
        return _validated(name, body)

    version = _change(ctl.r, name, make)
    ctl.say(f"removed target {target_id} from {name} version {version}")
    return EXIT_OK


def cmd_nodes(ctl: Ctl) -> int:
    """The nodes' heartbeats; entries older than a minute are deleted."""
    now = ctl.clock()
    beats: list[Heartbeat] = []
    stale: list[Any] = []
    entries: dict[Any, Any] = ctl.r.hgetall(NODES_KEY)
    for raw_id, raw in entries.items():
        try:
            beat = Heartbeat.model_validate_json(raw)
        except ValueError:
            ctl.warn(f"skipped node {_text(raw_id)!r}: unreadable heartbeat")
            continue
        if now - beat.last_heartbeat >= NODE_EXPIRY:
            stale.append(raw_id)
        else:
            beats.append(beat)
    if stale:
        ctl.r.hdel(NODES_KEY, *stale)
    beats.sort(key=lambda b: b.id)
    if ctl.args.json:
        rows = [
            {"id": b.id, "address": b.address, "admin": b.admin,
             "last_heartbeat": b.last_heartbeat, "config_version": b.config_version,
             "degraded": b.degraded, "live": b.live(now, LIVE_WINDOW)}
            for b in beats
        ]  # fmt: skip
        _json(rows, ctl.out)
    else:
        _table(["ID", "ADDRESS", "ADMIN", "LAST HEARTBEAT", "CONFIG VERSION", "DEGRADED", "LIVE"],
               [[b.id, b.address or "-", b.admin or "-",
                 f"{max(0.0, now - b.last_heartbeat):.1f}s ago", str(b.config_version),
                 "yes" if b.degraded else "no", "yes" if b.live(now, LIVE_WINDOW) else "no"]
                for b in beats], ctl.out)  # fmt: skip
    return EXIT_OK


def cmd_schema(ctl: Ctl) -> int:
    """The JSON Schema of a config file."""
    from lbshared.docgen import json_schema

    _json(json_schema(), ctl.out)
    return EXIT_OK


# -- events ------------------------------------------------------------------------------------


def _config_stream_names(r: redis.Redis) -> set[str]:
    """Names with a config stream (deleted ones included) or a registry entry."""
    keys: Any = r.hkeys(REGISTRY_KEY)
    names = {_text(n) for n in keys}
    for key in r.scan_iter(match="lb:{*}:config", count=1000, _type="STREAM"):
        text = _text(key)
        if text.startswith(_CONFIG_PREFIX) and text.endswith("}" + _CONFIG_SUFFIX):
            names.add(text[len(_CONFIG_PREFIX) : -len("}" + _CONFIG_SUFFIX)])
    return names


def _last_id(r: redis.Redis, stream: str) -> str:
    last: Any = r.xrevrange(stream, "+", "-", count=1)
    return _text(last[0][0]) if last else "0-0"


def _history(r: redis.Redis, stream: str, since: str) -> Iterator[tuple[str, dict[Any, Any]]]:
    """Entries of ``stream`` after ``since``, oldest first, in pages."""
    start = "-" if since in ("0", "0-0") else "(" + since
    while True:
        page: Any = r.xrange(stream, start, "+", count=1000)
        for raw_id, fields in page:
            yield _text(raw_id), fields
        if len(page) < 1000:
            return
        start = "(" + _text(page[-1][0])


def _event_line(ctl: Ctl, stream: str, entry_id: str, fields: dict[Any, Any]) -> None:
    try:
        event = decode(fields)
    except BadEvent as exc:
        ctl.warn(f"skipped malformed entry {entry_id} in {stream} ({exc})")
        return
    if event.type in HEALTH_EVENT_MODELS:
        _health_event_line(ctl, entry_id, event)
        return
    version = getattr(event, "version", None)
    if ctl.args.json:
        record: dict[str, Any] = {
            "id": entry_id,
            "lb": event.lb,
            "type": event.type,
            "version": version,
            "origin": event.origin,
            "at": event.at,
        }
        if isinstance(event, LbConfig):
            record["config"] = lb_to_dict(event.config)
        ctl.say(json.dumps(record))
        return
    line = (
        f"{entry_id} {_iso(event.at)} {event.lb} {event.type} version {version} by {event.origin}"
    )
    if isinstance(event, LbConfig):
        listeners = ", ".join(_listeners(event.config)) or "-"
        targets = ", ".join(_targets(event.config)) or "-"
        line += f" (listeners: {listeners}; targets: {targets})"
    ctl.say(line)


def _health_event_line(ctl: Ctl, entry_id: str, event: Any) -> None:
    """One entry of ``lb:{NAME}:health``: a committed health or breaker transition."""
    if ctl.args.json:
        ctl.say(json.dumps({"id": entry_id, "lb": event.lb, "type": event.type,
                            "target": event.target, "reason": event.reason, "at": event.at,
                            "node": event.node, "generation": event.generation}))  # fmt: skip
        return
    reason = f": {event.reason}" if event.reason else ""
    ctl.say(f"{entry_id} {_iso(event.at)} {event.lb} {event.type} {event.target}"
            f" by {event.node}{reason}")  # fmt: skip


def cmd_events(ctl: Ctl) -> int:
    """Config and health events of one or all load balancers, oldest first; ``--follow``
    waits for more.

    Ctrl-C ends it with exit code 0.
    """
    since: str = ctl.args.since
    if since != "$":
        try:
            parse_id(since)
        except ValueError:
            raise Failure(
                f"--since {since!r} is not a stream id (ms-seq, 0 or $)", EXIT_USAGE
            ) from None
    try:
        positions = _print_history(ctl, since)
        if ctl.args.follow:
            _follow(ctl, positions)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _print_history(ctl: Ctl, since: str) -> dict[str, str]:
    """Print the kept events after ``since``; return where to follow each stream from."""
    r = ctl.r
    only: str | None = ctl.args.lb
    positions: dict[str, str] = {}
    if ctl.args.follow and only is None:
        # Before the scan below: a load balancer created meanwhile is then seen either way.
        positions[REGISTRY_EVENTS_KEY] = _last_id(r, REGISTRY_EVENTS_KEY)
    if only is not None:
        if not r.exists(config_stream(only)) and r.hget(REGISTRY_KEY, only) is None:
            raise _no_lb(only)
        names = {only}
    else:
        names = _config_stream_names(r)
    entries: list[tuple[tuple[int, int], str, str, dict[Any, Any]]] = []
    for name in sorted(names):
        for stream in (config_stream(name), health_stream(name)):
            if since == "$":
                positions[stream] = _last_id(r, stream)
                continue
            positions[stream] = since
            for entry_id, fields in _history(r, stream, since):
                entries.append((parse_id(entry_id), stream, entry_id, fields))
                positions[stream] = entry_id
    entries.sort(key=lambda e: e[0])
    for _key, stream, entry_id, fields in entries:
        _event_line(ctl, stream, entry_id, fields)
    return positions


def _follow(ctl: Ctl, positions: dict[str, str]) -> None:
    r = ctl.r
    while positions:
        reply: Any = r.xread(positions, count=100, block=FOLLOW_BLOCK_MS)  # type: ignore[arg-type]
        batches = reply.items() if isinstance(reply, dict) else (reply or [])
        for raw_stream, batch in batches:
            stream = _text(raw_stream)
            for raw_id, fields in batch:
                entry_id = _text(raw_id)
                positions[stream] = entry_id
                if stream == REGISTRY_EVENTS_KEY:
                    lb = _text(fields.get(b"lb", b"")) if fields else ""
                    if lb and config_stream(lb) not in positions:
                        positions[config_stream(lb)] = "0-0"  # a load balancer new to us
                        positions[health_stream(lb)] = "0-0"
                    continue
                _event_line(ctl, stream, entry_id, fields or {})


# -- status, metrics, health (what the nodes publish) -----------------------------------------


def cmd_status(ctl: Ctl) -> int:
    """``status NAME``: listeners, nodes, per-target health, breaker and traffic."""
    from lbshared.lbctl_views import cmd_status as status  # imports this module

    return status(ctl)


def cmd_metrics(ctl: Ctl) -> int:
    """``metrics NAME``: cluster-wide, per-node and per-target traffic figures."""
    from lbshared.lbctl_views import cmd_metrics as metrics  # imports this module

    return metrics(ctl)


def cmd_health(ctl: Ctl) -> int:
    """``health NAME``: each target's cluster-wide health, override, breaker and last
    probes; ``health set NAME TARGET up|down|auto``: override a target for the cluster."""
    words: list[str] = ctl.args.words
    if words[0] == "set":
        if len(words) != 4:
            raise Failure("usage: lbctl health set NAME TARGET up|down|auto", EXIT_USAGE)
        if words[3] not in ("up", "down", "auto"):
            raise Failure(f"health set: {words[3]!r} is not up, down or auto", EXIT_USAGE)
        return _health_set(ctl, words[1], words[2], words[3])
    if len(words) != 1:
        raise Failure("usage: lbctl health NAME | health set NAME TARGET up|down|auto", EXIT_USAGE)
    from lbshared.lbctl_views import cmd_health as health  # imports this module

    return health(ctl, words[0])


def _health_set(ctl: Ctl, name: str, target: str, mode: str) -> int:
    """Store the override (``lb:{NAME}:overrides``; ``auto`` removes it) and announce it
    on ``lb:{NAME}:state`` in one transaction: every node applies it within milliseconds,
    a node that starts (or reconnects) later reads the hash."""
    r = ctl.r
    _version, lb = _read_lb(r, name)
    if lb is None:
        raise _no_lb(name)
    if not any(t.id == target for t in lb.targets):
        raise Failure(f"no target {target!r} in load balancer {name!r}")
    now = ctl.clock()
    event = HealthOverride(lb=name, origin=ORIGIN, at=now, target=target,
                           mode=mode)  # type: ignore[arg-type]  # fmt: skip
    pipe = r.pipeline(transaction=True)
    if mode == "auto":
        pipe.hdel(overrides_key(name), target)
    else:
        pipe.hset(overrides_key(name), target, mode)
    minid = f"{max(0, int((now - STATE_RETENTION) * 1000))}-0"
    pipe.xadd(state_stream(name), encode(event), minid=minid, approximate=True)  # type: ignore[arg-type]
    pipe.execute()
    ctl.say(f"set health of {target} in {name} to {mode}")
    return EXIT_OK


# -- the parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """lbctl's argument parser."""
    parser = _Parser(prog="lbctl", description="Control a cluster of lbnode load balancers.")
    parser.add_argument("--redis", metavar="URL", default=None,
                        help=f"Redis URL (default: $LB_REDIS_URL, else {DEFAULT_URL})")  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable[[Ctl], int], text: str,
                json_flag: bool = False) -> argparse.ArgumentParser:  # fmt: skip
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(handler=handler)
        if json_flag:
            p.add_argument("--json", action="store_true", help="JSON output")
        return p

    p = command("apply", cmd_apply, "create or replace the load balancers of a config file")
    p.add_argument("-f", "--file", required=True, metavar="FILE", help="YAML config ('-': stdin)")
    p.add_argument("--prune", action="store_true", help="delete load balancers FILE does not name")
    command("list", cmd_list, "list the load balancers", json_flag=True)
    p = command("get", cmd_get, "show one load balancer in file form", json_flag=True)
    p.add_argument("name", metavar="NAME")
    p = command("delete", cmd_delete, "delete a load balancer")
    p.add_argument("name", metavar="NAME")
    p = command("targets", cmd_targets_add, "add or remove a target")  # handler: see below
    tsub = p.add_subparsers(dest="targets_command", metavar="add|remove", required=True)
    p = tsub.add_parser("add", help="add a target", description="add a target")
    p.set_defaults(handler=cmd_targets_add)
    p.add_argument("name", metavar="NAME")
    p.add_argument("id", metavar="ID")
    p.add_argument("address", metavar="ADDRESS", help="host:port")
    p.add_argument("--weight", type=int, metavar="N", default=None)
    p = tsub.add_parser("remove", help="remove a target", description="remove a target")
    p.set_defaults(handler=cmd_targets_remove)
    p.add_argument("name", metavar="NAME")
    p.add_argument("id", metavar="ID")
    p = command("status", cmd_status, "targets of a load balancer across the nodes",
                json_flag=True)  # fmt: skip
    p.add_argument("name", metavar="NAME")
    p = command("health", cmd_health, "target health, or set an override", json_flag=True)
    p.add_argument("words", nargs="+", metavar="NAME | set NAME TARGET up|down|auto")
    p = command("metrics", cmd_metrics, "traffic figures of a load balancer", json_flag=True)
    p.add_argument("name", metavar="NAME")
    p = command("events", cmd_events, "config and health events, oldest first", json_flag=True)
    p.add_argument("--lb", metavar="NAME", help="only this load balancer")
    p.add_argument("--follow", "-f", action="store_true", help="wait for more (Ctrl-C ends)")
    p.add_argument(
        "--since",
        metavar="ID",
        default="0",
        help="after this stream id (0: all kept history, the default; $: only new)",
    )
    command("nodes", cmd_nodes, "the nodes and their heartbeats", json_flag=True)
    command("schema", cmd_schema, "print the JSON Schema of a config file")
    return parser


def run(
    argv: Sequence[str] | None = None,
    *,
    connector: Callable[[RedisAddress], redis.Redis] = connect,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    environ: dict[str, str] | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """Run one lbctl command; return the exit code. (Tests pass their own connector and streams.)"""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    env = os.environ if environ is None else environ
    ctl: Ctl | None = None
    address: RedisAddress | None = None
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        url = args.redis or env.get("LB_REDIS_URL") or DEFAULT_URL
        try:
            address = parse_url(url)
        except ValueError as exc:
            raise Failure(str(exc), EXIT_USAGE) from None
        ctl = Ctl(args, address, connector, out, err, clock)
        return int(args.handler(ctl))
    except Failure as exc:
        err.write(f"lbctl: {exc.message}\n")
        return exc.code
    except redis.RedisError as exc:
        assert address is not None
        failure = _redis_failure(exc, address)
        err.write(f"lbctl: {failure.message}\n")
        return failure.code
    except BrokenPipeError:
        return EXIT_OK  # `lbctl events | head`
    except KeyboardInterrupt:
        err.write("lbctl: interrupted\n")
        return 130
    finally:
        if ctl is not None:
            ctl.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    code = run(argv)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would complain at exit about the closed pipe; point stdout at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


if __name__ == "__main__":
    # ``python -m lbshared.lbctl``: run the module under its own name, so that the modules
    # that import ``lbshared.lbctl`` (lbctl_views) share its classes (Failure) with run().
    from lbshared.lbctl import main as _main

    raise SystemExit(_main())
