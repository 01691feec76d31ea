"""The network guard: which addresses a webhook may reach."""

from __future__ import annotations

import ipaddress

import pytest

from dispatcher.errors import DestinationRefused
from dispatcher.netguard import NetworkGuard

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
