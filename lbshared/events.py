"""Events: the typed, versioned records every node folds, and their Redis stream form.

Theory of operation
-------------------
Everything the cluster shares travels as events on Redis streams (or on the
in-process log of a standalone node). One stream entry is one event, written
as a flat *envelope* of string fields::

    v       "1"                          envelope version
    type    "lb_config", "pin", ...      selects the payload model
    lb      "api-lb"                     the load balancer it concerns
    origin  "node-a" or "lbctl"          who wrote it
    at      "1700000000.123"             epoch seconds, decimal text
    data    '{"version": 12, ...}'       the typed payload as a JSON object

The stream id (``ms-seq``) is not part of the event: it is the reader's resume
token and comes back next to the event from ``lbshared.store``.

In Python an event is one frozen pydantic model per ``type`` holding the
envelope fields (``lb``, ``origin``, ``at``) and its payload fields side by
side, so a reducer reads ``event.version`` rather than ``event.data.version``.
``Event`` is the discriminated union of them all, on ``type``.

``decode`` never lets a bad entry escape as anything but ``BadEvent``: an
unknown envelope version, an unknown type (a newer node may write types this
build does not know), bad JSON or a payload that fails validation all raise
``BadEvent(reason)``. Readers count it in a ``SkipCounter``, log it once in a
while, and go on with the next entry: one bad entry must never stop a node.

Adding an event type (the health issue added several): define a model deriving
from ``_EventBase`` with a ``type: Literal[...]`` field and add it to
``_EVENT_MODELS``; ``Event``, ``EVENT_TYPES`` and ``decode`` follow.

This module also holds the other JSON documents of the Redis layout that more
than one program reads: the config ``Snapshot`` and the node ``Heartbeat``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from lbshared.config import LoadBalancer, lb_to_dict

__all__ = [
    "ENVELOPE_VERSION", "EVENT_TYPES", "BadEvent", "Envelope", "Event", "Heartbeat", "LbConfig",
    "LbDeleted", "Pin", "RateDelta", "RegistryNotice", "SkipCounter", "Snapshot", "Unpin",
    "HEALTH_EVENT_MODELS", "BreakerTransition", "CircuitClosed", "CircuitHalfOpen", "CircuitOpen",
    "HealthOverride", "HealthTransition", "Healthy", "OutcomeDelta", "ProbeVerdict", "Unhealthy",
    "config_event", "decode", "decode_notice", "encode", "encode_data",
]  # fmt: skip

log = logging.getLogger(__name__)

#: The envelope version this build writes and reads (the ``v`` field).
ENVELOPE_VERSION = "1"

#: The envelope's own fields; a payload may not reuse these names.
ENVELOPE_FIELDS = ("v", "type", "lb", "origin", "at", "data")
_ENVELOPE_KEYS = frozenset(("type", "lb", "origin", "at"))


class BadEvent(Exception):
    """A stream entry that is not a valid event; ``reason`` is a short category.

    Reasons: ``"missing field"``, ``"unknown version"``, ``"unknown type"``,
    ``"bad JSON"``, ``"invalid payload"``; ``detail`` says more, for logs.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(reason, detail)

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


# -- event models ------------------------------------------------------------------------------


#: A load balancer that is a dict in file form on the wire (validated on the way in).
WireLoadBalancer = Annotated[
    LoadBalancer, PlainSerializer(lb_to_dict, return_type=dict, when_used="json")
]


class _EventBase(BaseModel):
    """Envelope fields every event has."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lb: str = Field(min_length=1, description="The load balancer the event concerns.")
    origin: str = Field(min_length=1, description='Writer: a node id or "lbctl".')
    at: float = Field(allow_inf_nan=False, description="Epoch seconds when it was written.")


class LbConfig(_EventBase):
    """A load balancer created or replaced, whole, at ``version``."""

    type: Literal["lb_config"] = "lb_config"
    version: int = Field(ge=1, description="The config version (from INCR lb:seq).")
    config: WireLoadBalancer = Field(description="The load balancer (file form on the wire).")

    @model_validator(mode="after")
    def _same_name(self) -> LbConfig:
        if self.config.name != self.lb:
            raise ValueError(f"config names {self.config.name!r}, the envelope {self.lb!r}")
        return self


class LbDeleted(_EventBase):
    """A load balancer deleted at ``version``."""

    type: Literal["lb_deleted"] = "lb_deleted"
    version: int = Field(ge=1, description="The config version of the deletion.")


#: One rate-limit delta: (limiter, key, admissions, bucket start in epoch seconds).
#: ``limiter`` is the rule name, ``""`` for the load balancer's own limit.
Delta = tuple[str, str, int, float]


class RateDelta(_EventBase):
    """Admissions a node counted since its last batch, per limiter and key."""

    type: Literal["rate_delta"] = "rate_delta"
    node: str = Field(min_length=1, description="The node that counted them.")
    deltas: tuple[Delta, ...] = Field(description="(limiter, key, n, bucket_start) tuples.")


class Pin(_EventBase):
    """A sticky session was pinned to a target (a cache-warming notice)."""

    type: Literal["pin"] = "pin"
    rule: str = Field(description='The rule whose sticky_session pinned it; "" = the LB level.')
    session: str = Field(description="The session cookie value.")
    target: str = Field(description="The target id.")
    ttl: float = Field(gt=0, allow_inf_nan=False, description="Seconds the pin lives.")


class Unpin(_EventBase):
    """A sticky session pin was dropped (its target went away or failed)."""

    type: Literal["unpin"] = "unpin"
    rule: str = Field(description='The rule; "" = the LB level.')
    session: str = Field(description="The session cookie value.")


# -- health and circuit breakers (lb:{NAME}:state inputs, lb:{NAME}:health transitions) ----------

#: One breaker outcome delta: (target, successes, errors, bucket_start in epoch seconds).
OutcomeEntry = tuple[str, Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)], float]


class ProbeVerdict(_EventBase):
    """A prober's hysteresis about ``target`` changed state (its verdict, on ``lb:{NAME}:state``)."""

    type: Literal["probe_verdict"] = "probe_verdict"
    target: str = Field(min_length=1, description="The target id.")
    prober: str = Field(min_length=1, description="The probing node.")
    state: Literal["healthy", "unhealthy"] = Field(description="The prober's new verdict.")
    reason: str = Field(default="", description="Why (the last failure, or the successes).")


class OutcomeDelta(_EventBase):
    """Request outcomes (for the circuit breakers) a node counted since its last batch."""

    type: Literal["outcome_delta"] = "outcome_delta"
    node: str = Field(min_length=1, description="The node that counted them.")
    deltas: tuple[OutcomeEntry, ...] = Field(description="(target, ok, errors, bucket_start).")


class HealthOverride(_EventBase):
    """An operator override of a target's health: ``up``, ``down`` or ``auto`` (none)."""

    type: Literal["health_override"] = "health_override"
    target: str = Field(min_length=1, description="The target id.")
    mode: Literal["up", "down", "auto"] = Field(description="The override.")


class _Committed(_EventBase):
    """A transition committed on ``lb:{NAME}:health`` (compare-and-set on ``generation``)."""

    target: str = Field(min_length=1, description="The target id.")
    reason: str = Field(default="", description="Why it changed.")
    generation: int = Field(ge=1, description="The target's health or breaker generation.")
    node: str = Field(min_length=1, description="The node that committed it.")


class _HealthCommitted(_Committed):
    voted: Literal["healthy", "unhealthy"] | None = Field(
        default=None, description="The probers' vote under an override (None: the state)."
    )


class Healthy(_HealthCommitted):
    """The cluster's view of ``target`` turned healthy."""

    type: Literal["healthy"] = "healthy"


class Unhealthy(_HealthCommitted):
    """The cluster's view of ``target`` turned unhealthy."""

    type: Literal["unhealthy"] = "unhealthy"


class _BreakerCommitted(_Committed):
    transition: str = Field(default="", description="trip, probe, close or reopen.")
    wait: float = Field(default=0.0, ge=0, allow_inf_nan=False,
                        description="circuit_open: seconds it stays open.")  # fmt: skip


class CircuitOpen(_BreakerCommitted):
    """``target``'s circuit breaker opened (or reopened) cluster-wide."""

    type: Literal["circuit_open"] = "circuit_open"


class CircuitHalfOpen(_BreakerCommitted):
    """``target``'s circuit breaker lets trial requests through."""

    type: Literal["circuit_half_open"] = "circuit_half_open"


class CircuitClosed(_BreakerCommitted):
    """``target``'s circuit breaker closed again."""

    type: Literal["circuit_closed"] = "circuit_closed"


#: The events of ``lb:{NAME}:health`` (what the websocket feed and ``lbctl events`` show).
HealthTransition = Healthy | Unhealthy | CircuitOpen | CircuitHalfOpen | CircuitClosed
BreakerTransition = CircuitOpen | CircuitHalfOpen | CircuitClosed

#: Every event model this build knows, in one place (add new types here).
_EVENT_MODELS: tuple[type[_EventBase], ...] = (
    LbConfig, LbDeleted, RateDelta, Pin, Unpin, ProbeVerdict, OutcomeDelta, HealthOverride,
    Healthy, Unhealthy, CircuitOpen, CircuitHalfOpen, CircuitClosed,
)  # fmt: skip

Event = Annotated[
    Union[  # noqa: UP007 - kept in step with the tuple
        LbConfig, LbDeleted, RateDelta, Pin, Unpin, ProbeVerdict, OutcomeDelta, HealthOverride,
        Healthy, Unhealthy, CircuitOpen, CircuitHalfOpen, CircuitClosed,
    ],
    Field(discriminator="type"),
]

#: ``type`` -> model of the committed health/breaker transitions.
HEALTH_EVENT_MODELS: Mapping[str, type[_Committed]] = {
    m.model_fields["type"].default: m
    for m in (Healthy, Unhealthy, CircuitOpen, CircuitHalfOpen, CircuitClosed)
}

#: ``type`` string -> model.
EVENT_TYPES: Mapping[str, type[_EventBase]] = {
    m.model_fields["type"].default: m for m in _EVENT_MODELS
}

#: The config events, the ones ``lbshared.projections.fold_config`` folds.
ConfigEvent = LbConfig | LbDeleted

_EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(Event)


def config_event(
    name: str, version: int, config: LoadBalancer | None, origin: str, at: float
) -> LbConfig | LbDeleted:
    """``LbConfig`` for a config, ``LbDeleted`` for ``None``."""
    if config is None:
        return LbDeleted(lb=name, origin=origin, at=at, version=version)
    return LbConfig(lb=name, origin=origin, at=at, version=version, config=config)


# -- the wire form -----------------------------------------------------------------------------


class Envelope(BaseModel):
    """A stream entry's fields, parsed but with the payload not yet typed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: str
    type: str
    lb: str
    origin: str
    at: str
    data: str

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any]) -> Envelope:
        """Decode a stream entry's field map (bytes or str); ``BadEvent`` if a field is missing."""
        text: dict[str, str] = {}
        for key, value in fields.items():
            k = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
            if k not in ENVELOPE_FIELDS:
                continue  # tolerated: a later envelope version may add fields
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise BadEvent("invalid payload", f"field {k!r} is not UTF-8") from None
            elif not isinstance(value, str):
                raise BadEvent("invalid payload", f"field {k!r} is not text")
            text[k] = value
        missing = [f for f in ENVELOPE_FIELDS if f not in text]
        if missing:
            raise BadEvent("missing field", ", ".join(missing))
        return cls(**text)

    def to_fields(self) -> dict[str, str]:
        """The stream entry's fields, in envelope order."""
        return {f: getattr(self, f) for f in ENVELOPE_FIELDS}


def _format_at(at: float) -> str:
    return repr(float(at))  # shortest text that reads back as the same float


def encode_data(event: _EventBase) -> str:
    """The ``data`` field of ``event``: its payload fields as a JSON object."""
    payload = event.model_dump(mode="json", exclude=set(_ENVELOPE_KEYS))
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode(event: _EventBase) -> dict[str, str]:
    """The stream entry fields of ``event`` (all values strings)."""
    return {
        "v": ENVELOPE_VERSION,
        "type": event.type,  # type: ignore[attr-defined]
        "lb": event.lb,
        "origin": event.origin,
        "at": _format_at(event.at),
        "data": encode_data(event),
    }


def decode(fields: Mapping[Any, Any]) -> Event:
    """The event of a stream entry; ``BadEvent`` for anything malformed or unknown."""
    env = Envelope.from_fields(fields)
    if env.v != ENVELOPE_VERSION:
        raise BadEvent("unknown version", repr(env.v))
    model = EVENT_TYPES.get(env.type)
    if model is None:
        raise BadEvent("unknown type", repr(env.type))
    try:
        data = json.loads(env.data)
    except ValueError as exc:
        raise BadEvent("bad JSON", str(exc)) from None
    if not isinstance(data, dict):
        raise BadEvent("invalid payload", "data is not a JSON object")
    clash = _ENVELOPE_KEYS.intersection(data)
    if clash:
        raise BadEvent("invalid payload", f"data repeats envelope fields {sorted(clash)}")
    try:
        at = float(env.at)
    except ValueError:
        raise BadEvent("invalid payload", f"at={env.at!r} is not a number") from None
    if not math.isfinite(at):
        raise BadEvent("invalid payload", f"at={env.at!r} is not finite")
    try:
        event: Event = model.model_validate(
            {**data, "type": env.type, "lb": env.lb, "origin": env.origin, "at": at}
        )  # type: ignore[assignment]
    except ValidationError as exc:
        raise BadEvent("invalid payload", _first_problem(exc)) from None
    return event


def _first_problem(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def validate_event(obj: Mapping[str, Any]) -> Event:
    """An event from its Python mapping form (``type`` selects the model); for tests and tools."""
    return _EVENT_ADAPTER.validate_python(obj)  # type: ignore[no-any-return]


# -- skipping bad entries ----------------------------------------------------------------------


class SkipCounter:
    """Counts bad entries a reader skipped, by reason, and logs them without flooding.

    The first ``log_first`` skips are logged at WARNING, then one in
    ``log_every``; ``total`` and ``by_reason`` feed the node's metrics.
    """

    __slots__ = ("total", "by_reason", "log_first", "log_every", "_logger")

    def __init__(
        self, *, log_first: int = 10, log_every: int = 1000, logger: logging.Logger = log
    ) -> None:
        self.total = 0
        self.by_reason: dict[str, int] = {}
        self.log_first = log_first
        self.log_every = log_every
        self._logger = logger

    def skip(self, stream: str, entry_id: str, error: BadEvent) -> None:
        """Count one skipped entry and maybe log it."""
        self.total += 1
        self.by_reason[error.reason] = self.by_reason.get(error.reason, 0) + 1
        if self.total <= self.log_first or self.total % self.log_every == 0:
            self._logger.warning(
                "skipped bad event %s in %s (%s; %d skipped so far)",
                entry_id, stream, error, self.total,
            )  # fmt: skip


# -- other shared JSON documents ---------------------------------------------------------------


class Snapshot(BaseModel):
    """``lb:{NAME}:snapshot``: the state after the last config event of one load balancer.

    ``config`` is ``None`` when the load balancer was deleted; ``stream_id``
    is the id of that last event in ``lb:{NAME}:config`` (resume after it).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    version: int = Field(ge=0)
    stream_id: str
    config: WireLoadBalancer | None = None

    @classmethod
    def from_json(cls, raw: bytes | str) -> Snapshot:
        """Parse the stored JSON; ``BadEvent`` if it is not a valid snapshot."""
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise BadEvent("bad JSON", f"snapshot: {exc}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise BadEvent("invalid payload", f"snapshot: {_first_problem(exc)}") from None

    def to_event(
        self, name: str, origin: str = "snapshot", at: float = 0.0
    ) -> LbConfig | LbDeleted:
        """The config event equivalent to this snapshot (to fold it like any other)."""
        return config_event(name, self.version, self.config, origin, at)


class RegistryNotice(BaseModel):
    """One entry of ``lb:registry:events``: load balancer ``lb`` changed at ``version``.

    Not an envelope event (the contract gives it three fields: ``type``,
    ``lb``, ``version``): it tells followers that a config stream they may not
    follow yet has news. ``decode_notice`` parses it.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    type: Literal["lb_config", "lb_deleted"]
    lb: str = Field(min_length=1)
    version: int = Field(ge=1)


def decode_notice(fields: Mapping[Any, Any]) -> RegistryNotice:
    """A registry notice from its stream fields; ``BadEvent`` if malformed."""
    text: dict[str, str] = {}
    for key, value in fields.items():
        try:
            k = key.decode() if isinstance(key, bytes) else str(key)
            text[k] = value.decode() if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            raise BadEvent("invalid payload", "registry notice is not UTF-8") from None
    missing = [f for f in ("type", "lb", "version") if f not in text]
    if missing:
        raise BadEvent("missing field", ", ".join(missing))
    try:
        return RegistryNotice.model_validate(text)
    except ValidationError as exc:
        raise BadEvent("invalid payload", f"registry notice: {_first_problem(exc)}") from None


class Heartbeat(BaseModel):
    """One entry of ``lb:nodes``: a node's JSON heartbeat, written every second.

    Unknown keys are ignored so newer nodes may add some.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    address: str = ""
    admin: str = ""
    last_heartbeat: float = Field(allow_inf_nan=False)
    config_version: int = 0
    degraded: bool = False
    started_at: float = 0.0
    pid: int = 0
    version: str = ""

    def live(self, now: float, window: float = 3.0) -> bool:
        """Whether the node counts as live at epoch time ``now``."""
        return now - self.last_heartbeat < window

    def to_json(self) -> str:
        """The stored JSON."""
        return self.model_dump_json()
