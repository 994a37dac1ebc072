"""``lbctl status NAME``, ``lbctl metrics NAME`` and ``lbctl health NAME``: a load
balancer as its nodes see it.

Theory of operation
-------------------
lbctl never talks to nodes. Every node publishes, every 2 s and per load
balancer NAME, a stats summary into the Redis hash ``lb:{NAME}:stats``
(field = node id; ``lbnode.cluster.agent``), and a heartbeat into
``lb:nodes``. These views read both, once, and merge:

* counters (requests by status class, 5xx errors, in-flight requests,
  requests sent to each target, request rates) are **added** over nodes;
* latency histograms share one bucket layout (``BUCKETS``, the same as
  ``lbnode.metrics.BUCKETS``), so the cluster's histogram is the
  bucket-by-bucket **sum** of the nodes' histograms and its percentiles are
  read from that sum. Percentiles are never averaged: the mean of three
  nodes' p99 is not the cluster's p99.

What each figure covers:

* ``requests_total``, ``error_rate``, ``latency_ms``: since each node
  started (a node's counters survive config changes, not restarts; a node
  that stops takes its counts with it).
* ``request_rate``: requests per second over each node's last ~10 s
  (``request_rate`` in its summary), summed over nodes.
* ``error_rate``: the fraction (0..1) of requests answered with a 5xx,
  the proxy's own (502/503/504) or the upstream's.
* ``latency_ms``: request head to last byte, as in the access log's
  ``total_ms``; linear interpolation inside a bucket (as Prometheus'
  ``histogram_quantile``), so a figure is exact only to its bucket's bounds.

A summary older than ``STATS_FRESH`` seconds (its node died, or cannot reach
Redis) is left out with a warning; one older than ``NODE_EXPIRY`` is also
deleted from the hash, as ``lbctl nodes`` deletes old heartbeats.

``health NAME`` takes each target's state from what the cluster committed
(``lb:{NAME}:healthstate``: the last ``healthy``/``unhealthy`` and breaker
transition, written by the node that announced it) and its override from
``lb:{NAME}:overrides``; the nodes' summaries add what only they know: the
last probe results of each prober, the current probers, local ejections,
and the state of targets that never changed (no committed transition yet).

The figure-making functions (``parse_summary``, ``read_summaries``,
``metrics_view``, ``status_view``, ``health_view``, ``quantile``) are pure:
they take decoded data and the time, and touch no Redis; ``cmd_status``,
``cmd_metrics`` and ``cmd_health`` do the reading (one ``HGETALL`` of the
stats hash, one of ``lb:nodes``, the load balancer's meta and snapshot; for
health the two health hashes) and the printing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lbshared.config import LoadBalancer
from lbshared.events import Heartbeat
from lbshared.lbctl import (
    EXIT_OK,
    Ctl,
    _iso,
    _json,
    _listeners,
    _no_lb,
    _read_lb,
    _table,
    _text,
    healthstate_key,
    overrides_key,
)
from lbshared.store import LIVE_WINDOW, NODE_EXPIRY, NODES_KEY, stats_key

__all__ = [
    "BUCKETS", "QUANTILES", "STATS_FRESH", "BadSummary", "NodeSummary", "Totals", "cmd_health",
    "cmd_metrics", "cmd_status", "health_view", "metrics_view", "parse_summary", "quantile",
    "read_summaries", "stats_key", "status_view",
]  # fmt: skip

#: Latency bucket upper bounds in seconds (the last bucket, +Inf, is implied). The same
#: layout as ``lbnode.metrics.BUCKETS`` (lbshared may not import lbnode; a test keeps the
#: two equal).
BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip
#: The percentiles shown, as (key, quantile).
QUANTILES: tuple[tuple[str, float], ...] = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
#: A node's summary older than this (seconds) is left out: the node is gone or cut off.
STATS_FRESH = 10.0
#: Status classes, index i = (i+1)xx.
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
#: Breaker states, the worst first: the cluster shows the worst any node reports.
BREAKER_ORDER = ("open", "half_open", "closed")
#: ``health NAME`` shows this many probe results per target (the newest, over all probers).
PROBES_SHOWN = 6
_BREAKER_OF_EVENT = {"circuit_open": "open", "circuit_half_open": "half_open",
                     "circuit_closed": "closed"}  # fmt: skip

_N_BUCKETS = len(BUCKETS) + 1



# -- the figures (pure) --------------------------------------------------------------------------


def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile (0..1) in seconds of a histogram in ``BUCKETS`` layout, interpolated
    linearly inside its bucket (the +Inf bucket answers the last bound); None when empty.

    Identical to ``lbnode.metrics.Histogram.quantile``.
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    lower = 0.0
    for i, n in enumerate(counts):
        upper = BUCKETS[i] if i < len(BUCKETS) else BUCKETS[-1]
        if n and seen + n >= rank:
            return lower + (upper - lower) * ((rank - seen) / n)
        seen += n
        lower = upper
    return BUCKETS[-1]


@dataclass(slots=True)
class Totals:
    """Counts that add up over rules, targets and nodes."""

    classes: list[int] = field(default_factory=lambda: [0] * len(CLASSES))
    errors: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * _N_BUCKETS)
    latency_sum: float = 0.0
    rate: float | None = None  # requests/s; None: nobody published one

    @property
    def requests(self) -> int:
        return sum(self.classes)

    def add(self, other: Totals) -> None:
        """Merge ``other`` in: counts and histogram buckets added, rates added."""
        for i, n in enumerate(other.classes):
            self.classes[i] += n
        self.errors += other.errors
        for i, n in enumerate(other.hist):
            self.hist[i] += n
        self.latency_sum += other.latency_sum
        self.add_rate(other.rate)

    def add_rate(self, rate: float | None) -> None:
        if rate is not None:
            self.rate = (self.rate or 0.0) + rate

    def figures(self) -> dict[str, Any]:
        """The ``--json`` figures: DESIGN.md's keys, then ``errors_total`` and ``responses``."""
        requests = self.requests
        latency: dict[str, float | None] = {}
        for key, q in QUANTILES:
            seconds = quantile(self.hist, q)
            latency[key] = None if seconds is None else round(seconds * 1000.0, 3)
        return {
            "requests_total": requests,
            "request_rate": None if self.rate is None else round(self.rate, 3),
            "error_rate": round(self.errors / requests, 6) if requests else 0.0,
            "latency_ms": latency,
            "errors_total": self.errors,
            "responses": dict(zip(CLASSES, self.classes, strict=True)),
        }


@dataclass(frozen=True, slots=True)
class NodeSummary:
    """One node's decoded stats summary of one load balancer."""

    node: str
    at: float  # epoch seconds of the publish
    entries: dict[tuple[str, str], Totals]  # (rule, target) -> counts; "" = none
    request_rate: float | None
    targets: dict[str, dict[str, Any]]  # target id -> {"active", "healthy", ...} as published


class BadSummary(ValueError):
    """A summary that cannot be read."""


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadSummary(f"{what} is not a number")
    return float(value)


def _counts(value: Any, size: int, what: str) -> list[int]:
    if (not isinstance(value, list) or len(value) != size
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)):
        raise BadSummary(f"{what} is not a list of {size} counts")  # fmt: skip
    return list(value)


def parse_summary(raw: bytes | str) -> NodeSummary:
    """Decode one field of ``lb:{NAME}:stats``; ``BadSummary`` names what is wrong."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise BadSummary("not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("node"), str):
        raise BadSummary("no node id")
    at = _number(data.get("at"), "at")
    stats = data.get("stats", {})
    targets = data.get("targets", {})
    if not isinstance(stats, dict) or not isinstance(targets, dict):
        raise BadSummary("stats or targets is not an object")
    entries: dict[tuple[str, str], Totals] = {}
    for key, value in stats.items():
        rule, sep, target = str(key).rpartition("|")
        if not sep or not isinstance(value, dict):
            raise BadSummary(f"stats entry {key!r} is malformed")
        entries[(rule, target)] = Totals(
            classes=_counts(value.get("classes"), len(CLASSES), f"{key}.classes"),
            errors=int(_number(value.get("errors", 0), f"{key}.errors")),
            hist=_counts(value.get("hist"), _N_BUCKETS, f"{key}.hist (bucket layout)"),
            latency_sum=_number(value.get("sum", 0.0), f"{key}.sum"),
        )
    rate = data.get("request_rate")
    return NodeSummary(
        node=data["node"],
        at=at,
        entries=entries,
        request_rate=None if rate is None else _number(rate, "request_rate"),
        targets={str(k): v for k, v in targets.items() if isinstance(v, dict)},
    )


def read_summaries(
    raw: Mapping[Any, Any], now: float, warn: Callable[[str], None]
) -> tuple[list[NodeSummary], list[Any]]:
    """The fresh summaries of a stats hash, sorted by node id, and the fields to delete
    (older than ``NODE_EXPIRY``). Unreadable and stale ones are skipped with a warning."""
    fresh: list[NodeSummary] = []
    expired: list[Any] = []
    for field_name, value in raw.items():
        node = _text(field_name)
        try:
            summary = parse_summary(value)
        except BadSummary as exc:
            warn(f"skipped the stats of node {node!r}: unreadable ({exc})")
            continue
        age = now - summary.at
        if age >= NODE_EXPIRY:
            expired.append(field_name)
        elif age >= STATS_FRESH:
            warn(f"left out the stats of node {node!r}: {age:.1f}s old "
                 "(stopped, or cut off from Redis?)")  # fmt: skip
        else:
            fresh.append(summary)
    fresh.sort(key=lambda s: s.node)
    return fresh, expired


def _node_totals(summary: NodeSummary) -> Totals:
    total = Totals()
    for entry in summary.entries.values():
        total.add(entry)
    total.rate = summary.request_rate
    return total


def metrics_view(summaries: Iterable[NodeSummary]) -> dict[str, Any]:
    """``metrics NAME --json``: ``{"cluster": F, "nodes": {ID: F}, "targets": {ID: F}}``.

    F = ``{"requests_total", "request_rate", "error_rate", "latency_ms": {"p50", "p95",
    "p99"}, "errors_total", "responses"}``. ``targets`` counts the requests each target
    answered (those refused before reaching one count only in ``cluster`` and ``nodes``).
    """
    cluster = Totals()
    nodes: dict[str, Any] = {}
    targets: dict[str, Totals] = {}
    for summary in summaries:
        node = _node_totals(summary)
        nodes[summary.node] = node.figures()
        cluster.add(node)
        for (_rule, target), entry in summary.entries.items():
            if target:
                targets.setdefault(target, Totals()).add(entry)
        for target_id, published in summary.targets.items():
            rate = published.get("request_rate")
            if isinstance(rate, int | float) and not isinstance(rate, bool):
                targets.setdefault(target_id, Totals()).add_rate(float(rate))
    return {
        "cluster": cluster.figures(),
        "nodes": nodes,
        "targets": {t: totals.figures() for t, totals in sorted(targets.items())},
    }


def _health_of(published: Mapping[str, Any]) -> str:
    health = published.get("health")
    if isinstance(health, str):
        return health
    return "healthy" if published.get("healthy", True) else "unhealthy"


def _breaker_of(published: Mapping[str, Any]) -> str:
    breaker = published.get("breaker")
    return breaker if isinstance(breaker, str) else "closed"


def _worst_breaker(states: Iterable[str]) -> str:
    found = set(states)
    for state in BREAKER_ORDER:
        if state in found:
            return state
    return sorted(found)[0] if found else "closed"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def status_view(name: str, version: int, lb: LoadBalancer, beats: Iterable[Heartbeat],
                summaries: Iterable[NodeSummary], now: float) -> dict[str, Any]:  # fmt: skip
    """``status NAME --json``.

    ``{"name", "version", "listeners", "nodes": [...], "targets": [...]}``; a node:
    ``{"id", "address", "admin", "live", "degraded", "config_version", "in_sync",
    "last_heartbeat", "stats_at"}`` (``in_sync``: its config version is at least this load
    balancer's); a target: ``{"id", "address", "weight", "health", "breaker",
    "active_connections", "requests_total", "request_rate", "health_by_node"}``, summed
    over the fresh summaries. ``health`` is the state every reporting node agrees on, else
    ``mixed`` (see ``health_by_node``), or ``unknown`` when no node reports the target;
    ``breaker`` is the worst state any node reports (``closed`` when none reports one).
    """
    summaries = list(summaries)
    stats_at = {s.node: s.at for s in summaries}
    nodes = [
        {"id": b.id, "address": b.address, "admin": b.admin, "live": b.live(now, LIVE_WINDOW),
         "degraded": b.degraded, "config_version": b.config_version,
         "in_sync": b.config_version >= version, "last_heartbeat": b.last_heartbeat,
         "stats_at": stats_at.get(b.id)}
        for b in sorted(beats, key=lambda b: b.id)
    ]  # fmt: skip
    targets = []
    for t in lb.targets:
        active = requests = 0
        rate: float | None = None
        health: dict[str, str] = {}
        breakers: list[str] = []
        for s in summaries:
            published = s.targets.get(t.id)
            if published is None:
                continue
            active += _int(published.get("active"))
            if "requests_total" in published:
                requests += _int(published.get("requests_total"))
            else:  # a node that does not publish it: the requests its stats saw answered
                requests += sum(e.requests for (_r, tid), e in s.entries.items() if tid == t.id)
            r = published.get("request_rate")
            if isinstance(r, int | float) and not isinstance(r, bool):
                rate = (rate or 0.0) + float(r)
            health[s.node] = _health_of(published)
            breakers.append(_breaker_of(published))
        states = set(health.values())
        targets.append({
            "id": t.id, "address": t.address, "weight": t.weight,
            "health": states.pop() if len(states) == 1 else ("mixed" if states else "unknown"),
            "breaker": _worst_breaker(breakers), "active_connections": active,
            "requests_total": requests, "request_rate": None if rate is None else round(rate, 3),
            "health_by_node": health,
        })  # fmt: skip
    return {"name": name, "version": version, "listeners": _listeners(lb), "nodes": nodes,
            "targets": targets}  # fmt: skip


def _json_field(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def health_view(lb: LoadBalancer, stored: Mapping[str, Any], overrides: Mapping[str, Any],
                summaries: Iterable[NodeSummary]) -> list[dict[str, Any]]:  # fmt: skip
    """``health NAME --json``: one entry per target, in config order.

    ``{"target", "state", "since", "override", "breaker", "last_probes", "reason",
    "probers", "ejected_on", "nodes"}``. ``state``/``since``/``reason``: the last committed
    transition; before any, what the nodes report (all agreeing, else ``mixed``), else the
    configured initial state. ``override``: ``up``, ``down`` or ``auto``. ``breaker``: the
    last committed breaker transition (``closed`` before any; ``disabled`` without a
    ``circuit_breaker``). ``last_probes``: the newest ``PROBES_SHOWN`` probe results over
    all probers, oldest first (``{"at", "ok", "reason", "status", "latency_ms", "node"}``).
    ``ejected_on``: nodes that eject the target locally (passive detection).
    ``nodes``: each reporting node's own view of the state.
    """
    summaries = list(summaries)
    hc = lb.health_check
    initial = hc.initial_state if hc is not None and hc.enabled else "healthy"
    cb = lb.circuit_breaker
    breaker_enabled = cb is not None and cb.enabled
    out = []
    for t in lb.targets:
        published = [(s.node, s.targets[t.id]) for s in summaries if t.id in s.targets]
        by_node = {node: str(p["health"]) for node, p in published if isinstance(p.get("health"), str)}
        committed = _json_field(stored.get(f"hstate:{t.id}"))
        override = _text(overrides.get(t.id, b"auto"))
        if committed is not None and committed.get("state") in ("healthy", "unhealthy"):
            state = str(committed["state"])
            since: float | None = committed.get("at")
            reason = str(committed.get("reason", ""))
        else:
            states = set(by_node.values())
            state = states.pop() if len(states) == 1 else ("mixed" if states else initial)
            if override in ("up", "down") and not by_node:
                state = "healthy" if override == "up" else "unhealthy"
            sinces = [p["since"] for _n, p in published if isinstance(p.get("since"), int | float)]
            since = min(sinces) if sinces else None
            reasons = [str(p["reason"]) for _n, p in published if p.get("reason")]
            reason = reasons[0] if reasons else ""
        bstate = _json_field(stored.get(f"bstate:{t.id}"))
        if not breaker_enabled:
            breaker = "disabled"
        elif bstate is not None and bstate.get("type") in _BREAKER_OF_EVENT:
            breaker = _BREAKER_OF_EVENT[bstate["type"]]
        else:
            breaker = "closed"
        probes = [p for _n, pub in published for p in pub.get("last_probes") or ()
                  if isinstance(p, dict) and isinstance(p.get("at"), int | float)]  # fmt: skip
        probes.sort(key=lambda p: p["at"])
        probers: list[str] = []
        for _n, p in sorted(published, key=lambda np: np[0]):
            if isinstance(p.get("probers"), list) and p["probers"]:
                probers = [str(x) for x in p["probers"]]
                break
        out.append({
            "target": t.id, "state": state, "since": since, "override": override,
            "breaker": breaker, "last_probes": probes[-PROBES_SHOWN:], "reason": reason,
            "probers": probers,
            "ejected_on": sorted(n for n, p in published if p.get("ejected") is True),
            "nodes": by_node,
        })  # fmt: skip
    return out


# -- reading and printing ------------------------------------------------------------------------


def _heartbeats(ctl: Ctl, now: float) -> list[Heartbeat]:
    beats: list[Heartbeat] = []
    entries: dict[Any, Any] = ctl.r.hgetall(NODES_KEY)
    for raw_id, raw in entries.items():
        try:
            beat = Heartbeat.model_validate_json(raw)
        except ValueError:
            ctl.warn(f"skipped node {_text(raw_id)!r}: unreadable heartbeat")
            continue
        if now - beat.last_heartbeat < NODE_EXPIRY:
            beats.append(beat)
    return beats


def _load(ctl: Ctl) -> tuple[str, int, LoadBalancer, list[NodeSummary], float]:
    name: str = ctl.args.name
    version, lb = _read_lb(ctl.r, name)
    if lb is None:
        raise _no_lb(name)
    now = ctl.clock()
    raw: dict[Any, Any] = ctl.r.hgetall(stats_key(name))
    summaries, expired = read_summaries(raw, now, ctl.warn)
    if expired:
        ctl.r.hdel(stats_key(name), *expired)
    return name, version, lb, summaries, now


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ago(now: float, at: float | None) -> str:
    return "-" if at is None else f"{max(0.0, now - at):.1f}s ago"


def cmd_status(ctl: Ctl) -> int:
    """``status NAME [--json]``: listeners, nodes, and each target's weight, health,
    breaker, in-flight requests, requests and request rate over the cluster."""
    name, version, lb, summaries, now = _load(ctl)
    view = status_view(name, version, lb, _heartbeats(ctl, now), summaries, now)
    if ctl.args.json:
        _json(view, ctl.out)
        return EXIT_OK
    listeners = ", ".join(view["listeners"]) or "-"
    ctl.say(f"{name}   version {version}   listeners {listeners}")
    ctl.say("")
    _table(["NODE", "ADDRESS", "CONFIG VERSION", "IN SYNC", "DEGRADED", "LIVE", "STATS"],
           [[n["id"], n["address"] or "-", str(n["config_version"]),
             "yes" if n["in_sync"] else "no", "yes" if n["degraded"] else "no",
             "yes" if n["live"] else "no", _ago(now, n["stats_at"])]
            for n in view["nodes"]], ctl.out)  # fmt: skip
    ctl.say("")
    _table(["TARGET", "ADDRESS", "WEIGHT", "HEALTH", "BREAKER", "ACTIVE", "REQUESTS", "RATE/S"],
           [[t["id"], t["address"], str(t["weight"]), t["health"], t["breaker"],
             str(t["active_connections"]), str(t["requests_total"]), _num(t["request_rate"])]
            for t in view["targets"]], ctl.out)  # fmt: skip
    if not summaries:
        ctl.warn(f"no node has published stats for {name!r} in the last {STATS_FRESH:g}s")
    return EXIT_OK


def _probe_text(probe: dict[str, Any] | None, now: float) -> str:
    if probe is None:
        return "-"
    what = "ok" if probe.get("ok") else f"failed ({probe.get('reason') or '?'})"
    return f"{what} by {probe.get('node', '?')} {_ago(now, probe.get('at'))}"


def cmd_health(ctl: Ctl, name: str) -> int:
    """``health NAME [--json]``: each target's cluster-wide state, since when and why, its
    override, its breaker and its latest probe."""
    _version, lb = _read_lb(ctl.r, name)
    if lb is None:
        raise _no_lb(name)
    now = ctl.clock()
    pipe = ctl.r.pipeline(transaction=False)
    pipe.hgetall(healthstate_key(name))
    pipe.hgetall(overrides_key(name))
    pipe.hgetall(stats_key(name))
    raw_stored, raw_overrides, raw_stats = pipe.execute()
    stored = {_text(k): v for k, v in raw_stored.items()}
    overrides = {_text(k): v for k, v in raw_overrides.items()}
    summaries, _expired = read_summaries(raw_stats, now, ctl.warn)
    view = health_view(lb, stored, overrides, summaries)
    if ctl.args.json:
        _json(view, ctl.out)
        return EXIT_OK
    _table(["TARGET", "STATE", "SINCE", "OVERRIDE", "BREAKER", "REASON", "LAST PROBE"],
           [[v["target"], v["state"], "-" if v["since"] is None else _iso(v["since"]),
             v["override"], v["breaker"], v["reason"] or "-",
             _probe_text(v["last_probes"][-1] if v["last_probes"] else None, now)]
            for v in view], ctl.out)  # fmt: skip
    if not summaries:
        ctl.warn(f"no node has published stats for {name!r} in the last {STATS_FRESH:g}s"
                 " (no probe results)")  # fmt: skip
    return EXIT_OK


def _metrics_row(scope: str, f: dict[str, Any]) -> list[str]:
    lat = f["latency_ms"]
    return [scope, str(f["requests_total"]), _num(f["request_rate"]), str(f["errors_total"]),
            f"{f['error_rate'] * 100:.2f}%", _num(lat["p50"], 2), _num(lat["p95"], 2),
            _num(lat["p99"], 2)]  # fmt: skip


def cmd_metrics(ctl: Ctl) -> int:
    """``metrics NAME [--json]``: cluster-wide request rate, error rate and latency
    percentiles (merged histograms), with per-node and per-target rows."""
    name, _version, _lb, summaries, _now = _load(ctl)
    view = metrics_view(summaries)
    if ctl.args.json:
        _json(view, ctl.out)
        return EXIT_OK
    rows = [_metrics_row("cluster", view["cluster"])]
    rows += [_metrics_row(f"node {n}", f) for n, f in view["nodes"].items()]
    rows += [_metrics_row(f"target {t}", f) for t, f in view["targets"].items()]
    _table(["SCOPE", "REQUESTS", "RATE/S", "5XX", "ERROR RATE", "P50 MS", "P95 MS", "P99 MS"],
           rows, ctl.out)  # fmt: skip
    ctl.say("")
    ctl.say(f"{len(view['nodes'])} node(s); requests, errors and latency since each node "
            "started; rate over the last ~10 s")  # fmt: skip
    if not summaries:
        ctl.warn(f"no node has published stats for {name!r} in the last {STATS_FRESH:g}s")
    return EXIT_OK
