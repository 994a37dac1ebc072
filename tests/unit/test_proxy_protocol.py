from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbnode.policy.proxy_protocol import (
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    NeedMore,
    ProxyHeader,
    ProxyProtocolError,
    parse_proxy_header,
)


def v2(
    *,
    ver_cmd: int = 0x21,
    fam: int = 0x11,
    body: bytes = b"",
    length: int | None = None,
) -> bytes:
    n = len(body) if length is None else length
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", n) + body


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.ip_address(src).packed
        + ipaddress.ip_address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


TLV_ALPN = b"\x01\x00\x02h2"
TLV_NOOP = b"\x04\x00\x00"

V1_VALID = [
    (
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
        ProxyHeader(1, "PROXY", "TCP4", "192.0.2.1", 56324, "198.51.100.2", 443, 45),
    ),
    (
        b"PROXY TCP6 2001:db8::1 2001:db8::2 0 65535\r\n",
        ProxyHeader(1, "PROXY", "TCP6", "2001:db8::1", 0, "2001:db8::2", 65535, 44),
    ),
    (
        b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n",
        ProxyHeader(1, "PROXY", "TCP6", "::ffff:c000:201", 1, "::1", 2, 37),
    ),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, "PROXY", "UNKNOWN", None, None, None, None, 15)),
    (
        b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
        ProxyHeader(1, "PROXY", "UNKNOWN", None, None, None, None, 59),
    ),
]

V2_VALID = [
    (
        v2(body=inet("192.0.2.1", "198.51.100.2", 56324, 443)),
        ProxyHeader(2, "PROXY", "TCP4", "192.0.2.1", 56324, "198.51.100.2", 443, 28),
    ),
    (
        v2(fam=0x21, body=inet("2001:db8::1", "2001:db8::2", 1, 2)),
        ProxyHeader(2, "PROXY", "TCP6", "2001:db8::1", 1, "2001:db8::2", 2, 52),
    ),
    (  # TLVs after the addresses are skipped
        v2(body=inet("10.0.0.1", "10.0.0.2", 1000, 80) + TLV_ALPN + TLV_NOOP),
        ProxyHeader(2, "PROXY", "TCP4", "10.0.0.1", 1000, "10.0.0.2", 80, 28 + 8),
    ),
    (v2(ver_cmd=0x20, fam=0x00), ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, None, None, 16)),
    (  # LOCAL ignores whatever address block it carries
        v2(ver_cmd=0x20, fam=0x11, body=inet("1.1.1.1", "2.2.2.2", 1, 2)),
        ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, None, None, 28),
    ),
    (v2(fam=0x00), ProxyHeader(2, "PROXY", "UNKNOWN", None, None, None, None, 16)),
    (
        v2(fam=0x31, body=b"\x00" * 216),
        ProxyHeader(2, "PROXY", "UNKNOWN", None, None, None, None, 232),
    ),
    (  # transport UNSPEC with INET is accepted
        v2(fam=0x10, body=inet("10.0.0.1", "10.0.0.2", 1, 2)),
        ProxyHeader(2, "PROXY", "TCP4", "10.0.0.1", 1, "10.0.0.2", 2, 28),
    ),
]


@pytest.mark.parametrize("raw, expected", V1_VALID + V2_VALID)
def test_valid_headers(raw: bytes, expected: ProxyHeader) -> None:
    assert parse_proxy_header(raw) == expected
    # What follows the header is not consumed.
    tail = b"GET / HTTP/1.1\r\n\r\n"
    result = parse_proxy_header(raw + tail)
    assert result == expected
    assert isinstance(result, ProxyHeader)
    assert (raw + tail)[result.consumed :] == tail


@pytest.mark.parametrize("raw, expected", V1_VALID + V2_VALID)
def test_every_strict_prefix_needs_more(raw: bytes, expected: ProxyHeader) -> None:
    for cut in range(len(raw)):
        got = parse_proxy_header(raw[:cut])
        assert isinstance(got, NeedMore), (cut, got)
        assert cut < got.at_least <= len(raw)


def test_v2_need_more_names_the_full_length() -> None:
    raw = v2(body=inet("192.0.2.1", "198.51.100.2", 1, 2) + TLV_ALPN)
    assert parse_proxy_header(raw[:16]) == NeedMore(len(raw))
    assert parse_proxy_header(raw[:20]) == NeedMore(len(raw))


def test_accepts_bytearray_and_memoryview() -> None:
    raw, expected = V1_VALID[0]
    assert parse_proxy_header(bytearray(raw)) == expected
    assert parse_proxy_header(memoryview(raw + b"xyz")) == expected


def test_has_addresses() -> None:
    assert V1_VALID[0][1].has_addresses
    assert not V1_VALID[3][1].has_addresses


MALFORMED = [
    # not a PROXY header at all
    (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
    (b"PROXX", "not a PROXY protocol header"),
    (b"proxy TCP4", "not a PROXY protocol header"),
    (b"\r\n\r\n\x00\r\nQUIX", "bad v2 signature"),
    # v1
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP5 ", "TCP4, TCP6 or UNKNOWN"),
    (b"PROXY X", "TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "needs 4"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "needs 4"),
    (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "needs 4"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "needs 4"),
    (b"PROXY TCP4\r\n", "needs 4"),
    (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "source address"),
    (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "destination address"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "source address"),
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "source address"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "source address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "source port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 080\r\n", "destination port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "source port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 +2\r\n", "destination port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "CRLF"),
    (b"PROXY TCP4 1.2.3.4\n", "CRLF"),
    (b"PROXY TCP4 1.2.3.4\rx", "CRLF"),
    (b"PROXY UNKNOWN" + b" " * 100, "no CRLF within 107"),
    # v2
    (v2(ver_cmd=0x11), "version nibble must be 2"),
    (v2(ver_cmd=0x22), "command must be LOCAL"),
    (V2_SIGNATURE + b"\x31", "version nibble must be 2"),
    (V2_SIGNATURE + b"\x21\x41", "address family 4"),
    (V2_SIGNATURE + b"\x21\x13", "transport 3"),
    (v2(fam=0x12, body=inet("1.1.1.1", "2.2.2.2", 1, 2)), "STREAM"),
    (v2(fam=0x11, length=11), "too short"),
    (v2(fam=0x21, body=inet("1.1.1.1", "2.2.2.2", 1, 2)), "too short"),
    (v2(body=inet("1.1.1.1", "2.2.2.2", 1, 2) + b"\x01\x00"), "TLV header truncated"),
    (v2(body=inet("1.1.1.1", "2.2.2.2", 1, 2) + b"\x01\x00\x05ab"), "runs past"),
]


@pytest.mark.parametrize("raw, message", MALFORMED)
def test_malformed(raw: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse_proxy_header(raw)


def test_v1_length_limit_is_107_bytes() -> None:
    # The longest legal line is exactly 107 bytes including CRLF.
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n"
    assert len(line) == V1_MAX_LENGTH
    result = parse_proxy_header(line)
    assert isinstance(result, ProxyHeader) and result.consumed == V1_MAX_LENGTH
    longer = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15) + b"\r\n"
    with pytest.raises(ProxyProtocolError, match="no CRLF within 107"):
        parse_proxy_header(longer)


def test_empty_buffer_needs_more() -> None:
    assert isinstance(parse_proxy_header(b""), NeedMore)


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
port = st.integers(0, 65535)


@given(src=ipv4, dst=ipv4, sport=port, dport=port)
def test_v1_tcp4_roundtrip(src: str, dst: str, sport: int, dport: int) -> None:
    raw = f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode()
    assert parse_proxy_header(raw) == ProxyHeader(
        1, "PROXY", "TCP4", src, sport, dst, dport, len(raw)
    )


@given(src=ipv6, dst=ipv6, sport=port, dport=port)
def test_v1_tcp6_roundtrip(src: str, dst: str, sport: int, dport: int) -> None:
    raw = f"PROXY TCP6 {src} {dst} {sport} {dport}\r\n".encode()
    assert parse_proxy_header(raw) == ProxyHeader(
        1, "PROXY", "TCP6", src, sport, dst, dport, len(raw)
    )


@given(src=ipv6, dst=ipv6, sport=port, dport=port, tlvs=st.binary(max_size=40))
def test_v2_inet6_roundtrip(src: str, dst: str, sport: int, dport: int, tlvs: bytes) -> None:
    tlv = b"\x04" + struct.pack("!H", len(tlvs)) + tlvs  # one NOOP TLV of any content
    raw = v2(fam=0x21, body=inet(src, dst, sport, dport) + tlv)
    assert parse_proxy_header(raw) == ProxyHeader(
        2, "PROXY", "TCP6", src, sport, dst, dport, len(raw)
    )


@given(st.binary(max_size=120))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        result = parse_proxy_header(data)
    except ProxyProtocolError:
        return
    if isinstance(result, ProxyHeader):
        assert 0 < result.consumed <= len(data)
    else:
        assert result.at_least > len(data)


@given(st.binary(max_size=60))
def test_arbitrary_bytes_after_v2_signature(data: bytes) -> None:
    try:
        result = parse_proxy_header(V2_SIGNATURE + data)
    except ProxyProtocolError:
        return
    if isinstance(result, ProxyHeader):
        assert result.consumed <= len(data) + 12
