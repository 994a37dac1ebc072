"""Configuration models: the one description of a load balancer that files, lbctl and nodes share.

Theory of operation
-------------------
A config file is YAML in one of two forms:

(a) ``load_balancers: [{name: api-lb, listeners: [...], targets: [...], rules: {...}}, ...]``
(b) ``load_balancer: {...}`` for a single load balancer (named ``default``
    unless it says otherwise) plus an optional top-level ``rules: {...}``
    that belongs to it - the form of the product reference.

``parse_config`` reshapes form (b) into form (a) and validates the result as
one ``Config``; problems are reported with paths that read as the file was
written (``load_balancer.targets[1].address``, ``rules.api_v2.targets[0]``).
Every model is frozen with ``extra="forbid"``, so a typo is an error
("unknown key (did you mean 'protocol'?)") and a validated config can be
shared freely. Durations are held as float seconds, CIDRs as ``ipaddress``
networks, expected status codes as a ``StatusSet``.

Validation has three layers and each reports every problem it finds: field
types and values (pydantic), one model's own cross-field rules (a listener's
protocol against its ``ssl``), and the cross-references of a load balancer
or of the whole config (rule targets, duplicate ids and ports). The last two
raise one ``config_problems`` error listing ``(sub-path, message)`` pairs;
``lbshared.errors`` turns it all into one line per problem, as ``ConfigError``.
A layer runs only when the layer below it passed for that model.

Nothing on disk is touched: certificate paths are only resolved against the
config file's directory (the node opens them with the listener), and
``"package.module:Class"`` plug-ins are only checked for shape.

``lb_to_dict``/``config_to_dict`` give the file form back (defaults omitted,
durations as ``10s``), and ``parse_config(config_to_dict(c)) == c``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from functools import cached_property
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainSerializer,
    Tag,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, core_schema

from lbshared.durations import DURATION_PATTERN, format_duration, parse_duration
from lbshared.errors import PROBLEMS_ERROR_TYPE, ConfigError, Loc, format_path, show, suggest
from lbshared.errors import validation_problems as _validation_problems

__all__ = [
    "ALGORITHMS", "Access", "CircuitBreaker", "Config", "ConfigError", "HealthCheck", "HttpProbe",
    "Limits", "Listener", "LoadBalancer", "Pool", "Probe", "RateLimit", "Rule", "SSLConfig",
    "Schedule", "StatusSet", "StickySession", "Target", "TcpProbe", "Timeouts", "ValueMatch",
    "config_to_dict", "lb_to_dict", "load_config", "parse_config", "split_address",
]  # fmt: skip

#: Built-in balancing algorithms; anything else must be a "package.module:Class" plug-in.
ALGORITHMS = (
    "round_robin", "weighted_round_robin", "least_connections",
    "random", "power_of_two", "consistent_hash",
)  # fmt: skip
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")  # ids go into Redis keys: no braces
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 token
_HOST_RE = re.compile(r"^[A-Za-z0-9_.-]+\Z")
_STATUS_RE = re.compile(r"^[0-9]{3}(-[0-9]{3})?\Z")


class TypeLabel(str):
    """Annotation metadata naming a field's type for people (docgen's "type" column)."""


# -- field types -----------------------------------------------------------------------------


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"{show(value)} must be longer than 0")
    return seconds


_DURATION_SCHEMA = {"anyOf": [{"type": "string", "pattern": DURATION_PATTERN},
                              {"type": "number", "exclusiveMinimum": 0}]}  # fmt: skip
Duration = Annotated[
    float,
    BeforeValidator(_positive_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema(_DURATION_SCHEMA),
    TypeLabel("duration"),
]


def _cidr(value: object) -> IPv4Network | IPv6Network:
    if isinstance(value, IPv4Network | IPv6Network):
        return value
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            pass
    raise ValueError(f"{show(value)} is not a CIDR (e.g. 10.0.0.0/8, 10.1.2.3 or 2001:db8::/32)")


CIDR = Annotated[IPv4Network | IPv6Network, BeforeValidator(_cidr), TypeLabel("CIDR")]


def _check(test: Callable[[str], object], problem: str) -> Callable[[str], str]:
    """An after-validator refusing values that fail ``test``; ``problem`` follows the value."""

    def check(value: str) -> str:
        if not test(value):
            raise ValueError(f"{value!r} {problem}")
        return value

    return check


def _is_plugin(value: str) -> bool:
    """``package.module:Name``: dotted identifiers either side (nothing is imported here)."""
    module, colon, attr = value.partition(":")
    return bool(colon) and all(p.isidentifier() for p in (*module.split("."), *attr.split(".")))


def _is_key_spec(value: str) -> bool:
    """The key language of lbnode.policy.keys (kept in step with it; lbshared cannot import it)."""
    kind, colon, name = value.partition(":")
    if colon and kind.lower() in ("header", "cookie"):
        return bool(_TOKEN_RE.match(name))
    if colon and kind.lower() == "query":
        return bool(name)
    return value in ("client_ip", "path", "host") or _is_plugin(value)


def _is_regex(value: str) -> bool:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{value!r} is not a valid regular expression ({exc})") from None
    return True


def _is_body_match(value: str) -> bool:
    return not (len(value) >= 2 and value[0] == value[-1] == "/") or _is_regex(value[1:-1])


_ALGORITHM_PROBLEM = (
    f"is not an algorithm (expected one of {', '.join(ALGORITHMS)} or 'package.module:Class')"
)
_KEY_PROBLEM = (
    "is not a key (expected client_ip, path, host, header:NAME, cookie:NAME, query:NAME"
    " or 'package.module:function')"
)
_NAME_PROBLEM = "is not a valid name (letters, digits, '_', '.', '-')"
Name = Annotated[str, AfterValidator(_check(_NAME_RE.match, _NAME_PROBLEM)), TypeLabel("name")]
Algorithm = Annotated[
    str,
    AfterValidator(_check(lambda v: v in ALGORITHMS or _is_plugin(v), _ALGORITHM_PROBLEM)),
    TypeLabel("algorithm"),
]
KeySpec = Annotated[str, AfterValidator(_check(_is_key_spec, _KEY_PROBLEM)), TypeLabel("key")]
Regex = Annotated[str, AfterValidator(_check(_is_regex, "")), TypeLabel("regex")]
BodyMatch = Annotated[str, AfterValidator(_check(_is_body_match, "")), TypeLabel("text or /regex/")]
UrlPath = Annotated[
    str,
    AfterValidator(_check(lambda v: v.startswith("/") or v == "*", "must start with '/'")),
    TypeLabel("path"),
]
CookieName = Annotated[
    str, AfterValidator(_check(_TOKEN_RE.match, "is not a valid cookie name")), TypeLabel("token")
]
Method = Annotated[
    str,
    AfterValidator(_check(_TOKEN_RE.match, "is not an HTTP method")),
    AfterValidator(str.upper),
    TypeLabel("HTTP method"),
]
Port = Annotated[int, Field(ge=1, le=65535)]


def _methods(value: object) -> object:
    """``any`` in any case, one method, or a list of methods (a list naming ``any`` is ``any``)."""
    items: list[Any] = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("an empty method list matches nothing (use any)")
    for item in items:
        if not isinstance(item, str) or not _TOKEN_RE.match(item):
            raise ValueError(f"{show(item)} is not an HTTP method")
    if any(item.lower() == "any" for item in items):
        return "any"
    upper = [item.upper() for item in items]
    return upper if isinstance(value, list) else upper[0]


class StatusSet:
    """A set of HTTP status codes: ``200``, ``[200, 204]``, ``"200-399"`` or ``"200,204,300-399"``.

    ``status in statuses`` is a frozenset lookup; ``str()`` gives the canonical
    string form (sorted, merged ranges), which is also how it is serialised.
    """

    __slots__ = ("ranges", "_codes")

    def __init__(self, ranges: Iterable[tuple[int, int]]) -> None:
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(ranges):
            if not 100 <= lo <= hi <= 599:
                raise ValueError(f"{lo}-{hi} is not a range of HTTP status codes (100-599)")
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        self.ranges: tuple[tuple[int, int], ...] = tuple(merged)
        self._codes = frozenset(c for lo, hi in merged for c in range(lo, hi + 1))

    @classmethod
    def parse(cls, value: object) -> StatusSet:
        """Read the file form; raise ``ValueError`` naming the value."""
        if isinstance(value, StatusSet):
            return value
        parts: list[Any] = []
        if isinstance(value, int) and not isinstance(value, bool):
            parts = [value]
        elif isinstance(value, list):
            parts = value
        elif isinstance(value, str):
            parts = [p.strip() for p in value.split(",")]
        ranges: list[tuple[int, int]] = []
        for part in parts:
            if isinstance(part, int) and not isinstance(part, bool):
                ranges.append((part, part))
            elif isinstance(part, str) and _STATUS_RE.match(part):
                lo, _, hi = part.partition("-")
                ranges.append((int(lo), int(hi or lo)))
            else:
                ranges = []
                break
        try:
            if ranges:
                return cls(ranges)
        except ValueError:
            pass
        raise ValueError(f"{show(value)} is not a set of status codes (e.g. 200, [200, 204],"
                         " '200-399' or '200,204')")  # fmt: skip

    def __contains__(self, status: object) -> bool:
        return status in self._codes

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StatusSet) and other.ranges == self.ranges

    def __hash__(self) -> int:
        return hash(self.ranges)

    def __str__(self) -> str:
        return ",".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)

    def __repr__(self) -> str:
        return f"StatusSet({str(self)!r})"

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.parse, serialization=core_schema.plain_serializer_function_ser_schema(str)
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        one = r"[0-9]{3}(-[0-9]{3})?"
        return {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"type": "integer"}},
                          {"type": "string", "pattern": f"^{one}(,{one})*$"}]}  # fmt: skip


DEFAULT_STATUS = StatusSet([(200, 399)])


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``; ``ValueError`` naming the address."""
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{address!r} has no valid IPv6 address in brackets") from None
        port_text = rest[1:] if bracket and rest.startswith(":") else ""
    else:
        host, _, port_text = address.rpartition(":")
        if ":" in host:
            raise ValueError(f"{address!r}: write an IPv6 address in brackets, '[::1]:80'")
        if host and not _HOST_RE.match(host):
            raise ValueError(f"{address!r} has no valid host")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{address!r} has no port")
    if not host:
        raise ValueError(f"{address!r} has no host")
    if not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{address!r} has a port outside 1..65535")
    return host, int(port_text)


def _problems(found: list[tuple[Loc, str]]) -> None:
    """Raise every cross-field problem at once (see lbshared.errors)."""
    if found:
        summary = "; ".join(f"{format_path(loc)}: {msg}" for loc, msg in found)
        context = {"summary": summary, "problems": found}
        raise PydanticCustomError(PROBLEMS_ERROR_TYPE, "{summary}", context)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# -- models ----------------------------------------------------------------------------------


class Target(_Model):
    """One upstream server."""

    id: Name = Field(description="Unique within the load balancer; rules name targets by it.")
    address: str = Field(description='"host:port" or "[IPv6]:port".')
    weight: int = Field(
        default=100, ge=0, le=10000, description="Share for weighted algorithms; 0 drains."
    )

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        split_address(value)
        return value

    # Cached in the instance __dict__ on first use: later reads are plain attribute hits.
    @cached_property
    def host(self) -> str:
        """Host name or IP address, without IPv6 brackets."""
        return split_address(self.address)[0]

    @cached_property
    def port(self) -> int:
        """TCP port."""
        return split_address(self.address)[1]

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Target:
        """As BaseModel.model_copy, without carrying over a stale cached host/port."""
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("host", None)
        copied.__dict__.pop("port", None)
        return copied


class SSLConfig(_Model):
    """TLS certificate and key of an https listener."""

    certificate: str = Field(min_length=1, description="PEM certificate chain file.")
    private_key: str = Field(min_length=1, description="PEM private key file.")

    @field_validator("certificate", "private_key")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("base_dir")
        if base is not None and not Path(value).is_absolute():
            return str(Path(base) / value)
        return value


def _ssl_false_in_schema(schema: dict[str, Any]) -> None:
    schema.setdefault("anyOf", []).append({"const": False})


def _ssl_off(value: object) -> object:
    if value is True:
        raise ValueError("true is not an ssl block (give certificate and private_key, or false)")
    return None if value is False else value


class Listener(_Model):
    """A port the load balancer accepts connections on."""

    protocol: Literal["http", "https"] = Field(
        default="http", description="http, or https (needs ssl)."
    )
    port: Port = Field(description="TCP port to listen on.")
    ssl: Annotated[SSLConfig | None, BeforeValidator(_ssl_off)] = Field(
        default=None,
        description="Certificate and key for https; `false` or absent for plain http.",
        json_schema_extra=_ssl_false_in_schema,
    )
    proxy_protocol: bool = Field(default=False, description="Expect a PROXY protocol header first.")

    @model_validator(mode="after")
    def _check_ssl(self) -> Listener:
        if self.protocol == "https" and self.ssl is None:
            message = f"https listener on port {self.port} needs certificate and private_key"
            _problems([(("ssl",), message)])
        if self.protocol == "http" and self.ssl is not None:
            message = f"ssl is set on http listener port {self.port} (use protocol: https)"
            _problems([(("ssl",), message)])
        return self


class Timeouts(_Model):
    """Connection and request timeouts (the waits for a head fire at most 0.1 s late)."""

    connect: Duration = Field(default=2.0, description="Connecting to a target.")
    request_headers: Duration = Field(
        default=10.0, description="Receiving a client's request head."
    )
    upstream_response: Duration = Field(
        default=30.0, description="Waiting for a target's response head; the 504 after it closes the client connection."
    )
    idle: Duration = Field(default=60.0, description="Idle keep-alive connection, either side.")


class Limits(_Model):
    """Request-head size limits (over either: 431)."""

    max_header_bytes: int = Field(
        default=32768, ge=1, description="Largest request head, in bytes."
    )
    max_headers: int = Field(default=100, ge=1, description="Most header fields in a request.")


class Pool(_Model):
    """Upstream connection pool, per target and node."""

    max_idle_per_target: int = Field(
        default=64, ge=0, description="Idle keep-alive connections kept."
    )
    max_connections_per_target: int = Field(
        default=1024, ge=1, description="Open connections at most."
    )


class HttpProbe(_Model):
    """An active HTTP health probe."""

    type: Literal["http"] = Field(default="http", description="Probe kind.")
    path: UrlPath = Field(default="/", description="Request path.")
    method: Method = Field(default="GET", description="Request method.")
    headers: dict[str, str] = Field(default={}, description="Extra request headers.")
    expected_status: StatusSet = Field(
        default=DEFAULT_STATUS,
        description="Healthy statuses: 200, [200, 204], '200-399', '200,204'.",
    )
    expected_body: BodyMatch | None = Field(
        default=None, description="Substring the body must contain, or /regex/ it must match."
    )
    port: Port | None = Field(default=None, description="Probe this port instead of the target's.")


class TcpProbe(_Model):
    """An active TCP-connect health probe."""

    type: Literal["tcp"] = Field(default="tcp", description="Probe kind.")
    port: Port | None = Field(
        default=None, description="Connect to this port instead of the target's."
    )
    timeout: Duration | None = Field(
        default=None, description="Connect timeout; else the schedule's."
    )


def _probe_type(value: Any) -> str:
    kind = value.get("type", "http") if isinstance(value, dict) else getattr(value, "type", "http")
    return kind if isinstance(kind, str) else show(kind)


Probe = Annotated[
    Union[Annotated[HttpProbe, Tag("http")], Annotated[TcpProbe, Tag("tcp")]],  # noqa: UP007
    Discriminator(_probe_type),
]


class Schedule(_Model):
    """When probes run."""

    interval: Duration = Field(default=10.0, description="Time between probe rounds.")
    timeout: Duration = Field(default=2.0, description="Time a probe may take.")
    retry: int = Field(
        default=0, ge=0, validation_alias=AliasChoices("retry", "retries"),
        description="Immediate retries of a failed probe before it counts (alias `retries`).",
    )  # fmt: skip


class HealthCheck(_Model):
    """Active health checks; without this block targets count healthy (passive checks still run)."""

    enabled: bool = Field(default=True, description="Run the probes.")
    path: UrlPath | None = Field(
        default=None, description="HTTP probe path; absent: a TCP connect probe."
    )
    method: Method = Field(default="GET", description="HTTP probe method.")
    headers: dict[str, str] = Field(default={}, description="HTTP probe extra headers.")
    expected_status: StatusSet = Field(default=DEFAULT_STATUS, description="Healthy status codes.")
    expected_body: BodyMatch | None = Field(default=None, description="Body substring, or /regex/.")
    port: Port | None = Field(default=None, description="Probe this port instead of the target's.")
    interval: Duration = Field(default=10.0, description="Time between probe rounds.")
    timeout: Duration = Field(default=2.0, description="Time a probe may take.")
    healthy_threshold: int = Field(
        default=2, ge=1, description="Successes in a row to turn healthy."
    )
    unhealthy_threshold: int = Field(
        default=3, ge=1, description="Failures in a row to turn unhealthy."
    )
    probers: int = Field(default=2, ge=1, description="Live nodes probing each target.")
    initial_state: Literal["healthy", "unhealthy"] = Field(
        default="healthy", description="State of a target before its first probes."
    )
    slow_start: Duration | None = Field(
        default=None, description="Ramp a recovered target up; off."
    )
    probes: list[Probe] = Field(
        default=[],
        description="Explicit http/tcp probes; replace path, method, headers, expected_*.",
    )
    schedule: Schedule | None = Field(default=None, description="Replaces interval and timeout.")

    def effective_probes(self) -> list[HttpProbe | TcpProbe]:
        """``probes`` if given, else an HTTP probe when ``path`` is set, else a TCP probe."""
        if self.probes:
            return list(self.probes)
        if self.path is None:
            return [TcpProbe(port=self.port)]
        probe = HttpProbe(path=self.path, method=self.method, headers=self.headers,
                          expected_status=self.expected_status,
                          expected_body=self.expected_body, port=self.port)  # fmt: skip
        return [probe]

    def effective_schedule(self) -> Schedule:
        """``schedule`` if given, else ``interval``/``timeout`` with no retries."""
        return self.schedule or Schedule(interval=self.interval, timeout=self.timeout)


class CircuitBreaker(_Model):
    """Cut a target off while its error ratio is over the threshold."""

    enabled: bool = Field(default=True, description="Use the breaker.")
    threshold: float = Field(
        default=0.5, gt=0, le=1, description="Error ratio (0-1] that opens it."
    )
    min_requests: int = Field(
        default=100, ge=1, description="Requests in the window before it can open."
    )
    interval: Duration = Field(default=60.0, description="Sliding window for the error ratio.")
    half_open_timeout: Duration = Field(
        default=30.0, description="Open time before a trial request."
    )


class RateLimit(_Model):
    """Sliding-window request limit per key, shared by the cluster."""

    enabled: bool = Field(default=True, description="Apply the limit.")
    limit: int = Field(gt=0, description="Requests allowed per key and interval.")
    interval: Duration = Field(default=60.0, description="Window length.")
    key: KeySpec = Field(
        default="client_ip", description="Whose requests count together (see keys)."
    )
    mode: Literal["cluster", "strict"] = Field(
        default="cluster",
        description="cluster: batched deltas; strict: an atomic Redis call a request.",
    )
    on_store_error: Literal["allow", "deny"] = Field(
        default="allow", description="When Redis is down."
    )
    on_missing_key: Literal["allow", "deny", "shared"] = Field(
        default="allow", description="When the key is absent: allow, deny, or one shared bucket."
    )
    max_keys: int = Field(
        default=100_000, ge=1, description="Keys tracked per node; oldest dropped."
    )


class Access(_Model):
    """Client address access control; deny wins, an empty allow allows everyone."""

    allow: list[CIDR] = Field(default=[], description="CIDRs allowed (empty: everyone).")
    deny: list[CIDR] = Field(default=[], description="CIDRs refused with 403.")


class StickySession(_Model):
    """Pin a client to a target with a cookie, across every node."""

    cookie: CookieName = Field(description="Cookie name.")
    ttl: Duration = Field(default=3600.0, description="Session lifetime since last use.")


class ValueMatch(_Model):
    """Match a header or query parameter by value, by regex, or by presence."""

    name: str = Field(min_length=1, description="Header or query parameter name.")
    value: str | None = Field(default=None, description="Exact value.")
    regex: Regex | None = Field(
        default=None, description="Regular expression searched in the value."
    )
    present: bool | None = Field(default=None, description="true: must be present; false: absent.")

    @model_validator(mode="after")
    def _one_test(self) -> ValueMatch:
        given = [k for k in ("value", "regex", "present") if getattr(self, k) is not None]
        if len(given) > 1:
            message = f"give at most one of value, regex, present (got {' and '.join(given)})"
            _problems([((), message)])
        return self


def _one_or_many(value: Any) -> str:
    return "many" if isinstance(value, list) else "one"


ValueMatches = Annotated[
    Union[  # noqa: UP007
        Annotated[ValueMatch, Tag("one")], Annotated[list[ValueMatch], Tag("many")]
    ],
    Discriminator(_one_or_many),
]


class Rule(_Model):
    """A traffic rule: requests matching every condition given go to its targets."""

    name: str = Field(default="", description="The rule's key in `rules:` (filled in).")
    path: UrlPath | None = Field(
        default=None, description="Path glob: `*` any run (`/` too), `?` one."
    )
    method: Annotated[str | list[str], BeforeValidator(_methods), TypeLabel("method(s) or any")] = (
        Field(default="any", description="A method, a list of methods, or any.")
    )
    host: str | None = Field(default=None, min_length=1, description="Host header glob.")
    header: ValueMatches | None = Field(default=None, description="Header match, or a list (all).")
    query: ValueMatches | None = Field(
        default=None, description="Query parameter match, or a list."
    )
    client_cidr: list[CIDR] = Field(default=[], description="Client address in any of these CIDRs.")
    targets: list[str] = Field(default=[], description="Target ids this rule sends to.")
    algorithm: Algorithm | None = Field(default=None, description="Overrides the load balancer's.")
    hash_key: KeySpec | None = Field(default=None, description="Overrides the consistent-hash key.")
    weight: int | None = Field(
        default=None, ge=0, le=100, description="Percent of matches it takes."
    )
    split_key: KeySpec = Field(
        default="client_ip", description="Key that buckets requests for weight."
    )
    sticky_session: StickySession | None = Field(default=None, description="Session affinity.")
    rate_limit: RateLimit | None = Field(default=None, description="Rate limit for this rule.")
    access: Access | None = Field(default=None, description="Access control for this rule.")


class LoadBalancer(_Model):
    """One named load balancer: listeners, targets, policies and rules."""

    name: Name = Field(default="default", description="Unique name (the Redis hash tag).")
    listeners: list[Listener] = Field(default=[], description="Ports to accept on.")
    algorithm: Algorithm = Field(
        default="round_robin", description=f"{', '.join(ALGORITHMS)} or 'pkg.mod:Class'."
    )
    hash_key: KeySpec = Field(default="client_ip", description="Key for consistent_hash.")
    targets: list[Target] = Field(default=[], description="Upstream servers.")
    sticky_sessions: bool = Field(default=True, description="false turns every sticky_session off.")
    sticky_session: StickySession | None = Field(
        default=None, description="For requests no rule takes."
    )
    timeouts: Timeouts = Field(default=Timeouts(), description="Timeouts.")
    limits: Limits = Field(default=Limits(), description="Request-head limits.")
    pool: Pool = Field(default=Pool(), description="Upstream connection pool.")
    trusted_proxies: list[CIDR] = Field(
        default=[], description="CIDRs whose X-Forwarded-For counts."
    )
    health_check: HealthCheck | None = Field(
        default=None, description="Active health checks; or none."
    )
    circuit_breaker: CircuitBreaker | None = Field(default=None, description="Breaker; or none.")
    rate_limit: RateLimit | None = Field(default=None, description="Rate limit over all requests.")
    access: Access | None = Field(default=None, description="Access control over all requests.")
    rules: dict[Name, Rule] = Field(
        default={}, description="Traffic rules by name, tried in order."
    )

    @model_validator(mode="before")
    @classmethod
    def _name_rules(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("rules"), dict):
            rules: dict[Any, Any] = {}
            for key, rule in data["rules"].items():
                if isinstance(key, str) and isinstance(rule, dict) and "name" not in rule:
                    rule = {**rule, "name": key}
                elif isinstance(key, str) and isinstance(rule, Rule) and not rule.name:
                    rule = rule.model_copy(update={"name": key})
                rules[key] = rule
            data = {**data, "rules": rules}
        return data

    @model_validator(mode="after")
    def _cross_check(self) -> LoadBalancer:
        found: list[tuple[Loc, str]] = []
        ids: dict[str, int] = {}
        for i, target in enumerate(self.targets):
            first = ids.setdefault(target.id, i)
            if first != i:
                message = f"duplicate target id {target.id!r} (first at targets[{first}])"
                found.append((("targets", i, "id"), message))
        ports: dict[int, int] = {}
        for i, listener in enumerate(self.listeners):
            first = ports.setdefault(listener.port, i)
            if first != i:
                message = f"port {listener.port} is already used by listeners[{first}]"
                found.append((("listeners", i, "port"), message))
        for key, rule in self.rules.items():
            if rule.name != key:
                message = f"{rule.name!r} does not match its key {key!r}"
                found.append((("rules", key, "name"), message))
            for i, target_id in enumerate(rule.targets):
                if target_id not in ids:
                    message = f"{target_id!r} is not a target of this load balancer"
                    found.append((("rules", key, "targets", i), message))
        _problems(found)
        return self


class Config(_Model):
    """Everything a config file describes: one or more load balancers."""

    load_balancers: list[LoadBalancer] = Field(description="Load balancers, names unique.")

    @model_validator(mode="after")
    def _cross_check(self) -> Config:
        found: list[tuple[Loc, str]] = []
        names: dict[str, int] = {}
        owners: dict[int, str] = {}
        for i, lb in enumerate(self.load_balancers):
            first = names.setdefault(lb.name, i)
            if first != i:
                message = f"duplicate load balancer name {lb.name!r} (first at [{first}])"
                found.append((("load_balancers", i, "name"), message))
            for j, listener in enumerate(lb.listeners):
                owner = owners.setdefault(listener.port, lb.name)
                if owner != lb.name:
                    message = f"port {listener.port} is already used by load balancer {owner!r}"
                    found.append((("load_balancers", i, "listeners", j, "port"), message))
        _problems(found)
        return self


# -- loading ---------------------------------------------------------------------------------

_TOP_KEYS = ("load_balancers", "load_balancer", "rules")
_FORMS = "'load_balancers:' (a list) or 'load_balancer:' (just one)"


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` keys may be overridden
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.problem and exc.context:
            at = f" at line {exc.context_mark.line + 1}" if exc.context_mark else ""
            problem = f"{exc.problem} ({exc.context}{at})"
        raise ConfigError([f"{where}: {' '.join(problem.split())}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: {' '.join(str(exc).split())}"]) from None


def _reshape(data: Any, source: str) -> tuple[dict[str, Any], Callable[[Loc], Loc]]:
    """Form (a) or (b) -> ``{"load_balancers": [...]}``, and the loc mapping back to the file."""
    if data is None:
        raise ConfigError([f"{source}: the file is empty (expected {_FORMS})"])
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the top level must be a mapping, not {show(data)}"])
    problems = []
    for key in data:
        if key not in _TOP_KEYS:
            close = suggest(str(key), _TOP_KEYS)
            hint = f"did you mean {close!r}?" if close else "expected " + ", ".join(_TOP_KEYS)
            problems.append(f"{format_path((str(key),))}: unknown key ({hint})")
    single = "load_balancer" in data
    if single and "load_balancers" in data:
        problems.append("load_balancer: give 'load_balancers:' or 'load_balancer:', not both")
    elif not single and "load_balancers" not in data and not problems:
        problems.append(f"{source}: expected {_FORMS}")
    if problems:
        raise ConfigError(problems)
    entries = [data["load_balancer"]] if single else data["load_balancers"]
    if single and not isinstance(entries[0], dict):
        raise ConfigError([f"load_balancer: expected a mapping, got {show(entries[0])}"])
    if not isinstance(entries, list):
        raise ConfigError([f"load_balancers: expected a list, got {show(entries)}"])
    entries = list(entries)
    top_rules = "rules" in data
    if top_rules:
        if not isinstance(data["rules"], dict):
            got = show(data["rules"])
            raise ConfigError([f"rules: expected a mapping of rule names to rules, got {got}"])
        if len(entries) != 1:
            raise ConfigError([f"rules: top-level rules need exactly one load balancer, not "
                               f"{len(entries)}; give each its own 'rules:'"])  # fmt: skip
        if isinstance(entries[0], dict) and "rules" in entries[0]:
            where = "load_balancer" if single else "load_balancers[0]"
            raise ConfigError([f"rules: given both at the top level and under {where}"])
        if isinstance(entries[0], dict):
            entries[0] = {**entries[0], "rules": data["rules"]}

    def remap(loc: Loc) -> Loc:
        if top_rules and loc[:3] == ("load_balancers", 0, "rules"):
            return ("rules", *loc[3:])
        if single and loc[:2] == ("load_balancers", 0):
            return ("load_balancer", *loc[2:])
        return loc

    return {"load_balancers": entries}, remap


def parse_config(
    data: str | dict[str, Any], source: str = "<config>", base_dir: Path | None = None
) -> Config:
    """Validate a config given as YAML text or as the parsed mapping.

    ``source`` names the input in YAML syntax errors; relative certificate
    paths are resolved against ``base_dir`` when it is given. Raises
    ``ConfigError`` listing every problem, one line each.
    """
    if isinstance(data, str):
        data = _load_yaml(data, source)
    shaped, remap = _reshape(data, source)
    try:
        return Config.model_validate(shaped, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(_validation_problems(exc, Config, remap)) from None


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; certificate paths resolve against its directory."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror or exc})"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    return parse_config(text, source=str(path), base_dir=path.resolve().parent)


# -- serialising -----------------------------------------------------------------------------


def _prune(model: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        if isinstance(model, Rule) and name == "name":
            continue  # it is the mapping key
        value = getattr(model, name)
        keep = name == "type" or (isinstance(model, LoadBalancer) and name == "name")
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        if not (keep or field.is_required()) and value == default:
            continue
        out[name] = _prune_value(value, dumped[name])
    return out


def _prune_value(value: Any, dumped: Any) -> Any:
    if isinstance(value, BaseModel):
        return _prune(value, dumped)
    if isinstance(value, list):
        return [_prune_value(v, d) for v, d in zip(value, dumped, strict=True)]
    if isinstance(value, dict):
        return {k: _prune_value(v, dumped[k]) for k, v in value.items()}
    return dumped


def lb_to_dict(lb: LoadBalancer) -> dict[str, Any]:
    """One load balancer in the config-file form: its ``name`` always, other defaults omitted."""
    return _prune(lb, lb.model_dump(mode="json"))


def config_to_dict(config: Config) -> dict[str, Any]:
    """A whole config in the ``load_balancers:`` file form."""
    return {"load_balancers": [lb_to_dict(lb) for lb in config.load_balancers]}
