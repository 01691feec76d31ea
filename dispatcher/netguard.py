"""The network guard: which addresses a webhook may reach, and bounded name resolution.

Webhook URLs come from API clients, so without a guard they could make the
workers call loopback, cloud metadata or private services (SSRF). The API
checks every address the host resolves to; the worker resolves again, judges
every address, and connects only to an address it has judged, which defeats DNS
rebinding.

Lookups run on a small thread pool created on first use, so that a request can
bound the time it waits for them (`socket.getaddrinfo` itself cannot be
interrupted): a lookup still running when its waiters give up keeps running and
its answer is cached for the next request; one lookup per host is in flight at
a time, whoever waits for it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from dispatcher.config import DEFAULT_DNS_TIMEOUT
from dispatcher.errors import DestinationRefused, ResolutionFailed, ResolutionTimedOut

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: socket.getaddrinfo's shape: (host, port, family, type, ...) -> [(family, type, proto, canonname, sockaddr)].
Resolver = Callable[..., Sequence[tuple]]

#: How long the API reuses a host's DNS answer, and how many hosts it remembers.
DNS_CACHE_SECONDS = 30.0
#: How long a failed lookup (no such host, DNS error) is remembered: a batch naming one broken host
#: 10,000 times, or a client retrying at once, asks DNS once, yet a fixed record is seen soon.
DNS_FAILURE_CACHE_SECONDS = 5.0
DNS_CACHE_SIZE = 10_000
#: Lookups running at once in one process; more wait their turn (within their requests' time bound).
DNS_LOOKUP_THREADS = 64


def _net(cidr: str) -> IPNetwork:
    return ipaddress.ip_network(cidr)


#: Every range IANA's special-purpose address registries mark as not globally reachable, plus
#: multicast and the other ranges no public unicast destination lives in. A few globally reachable
#: anycast exceptions inside 192.0.0.0/24 (192.0.0.9, .10) are refused with the rest: no webhook
#: receiver lives there. Checked in order: the first row that contains an address names why.
REFUSED_IPV4: tuple[tuple[IPNetwork, str], ...] = tuple(
    (_net(cidr), reason)
    for cidr, reason in (
        ("0.0.0.0/8", '"this network", RFC 791 / RFC 1122'),
        ("10.0.0.0/8", "private, RFC 1918"),
        ("100.64.0.0/10", "carrier-grade NAT shared space, RFC 6598"),
        ("127.0.0.0/8", "loopback, RFC 1122"),
        ("169.254.0.0/16", "link-local, RFC 3927"),
        ("172.16.0.0/12", "private, RFC 1918"),
        ("192.0.0.0/24", "IETF protocol assignments, RFC 6890"),
        ("192.0.2.0/24", "documentation TEST-NET-1, RFC 5737"),
        ("192.88.99.0/24", "deprecated 6to4 relay anycast, RFC 7526"),
        ("192.168.0.0/16", "private, RFC 1918"),
        ("198.18.0.0/15", "benchmarking, RFC 2544"),
        ("198.51.100.0/24", "documentation TEST-NET-2, RFC 5737"),
        ("203.0.113.0/24", "documentation TEST-NET-3, RFC 5737"),
        ("224.0.0.0/4", "multicast, RFC 5771"),
        ("255.255.255.255/32", "limited broadcast, RFC 919 / RFC 8190"),
        ("240.0.0.0/4", "reserved, RFC 1112"),
    )
)

#: The IPv6 rows. ::ffff:0:0/96 (IPv4-mapped, RFC 4291), 64:ff9b::/96 (NAT64, RFC 6052) and
#: 2002::/16 (6to4, RFC 3056) are absent on purpose: an address there is judged by the IPv4 address
#: it embeds. The globally reachable exceptions inside 2001::/23 (2001:1::1-3, 2001:3::/32 AMT,
#: 2001:4:112::/48 AS112, 2001:20::/28 ORCHIDv2, 2001:30::/28 DRIP) are refused with the rest.
REFUSED_IPV6: tuple[tuple[IPNetwork, str], ...] = tuple(
    (_net(cidr), reason)
    for cidr, reason in (
        ("::/128", "unspecified, RFC 4291"),
        ("::1/128", "loopback, RFC 4291"),
        ("64:ff9b:1::/48", "local-use IPv4/IPv6 translation, RFC 8215"),
        ("100::/64", "discard-only, RFC 6666"),
        ("100:0:0:1::/64", "dummy prefix, RFC 9780"),
        ("2001::/23", "IETF protocol assignments (Teredo, benchmarking, ORCHID...), RFC 2928"),
        ("2001:db8::/32", "documentation, RFC 3849"),
        ("3fff::/20", "documentation, RFC 9637"),
        ("5f00::/16", "segment routing SIDs, RFC 9602"),
        ("fc00::/7", "unique local, RFC 4193"),
        ("fe80::/10", "link-local, RFC 4291"),
        ("fec0::/10", "deprecated site-local, RFC 3879"),
        ("ff00::/8", "multicast, RFC 4291"),
    )
)
#: Public IPv6 unicast lives in 2000::/3 only (RFC 4291, IANA's IPv6 address space registry);
#: everything else outside the rows above is reserved or unassigned (IPv4-compatible ::a.b.c.d too).
GLOBAL_UNICAST_V6 = _net("2000::/3")
#: Prefixes whose addresses carry an IPv4 address, and how to read it out.
_NAT64 = _net("64:ff9b::/96")


def embedded_ipv4(ip: IPAddress) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv4-mapped, NAT64 or 6to4 address reaches, and which kind it is."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped address"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64 address"
    if ip.sixtofour is not None:
        # 6to4 reaches the IPv4 address it embeds wherever a relay route exists.
        return ip.sixtofour, "6to4 address"
    return None


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why `ip` is not a public unicast address, or None when it is."""
    embedded = embedded_ipv4(ip)
    if embedded is not None:
        reason = forbidden_reason(embedded[0])
        return None if reason is None else f"{embedded[1]} of {embedded[0]}: {reason}"
    for network, reason in REFUSED_IPV4 if ip.version == 4 else REFUSED_IPV6:
        if ip in network:
            return reason
    if ip.version == 6 and ip not in GLOBAL_UNICAST_V6:
        return "outside the global unicast space 2000::/3, RFC 4291"
    return None


class _Lookup:
    """One lookup in flight, shared by every request that waits for the same host."""

    __slots__ = ("future", "wanted_until")

    def __init__(self, wanted_until: float) -> None:
        self.future: Future[list[str]] = Future()
        #: The latest moment a waiter still wants the answer; a queued lookup started after it is skipped.
        self.wanted_until = wanted_until


class NetworkGuard:
    """Allows public addresses, and private ones inside `allowed` networks.

    `resolver` is socket.getaddrinfo unless a test replaces the system resolver; `dns_timeout` bounds
    `check_host` when no request-wide bound (`lookups()`) is given.
    """

    def __init__(
        self,
        allowed: Iterable[IPNetwork] = (),
        dns_timeout: float = DEFAULT_DNS_TIMEOUT,
        resolver: Resolver = socket.getaddrinfo,
    ) -> None:
        self.allowed = tuple(allowed)
        self.dns_timeout = dns_timeout
        self.resolver = resolver
        self._lock = threading.Lock()
        #: host -> (until when, why it is refused, why its lookup failed): the API's cache.
        self._verdicts: dict[str, tuple[float, str | None, str | None]] = {}
        self._inflight: dict[str, _Lookup] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0

    # --- judging addresses ---------------------------------------------------------------

    def check_address(self, address: str | IPAddress) -> None:
        """Raise DestinationRefused unless a webhook may connect to `address`."""
        ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
        reason = forbidden_reason(ip)
        if reason is None:
            return
        embedded = embedded_ipv4(ip)
        judged = embedded[0] if embedded is not None else ip
        if any(judged.version == net.version and judged in net for net in self.allowed):
            return
        raise DestinationRefused(
            f"{ip} is not a public address ({reason}); add its network to DISPATCHER_ALLOWED_NETWORKS to allow it"
        )

    # --- the API's checks ------------------------------------------------------------------

    def lookups(self) -> HostLookups:
        """A request's lookups: every host it names shares one bound of `dns_timeout` seconds."""
        return HostLookups(self, time.monotonic() + self.dns_timeout, self.dns_timeout)

    def check_host(self, host: str, port: int, until: float | None = None, bound: float | None = None) -> None:
        """Resolve `host` and raise DestinationRefused if any of its addresses is forbidden.

        Raise ResolutionFailed when it does not resolve, ResolutionTimedOut when no answer came by
        `until` (a time.monotonic() value; default: `dns_timeout` from now; `bound` is the seconds
        the error message names).
        """
        # A batch of 10,000 webhooks to one partner must not mean 10,000 DNS lookups and checks. The
        # cache is only for the API's early answer: the worker judges the addresses it connects to.
        cached = self._verdicts.get(host)
        if cached is not None and cached[0] > time.monotonic():
            _, refused, failed = cached
        elif (literal := _literal(host)) is not None:
            refused, failed = self._verdict([literal]), None
            self._store(host, refused, None)
        else:
            if until is None:
                until, bound = time.monotonic() + self.dns_timeout, self.dns_timeout
            lookup = self._start(host, until)
            self._wait(host, lookup, until, bound)
            refused, failed = self._judge(host, *_outcome(lookup.future))
        if failed is not None:
            raise ResolutionFailed(failed)
        if refused is not None:
            raise DestinationRefused(refused)

    def _verdict(self, addresses: list[str]) -> str | None:
        """Why one of `addresses` may not be reached, or None when all may be."""
        try:
            for address in addresses:
                self.check_address(address)
        except DestinationRefused as exc:
            return str(exc)
        return None

    def _judge(
        self, host: str, addresses: list[str] | None, exc: BaseException | None
    ) -> tuple[str | None, str | None]:
        """A lookup's (refusal, failure) messages from its addresses or its error; one is None."""
        if exc is None and addresses is not None:
            return self._verdict(addresses), None
        return None, str(exc) if isinstance(exc, ResolutionFailed) else f"host {host!r} does not resolve: {exc!r}"

    def _store(self, host: str, refused: str | None, failed: str | None) -> None:
        """Cache a verdict: good answers DNS_CACHE_SECONDS, failed lookups DNS_FAILURE_CACHE_SECONDS."""
        ttl = DNS_CACHE_SECONDS if failed is None else DNS_FAILURE_CACHE_SECONDS
        with self._lock:
            if len(self._verdicts) >= DNS_CACHE_SIZE:
                self._verdicts.clear()
            self._verdicts[host] = (time.monotonic() + ttl, refused, failed)

    # --- lookups -------------------------------------------------------------------------

    def resolve(self, host: str, timeout: float) -> list[str]:
        """The addresses `host` resolves to now (never from the cache), within `timeout` seconds.

        Raise ResolutionFailed, or ResolutionTimedOut when no answer came in time.
        """
        literal = _literal(host)
        if literal is not None:
            return [literal]
        until = time.monotonic() + timeout
        lookup = self._start(host, until)
        self._wait(host, lookup, until, timeout)
        addresses, exc = _outcome(lookup.future)
        if addresses is None:
            # A new instance: the future's is shared between threads.
            raise ResolutionFailed(self._judge(host, None, exc)[1] or f"host {host!r} does not resolve")
        return list(addresses)

    def _wait(self, host: str, lookup: _Lookup, until: float, bound: float | None) -> None:
        try:
            lookup.future.exception(timeout=max(0.0, until - time.monotonic()))
        except FutureTimeout:
            raise ResolutionTimedOut(host, bound if bound is not None else self.dns_timeout) from None

    def _start(self, host: str, until: float) -> _Lookup:
        """The lookup of `host` in flight, joined, or a new one queued on the pool."""
        with self._lock:
            pool = self._executor()
            lookup = self._inflight.get(host)
            if lookup is not None:
                lookup.wanted_until = max(lookup.wanted_until, until)
                return lookup
            lookup = self._inflight[host] = _Lookup(until)
        pool.submit(self._run, host, lookup)
        return lookup

    def _run(self, host: str, lookup: _Lookup) -> None:
        with self._lock:
            # Queued behind slow lookups until every request that wanted it had given up: skip it
            # (under the lock, so that no request joins it meanwhile).
            skipped = time.monotonic() > lookup.wanted_until
            if skipped:
                self._forget(host, lookup)
        if skipped:
            lookup.future.set_exception(ResolutionTimedOut(host, 0.0))
            return
        addresses: list[str] | None = None
        error: BaseException | None = None
        try:
            addresses = self._getaddrinfo(host)
        except BaseException as exc:
            error = exc
        if error is None or isinstance(error, ResolutionFailed):
            # Cached before it leaves the in-flight table: no moment when a request would ask again.
            self._store(host, *self._judge(host, addresses, error))
        with self._lock:
            self._forget(host, lookup)
        if error is not None:
            lookup.future.set_exception(error)
        else:
            lookup.future.set_result(addresses)  # type: ignore[arg-type]

    def _getaddrinfo(self, host: str) -> list[str]:
        try:
            infos = self.resolver(host, None, type=socket.SOCK_STREAM)
            addresses = [str(info[4][0]) for info in infos]
        except Exception as exc:  # OSError, UnicodeError, or whatever a resolver raises
            raise ResolutionFailed(f"host {host!r} does not resolve: {exc}") from exc
        if not addresses:
            raise ResolutionFailed(f"host {host!r} does not resolve: no addresses")
        return addresses

    def _forget(self, host: str, lookup: _Lookup) -> None:
        """No longer in flight (the caller holds the lock)."""
        if self._inflight.get(host) is lookup:
            del self._inflight[host]

    def _executor(self) -> ThreadPoolExecutor:
        """The lookup pool, created on first use (and again in a forked child): never at import or
        app creation, so a server that forks or monkey-patches threads afterwards gets working threads."""
        if self._pool is None or self._pid != os.getpid():
            self._pool = ThreadPoolExecutor(DNS_LOOKUP_THREADS, thread_name_prefix="dns")
            self._pid = os.getpid()
            self._inflight = {}
        return self._pool


class HostLookups:
    """The DNS checks of one API request: lookups started together, one time bound for them all."""

    def __init__(self, guard: NetworkGuard, until: float, bound: float) -> None:
        self.guard = guard
        self.until = until
        self.bound = bound

    def start(self, hosts: Iterable[str]) -> None:
        """Start the lookups of `hosts` (cached or in flight ones are not asked again)."""
        for host in dict.fromkeys(hosts):
            cached = self.guard._verdicts.get(host)
            if (cached is None or cached[0] <= time.monotonic()) and _literal(host) is None:
                self.guard._start(host, self.until)

    def check_host(self, host: str, port: int) -> None:
        """NetworkGuard.check_host within this request's bound."""
        self.guard.check_host(host, port, self.until, self.bound)


def _outcome(future: Future[list[str]]) -> tuple[list[str] | None, BaseException | None]:
    """A finished lookup's (addresses, None) or (None, error)."""
    exc = future.exception()
    return (None, exc) if exc is not None else (future.result(), None)


def _literal(host: str) -> str | None:
    """`host` when it is an IP address already (nothing to look up), else None."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return host.strip("[]")
