from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbnode.policy.access import AccessPolicy, NetworkSet, client_ip_from, parse_ip
from lbshared.config import Access

# ---------------------------------------------------------------- NetworkSet

MEMBERSHIP = [
    # networks, address, expected
    (["10.0.0.0/8"], "10.255.1.2", True),
    (["10.0.0.0/8"], "11.0.0.1", False),
    (["10.0.0.1"], "10.0.0.1", True),  # a bare address is a /32
    (["10.0.0.1"], "10.0.0.2", False),
    (["0.0.0.0/0"], "203.0.113.9", True),
    (["0.0.0.0/0"], "2001:db8::1", False),  # v4 networks never hold v6 addresses
    (["::/0"], "10.0.0.1", False),
    (["2001:db8::/32"], "2001:db8:ffff::1", True),
    (["2001:db8::/32"], "2001:db9::1", False),
    (["10.0.0.0/8"], "::ffff:10.1.2.3", True),  # v4-mapped address normalised
    (["::ffff:10.0.0.0/104"], "10.9.9.9", True),  # v4-mapped network normalised
    (["::ffff:10.0.0.0/104"], "11.0.0.1", False),
    (["192.168.1.0/24", "10.0.0.0/8"], "192.168.1.77", True),
    (["192.168.1.0/24", "10.0.0.0/8"], "192.168.2.1", False),
    (["fe80::/10"], "fe80::1%eth0", True),  # zone id dropped
    (["10.0.0.0/8"], "not-an-ip", False),
    ([], "10.0.0.1", False),
]


@pytest.mark.parametrize("networks, ip, expected", MEMBERSHIP)
def test_network_set_membership(networks: list[str], ip: str, expected: bool) -> None:
    assert (ip in NetworkSet(networks)) is expected


def test_network_set_accepts_address_objects() -> None:
    ns = NetworkSet([ipaddress.ip_network("10.0.0.0/8")])
    assert ipaddress.ip_address("10.1.1.1") in ns
    assert ipaddress.ip_address("::ffff:10.1.1.1") in ns
    assert 42 not in ns


def test_long_lists_bucket_by_prefix_length() -> None:
    nets = [f"10.{i // 256}.{i % 256}.0/24" for i in range(5000)] + [
        f"172.16.{i // 256}.{i % 256}" for i in range(5000)
    ]
    ns = NetworkSet(nets)
    assert len(ns) == 10_000
    # Two prefix lengths -> two (mask, set) pairs, whatever the list length.
    assert len(ns._v4) == 2
    assert "10.19.135.200" in ns
    assert "172.16.19.135" in ns
    assert "172.16.19.136" not in ns  # 5000 /32s end at 172.16.19.135
    assert "172.16.200.1" not in ns
    assert "10.20.0.1" not in ns  # 5000 /24s end at 10.19.135.0


@given(
    net=st.ip_addresses(v=4),
    plen=st.integers(0, 32),
    probe=st.ip_addresses(v=4),
)
def test_network_set_agrees_with_ipaddress_v4(
    net: ipaddress.IPv4Address, plen: int, probe: ipaddress.IPv4Address
) -> None:
    network = ipaddress.ip_network(f"{net}/{plen}", strict=False)
    assert (str(probe) in NetworkSet([network])) is (probe in network)


@given(
    net=st.ip_addresses(v=6),
    plen=st.integers(0, 128),
    probe=st.ip_addresses(v=6),
)
def test_network_set_agrees_with_ipaddress_v6(
    net: ipaddress.IPv6Address, plen: int, probe: ipaddress.IPv6Address
) -> None:
    network = ipaddress.IPv6Network(f"{net}/{plen}", strict=False)
    mapped = probe.ipv4_mapped is not None or (
        network.prefixlen >= 96 and network.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96"))
    )
    if mapped:
        return  # normalised to v4 on one side: covered by the table above
    assert (str(probe) in NetworkSet([network])) is (probe in network)


def test_parse_ip() -> None:
    assert parse_ip("::ffff:1.2.3.4") == ipaddress.IPv4Address("1.2.3.4")
    assert parse_ip("fe80::1%eth0") == ipaddress.IPv6Address("fe80::1")
    assert parse_ip("1.2.3.4.5") is None
    assert parse_ip("") is None


# --------------------------------------------------------------- AccessPolicy

ALLOWS = [
    # allow, deny, ip, expected
    ([], [], "1.2.3.4", True),  # empty allow: everyone
    ([], [], "garbage", True),  # nothing configured: nothing to check
    (["10.0.0.0/8"], [], "10.1.1.1", True),
    (["10.0.0.0/8"], [], "11.1.1.1", False),
    ([], ["10.0.0.0/8"], "10.1.1.1", False),
    ([], ["10.0.0.0/8"], "11.1.1.1", True),
    (["10.0.0.0/8"], ["10.1.0.0/16"], "10.1.2.3", False),  # deny wins
    (["10.0.0.0/8"], ["10.1.0.0/16"], "10.2.2.3", True),
    (["10.1.2.3"], ["10.1.2.3"], "10.1.2.3", False),  # deny wins even when exact
    (["2001:db8::/32"], [], "2001:db8::5", True),
    (["2001:db8::/32"], [], "10.0.0.1", False),
    (["10.0.0.0/8", "2001:db8::/32"], ["2001:db8:1::/48"], "2001:db8:1::1", False),
    (["10.0.0.0/8"], [], "::ffff:10.0.0.1", True),  # mapped client
    ([], ["::ffff:10.0.0.0/104"], "10.0.0.1", False),  # mapped deny entry
    ([], ["10.0.0.0/8"], "unknown", False),  # unparseable: fail closed
    (["10.0.0.0/8"], [], "unknown", False),
]


@pytest.mark.parametrize("allow, deny, ip, expected", ALLOWS)
def test_access_policy(allow: list[str], deny: list[str], ip: str, expected: bool) -> None:
    assert AccessPolicy(allow, deny).allows(ip) is expected


def test_access_policy_from_config() -> None:
    policy = AccessPolicy.from_config(Access(allow=["10.0.0.0/8"], deny=["10.9.0.0/16"]))
    assert policy.allows("10.1.1.1")
    assert not policy.allows("10.9.1.1")
    assert not policy.allows("192.168.0.1")
    assert AccessPolicy.from_config(None).allows("192.168.0.1")


# ------------------------------------------------------------- client_ip_from

TRUSTED = ["10.0.0.0/8", "2001:db8:ffff::/48"]

CLIENT_IP = [
    # peer, X-Forwarded-For values, expected client
    ("203.0.113.5", [], "203.0.113.5"),
    # untrusted peer: its XFF is ignored, whatever it says
    ("203.0.113.5", [b"1.1.1.1"], "203.0.113.5"),
    ("203.0.113.5", [b"10.0.0.1, 1.1.1.1"], "203.0.113.5"),
    # trusted peer: right-most untrusted entry
    ("10.0.0.2", [b"198.51.100.7"], "198.51.100.7"),
    ("10.0.0.2", [b"1.1.1.1, 198.51.100.7"], "198.51.100.7"),
    # client-supplied spoof on the left stays on the left
    ("10.0.0.2", [b"6.6.6.6, 198.51.100.7, 10.0.0.9"], "198.51.100.7"),
    # several headers are concatenated in order
    ("10.0.0.2", [b"6.6.6.6", b"198.51.100.7", b"10.0.0.9"], "198.51.100.7"),
    ("10.0.0.2", [b"6.6.6.6, 198.51.100.7", b"10.0.0.9, 10.0.0.8"], "198.51.100.7"),
    # every entry trusted: the left-most
    ("10.0.0.2", [b"10.0.0.7, 10.0.0.8"], "10.0.0.7"),
    # trusted peer with no XFF: the peer
    ("10.0.0.2", [], "10.0.0.2"),
    # garbage stops the walk: last valid one seen, or the peer
    ("10.0.0.2", [b"1.1.1.1, garbage, 10.0.0.5"], "10.0.0.5"),
    ("10.0.0.2", [b"1.1.1.1, garbage"], "10.0.0.2"),
    ("10.0.0.2", [b"1.1.1.1, , 10.0.0.5"], "10.0.0.5"),
    ("10.0.0.2", [b""], "10.0.0.2"),
    ("10.0.0.2", [b"1.1.1.1, 300.1.1.1"], "10.0.0.2"),
    ("10.0.0.2", [b"\xff\xfe"], "10.0.0.2"),
    # IPv6, ports, brackets, mapped addresses
    ("2001:db8:ffff::1", [b"2001:db8::42"], "2001:db8::42"),
    ("10.0.0.2", [b"[2001:db8::42]:5555"], "2001:db8::42"),
    ("10.0.0.2", [b"198.51.100.7:4711"], "198.51.100.7"),
    ("10.0.0.2", [b"::ffff:198.51.100.7"], "198.51.100.7"),
    ("::ffff:10.0.0.2", [b"198.51.100.7"], "198.51.100.7"),  # mapped peer is trusted
    ("::ffff:203.0.113.5", [b"1.1.1.1"], "203.0.113.5"),
    # an unparseable peer is returned as is
    ("unix:/tmp/sock", [b"1.1.1.1"], "unix:/tmp/sock"),
]


@pytest.mark.parametrize("peer, xff, expected", CLIENT_IP)
def test_client_ip_from(peer: str, xff: list[bytes], expected: str) -> None:
    assert client_ip_from(peer, xff, NetworkSet(TRUSTED)) == expected
    # a plain list of networks works too
    assert client_ip_from(peer, xff, TRUSTED) == expected


def test_no_trusted_proxies_means_the_peer() -> None:
    assert client_ip_from("10.0.0.2", [b"1.1.1.1"], []) == "10.0.0.2"


@given(
    spoof=st.lists(st.ip_addresses().map(str), max_size=5),
    peer=st.ip_addresses(v=4).filter(lambda a: not a.is_private).map(str),
)
def test_spoofed_xff_from_untrusted_peer_changes_nothing(spoof: list[str], peer: str) -> None:
    xff = [", ".join(spoof).encode()] if spoof else []
    assert client_ip_from(peer, xff, NetworkSet(TRUSTED)) == peer
