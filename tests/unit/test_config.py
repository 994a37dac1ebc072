"""Tests for lbshared.config: the file forms, every validation rule and its message, defaults,
health-check forms, certificate paths, serialisation round trips and the generated reference."""

from __future__ import annotations

import ipaddress
import json
import pickle
import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from lbshared import docgen
from lbshared.config import (
    Access,
    CircuitBreaker,
    Config,
    ConfigError,
    HealthCheck,
    HttpProbe,
    Limits,
    Listener,
    LoadBalancer,
    Pool,
    RateLimit,
    Rule,
    Schedule,
    SSLConfig,
    StatusSet,
    StickySession,
    Target,
    TcpProbe,
    Timeouts,
    ValueMatch,
    config_to_dict,
    lb_to_dict,
    load_config,
    parse_config,
    split_address,
)

REPO = Path(__file__).resolve().parents[2]

# -- the documents' own examples, verbatim (whitespace-only lines included) ------------------

# REFERENCE.md, "Core Configuration".
REFERENCE_CORE = (
    "load_balancer:\n"
    "  listeners:\n"
    "    - protocol: http\n"
    "      port: 80\n"
    "      ssl: false\n"
    "      \n"
    "    - protocol: https\n"
    "      port: 443\n"
    "      ssl:\n"
    "        certificate: /etc/ssl/cert.pem\n"
    "        private_key: /etc/ssl/key.pem\n"
    "        \n"
    "  algorithm: round_robin\n"
    "  sticky_sessions: true\n"
    "  \n"
    "  health_check:\n"
    "    enabled: true\n"
    "    interval: 10s\n"
    "    timeout: 2s\n"
    "    healthy_threshold: 2\n"
    "    unhealthy_threshold: 3\n"
    "    \n"
    "  circuit_breaker:\n"
    "    enabled: true\n"
    "    threshold: 0.5\n"
    "    min_requests: 100\n"
    "    interval: 60s\n"
    "    \n"
    "  rate_limit:\n"
    "    enabled: true\n"
    "    limit: 1000\n"
    "    interval: 60s\n"
)

REFERENCE_RULES = (
    "rules:\n"
    "  api_v2:\n"
    "    path: /api/v2/*\n"
    "    method: any\n"
    "    targets:\n"
    "      - api-v2-1\n"
    "      - api-v2-2\n"
    "    sticky_session:\n"
    "      cookie: session_id\n"
    "      ttl: 1h\n"
    "      \n"
    "  api_canary:\n"
    "    header:\n"
    "      name: X-Canary\n"
    '      value: "true"\n'
    "    targets:\n"
    "      - api-canary-1\n"
    "    weight: 10\n"
)

DESIGN_CONFIG = (
    "load_balancers:\n"
    "  - name: api-lb\n"
    "    listeners:\n"
    "      - {protocol: http, port: 8080}\n"
    "      - {protocol: https, port: 8443, ssl: {certificate: cert.pem, private_key: key.pem}}\n"
    "    algorithm: round_robin          # weighted_round_robin, least_connections, random,\n"
    '                                    # power_of_two, consistent_hash, or "pkg.mod:Class"\n'
    "    hash_key: client_ip             # for consistent_hash: client_ip,"
    " header:NAME, cookie:NAME\n"
    "    targets:\n"
    '      - {id: api-1, address: "127.0.0.1:9001", weight: 100}\n'
    "    timeouts: {connect: 2s, request_headers: 10s, upstream_response: 30s, idle: 60s}\n"
    "    trusted_proxies: []             # CIDRs whose X-Forwarded-For is believed\n"
    "    health_check: {enabled: true, path: /health, interval: 10s, timeout: 2s,\n"
    "                   healthy_threshold: 2, unhealthy_threshold: 3,\n"
    "                   probers: 2}          # live nodes probing each target\n"
    "    circuit_breaker: {enabled: true, threshold: 0.5, min_requests: 100,\n"
    "                      interval: 60s, half_open_timeout: 30s}\n"
    "    rate_limit: {enabled: true, limit: 1000, interval: 60s, key: client_ip,\n"
    "                 mode: cluster,           # or strict: one atomic Redis script per request\n"
    "                 on_store_error: allow}   # or deny, when Redis is unreachable\n"
    '    access: {allow: ["10.0.0.0/8"], deny: []}\n'
    "    rules:\n"
    "      api_v2:\n"
    "        path: /api/v2/*\n"
    "        method: any\n"
    "        targets: [api-1]\n"
    "        sticky_session: {cookie: session_id, ttl: 1h}\n"
    "      api_canary:\n"
    '        header: {name: X-Canary, value: "true"}\n'
    "        targets: [api-1]\n"
    "        weight: 10                  # percent of matching requests this rule takes\n"
)

# What the reference leaves out: the servers its rules name (indented under load_balancer:).
REFERENCE_TARGETS = (
    "  targets:\n"
    '    - {id: api-v2-1, address: "127.0.0.1:9001"}\n'
    '    - {id: api-v2-2, address: "127.0.0.1:9002"}\n'
    '    - {id: api-canary-1, address: "127.0.0.1:9003"}\n'
)


def problems(data: str | dict[str, Any], source: str = "config.yaml") -> list[str]:
    """The problem lines parse_config reports (and that it does report some)."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, source=source)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def lb_yaml(body: str) -> str:
    """A single-load-balancer file whose load_balancer block is ``body`` (indented 2)."""
    return "load_balancer:\n" + "".join(f"  {line}\n" for line in body.strip("\n").splitlines())


# -- the documents' examples load as written -------------------------------------------------


def test_reference_core_configuration_loads_as_written() -> None:
    lb = parse_config(REFERENCE_CORE).load_balancers[0]
    assert lb.name == "default"
    assert lb.listeners == [
        Listener(protocol="http", port=80, ssl=None),
        Listener(
            protocol="https",
            port=443,
            ssl=SSLConfig(certificate="/etc/ssl/cert.pem", private_key="/etc/ssl/key.pem"),
        ),
    ]
    assert lb.algorithm == "round_robin"
    assert lb.sticky_sessions is True
    assert lb.health_check == HealthCheck(
        enabled=True, interval=10, timeout=2, healthy_threshold=2, unhealthy_threshold=3
    )
    assert lb.circuit_breaker == CircuitBreaker(
        enabled=True, threshold=0.5, min_requests=100, interval=60
    )
    assert lb.rate_limit == RateLimit(enabled=True, limit=1000, interval=60)
    assert lb.rules == {}


def test_reference_examples_load_together_once_targets_are_added() -> None:
    text = REFERENCE_CORE + REFERENCE_TARGETS + REFERENCE_RULES
    lb = parse_config(text).load_balancers[0]
    assert [t.id for t in lb.targets] == ["api-v2-1", "api-v2-2", "api-canary-1"]
    assert list(lb.rules) == ["api_v2", "api_canary"]
    v2, canary = lb.rules["api_v2"], lb.rules["api_canary"]
    assert v2 == Rule(
        name="api_v2",
        path="/api/v2/*",
        method="any",
        targets=["api-v2-1", "api-v2-2"],
        sticky_session=StickySession(cookie="session_id", ttl=3600),
    )
    assert canary == Rule(
        name="api_canary",
        header=ValueMatch(name="X-Canary", value="true"),
        targets=["api-canary-1"],
        weight=10,
    )


def test_reference_rules_without_targets_name_each_missing_target() -> None:
    assert problems(REFERENCE_CORE + REFERENCE_RULES) == [
        "rules.api_v2.targets[0]: 'api-v2-1' is not a target of this load balancer",
        "rules.api_v2.targets[1]: 'api-v2-2' is not a target of this load balancer",
        "rules.api_canary.targets[0]: 'api-canary-1' is not a target of this load balancer",
    ]


def test_design_config_block_loads_as_written() -> None:
    (lb,) = parse_config(DESIGN_CONFIG).load_balancers
    assert lb.name == "api-lb"
    assert [(x.protocol, x.port) for x in lb.listeners] == [("http", 8080), ("https", 8443)]
    assert lb.listeners[1].ssl == SSLConfig(certificate="cert.pem", private_key="key.pem")
    assert lb.targets == [Target(id="api-1", address="127.0.0.1:9001", weight=100)]
    assert lb.timeouts == Timeouts(connect=2, request_headers=10, upstream_response=30, idle=60)
    assert lb.trusted_proxies == []
    assert lb.health_check is not None and lb.health_check.path == "/health"
    assert lb.health_check.probers == 2
    assert lb.circuit_breaker == CircuitBreaker(half_open_timeout=30)
    assert lb.rate_limit == RateLimit(limit=1000, key="client_ip", mode="cluster")
    assert lb.access == Access(allow=[ipaddress.ip_network("10.0.0.0/8")], deny=[])
    assert list(lb.rules) == ["api_v2", "api_canary"]
    assert lb.rules["api_v2"].sticky_session == StickySession(cookie="session_id", ttl=3600)
    assert lb.rules["api_canary"].weight == 10


@pytest.mark.parametrize("name", ["reference.yaml", "cluster.yaml"])
def test_examples_load_and_round_trip(name: str) -> None:
    config = load_config(REPO / "examples" / name)
    assert parse_config(config_to_dict(config)) == config


def test_reference_example_is_the_reference_plus_targets() -> None:
    from_docs = parse_config(REFERENCE_CORE + REFERENCE_TARGETS + REFERENCE_RULES)
    assert load_config(REPO / "examples" / "reference.yaml") == from_docs


def test_cluster_example_has_two_load_balancers() -> None:
    config = load_config(REPO / "examples" / "cluster.yaml")
    assert [lb.name for lb in config.load_balancers] == ["api-lb", "admin-lb"]


# -- defaults (DESIGN.md) --------------------------------------------------------------------

DEFAULTS = [
    (lambda: LoadBalancer().name, "default"),
    (lambda: LoadBalancer().sticky_sessions, True),
    (lambda: LoadBalancer().algorithm, "round_robin"),
    (lambda: LoadBalancer().hash_key, "client_ip"),
    (lambda: LoadBalancer().health_check, None),
    (lambda: LoadBalancer().circuit_breaker, None),
    (lambda: LoadBalancer().timeouts.connect, 2.0),
    (lambda: LoadBalancer().timeouts.request_headers, 10.0),
    (lambda: LoadBalancer().timeouts.upstream_response, 30.0),
    (lambda: LoadBalancer().timeouts.idle, 60.0),
    (lambda: LoadBalancer().limits.max_header_bytes, 32768),
    (lambda: LoadBalancer().limits.max_headers, 100),
    (lambda: LoadBalancer().pool, Pool(max_idle_per_target=64, max_connections_per_target=1024)),
    (lambda: HealthCheck().enabled, True),
    (lambda: HealthCheck().interval, 10.0),
    (lambda: HealthCheck().timeout, 2.0),
    (lambda: HealthCheck().healthy_threshold, 2),
    (lambda: HealthCheck().unhealthy_threshold, 3),
    (lambda: HealthCheck().probers, 2),
    (lambda: HealthCheck().initial_state, "healthy"),
    (lambda: HealthCheck().slow_start, None),
    (lambda: HealthCheck().path, None),
    (lambda: HealthCheck().expected_status, StatusSet.parse("200-399")),
    (lambda: CircuitBreaker().enabled, True),
    (lambda: CircuitBreaker().threshold, 0.5),
    (lambda: CircuitBreaker().min_requests, 100),
    (lambda: CircuitBreaker().interval, 60.0),
    (lambda: CircuitBreaker().half_open_timeout, 30.0),
    (lambda: RateLimit(limit=5).enabled, True),
    (lambda: RateLimit(limit=5).interval, 60.0),
    (lambda: RateLimit(limit=5).key, "client_ip"),
    (lambda: RateLimit(limit=5).mode, "cluster"),
    (lambda: RateLimit(limit=5).on_store_error, "allow"),
    (lambda: RateLimit(limit=5).on_missing_key, "allow"),
    (lambda: RateLimit(limit=5).max_keys, 100_000),
    (lambda: StickySession(cookie="s").ttl, 3600.0),
    (lambda: Schedule(), Schedule(interval=10, timeout=2, retry=0)),
    (lambda: Listener(port=1).protocol, "http"),
    (lambda: Listener(port=1).ssl, None),
    (lambda: Listener(port=1).proxy_protocol, False),
    (lambda: Target(id="a", address="h:1").weight, 100),
    (lambda: Rule().method, "any"),
    (lambda: Rule().split_key, "client_ip"),
    (
        lambda: HttpProbe(),
        HttpProbe(path="/", method="GET", expected_status=StatusSet.parse("200-399")),
    ),
]


@pytest.mark.parametrize(("get", "expected"), DEFAULTS)
def test_defaults_are_the_designs(get: Any, expected: object) -> None:
    assert get() == expected


def test_a_file_without_name_gets_default() -> None:
    assert parse_config("load_balancers: [{}]").load_balancers[0].name == "default"
    assert parse_config("load_balancer: {}").load_balancers[0].name == "default"


# -- every validation rule and its message -----------------------------------------------------

ALGORITHMS_HINT = (
    "(expected one of round_robin, weighted_round_robin, least_connections, random,"
    " power_of_two, consistent_hash or 'package.module:Class')"
)
KEY_HINT = (
    "(expected client_ip, path, host, header:NAME, cookie:NAME, query:NAME"
    " or 'package.module:function')"
)
CIDR_HINT = "(e.g. 10.0.0.0/8, 10.1.2.3 or 2001:db8::/32)"
STATUS_HINT = "(e.g. 200, [200, 204], '200-399' or '200,204')"

# (body of the load_balancer block, problem without the leading "load_balancer.")
INVALID = [
    # unknown keys, with a suggestion from that model's own fields
    ("listeners: [{prot: http, port: 80}]",
     "listeners[0].prot: unknown key (did you mean 'protocol'?)"),
    ("listeners: [{protocol: http, port: 80, sll: false}]",
     "listeners[0].sll: unknown key (did you mean 'ssl'?)"),
    ("healthcheck: {}", "healthcheck: unknown key (did you mean 'health_check'?)"),
    ("zzz: 1", "zzz: unknown key"),
    ("timeouts: {conect: 1s}", "timeouts.conect: unknown key (did you mean 'connect'?)"),
    ("health_check: {probes: [{type: tcp, prt: 1}]}",
     "health_check.probes[0].prt: unknown key (did you mean 'port'?)"),
    ("rules: {r: {header: [{name: a}, {name: b, valeu: c}]}}",
     "rules.r.header[1].valeu: unknown key (did you mean 'value'?)"),
    # durations
    ("timeouts: {connect: 10 sec}",
     "timeouts.connect: '10 sec' is not a duration (use 500ms, 10s, 5m, 1h)"),
    ("health_check: {interval: 10 sec}",
     "health_check.interval: '10 sec' is not a duration (use 500ms, 10s, 5m, 1h)"),
    ("timeouts: {idle: 0}", "timeouts.idle: 0 must be longer than 0"),
    ("timeouts: {idle: -5s}",
     "timeouts.idle: '-5s' is not a duration (use 500ms, 10s, 5m, 1h)"),
    # CIDRs
    ("trusted_proxies: [10.0.0.300/8]",
     f"trusted_proxies[0]: '10.0.0.300/8' is not a CIDR {CIDR_HINT}"),
    ("access: {deny: [5]}", f"access.deny[0]: 5 is not a CIDR {CIDR_HINT}"),
    ("trusted_proxies: 10.0.0.0/8", "trusted_proxies: expected a list, got '10.0.0.0/8'"),
    # algorithms and keys
    ("algorithm: round-robin",
     f"algorithm: 'round-robin' is not an algorithm {ALGORITHMS_HINT}"),
    ("algorithm: 'my plugin:X'",
     f"algorithm: 'my plugin:X' is not an algorithm {ALGORITHMS_HINT}"),
    ("hash_key: ip", f"hash_key: 'ip' is not a key {KEY_HINT}"),
    ("rate_limit: {limit: 1, key: 'header:'}",
     f"rate_limit.key: 'header:' is not a key {KEY_HINT}"),
    ("rate_limit: {limit: 1, key: 'cookie:a b'}",
     f"rate_limit.key: 'cookie:a b' is not a key {KEY_HINT}"),
    # targets
    ("targets: [{id: a, address: 10.0.0.1}]", "targets[0].address: '10.0.0.1' has no port"),
    ("targets: [{id: a, address: '10.0.0.1:0'}]",
     "targets[0].address: '10.0.0.1:0' has a port outside 1..65535"),
    ("targets: [{id: a, address: '10.0.0.1:65536'}]",
     "targets[0].address: '10.0.0.1:65536' has a port outside 1..65535"),
    ("targets: [{id: a, address: ':80'}]", "targets[0].address: ':80' has no host"),
    ("targets: [{id: a, address: '::1:80'}]",
     "targets[0].address: '::1:80': write an IPv6 address in brackets, '[::1]:80'"),
    ("targets: [{id: a, address: '[nothost]:80'}]",
     "targets[0].address: '[nothost]:80' has no valid IPv6 address in brackets"),
    ("targets: [{id: a, address: 'a b:80'}]", "targets[0].address: 'a b:80' has no valid host"),
    ("targets: [{id: a, address: 'h:1', weight: 10001}]",
     "targets[0].weight: 10001 must be <= 10000"),
    ("targets: [{id: 'a b', address: 'h:1'}]",
     "targets[0].id: 'a b' is not a valid name (letters, digits, '_', '.', '-')"),
    ("targets: [{address: 'h:1'}]", "targets[0].id: required key is missing"),
    ("targets: [{id: a, address: 'h:1'}, {id: a, address: 'h:2'}]",
     "targets[1].id: duplicate target id 'a' (first at targets[0])"),
    # listeners
    ("listeners: [{port: 80}, {port: 80}]",
     "listeners[1].port: port 80 is already used by listeners[0]"),
    ("listeners: [{port: 0}]", "listeners[0].port: 0 must be >= 1"),
    ("listeners: [{port: 65536}]", "listeners[0].port: 65536 must be <= 65535"),
    ("listeners: [{port: http}]", "listeners[0].port: 'http' is not an integer"),
    ("listeners: [{protocol: ftp, port: 21}]",
     "listeners[0].protocol: 'ftp' is not one of 'http' or 'https'"),
    ("listeners: [{protocol: https, port: 443}]",
     "listeners[0].ssl: https listener on port 443 needs certificate and private_key"),
    ("listeners: [{protocol: https, port: 443, ssl: false}]",
     "listeners[0].ssl: https listener on port 443 needs certificate and private_key"),
    ("listeners: [{port: 80, ssl: {certificate: c, private_key: k}}]",
     "listeners[0].ssl: ssl is set on http listener port 80 (use protocol: https)"),
    ("listeners: [{port: 80, ssl: true}]",
     "listeners[0].ssl: true is not an ssl block (give certificate and private_key, or false)"),
    ("listeners: [{protocol: https, port: 443, ssl: {certificate: c}}]",
     "listeners[0].ssl.private_key: required key is missing"),
    # health checks
    ("health_check: {expected_status: '600'}",
     f"health_check.expected_status: '600' is not a set of status codes {STATUS_HINT}"),
    ("health_check: {expected_status: ok}",
     f"health_check.expected_status: 'ok' is not a set of status codes {STATUS_HINT}"),
    ("health_check: {expected_body: '/(/'}",
     "health_check.expected_body: '(' is not a valid regular expression"
     " (missing ), unterminated subpattern at position 0)"),
    ("health_check: {path: health}", "health_check.path: 'health' must start with '/'"),
    ("health_check: {method: 'GE T'}", "health_check.method: 'GE T' is not an HTTP method"),
    ("health_check: {healthy_threshold: 0}", "health_check.healthy_threshold: 0 must be >= 1"),
    ("health_check: {probers: 0}", "health_check.probers: 0 must be >= 1"),
    ("health_check: {initial_state: up}",
     "health_check.initial_state: 'up' is not one of 'healthy' or 'unhealthy'"),
    ("health_check: {probes: [{type: udp}]}",
     "health_check.probes[0].type: 'udp' is not one of 'http', 'tcp'"),
    ("health_check: {probes: [{type: tcp, port: 70000}]}",
     "health_check.probes[0].port: 70000 must be <= 65535"),
    ("health_check: {probes: [tcp]}", "health_check.probes[0]: expected a mapping, got 'tcp'"),
    ("health_check: {schedule: {retries: -1}}",
     "health_check.schedule.retries: -1 must be >= 0"),
    # breaker, rate limit, sticky sessions
    ("circuit_breaker: {threshold: 1.5}", "circuit_breaker.threshold: 1.5 must be <= 1.0"),
    ("circuit_breaker: {threshold: 0}", "circuit_breaker.threshold: 0 must be > 0.0"),
    ("circuit_breaker: {min_requests: 0}", "circuit_breaker.min_requests: 0 must be >= 1"),
    ("rate_limit: {interval: 1s}", "rate_limit.limit: required key is missing"),
    ("rate_limit: {limit: 0}", "rate_limit.limit: 0 must be > 0"),
    ("rate_limit: {limit: 1, mode: fast}",
     "rate_limit.mode: 'fast' is not one of 'cluster' or 'strict'"),
    ("rate_limit: {limit: 1, on_store_error: retry}",
     "rate_limit.on_store_error: 'retry' is not one of 'allow' or 'deny'"),
    ("sticky_session: {cookie: 'a b'}", "sticky_session.cookie: 'a b' is not a valid cookie name"),
    ("sticky_session: {ttl: 1h}", "sticky_session.cookie: required key is missing"),
    ("sticky_sessions: maybe", "sticky_sessions: 'maybe' is not true or false"),
    ("limits: {max_headers: 0}", "limits.max_headers: 0 must be >= 1"),
    # rules
    ("rules: {r: {targets: [api-9]}}",
     "rules.r.targets[0]: 'api-9' is not a target of this load balancer"),
    ("rules: {r: {name: other}}", "rules.r.name: 'other' does not match its key 'r'"),
    ("rules: {'bad key': {}}",
     "rules['bad key']: 'bad key' is not a valid name (letters, digits, '_', '.', '-')"),
    ("rules: {r: {path: api}}", "rules.r.path: 'api' must start with '/'"),
    ("rules: {r: {method: 'G T'}}", "rules.r.method: 'G T' is not an HTTP method"),
    ("rules: {r: {method: []}}",
     "rules.r.method: an empty method list matches nothing (use any)"),
    ("rules: {r: {weight: 101}}", "rules.r.weight: 101 must be <= 100"),
    ("rules: {r: {algorithm: fastest}}",
     f"rules.r.algorithm: 'fastest' is not an algorithm {ALGORITHMS_HINT}"),
    ("rules: {r: {split_key: ip}}", f"rules.r.split_key: 'ip' is not a key {KEY_HINT}"),
    ("rules: {r: {client_cidr: [nope]}}",
     f"rules.r.client_cidr[0]: 'nope' is not a CIDR {CIDR_HINT}"),
    ("rules: {r: {header: {name: a, regex: '('}}}",
     "rules.r.header.regex: '(' is not a valid regular expression"
     " (missing ), unterminated subpattern at position 0)"),
    ("rules: {r: {query: [{name: a, regex: '['}]}}",
     "rules.r.query[0].regex: '[' is not a valid regular expression"
     " (unterminated character set at position 0)"),
    ("rules: {r: {header: {name: a, value: b, present: true}}}",
     "rules.r.header: give at most one of value, regex, present (got value and present)"),
    ("rules: {r: {header: {value: b}}}", "rules.r.header.name: required key is missing"),
    ("rules: {r: {header: {name: a, value: true}}}",
     "rules.r.header.value: expected a string, got true"),
    ("rules: {r: {sticky_session: {cookie: s, ttl: forever}}}",
     "rules.r.sticky_session.ttl: 'forever' is not a duration (use 500ms, 10s, 5m, 1h)"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "expected"), INVALID)
def test_each_rule_reports_its_exact_message(body: str, expected: str) -> None:
    assert problems(lb_yaml(body)) == ["load_balancer." + expected]


def test_all_problems_are_reported_at_once() -> None:
    text = lb_yaml("""
listeners:
  - {prot: http, port: 8080}
targets:
  - {id: api-1, address: "10.0.0.1"}
timeouts: {connect: 10 sec}
algorithm: round-robin
""")
    assert problems(text) == [
        "load_balancer.listeners[0].prot: unknown key (did you mean 'protocol'?)",
        f"load_balancer.algorithm: 'round-robin' is not an algorithm {ALGORITHMS_HINT}",
        "load_balancer.targets[0].address: '10.0.0.1' has no port",
        "load_balancer.timeouts.connect: '10 sec' is not a duration (use 500ms, 10s, 5m, 1h)",
    ]


def test_cross_reference_problems_are_all_reported() -> None:
    text = lb_yaml("""
listeners: [{port: 80}, {port: 80}]
targets: [{id: a, address: "h:1"}, {id: a, address: "h:2"}]
rules:
  x: {targets: [a, b, c]}
""")
    assert problems(text) == [
        "load_balancer.targets[1].id: duplicate target id 'a' (first at targets[0])",
        "load_balancer.listeners[1].port: port 80 is already used by listeners[0]",
        "load_balancer.rules.x.targets[1]: 'b' is not a target of this load balancer",
        "load_balancer.rules.x.targets[2]: 'c' is not a target of this load balancer",
    ]


# -- paths read as the file is written ------------------------------------------------------


PATHS = [
    ("load_balancers:\n  - targets: [{id: a, address: 'h:1'}, {id: b, address: 10.0.0.1}]\n",
     "load_balancers[0].targets[1].address: '10.0.0.1' has no port"),
    ("load_balancers:\n  - listeners: [{prot: http, port: 80}]\n",
     "load_balancers[0].listeners[0].prot: unknown key (did you mean 'protocol'?)"),
    ("load_balancers:\n  - name: api-lb\n    targets: [{id: a, address: 'h:1'}]\n"
     "    rules: {api_v2: {targets: [a, api-9]}}\n",
     "load_balancers[0].rules.api_v2.targets[1]: 'api-9' is not a target of this load balancer"),
    ("load_balancer:\n  targets: [{id: a, address: 'h:1'}]\n"
     "rules:\n  api_v2: {targets: [a, api-9]}\n",
     "rules.api_v2.targets[1]: 'api-9' is not a target of this load balancer"),
    ("load_balancers:\n  - targets: [{id: a, address: 'h:1'}]\nrules:\n  api_v2: {targets: [x]}\n",
     "rules.api_v2.targets[0]: 'x' is not a target of this load balancer"),
    ("load_balancer: {}\nrules:\n  api_v2: {header: {name: x, vale: y}}\n",
     "rules.api_v2.header.vale: unknown key (did you mean 'value'?)"),
    ("load_balancers:\n  - {name: a, listeners: [{port: 80}]}\n"
     "  - {name: b, listeners: [{port: 80}]}\n",
     "load_balancers[1].listeners[0].port: port 80 is already used by load balancer 'a'"),
    ("load_balancers:\n  - {name: a}\n  - {name: a}\n",
     "load_balancers[1].name: duplicate load balancer name 'a' (first at [0])"),
    ("load_balancers:\n  - {name: a}\n  - {name: 'b c'}\n",
     "load_balancers[1].name: 'b c' is not a valid name (letters, digits, '_', '.', '-')"),
    ("load_balancers: [5]\n", "load_balancers[0]: expected a mapping, got 5"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), PATHS)
def test_problem_paths_follow_the_file_form(text: str, expected: str) -> None:
    assert problems(text) == [expected]


TOP_LEVEL = [
    ("", "config.yaml: the file is empty (expected 'load_balancers:' (a list) or"
         " 'load_balancer:' (just one))"),
    ("# only a comment\n", "config.yaml: the file is empty (expected 'load_balancers:' (a list) or"
                           " 'load_balancer:' (just one))"),
    ("- a\n- b\n", "config.yaml: the top level must be a mapping, not a list"),
    ("just text\n", "config.yaml: the top level must be a mapping, not 'just text'"),
    ("rules: {}\n",
     "config.yaml: expected 'load_balancers:' (a list) or 'load_balancer:' (just one)"),
    ("loadbalancer: {}\n", "loadbalancer: unknown key (did you mean 'load_balancer'?)"),
    ("load_balancer: {}\nextra: 1\n",
     "extra: unknown key (expected load_balancers, load_balancer, rules)"),
    ("load_balancer: {}\nload_balancers: []\n",
     "load_balancer: give 'load_balancers:' or 'load_balancer:', not both"),
    ("load_balancer: [1]\n", "load_balancer: expected a mapping, got a list"),
    ("load_balancer:\n", "load_balancer: expected a mapping, got null"),
    ("load_balancers: {a: 1}\n", "load_balancers: expected a list, got a mapping"),
    ("load_balancer: {}\nrules: [a]\n",
     "rules: expected a mapping of rule names to rules, got a list"),
    ("load_balancers: [{name: a}, {name: b}]\nrules: {}\n",
     "rules: top-level rules need exactly one load balancer, not 2; give each its own 'rules:'"),
    ("load_balancer: {rules: {}}\nrules: {}\n",
     "rules: given both at the top level and under load_balancer"),
    ("load_balancers: [{rules: {}}]\nrules: {}\n",
     "rules: given both at the top level and under load_balancers[0]"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), TOP_LEVEL)
def test_top_level_problems(text: str, expected: str) -> None:
    assert problems(text) == [expected]


def test_empty_load_balancers_list_is_an_empty_config() -> None:
    assert parse_config("load_balancers: []\n") == Config(load_balancers=[])


YAML_ERRORS = [
    ("load_balancer:\n  listeners:\n  - port: 80\n   protocol: http\n",
     "config.yaml:4:4: expected <block end>, but found '<block mapping start>'"
     " (while parsing a block mapping at line 2)"),
    ("load_balancer:\n\tname: x\n",
     "config.yaml:2:1: found character '\\t' that cannot start any token"
     " (while scanning for the next token)"),
    ("load_balancer: {name: a\n",
     "config.yaml:2:1: expected ',' or '}', but got '<stream end>'"
     " (while parsing a flow mapping at line 1)"),
    ("load_balancer:\n  name: a\n  name: b\n", "config.yaml:3:3: duplicate key 'name'"),
    ("a: 1\n---\nb: 2\n",
     "config.yaml:2:1: but found another document (expected a single document in the stream"
     " at line 1)"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), YAML_ERRORS)
def test_yaml_syntax_errors_name_line_and_column(text: str, expected: str) -> None:
    assert problems(text) == [expected]


def test_merge_keys_may_override_without_a_duplicate_error() -> None:
    text = """
base: &base {protocol: http, port: 80}
load_balancer:
  listeners:
    - {<<: *base, port: 81}
"""
    # `base` is not a top-level key we know: the merge itself went through.
    assert problems(text) == ["base: unknown key (expected load_balancers, load_balancer, rules)"]
    ok = "load_balancer:\n  timeouts: &t {connect: 1s}\n  pool: {max_idle_per_target: 1}\n"
    assert parse_config(ok).load_balancers[0].timeouts.connect == 1.0


def test_config_error_is_one_line_per_problem() -> None:
    error = ConfigError(["a: x", "b: y"])
    assert isinstance(error, Exception)
    assert error.problems == ["a: x", "b: y"]
    assert str(error) == "a: x\nb: y"
    assert pickle.loads(pickle.dumps(error)).problems == ["a: x", "b: y"]  # e.g. from a worker


def test_no_pydantic_noise_in_messages() -> None:
    text = lb_yaml("listeners: [{port: x, protocol: ftp}]\ntimeouts: {idle: soon}\nzzz: 1")
    for line in problems(text):
        assert "Value error" not in line and "http" not in line.split(":", 1)[0]
        assert "pydantic" not in line and "\n" not in line


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LoadBalancer(name="api\n"), "'api\\n' is not a valid name"),
        (lambda: HttpProbe(method="GET\n"), "'GET\\n' is not an HTTP method"),
        (lambda: StickySession(cookie="sid\n"), "'sid\\n' is not a valid cookie name"),
        (lambda: Target(id="a", address="h\n:1"), "'h\\n:1' has no valid host"),
    ],
)
def test_a_trailing_newline_is_not_a_valid_token(make: Any, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        make()
    assert message in str(info.value)


def test_python_api_rejects_unknown_keys_and_is_frozen() -> None:
    with pytest.raises(ValidationError):
        Target(id="a", address="h:1", wieght=3)  # type: ignore[call-arg]
    target = Target(id="a", address="h:1")
    with pytest.raises(ValidationError):
        target.weight = 5  # type: ignore[misc]


# -- values ----------------------------------------------------------------------------------------

ADDRESSES = [
    ("127.0.0.1:9001", "127.0.0.1", 9001),
    ("api.internal:80", "api.internal", 80),
    ("api_1:65535", "api_1", 65535),
    ("[::1]:8080", "::1", 8080),
    ("[2001:db8::5]:1", "2001:db8::5", 1),
]


@pytest.mark.parametrize(("address", "host", "port"), ADDRESSES)
def test_target_host_and_port(address: str, host: str, port: int) -> None:
    target = Target(id="t", address=address)
    assert (target.host, target.port) == (host, port)
    assert split_address(address) == (host, port)


def test_target_copies_recompute_host_and_port() -> None:
    target = Target(id="t", address="a:1")
    assert (target.host, target.port) == ("a", 1)
    moved = target.model_copy(update={"address": "b:2"})
    assert (moved.host, moved.port) == ("b", 2)
    assert target == Target(id="t", address="a:1")  # cached values do not affect equality


STATUS_SETS = [
    (200, [200], [199, 201]),
    ("200-399", [200, 301, 399], [199, 400]),
    ("200,204", [200, 204], [201, 203]),
    ([200, 204], [200, 204], [202]),
    ("200-299,300-302", [250, 302], [303]),
    (" 204 , 200 ", [200, 204], [201]),
]


@pytest.mark.parametrize(("written", "inside", "outside"), STATUS_SETS)
def test_status_sets(written: object, inside: list[int], outside: list[int]) -> None:
    statuses = HealthCheck.model_validate({"expected_status": written}).expected_status
    assert all(code in statuses for code in inside)
    assert not any(code in statuses for code in outside)
    assert StatusSet.parse(str(statuses)) == statuses


@pytest.mark.parametrize("written", ["", "2xx", "399-200", "99", "200-600", [], [True], True, 1.5])
def test_bad_status_sets(written: object) -> None:
    with pytest.raises(ValueError, match="is not a set of status codes"):
        StatusSet.parse(written)


def test_status_set_canonical_form_merges_ranges() -> None:
    assert str(StatusSet.parse("300-399,200-299,204")) == "200-399"
    assert str(StatusSet.parse([204, 200])) == "200,204"


METHODS = [
    ("any", "any"),
    ("ANY", "any"),
    ("Any", "any"),
    ("get", "GET"),
    ("POST", "POST"),
    (["get", "post"], ["GET", "POST"]),
    (["GET"], ["GET"]),
    (["GET", "any"], "any"),
]


@pytest.mark.parametrize(("written", "stored"), METHODS)
def test_rule_methods_are_normalised(written: object, stored: object) -> None:
    assert Rule.model_validate({"method": written}).method == stored


def test_probe_methods_are_upper_case() -> None:
    assert HttpProbe(method="head").method == "HEAD"
    assert HealthCheck(method="options").method == "OPTIONS"


CIDRS = [
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("10.0.0.1", "10.0.0.1/32"),
    ("10.1.2.3/8", "10.0.0.0/8"),
    ("2001:db8::/32", "2001:db8::/32"),
    ("::1", "::1/128"),
]


@pytest.mark.parametrize(("written", "network"), CIDRS)
def test_cidrs_are_networks_and_host_bits_are_dropped(written: str, network: str) -> None:
    assert Access.model_validate({"allow": [written]}).allow == [ipaddress.ip_network(network)]


KEYS = [
    "client_ip", "path", "host", "header:X-Api-Key", "Header:X-User", "cookie:session",
    "query:user id", "my_keys:by_tenant", "pkg.mod:Class.method",
]  # fmt: skip


@pytest.mark.parametrize("key", KEYS)
def test_key_specs_accepted(key: str) -> None:
    assert RateLimit(limit=1, key=key).key == key
    assert Rule(split_key=key, hash_key=key).hash_key == key


@pytest.mark.parametrize(
    "algorithm",
    [
        "round_robin",
        "weighted_round_robin",
        "least_connections",
        "random",
        "power_of_two",
        "consistent_hash",
        "pkg.mod:Algo",
    ],
)
def test_algorithms_accepted(algorithm: str) -> None:
    assert LoadBalancer(algorithm=algorithm).algorithm == algorithm


def test_ssl_false_means_plain_http() -> None:
    text = lb_yaml("listeners: [{protocol: http, port: 80, ssl: false}]")
    lb = parse_config(text).load_balancers[0]
    assert lb.listeners == [Listener(port=80)]
    assert lb.listeners[0].ssl is None


def test_value_match_forms() -> None:
    rule = Rule.model_validate(
        {
            "header": [{"name": "a"}, {"name": "b", "present": False}],
            "query": {"name": "q", "regex": "^x"},
        }
    )
    assert rule.header == [ValueMatch(name="a"), ValueMatch(name="b", present=False)]
    assert rule.query == ValueMatch(name="q", regex="^x")


def test_rule_names_come_from_their_keys() -> None:
    lb = LoadBalancer.model_validate({"rules": {"first": Rule(), "second": {"path": "/x"}}})
    assert [r.name for r in lb.rules.values()] == ["first", "second"]
    with pytest.raises(ValidationError, match="'other' does not match its key 'first'"):
        LoadBalancer(rules={"first": Rule(name="other")})


# -- health checks: the block form and the probes/schedule form ------------------------------------


def test_health_check_with_path_is_one_http_probe() -> None:
    check = (
        parse_config(
            lb_yaml("""
health_check:
  path: /health
  method: head
  headers: {User-Agent: HealthCheck/1.0}
  expected_status: 200
  expected_body: ok
  port: 8081
  interval: 5s
  timeout: 500ms
""")
        )
        .load_balancers[0]
        .health_check
    )
    assert check is not None
    assert check.effective_probes() == [
        HttpProbe(path="/health", method="HEAD", headers={"User-Agent": "HealthCheck/1.0"},
                  expected_status=StatusSet.parse(200), expected_body="ok", port=8081)
    ]  # fmt: skip
    assert check.effective_schedule() == Schedule(interval=5, timeout=0.5, retry=0)


def test_health_check_without_path_is_a_tcp_probe() -> None:
    check = HealthCheck.model_validate({"port": 9000, "interval": "3s", "timeout": "1s"})
    assert check.effective_probes() == [TcpProbe(port=9000)]
    assert check.effective_schedule() == Schedule(interval=3, timeout=1)


def test_health_check_with_probes_and_schedule() -> None:
    check = (
        parse_config(
            lb_yaml("""
health_check:
  path: /ignored-when-probes-are-given
  probes:
    - type: http
      path: /health
      method: GET
      headers: {User-Agent: HealthCheck/1.0}
      expected_status: 200
      expected_body: null
    - type: tcp
      port: 8080
      timeout: 2s
    - {path: /ready, expected_body: "/^ready$/"}
  schedule:
    interval: 10s
    timeout: 2s
    retry: 3
""")
        )
        .load_balancers[0]
        .health_check
    )
    assert check is not None
    probes = check.effective_probes()
    assert probes == [
        HttpProbe(
            path="/health",
            headers={"User-Agent": "HealthCheck/1.0"},
            expected_status=StatusSet.parse(200),
        ),
        TcpProbe(port=8080, timeout=2),
        HttpProbe(path="/ready", expected_body="/^ready$/"),
    ]
    assert isinstance(probes[2], HttpProbe)  # `type` defaults to http
    assert isinstance(probes[0], HttpProbe)
    assert 200 in probes[0].expected_status and 201 not in probes[0].expected_status
    assert check.effective_schedule() == Schedule(interval=10, timeout=2, retry=3)


def test_schedule_accepts_retries_as_an_alias() -> None:
    assert Schedule.model_validate({"retries": 2}).retry == 2
    assert Schedule(retry=1).retry == 1


# -- certificate paths -----------------------------------------------------------------------------

CERT_CONFIG = """
load_balancer:
  listeners:
    - {protocol: https, port: 8443, ssl: {certificate: cert.pem, private_key: keys/key.pem}}
    - {protocol: https, port: 9443, ssl: {certificate: /abs/cert.pem, private_key: /abs/key.pem}}
"""


def test_load_config_resolves_relative_cert_paths_against_the_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "lb.yaml"
    path.parent.mkdir()
    path.write_text(CERT_CONFIG)
    first, second = load_config(path).load_balancers[0].listeners
    assert first.ssl == SSLConfig(
        certificate=str(path.parent / "cert.pem"), private_key=str(path.parent / "keys" / "key.pem")
    )
    assert second.ssl == SSLConfig(certificate="/abs/cert.pem", private_key="/abs/key.pem")


def test_parse_config_resolves_only_when_given_a_base_dir(tmp_path: Path) -> None:
    plain = parse_config(CERT_CONFIG).load_balancers[0].listeners[0].ssl
    assert plain == SSLConfig(certificate="cert.pem", private_key="keys/key.pem")
    based = parse_config(CERT_CONFIG, base_dir=tmp_path).load_balancers[0].listeners[0].ssl
    assert based is not None and based.certificate == str(tmp_path / "cert.pem")


def test_load_config_names_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.problems == [f"{missing}: cannot read (No such file or directory)"]


def test_load_config_names_the_file_in_yaml_errors(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("load_balancer:\n  name: a\n  name: b\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}:3:3: duplicate key 'name'"]


# -- serialisation -------------------------------------------------------------------------------


def test_lb_to_dict_omits_defaults_and_writes_file_forms() -> None:
    lb = parse_config(DESIGN_CONFIG).load_balancers[0]
    assert lb_to_dict(lb) == {
        "name": "api-lb",
        "listeners": [
            {"port": 8080},
            {"protocol": "https", "port": 8443,
             "ssl": {"certificate": "cert.pem", "private_key": "key.pem"}},
        ],
        "targets": [{"id": "api-1", "address": "127.0.0.1:9001"}],
        "health_check": {"path": "/health"},
        "circuit_breaker": {},
        "rate_limit": {"limit": 1000},
        "access": {"allow": ["10.0.0.0/8"]},
        "rules": {
            "api_v2": {"path": "/api/v2/*", "targets": ["api-1"],
                       "sticky_session": {"cookie": "session_id"}},
            "api_canary": {"header": {"name": "X-Canary", "value": "true"},
                           "targets": ["api-1"], "weight": 10},
        },
    }  # fmt: skip


def test_serialised_durations_statuses_and_probe_types() -> None:
    lb = LoadBalancer(
        name="x",
        timeouts=Timeouts(connect=0.5, idle=120),
        health_check=HealthCheck(expected_status=StatusSet.parse([200, 204]), slow_start=90,
                                 probes=[TcpProbe(port=1), HttpProbe()]),
        trusted_proxies=[ipaddress.ip_network("10.1.2.3")],
    )  # fmt: skip
    assert lb_to_dict(lb) == {
        "name": "x",
        "timeouts": {"connect": "500ms", "idle": "2m"},
        "trusted_proxies": ["10.1.2.3/32"],
        "health_check": {"expected_status": "200,204", "slow_start": "90s",
                         "probes": [{"type": "tcp", "port": 1}, {"type": "http"}]},
    }  # fmt: skip


def test_config_to_dict_is_the_list_form() -> None:
    config = parse_config(REFERENCE_CORE + REFERENCE_TARGETS + REFERENCE_RULES)
    data = config_to_dict(config)
    assert list(data) == ["load_balancers"]
    assert data["load_balancers"][0]["name"] == "default"
    assert "name" not in data["load_balancers"][0]["rules"]["api_v2"]
    assert parse_config(yaml.safe_dump(data, sort_keys=False)) == config


# -- round trip property ---------------------------------------------------------------------

_NAME_CHARS = string.ascii_lowercase + string.digits + "_.-"
names = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from(string.ascii_letters + string.digits),
    st.text(_NAME_CHARS, max_size=6),
)
durations = st.integers(min_value=1, max_value=10**8).map(lambda ms: ms / 1000)
texts = st.text(string.ascii_letters + string.digits + " -_./:", max_size=8)
ports = st.integers(min_value=1, max_value=65535)
header_names = st.sampled_from(["X-Canary", "User-Agent", "x-api-key", "Accept"])
cidrs = st.one_of(
    st.builds(lambda a, p: ipaddress.ip_network(f"{a}/{p}", strict=False),
              st.ip_addresses(v=4), st.integers(0, 32)),
    st.builds(lambda a, p: ipaddress.ip_network(f"{a}/{p}", strict=False),
              st.ip_addresses(v=6), st.integers(0, 128)),
)  # fmt: skip
keys = st.sampled_from(["client_ip", "path", "host", "header:X-User", "cookie:sid", "query:u",
                        "mypkg.keys:tenant"])  # fmt: skip
algorithms = st.sampled_from(["round_robin", "least_connections", "consistent_hash", "pkg.m:Algo"])
statuses = st.sampled_from([200, "200-299", "200,204", [200, 301], "100-599"]).map(StatusSet.parse)
bodies = st.sampled_from(["ok", "/^ok$/", "/"])


def optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Keyword arguments where each field may be left out (then the model's default applies)."""
    return st.fixed_dictionaries({}, optional=fields)


def model(cls: type[Any], **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return optional(**fields).map(lambda kwargs: cls(**kwargs))


sticky = st.builds(StickySession, cookie=st.sampled_from(["sid", "session_id"]), ttl=durations)
rate_limits = st.builds(lambda limit, rest: RateLimit(limit=limit, **rest),
                        st.integers(1, 10**6),
                        optional(enabled=st.booleans(), interval=durations, key=keys,
                                 mode=st.sampled_from(["cluster", "strict"]),
                                 on_store_error=st.sampled_from(["allow", "deny"]),
                                 on_missing_key=st.sampled_from(["allow", "deny", "shared"]),
                                 max_keys=st.integers(1, 10**6)))  # fmt: skip
accesses = model(Access, allow=st.lists(cidrs, max_size=2), deny=st.lists(cidrs, max_size=2))
value_matches = st.one_of(
    st.builds(ValueMatch, name=header_names),
    st.builds(ValueMatch, name=header_names, value=texts),
    st.builds(ValueMatch, name=header_names, regex=st.sampled_from(["^a", "b+", "(x|y)$"])),
    st.builds(ValueMatch, name=header_names, present=st.booleans()),
)
matches = st.one_of(value_matches, st.lists(value_matches, max_size=2))
http_probes = model(HttpProbe, path=st.sampled_from(["/", "/health"]),
                    method=st.sampled_from(["GET", "HEAD"]),
                    headers=st.dictionaries(header_names, texts, max_size=2),
                    expected_status=statuses, expected_body=bodies, port=ports)  # fmt: skip
tcp_probes = model(TcpProbe, port=ports, timeout=durations)
health_checks = model(
    HealthCheck, enabled=st.booleans(), path=st.sampled_from(["/", "/health"]),
    method=st.sampled_from(["GET", "HEAD"]),
    headers=st.dictionaries(header_names, texts, max_size=2),
    expected_status=statuses, expected_body=bodies, port=ports, interval=durations,
    timeout=durations, healthy_threshold=st.integers(1, 10), unhealthy_threshold=st.integers(1, 10),
    probers=st.integers(1, 5), initial_state=st.sampled_from(["healthy", "unhealthy"]),
    slow_start=durations, probes=st.lists(st.one_of(http_probes, tcp_probes), max_size=3),
    schedule=model(Schedule, interval=durations, timeout=durations, retry=st.integers(0, 5)),
)  # fmt: skip
breakers = model(CircuitBreaker, enabled=st.booleans(),
                 threshold=st.floats(min_value=0, max_value=1, exclude_min=True),
                 min_requests=st.integers(1, 1000), interval=durations,
                 half_open_timeout=durations)  # fmt: skip


@st.composite
def load_balancers(draw: st.DrawFn, name: str, listen_ports: list[int]) -> LoadBalancer:
    ids = draw(st.lists(names, unique=True, max_size=4))
    hosts = st.sampled_from(["127.0.0.1", "api.internal", "[::1]"])
    weights = optional(weight=st.integers(0, 10000))
    targets = [Target(id=i, address=f"{draw(hosts)}:{draw(ports)}", **draw(weights)) for i in ids]
    listeners = []
    for port in listen_ports:
        https = draw(st.booleans())
        cert = draw(st.sampled_from(["c.pem", "/etc/c.pem"]))
        ssl = SSLConfig(certificate=cert, private_key="k.pem")
        listeners.append(Listener(port=port, protocol="https" if https else "http",
                                  ssl=ssl if https else None,
                                  **draw(optional(proxy_protocol=st.booleans()))))  # fmt: skip
    rule_targets = st.lists(st.sampled_from(ids), max_size=3) if ids else st.just([])
    rules = model(
        Rule, path=st.sampled_from(["/api/*", "/a?c", "*"]),
        method=st.sampled_from(["any", "GET", ["GET", "POST"]]),
        host=st.sampled_from(["*.example.com"]), header=matches, query=matches,
        client_cidr=st.lists(cidrs, max_size=2), targets=rule_targets,
        algorithm=algorithms, hash_key=keys, weight=st.integers(0, 100), split_key=keys,
        sticky_session=sticky, rate_limit=rate_limits, access=accesses,
    )  # fmt: skip
    rest = draw(optional(
        algorithm=algorithms, hash_key=keys, sticky_sessions=st.booleans(), sticky_session=sticky,
        timeouts=model(Timeouts, connect=durations, request_headers=durations,
                       upstream_response=durations, idle=durations),
        limits=model(Limits, max_header_bytes=st.integers(1, 10**6),
                     max_headers=st.integers(1, 1000)),
        pool=model(Pool, max_idle_per_target=st.integers(0, 100),
                   max_connections_per_target=st.integers(1, 10**4)),
        trusted_proxies=st.lists(cidrs, max_size=2), health_check=health_checks,
        circuit_breaker=breakers, rate_limit=rate_limits, access=accesses,
        rules=st.dictionaries(names, rules, max_size=3),
    ))  # fmt: skip
    return LoadBalancer(name=name, listeners=listeners, targets=targets, **rest)


@st.composite
def configs(draw: st.DrawFn) -> Config:
    lb_names = draw(st.lists(names, unique=True, max_size=3))
    count = 2 * len(lb_names)
    all_ports = draw(st.lists(ports, unique=True, min_size=count, max_size=count))
    lbs = [draw(load_balancers(n, all_ports[2 * i: 2 * i + draw(st.integers(0, 2))]))
           for i, n in enumerate(lb_names)]  # fmt: skip
    return Config(load_balancers=lbs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HypothesisHealthCheck.too_slow])
@given(configs())
def test_config_round_trips_through_the_file_form(config: Config) -> None:
    data = config_to_dict(config)
    assert parse_config(data) == config
    assert parse_config(yaml.safe_dump(data, sort_keys=False)) == config
    assert config_to_dict(parse_config(data)) == data


# -- the generated reference ---------------------------------------------------------------------


def test_reference_lists_every_model_and_field() -> None:
    text = docgen.render()
    for cls in docgen.MODELS:
        assert f"## {cls.__name__}\n" in text
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"
            assert f"| `{name}` |" in text
    assert "| `connect` | duration | `2s` | Connecting to a target. |" in text
    assert "| `limit` | integer (> 0) | required |" in text


def test_docs_configuration_md_is_up_to_date() -> None:
    assert (REPO / "docs" / "configuration.md").read_text() == docgen.render()


def test_json_schema_describes_the_models() -> None:
    schema = docgen.json_schema()
    assert schema["title"] == "Config"
    assert {"LoadBalancer", "Listener", "Target", "HealthCheck", "Rule"} <= set(schema["$defs"])
    assert schema["$defs"]["Listener"]["additionalProperties"] is False
    assert {"const": False} in schema["$defs"]["Listener"]["properties"]["ssl"]["anyOf"]
    json.dumps(schema)  # what `lbctl schema` prints must be plain JSON
