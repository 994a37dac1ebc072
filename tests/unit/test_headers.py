"""Header rewriting between the hops (lbnode.headers), table-driven."""

from __future__ import annotations

import re

import pytest

from lbnode.headers import (
    downstream_response_headers,
    new_request_id,
    upstream_request_headers,
    wants_upgrade,
)
from lbnode.http1 import HOP_BY_HOP

Hs = list[tuple[bytes, bytes]]


def up(headers: Hs, *, upgrade: bytes | None = None, scheme: bytes = b"http") -> tuple[Hs, bytes]:
    return upstream_request_headers(headers, client_ip=b"192.0.2.7", scheme=scheme,
                                    upgrade=upgrade, default_host=b"10.0.0.1:9001")  # fmt: skip


def names(headers: Hs) -> list[bytes]:
    return [n for n, _ in headers]


def values(headers: Hs, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


def test_a_typical_request_exactly() -> None:
    out, rid = up([
        (b"host", b"shop.example"),
        (b"user-agent", b"curl/8"),
        (b"connection", b"keep-alive"),
        (b"x-request-id", b"r-1"),
        (b"accept", b"*/*"),
    ])  # fmt: skip
    assert rid == b"r-1"
    assert out == [
        (b"host", b"shop.example"),
        (b"user-agent", b"curl/8"),
        (b"x-request-id", b"r-1"),
        (b"accept", b"*/*"),
        (b"x-forwarded-for", b"192.0.2.7"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"shop.example"),
    ]


@pytest.mark.parametrize("name", sorted(HOP_BY_HOP))
def test_every_hop_by_hop_header_is_removed(name: bytes) -> None:
    out, _ = up([(b"host", b"h"), (name, b"x"), (b"x-keep", b"1")])
    if name == b"transfer-encoding":  # re-done for this hop, never copied
        assert values(out, name) == [b"chunked"]
    else:
        assert name not in names(out)
    assert values(out, b"x-keep") == [b"1"]


def test_hop_by_hop_list_is_the_rfc_one() -> None:
    assert {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
            b"transfer-encoding", b"upgrade", b"proxy-authenticate",
            b"proxy-authorization"} <= HOP_BY_HOP  # fmt: skip


@pytest.mark.parametrize(
    ("connection", "dropped", "kept"),
    [
        ([b"X-Secret"], [b"x-secret"], [b"x-other"]),
        ([b"close, X-Secret ,x-other"], [b"x-secret", b"x-other"], []),
        ([b"x-secret", b"X-Other"], [b"x-secret", b"x-other"], []),  # two Connection headers
        ([b" , ,"], [], [b"x-secret", b"x-other"]),  # empty tokens name nothing
        ([b"keep-alive"], [], [b"x-secret", b"x-other"]),
    ],
)
def test_headers_named_by_connection_are_removed(connection: list[bytes], dropped: list[bytes],
                                                 kept: list[bytes]) -> None:  # fmt: skip
    headers = [(b"host", b"h"), *[(b"connection", c) for c in connection],
               (b"x-secret", b"s"), (b"x-other", b"o")]  # fmt: skip
    out, _ = up(headers)
    for name in dropped:
        assert name not in names(out)
    for name in kept:
        assert name in names(out)
    assert b"connection" not in names(out)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([], b"192.0.2.7"),
        ([b"203.0.113.1"], b"203.0.113.1, 192.0.2.7"),
        ([b"203.0.113.1, 198.51.100.2"], b"203.0.113.1, 198.51.100.2, 192.0.2.7"),
        ([b"203.0.113.1", b"198.51.100.2"], b"203.0.113.1, 198.51.100.2, 192.0.2.7"),
    ],
)
def test_x_forwarded_for_is_appended(given: list[bytes], expected: bytes) -> None:
    out, _ = up([(b"host", b"h"), *[(b"x-forwarded-for", v) for v in given]])
    assert values(out, b"x-forwarded-for") == [expected]


@pytest.mark.parametrize("scheme", [b"http", b"https"])
def test_forwarded_proto_and_host_are_replaced(scheme: bytes) -> None:
    out, _ = up([(b"host", b"real.example"), (b"x-forwarded-proto", b"gopher"),
                 (b"x-forwarded-host", b"evil.example")], scheme=scheme)  # fmt: skip
    assert values(out, b"x-forwarded-proto") == [scheme]
    assert values(out, b"x-forwarded-host") == [b"real.example"]


def test_host_is_added_for_http10_and_a_second_host_never_goes_up() -> None:
    out, _ = up([(b"accept", b"*/*")])
    assert values(out, b"host") == [b"10.0.0.1:9001"]
    assert values(out, b"x-forwarded-host") == [b"10.0.0.1:9001"]
    out, _ = up([(b"host", b"a"), (b"host", b"b")])
    assert values(out, b"host") == [b"a"]


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ([b"abc-123"], b"abc-123"),
        ([b"first", b"second"], b"first"),
        ([b""], None),  # empty: generated
        ([], None),
    ],
)
def test_request_id_kept_or_generated(given: list[bytes], kept: bytes | None) -> None:
    out, rid = up([(b"host", b"h"), *[(b"x-request-id", v) for v in given]])
    assert values(out, b"x-request-id") == [rid]
    if kept is not None:
        assert rid == kept
    else:
        assert re.fullmatch(rb"[0-9a-f]{12}-[0-9a-f]{8,}", rid)


def test_generated_request_ids_are_unique() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000


def test_expect_is_answered_here_not_forwarded() -> None:
    out, _ = up([(b"host", b"h"), (b"expect", b"100-continue"), (b"content-length", b"5")])
    assert b"expect" not in names(out)
    assert values(out, b"content-length") == [b"5"]


@pytest.mark.parametrize(
    ("framing", "expected_te"),
    [
        ([(b"transfer-encoding", b"chunked")], [b"chunked"]),
        ([(b"content-length", b"10")], []),
        ([], []),
    ],
)
def test_chunked_is_redone_for_the_upstream_hop(framing: Hs, expected_te: list[bytes]) -> None:
    out, _ = up([(b"host", b"h"), *framing, (b"te", b"trailers")])
    assert values(out, b"transfer-encoding") == expected_te
    assert b"te" not in names(out)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"connection", b"Upgrade"), (b"upgrade", b"websocket")], b"websocket"),
        ([(b"connection", b"keep-alive, upgrade"), (b"upgrade", b"h2c")], b"h2c"),
        ([(b"upgrade", b"websocket")], None),  # Connection does not name it
        ([(b"connection", b"upgrade")], None),  # nothing to upgrade to
        ([(b"connection", b"keep-alive"), (b"upgrade", b"websocket")], None),
    ],
)
def test_wants_upgrade(headers: Hs, expected: bytes | None) -> None:
    assert wants_upgrade(headers) == expected


def test_upgrade_pair_is_recreated_upstream() -> None:
    headers = [(b"host", b"h"), (b"connection", b"keep-alive, Upgrade"), (b"upgrade", b"websocket"),
               (b"sec-websocket-key", b"k")]  # fmt: skip
    out, _ = up(headers, upgrade=wants_upgrade(headers))
    assert values(out, b"upgrade") == [b"websocket"]
    assert values(out, b"connection") == [b"upgrade"]
    assert values(out, b"sec-websocket-key") == [b"k"]


RESPONSES = [
    # (upstream response headers, upgrade, expected downstream headers)
    ([(b"content-type", b"text/html"), (b"content-length", b"5")], None,
     [(b"content-type", b"text/html"), (b"content-length", b"5")]),
    ([(b"connection", b"close"), (b"keep-alive", b"timeout=5"), (b"x-a", b"1")], None,
     [(b"x-a", b"1")]),
    ([(b"connection", b"x-internal"), (b"x-internal", b"secret"), (b"set-cookie", b"a=1"),
      (b"set-cookie", b"b=2")], None,
     [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]),
    ([(b"transfer-encoding", b"chunked"), (b"trailer", b"x-sum"),
      (b"proxy-authenticate", b"Basic")], None, []),
    ([(b"upgrade", b"websocket"), (b"connection", b"Upgrade"), (b"sec-websocket-accept", b"x")],
     b"websocket",
     [(b"sec-websocket-accept", b"x"), (b"upgrade", b"websocket"), (b"connection", b"upgrade")]),
]  # fmt: skip


@pytest.mark.parametrize(("given", "upgrade", "expected"), RESPONSES)
def test_downstream_response_headers(given: Hs, upgrade: bytes | None, expected: Hs) -> None:
    assert downstream_response_headers(given, upgrade=upgrade) == expected
