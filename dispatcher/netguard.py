"""The network guard: which addresses a webhook may reach.

Webhook URLs come from API clients, so without a guard they could make the
workers call loopback, cloud metadata or private services (SSRF). The API
checks every address the host resolves to; the worker checks again the address
it actually connected to, which defeats DNS rebinding.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterable

from dispatcher.errors import DestinationRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: How long the API reuses a host's DNS answer, and how many hosts it remembers.
DNS_CACHE_SECONDS = 30.0
DNS_CACHE_SIZE = 10_000
#: Carrier-grade NAT (RFC 6598); not in the stdlib's private list on every Python.
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why `ip` is not a public unicast address, or None when it is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv6Address) and ip.sixtofour is not None:
        # 6to4 (2002::/16) reaches the IPv4 address it embeds wherever a relay route exists.
        embedded = forbidden_reason(ip.sixtofour)
        if embedded is not None:
            return f"6to4 address of a {embedded} IPv4 address"
    checks = (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT, "carrier-grade NAT"),
        (ip.is_private, "private"),
        (ip.is_reserved, "reserved"),
        (not ip.is_global, "not globally routable"),
    )
    for hit, reason in checks:
        if hit:
            return reason
    return None


class NetworkGuard:
    """Allows public addresses, and private ones inside `allowed` networks."""

    def __init__(self, allowed: Iterable[IPNetwork] = ()) -> None:
        self.allowed = tuple(allowed)
        #: host -> (until when, why it is refused or None): DNS answers judged, kept DNS_CACHE_SECONDS.
        self._verdicts: dict[str, tuple[float, str | None]] = {}

    def check_address(self, address: str | IPAddress) -> None:
        """Raise DestinationRefused unless a webhook may connect to `address`."""
        ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
        reason = forbidden_reason(ip)
        if reason is None:
            return
        judged = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
        if any(judged.version == net.version and judged in net for net in self.allowed):
            return
        raise DestinationRefused(
            f"{ip} is not a public address ({reason}); add its network to DISPATCHER_ALLOWED_NETWORKS to allow it"
        )

    def check_host(self, host: str, port: int) -> None:
        """Resolve `host` and raise DestinationRefused if any of its addresses is forbidden."""
        # A batch of 10,000 webhooks to one partner must not mean 10,000 DNS lookups and checks. The
        # cache is only for the API's early answer: the worker checks the address it really connects to.
        cached = self._verdicts.get(host)
        if cached is None or cached[0] <= time.monotonic():
            cached = (time.monotonic() + DNS_CACHE_SECONDS, self._judge(host, port))
            if len(self._verdicts) >= DNS_CACHE_SIZE:
                self._verdicts.clear()
            self._verdicts[host] = cached
        if cached[1] is not None:
            raise DestinationRefused(cached[1])

    def _judge(self, host: str, port: int) -> str | None:
        """Why `host` may not be reached, or None when every address it resolves to may be.

        A failed lookup raises instead: it is not remembered, the next request asks DNS again.
        """
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise DestinationRefused(f"host {host!r} does not resolve: {exc}") from None
        try:
            for info in infos:
                self.check_address(info[4][0])
        except DestinationRefused as exc:
            return str(exc)
        return None
