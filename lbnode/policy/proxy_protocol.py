"""PROXY protocol (HAProxy) v1 and v2 header parser, pure.

Theory of operation
-------------------
A listener with ``proxy_protocol: true`` sits behind another proxy or a
network load balancer that prefixes every connection with a header naming the
real client. The data path reads bytes into a buffer and calls
``parse_proxy_header(buf)`` until it returns something other than
``NeedMore``:

* ``ProxyHeader``: the header is complete; ``consumed`` bytes belong to it and
  the rest of ``buf`` is the start of the client's HTTP stream.
* ``NeedMore``: ``buf`` is a valid prefix of a header; read more. ``NeedMore``
  carries ``at_least``, a lower bound on the total buffer size the parser
  will want (exact for v2 once the 16-byte fixed part is in).
* ``ProxyProtocolError``: the bytes can never become a valid header; close
  the connection. There is no fallback to "no header": a listener configured
  for the PROXY protocol must not trust a client that omits it.

Version 1 (text) is ``PROXY TCP4|TCP6|UNKNOWN ...\\r\\n``, at most 107 bytes
including the CRLF. For ``TCP4``/``TCP6`` exactly four space-separated fields
follow (source address, destination address, source port, destination
port); addresses must be of the announced family, ports decimal 0..65535
without leading zeros. ``UNKNOWN`` may be followed by anything up to the
CRLF, which is ignored (the receiver uses the real socket addresses).

Version 2 (binary) starts with the 12-byte signature
``\\r\\n\\r\\n\\x00\\r\\nQUIT\\n``, then a version/command byte (version 2,
command LOCAL or PROXY), a family/transport byte, and a big-endian 16-bit
length of what follows. ``LOCAL`` (health checks from the proxy itself)
carries no client: the addresses are ignored and the result's ``command`` is
``"LOCAL"``. ``PROXY`` with ``AF_INET`` carries 12 address bytes, with
``AF_INET6`` 36, with ``AF_UNSPEC`` none (reported as ``UNKNOWN``);
``AF_UNIX`` (216 bytes) is accepted but reported as ``UNKNOWN`` since the
load balancer only speaks IP. Only the STREAM transport (or UNSPEC) is
accepted: a datagram header on a TCP listener is an error. Bytes after the
addresses are TLVs; their framing is validated (each TLV must fit) and their
content skipped.

The parser never consumes partial input and never allocates beyond the
result: call it again on the grown buffer.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "NeedMore",
    "ProxyHeader",
    "ProxyProtocolError",
    "parse_proxy_header",
]

#: The longest v1 header the spec allows, CRLF included.
V1_MAX_LENGTH: Final = 107
#: The 12-byte v2 signature.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"

_V1_PREFIX: Final = b"PROXY "
_V2_FIXED: Final = 16  # signature + ver/cmd + fam + len

_V2_CMD_LOCAL: Final = 0x0
_V2_CMD_PROXY: Final = 0x1
_V2_AF_UNSPEC: Final = 0x0
_V2_AF_INET: Final = 0x1
_V2_AF_INET6: Final = 0x2
_V2_AF_UNIX: Final = 0x3
_V2_TRANSPORT_UNSPEC: Final = 0x0
_V2_TRANSPORT_STREAM: Final = 0x1
# Address block sizes by family.
_V2_ADDR_LEN: Final = {_V2_AF_UNSPEC: 0, _V2_AF_INET: 12, _V2_AF_INET6: 36, _V2_AF_UNIX: 216}

_DIGITS: Final = frozenset(b"0123456789")


class ProxyProtocolError(ValueError):
    """The bytes are not (and can never become) a valid PROXY header."""


@dataclass(frozen=True, slots=True)
class NeedMore:
    """``buf`` is a valid prefix; call again once ``len(buf) >= at_least``."""

    at_least: int


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete PROXY header.

    ``command`` is ``"PROXY"`` (addresses describe the client connection) or
    ``"LOCAL"`` (v2 only: the proxy's own connection, use the socket
    addresses). ``family`` is ``"TCP4"``, ``"TCP6"`` or ``"UNKNOWN"``; the
    address fields are ``None`` unless the family is TCP4/TCP6 and the
    command is PROXY. ``consumed`` is the header's length in bytes.
    """

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    family: Literal["TCP4", "TCP6", "UNKNOWN"]
    src_ip: str | None
    src_port: int | None
    dst_ip: str | None
    dst_port: int | None
    consumed: int

    @property
    def has_addresses(self) -> bool:
        """True if the header names a client (use ``src_ip`` as the peer)."""
        return self.src_ip is not None


def parse_proxy_header(buf: bytes | bytearray | memoryview) -> ProxyHeader | NeedMore:
    """Parse a PROXY v1 or v2 header at the start of ``buf``.

    Returns ``ProxyHeader`` when complete, ``NeedMore`` when ``buf`` is a
    valid but incomplete prefix; raises ``ProxyProtocolError`` otherwise.
    """
    # A header is never longer than the v2 fixed part plus a 16-bit length.
    data = buf if isinstance(buf, bytes) else bytes(buf[: _V2_FIXED + 0xFFFF])
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    if not data:
        return NeedMore(len(_V1_PREFIX))
    raise ProxyProtocolError("not a PROXY protocol header (expected 'PROXY ' or the v2 signature)")


# --------------------------------------------------------------------------
# v1
# --------------------------------------------------------------------------


def _parse_v1(data: bytes) -> ProxyHeader | NeedMore:
    head = data[: len(_V1_PREFIX)]
    if head != _V1_PREFIX[: len(head)]:
        raise ProxyProtocolError("not a PROXY protocol header (expected 'PROXY ')")
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"PROXY v1 header has no CRLF within {V1_MAX_LENGTH} bytes")
        # A bare LF or CR anywhere but the final CRLF can never become valid.
        cr = data.find(b"\r")
        if data.find(b"\n") >= 0 or (0 <= cr < len(data) - 1):
            raise ProxyProtocolError("PROXY v1 header must end with CRLF")
        if len(data) >= len(_V1_PREFIX):
            _check_v1_partial(data[len(_V1_PREFIX) :])
        return NeedMore(max(len(data) + 1, len(_V1_PREFIX)))
    consumed = end + 2
    line = data[len(_V1_PREFIX) : end]
    if b"\r" in line or b"\n" in line:
        raise ProxyProtocolError("PROXY v1 header must end with CRLF")
    proto, _, rest = line.partition(b" ")
    if proto == b"UNKNOWN":
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None, None, None, consumed)
    if proto not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(
            f"PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN, got {_show(proto)}"
        )
    fields = rest.split(b" ")
    if len(fields) != 4:
        raise ProxyProtocolError(
            f"PROXY v1 {proto.decode()} needs 4 single-space-separated fields "
            f"(src dst sport dport), got {len(fields)}"
        )
    family: Literal["TCP4", "TCP6"] = "TCP4" if proto == b"TCP4" else "TCP6"
    src = _v1_address(fields[0], family, "source")
    dst = _v1_address(fields[1], family, "destination")
    sport = _v1_port(fields[2], "source")
    dport = _v1_port(fields[3], "destination")
    return ProxyHeader(1, "PROXY", family, src, sport, dst, dport, consumed)


_V1_PARTIAL_PROTOS: Final = (b"TCP4", b"TCP6", b"UNKNOWN")


def _check_v1_partial(line: bytes) -> None:
    """Reject an incomplete v1 line early when its protocol is already wrong."""
    proto, sep, _ = line.partition(b" ")
    if sep:
        if proto not in _V1_PARTIAL_PROTOS:
            raise ProxyProtocolError(
                f"PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN, got {_show(proto)}"
            )
    elif not any(p.startswith(proto.rstrip(b"\r")) for p in _V1_PARTIAL_PROTOS):
        raise ProxyProtocolError(
            f"PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN, got {_show(proto)}"
        )


def _v1_address(raw: bytes, family: Literal["TCP4", "TCP6"], which: str) -> str:
    try:
        text = raw.decode("ascii")
        addr = ipaddress.IPv4Address(text) if family == "TCP4" else ipaddress.IPv6Address(text)
    except (UnicodeDecodeError, ValueError):
        raise ProxyProtocolError(
            f"PROXY v1 {which} address {_show(raw)} is not a valid "
            f"{'IPv4' if family == 'TCP4' else 'IPv6'} address"
        ) from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        raise ProxyProtocolError(f"PROXY v1 {which} address {_show(raw)} has a scope id")
    return str(addr)


def _v1_port(raw: bytes, which: str) -> int:
    if (
        not raw
        or len(raw) > 5
        or not set(raw) <= _DIGITS
        or (len(raw) > 1 and raw[:1] == b"0")
        or int(raw) > 65535
    ):
        raise ProxyProtocolError(
            f"PROXY v1 {which} port {_show(raw)} is not a decimal number 0..65535 "
            "without leading zeros"
        )
    return int(raw)


def _show(raw: bytes) -> str:
    return repr(raw.decode("latin-1")[:40])


# --------------------------------------------------------------------------
# v2
# --------------------------------------------------------------------------


def _parse_v2(data: bytes) -> ProxyHeader | NeedMore:
    sig = data[: len(V2_SIGNATURE)]
    if sig != V2_SIGNATURE[: len(sig)]:
        raise ProxyProtocolError("not a PROXY protocol header (bad v2 signature)")
    if len(data) < _V2_FIXED:
        if len(data) > 12:
            _check_v2_ver_cmd(data[12])
        if len(data) > 13:
            _check_v2_fam(data[13])
        return NeedMore(_V2_FIXED)
    ver_cmd, fam = data[12], data[13]
    command = _check_v2_ver_cmd(ver_cmd)
    af, transport = _check_v2_fam(fam)
    length = int.from_bytes(data[14:16], "big")
    total = _V2_FIXED + length
    if command == _V2_CMD_PROXY and length < _V2_ADDR_LEN[af]:
        # Checkable before the body arrives: the length cannot hold the addresses.
        raise ProxyProtocolError(
            f"PROXY v2 length {length} is too short for the address family "
            f"(needs {_V2_ADDR_LEN[af]})"
        )
    if len(data) < total:
        return NeedMore(total)
    if command == _V2_CMD_LOCAL:
        # LOCAL: the proxy speaks for itself; the address block is ignored.
        return ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, None, None, total)
    if transport not in (_V2_TRANSPORT_UNSPEC, _V2_TRANSPORT_STREAM):
        raise ProxyProtocolError("PROXY v2 transport must be STREAM (TCP) on this listener")
    body = data[_V2_FIXED:total]
    addr_len = _V2_ADDR_LEN[af]
    _check_tlvs(body[addr_len:])
    if af == _V2_AF_INET:
        src = str(ipaddress.IPv4Address(body[0:4]))
        dst = str(ipaddress.IPv4Address(body[4:8]))
        sport = int.from_bytes(body[8:10], "big")
        dport = int.from_bytes(body[10:12], "big")
        return ProxyHeader(2, "PROXY", "TCP4", src, sport, dst, dport, total)
    if af == _V2_AF_INET6:
        src = str(ipaddress.IPv6Address(body[0:16]))
        dst = str(ipaddress.IPv6Address(body[16:32]))
        sport = int.from_bytes(body[32:34], "big")
        dport = int.from_bytes(body[34:36], "big")
        return ProxyHeader(2, "PROXY", "TCP6", src, sport, dst, dport, total)
    # AF_UNSPEC or AF_UNIX: no IP client to report.
    return ProxyHeader(2, "PROXY", "UNKNOWN", None, None, None, None, total)


def _check_v2_ver_cmd(ver_cmd: int) -> int:
    version, command = ver_cmd >> 4, ver_cmd & 0x0F
    if version != 2:
        raise ProxyProtocolError(f"PROXY v2 version nibble must be 2, got {version}")
    if command not in (_V2_CMD_LOCAL, _V2_CMD_PROXY):
        raise ProxyProtocolError(f"PROXY v2 command must be LOCAL (0) or PROXY (1), got {command}")
    return command


def _check_v2_fam(fam: int) -> tuple[int, int]:
    af, transport = fam >> 4, fam & 0x0F
    if af not in _V2_ADDR_LEN:
        raise ProxyProtocolError(f"PROXY v2 address family {af} is not defined")
    if transport > 2:
        raise ProxyProtocolError(f"PROXY v2 transport {transport} is not defined")
    return af, transport


def _check_tlvs(tlvs: bytes) -> None:
    pos, end = 0, len(tlvs)
    while pos < end:
        if end - pos < 3:
            raise ProxyProtocolError("PROXY v2 TLV header truncated")
        length = int.from_bytes(tlvs[pos + 1 : pos + 3], "big")
        pos += 3 + length
        if pos > end:
            raise ProxyProtocolError("PROXY v2 TLV value runs past the header length")
