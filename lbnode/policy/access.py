"""Access control by client address, and the client address itself.

Theory of operation
-------------------
``NetworkSet`` answers "is this address in any of these networks?" in time
that depends on the number of *distinct prefix lengths*, not on the number of
networks: networks are bucketed by (IP version, prefix length) and stored as
the integer value of their network address in a ``set``. A lookup converts
the address to an int once, then, for each prefix length present (at most 33
for IPv4, 129 for IPv6; a real list has a handful), masks the int and probes
the set. A list of 10,000 /32s and /24s costs two set probes.

IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``) are normalised to IPv4, both
when building the set (``::ffff:10.0.0.0/104`` becomes ``10.0.0.0/8``) and
when looking up, so a dual-stack listener that reports mapped addresses
matches IPv4 rules.

``AccessPolicy`` holds an allow set and a deny set: deny wins, an empty allow
list allows everything not denied. An address that does not parse (a PROXY
``UNKNOWN`` peer, a unix socket) is refused whenever either list is
non-empty: an unknown client cannot be shown to be outside the deny list.

``client_ip_from`` decides which address *is* the client. Only a peer inside
``trusted_proxies`` may speak for someone else: then the X-Forwarded-For
headers (all of them, concatenated in order, comma-separated) are walked from
the right, skipping addresses that are themselves trusted proxies; the first
untrusted one is the client. An entry that is not an IP address stops the
walk: the last valid address seen (or the peer) is used, since anything to
the left of garbage was written by someone we cannot vouch for. If every
entry is trusted, the left-most is the client (nginx's
``real_ip_recursive on``). A peer outside the trusted list gets no say: its
X-Forwarded-For is ignored, so spoofing it changes nothing.

Order of checks on the data path: see ``lbnode.policy.rules``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from lbshared.config import Access

__all__ = [
    "AccessPolicy",
    "Network",
    "NetworkSet",
    "client_ip_from",
    "parse_ip",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4_MAPPED_NET: Final = ipaddress.IPv6Network("::ffff:0:0/96")
_ALL4: Final = (1 << 32) - 1
_ALL6: Final = (1 << 128) - 1


def parse_ip(text: str) -> Address | None:
    """Parse an address, mapping IPv4-mapped IPv6 to IPv4; None if invalid.

    A zone id (``fe80::1%eth0``) is dropped.
    """
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.scope_id is not None:
            return ipaddress.IPv6Address(int(addr))
    return addr


def _normalise_network(net: Network | str) -> Network:
    if isinstance(net, str):
        net = ipaddress.ip_network(net, strict=False)
    if (
        isinstance(net, ipaddress.IPv6Network)
        and net.prefixlen >= 96
        and net.subnet_of(_V4_MAPPED_NET)
    ):
        v4 = ipaddress.IPv4Address(int(net.network_address) & _ALL4)
        return ipaddress.IPv4Network((v4, net.prefixlen - 96))
    return net


class NetworkSet:
    """An immutable set of IPv4/IPv6 networks with fast membership tests."""

    __slots__ = ("_v4", "_v6", "_networks")

    def __init__(self, networks: Iterable[Network | str] = ()) -> None:
        v4: dict[int, set[int]] = {}
        v6: dict[int, set[int]] = {}
        nets: list[Network] = []
        for raw in networks:
            net = _normalise_network(raw)
            nets.append(net)
            table = v4 if net.version == 4 else v6
            table.setdefault(net.prefixlen, set()).add(int(net.network_address))
        # (mask, frozenset) pairs, longest prefix first (order does not change
        # the answer; most specific lists are usually the longest).
        self._v4: tuple[tuple[int, frozenset[int]], ...] = tuple(
            ((_ALL4 << (32 - plen)) & _ALL4, frozenset(s))
            for plen, s in sorted(v4.items(), reverse=True)
        )
        self._v6: tuple[tuple[int, frozenset[int]], ...] = tuple(
            ((_ALL6 << (128 - plen)) & _ALL6, frozenset(s))
            for plen, s in sorted(v6.items(), reverse=True)
        )
        self._networks: tuple[Network, ...] = tuple(nets)

    @property
    def networks(self) -> tuple[Network, ...]:
        """The networks as given (after v4-mapped normalisation)."""
        return self._networks

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __len__(self) -> int:
        return len(self._networks)

    def __repr__(self) -> str:
        shown = [str(n) for n in self._networks[:8]]
        more = f" +{len(self._networks) - 8} more" if len(self._networks) > 8 else ""
        return f"NetworkSet({shown!r}{more})"

    def contains_address(self, addr: Address) -> bool:
        """Membership of an already parsed (and normalised) address."""
        value = int(addr)
        for mask, members in self._v4 if addr.version == 4 else self._v6:
            if value & mask in members:
                return True
        return False

    def __contains__(self, ip: object) -> bool:
        addr: Address | None
        if isinstance(ip, str):
            addr = parse_ip(ip)
        elif isinstance(ip, ipaddress.IPv6Address):
            addr = ip.ipv4_mapped or ip
        elif isinstance(ip, ipaddress.IPv4Address):
            addr = ip
        else:
            return False
        return addr is not None and self.contains_address(addr)


class AccessPolicy:
    """Allow/deny by client address: deny wins; an empty allow list allows all."""

    __slots__ = ("allow", "deny", "_open")

    def __init__(
        self,
        allow: Iterable[Network | str] = (),
        deny: Iterable[Network | str] = (),
    ) -> None:
        self.allow = NetworkSet(allow)
        self.deny = NetworkSet(deny)
        self._open = not self.allow and not self.deny

    @classmethod
    def from_config(cls, access: Access | None) -> AccessPolicy:
        """Build from a config ``Access`` block (None: allow everything)."""
        if access is None:
            return cls()
        return cls(access.allow, access.deny)

    def allows(self, ip: str) -> bool:
        """True if a client at ``ip`` may be served."""
        if self._open:
            return True
        addr = parse_ip(ip)
        if addr is None:
            return False
        if self.deny.contains_address(addr):
            return False
        return not self.allow or self.allow.contains_address(addr)

    def __repr__(self) -> str:
        return f"AccessPolicy(allow={self.allow!r}, deny={self.deny!r})"


def client_ip_from(
    peer_ip: str,
    xff_header_values: Sequence[bytes],
    trusted: NetworkSet | Iterable[Network | str],
) -> str:
    """The client address of a request.

    ``peer_ip`` is the TCP peer (or the PROXY protocol source);
    ``xff_header_values`` every ``X-Forwarded-For`` value in order; ``trusted``
    the load balancer's ``trusted_proxies`` (pass a prebuilt ``NetworkSet`` on
    the hot path). Returns the address as text, IPv4-mapped addresses in
    IPv4 form; an unparseable peer is returned unchanged.
    """
    trust = trusted if isinstance(trusted, NetworkSet) else NetworkSet(trusted)
    peer = parse_ip(peer_ip)
    if peer is None:
        return peer_ip
    if not trust or not xff_header_values or not trust.contains_address(peer):
        return str(peer)
    entries: list[bytes] = []
    for value in xff_header_values:
        entries.extend(value.split(b","))
    best = peer
    for raw in reversed(entries):
        addr = _parse_xff_entry(raw)
        if addr is None:
            break
        best = addr
        if not trust.contains_address(addr):
            break
    return str(best)


def _parse_xff_entry(raw: bytes) -> Address | None:
    text = raw.strip()
    if not text or len(text) > 64:
        return None
    try:
        s = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    if s.startswith("["):  # "[v6]" or "[v6]:port"
        end = s.find("]")
        if end < 0:
            return None
        s = s[1:end]
    elif s.count(":") == 1:  # "v4:port"
        s = s.partition(":")[0]
    return parse_ip(s)
