"""The network guard: which addresses a webhook may reach."""

from __future__ import annotations

import ipaddress

import pytest

from dispatcher.errors import DestinationRefused
from dispatcher.netguard import NetworkGuard, forbidden_reason

FORBIDDEN = [
    pytest.param("127.0.0.1", id="loopback-v4"),
    pytest.param("127.255.0.9", id="loopback-v4-other"),
    pytest.param("::1", id="loopback-v6"),
    pytest.param("10.0.0.1", id="private-10"),
    pytest.param("172.16.0.1", id="private-172.16"),
    pytest.param("172.31.255.254", id="private-172.31"),
    pytest.param("192.168.1.1", id="private-192.168"),
    pytest.param("fc00::1", id="ula-fc00"),
    pytest.param("fd12:3456::1", id="ula-fd"),
    pytest.param("169.254.169.254", id="link-local-v4-metadata"),
    pytest.param("fe80::1", id="link-local-v6"),
    pytest.param("fe80::1%eth0", id="link-local-v6-scoped"),
    pytest.param("100.64.0.1", id="cgnat-low"),
    pytest.param("100.127.255.254", id="cgnat-high"),
    pytest.param("224.0.0.1", id="multicast-v4"),
    pytest.param("239.255.255.250", id="multicast-v4-ssdp"),
    pytest.param("ff02::1", id="multicast-v6"),
    pytest.param("240.0.0.1", id="reserved-240"),
    pytest.param("255.255.255.255", id="broadcast"),
    pytest.param("0.0.0.0", id="unspecified-v4"),
    pytest.param("::", id="unspecified-v6"),
    pytest.param("0.1.2.3", id="this-network"),
    pytest.param("192.0.2.10", id="doc-test-net-1"),
    pytest.param("198.51.100.10", id="doc-test-net-2"),
    pytest.param("203.0.113.10", id="doc-test-net-3"),
    pytest.param("2001:db8::1", id="doc-v6"),
    pytest.param("198.18.0.1", id="benchmarking"),
    pytest.param("::ffff:10.0.0.1", id="mapped-private"),
    pytest.param("::ffff:127.0.0.1", id="mapped-loopback"),
    pytest.param("::ffff:169.254.169.254", id="mapped-link-local"),
    pytest.param("2002:7f00:1::", id="6to4-loopback"),
    pytest.param("2002:a9fe:a9fe::1", id="6to4-link-local"),
    pytest.param("2002:a00:1::1", id="6to4-private"),
]

PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700::1111", "2001:4860:4860::8888", "::ffff:8.8.8.8"]

#: IANA's special-purpose ranges that are not globally reachable, multicast, and site-local (IPv4, IPv6).
REFUSED_RANGES = [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
    "::/128", "::1/128", "64:ff9b:1::/48", "100::/64", "100:0:0:1::/64", "2001::/23", "2001:db8::/32",
    "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
]  # fmt: skip
#: Ordinary public addresses, many just outside a refused range.
MORE_PUBLIC = [
    "9.9.9.9", "185.199.108.153", "11.0.0.0", "126.255.255.255", "128.0.0.0", "100.63.255.255", "100.128.0.0",
    "169.253.255.255", "169.255.0.0", "172.15.255.255", "172.32.0.0", "192.0.1.255", "192.0.3.0",
    "192.88.98.255", "192.88.100.0", "192.167.255.255", "192.169.0.0", "198.17.255.255", "198.20.0.0",
    "198.51.99.255", "203.0.112.255", "223.255.255.255", "1.0.0.1",
    "2a00:1450:4001:82a::200e", "2620:fe::fe", "2400:cb00:2048:1::c629:d7a2", "2001:200::1", "2001:db7:ffff::1",
    "2001:db9::1", "3fff:1000::1", "3ffe::1", "2c0f:fb50:4003::1",
    # Prefixes that embed an IPv4 address pass when the embedded address is public.
    "::ffff:1.1.1.1", "64:ff9b::808:808", "64:ff9b::1.1.1.1", "2002:808:808::1", "2002:101:101:1::1",
]  # fmt: skip
#: Prefixes that embed an IPv4 address, as functions of that address.
EMBEDDINGS = {
    "mapped": lambda v4: ipaddress.IPv6Address(f"::ffff:{v4}"),
    "nat64": lambda v4: ipaddress.IPv6Address(f"64:ff9b::{v4}"),
    "6to4": lambda v4: ipaddress.IPv6Address((0x2002 << 112) | (int(v4) << 80) | 1),
}


def _first_middle_last(cidr: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    network = ipaddress.ip_network(cidr)
    return [network[0], network[network.num_addresses // 2], network[-1]]


@pytest.mark.parametrize("cidr", REFUSED_RANGES)
def test_every_address_of_a_special_purpose_range_is_refused_with_its_reason(cidr):
    for ip in _first_middle_last(cidr):
        with pytest.raises(DestinationRefused, match=r"is not a public address \(.*RFC \d+.*\)") as caught:
            NetworkGuard().check_address(ip)
        assert str(ip) in str(caught.value)
        with pytest.raises(DestinationRefused):
            NetworkGuard().check_address(str(ip))


@pytest.mark.parametrize("embedding", EMBEDDINGS)
@pytest.mark.parametrize("cidr", [c for c in REFUSED_RANGES if "." in c])
def test_an_address_embedding_a_refused_ipv4_address_is_refused(cidr, embedding):
    for v4 in _first_middle_last(cidr):
        ip = EMBEDDINGS[embedding](v4)
        with pytest.raises(DestinationRefused, match=f"of {v4}: "):
            NetworkGuard().check_address(ip)


@pytest.mark.parametrize("address", [*PUBLIC, *MORE_PUBLIC])
def test_ordinary_public_addresses_pass(address):
    assert forbidden_reason(ipaddress.ip_address(address)) is None
    NetworkGuard().check_address(address)


@pytest.mark.parametrize("address", ["1fff:ffff::1", "4000::1", "::7f00:1", "::a00:1", "fe00::1", "8000::1"])
def test_ipv6_outside_global_unicast_space_is_refused(address):
    with pytest.raises(DestinationRefused, match="2000::/3"):
        NetworkGuard().check_address(address)


@pytest.mark.parametrize("address", FORBIDDEN)
def test_non_public_address_is_refused(address):
    with pytest.raises(DestinationRefused, match="DISPATCHER_ALLOWED_NETWORKS"):
        NetworkGuard().check_address(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_address_passes(address):
    NetworkGuard().check_address(address)
    NetworkGuard().check_address(ipaddress.ip_address(address))


def test_address_objects_are_judged_like_strings():
    with pytest.raises(DestinationRefused):
        NetworkGuard().check_address(ipaddress.ip_address("10.0.0.1"))


@pytest.mark.parametrize(
    ("allowed", "address"),
    [
        ("10.0.0.0/8", "10.1.2.3"),
        ("127.0.0.0/8", "127.0.0.1"),
        ("::1/128", "::1"),
        ("fd00::/8", "fd00::5"),
        ("169.254.169.254/32", "169.254.169.254"),
        ("10.0.0.0/8", "::ffff:10.1.2.3"),
        ("127.0.0.0/8", "::ffff:127.0.0.1"),
        ("10.0.0.0/8", "64:ff9b::a01:203"),
        ("10.0.0.0/8", "2002:a01:203::1"),
        ("fec0::/10", "fec0::1"),
        ("100.64.0.0/10", "100.100.100.200"),
        ("2001:db8::/32", "2001:db8::1"),
    ],
)
def test_allowed_network_lets_a_private_address_pass(allowed, address):
    NetworkGuard([ipaddress.ip_network(allowed)]).check_address(address)


@pytest.mark.parametrize(
    ("allowed", "address"),
    [
        ("10.0.0.0/8", "192.168.1.1"),
        ("10.0.0.0/8", "172.16.0.1"),
        ("127.0.0.0/8", "::1"),
        ("::1/128", "127.0.0.1"),
        # An IPv4-mapped address is judged as its IPv4 address, not by IPv6 networks that contain it.
        ("::ffff:0:0/96", "::ffff:10.0.0.1"),
        ("10.0.0.0/8", "::ffff:192.168.1.1"),
    ],
)
def test_allowed_network_does_not_let_other_addresses_pass(allowed, address):
    with pytest.raises(DestinationRefused):
        NetworkGuard([ipaddress.ip_network(allowed)]).check_address(address)


def test_check_host_refuses_localhost_without_allowed_networks():
    with pytest.raises(DestinationRefused):
        NetworkGuard().check_host("localhost", 80)


def test_check_host_allows_localhost_when_loopback_is_allowed():
    guard = NetworkGuard([ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")])

    guard.check_host("localhost", 80)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "10.0.0.1", "::ffff:127.0.0.1"])
def test_check_host_refuses_literal_addresses(host):
    with pytest.raises(DestinationRefused):
        NetworkGuard().check_host(host, 443)
