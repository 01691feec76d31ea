"""An HTTP client that connects only to addresses the network guard allows, within a hard deadline.

A new connection resolves the host itself, judges every address with the guard
and only then connects, to one of those addresses: no connection to a refused
address is ever opened (so no error can tell an open internal port from a closed
one), and a host that resolved to a public address for the API and to a private
one now (DNS rebinding) is still refused. TLS still checks the certificate
against the host name. Connections are pooled per host and kept alive; redirects
are never followed.

Each POST runs inside a `workers.deadline.Deadline` of `timeout` seconds that
covers all of it: name resolution, connect, TLS, sending, the status line and
headers, and the excerpt. Every socket it uses, new or kept alive, is watched,
so a receiver that trickles bytes is cut off at the deadline, however short
each read is.
"""

from __future__ import annotations

import http.client
import socket
import sys
from dataclasses import dataclass
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import connection

from dispatcher.errors import ResolutionFailed, ResolutionTimedOut
from dispatcher.netguard import NetworkGuard
from workers import deadline
from workers.deadline import Deadline

#: The first bytes of a response kept in the attempt record.
EXCERPT_BYTES = 1024
#: A response body up to this size is read to the end so its connection can be reused;
#: a larger one closes the connection instead.
DRAIN_LIMIT = 64 * 1024
USER_AGENT = "Dispatcher/0.1 (+webhooks)"


class DeadlineExceeded(urllib3.exceptions.TimeoutError):
    """The attempt's deadline passed before the response's status line and headers arrived."""

    def __init__(self, seconds: float, stage: str) -> None:
        super().__init__(f"the attempt exceeded its {seconds:g} s deadline {stage}")
        self.seconds = seconds


class _GuardedMixin:
    """Connection behaviour shared by the HTTP and HTTPS connection classes below."""

    guard: NetworkGuard
    host: str
    port: int
    timeout: Any
    source_address: tuple[str, int] | None
    socket_options: Any

    def _new_conn(self) -> socket.socket:
        """Resolve, judge every address, then connect to a judged one; watch the socket."""
        active = deadline.active()
        connect_timeout = self.timeout if isinstance(self.timeout, int | float) else None
        budget = active.remaining() if active is not None else (connect_timeout or self.guard.dns_timeout)
        host = self.host.rstrip(".").strip("[]")
        try:
            addresses = self.guard.resolve(host, budget)
        except ResolutionTimedOut:
            raise
        except ResolutionFailed as exc:
            raise NameResolutionError(self.host, self, socket.gaierror(str(exc))) from None  # type: ignore[arg-type]
        for address in addresses:
            self.guard.check_address(address)  # DestinationRefused before any packet goes out
        error: OSError | None = None
        for address in dict.fromkeys(addresses):
            timeout = connect_timeout
            if active is not None:
                timeout = min(timeout, active.remaining()) if timeout is not None else active.remaining()
            try:
                sock = connection.create_connection(
                    (address, self.port),
                    timeout,
                    source_address=self.source_address,
                    socket_options=self.socket_options,
                )
            except OSError as exc:
                error = exc
                continue
            sys.audit("http.client.connect", self, self.host, self.port)
            if active is not None:
                active.watch(sock)  # before the TLS handshake, which the deadline bounds too
            return sock
        if isinstance(error, TimeoutError):
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out. (connect timeout={timeout})")
        raise NewConnectionError(self, f"Failed to establish a new connection: {error}")  # type: ignore[arg-type]

    def request(self, *args: Any, **kwargs: Any) -> None:
        active = deadline.active()
        if active is not None and getattr(self, "sock", None) is not None:
            # A kept-alive connection, reused: its socket object stays the same for the whole attempt.
            active.watch(self.sock, duplicate=False)  # type: ignore[attr-defined]
        super().request(*args, **kwargs)  # type: ignore[misc]


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    excerpt: str


class HttpClient:
    def __init__(self, guard: NetworkGuard, timeout: float, pool_size: int = 4) -> None:
        conn_http = type("GuardedHTTPConnection", (_GuardedMixin, HTTPConnection), {"guard": guard})
        conn_https = type("GuardedHTTPSConnection", (_GuardedMixin, HTTPSConnection), {"guard": guard})
        self.pool = urllib3.PoolManager(num_pools=256, maxsize=pool_size, retries=False)
        self.pool.pool_classes_by_scheme = {
            "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": conn_http}),
            "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": conn_https}),
        }
        self.seconds = timeout
        # The deadline bounds the attempt; socket timeouts stay as a backstop only.
        self.timeout = urllib3.Timeout(connect=timeout, read=timeout)

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> Response:
        """POST once within the deadline; raise DestinationRefused, DeadlineExceeded or another
        urllib3.exceptions.HTTPError when no response came.

        Once the status line and headers are in, the answer counts even if the excerpt is cut short
        by the deadline: the receiver has accepted or refused the webhook, and retrying one it
        accepted would deliver it twice. The connection is then closed, never pooled.
        """
        with Deadline(self.seconds) as attempt:
            try:
                response = self.pool.request(
                    "POST",
                    url,
                    body=body,
                    headers={"user-agent": USER_AGENT, **headers},
                    timeout=self.timeout,
                    retries=False,
                    redirect=False,
                    preload_content=False,
                )
            except ResolutionTimedOut:
                raise DeadlineExceeded(self.seconds, "while resolving the host") from None
            except (urllib3.exceptions.HTTPError, OSError):
                if attempt.expired:
                    raise DeadlineExceeded(self.seconds, "before the response headers arrived") from None
                raise
            if attempt.expired:
                # Cut off by the deadline, the status line and headers can look complete (http.client
                # takes the end of the stream for their end): only headers that came in time count.
                response.close()
                raise DeadlineExceeded(self.seconds, "before the response headers arrived")
            excerpt, clean = _read_excerpt(response)
            remaining = response.length_remaining
            reusable = clean and remaining is not None and remaining <= DRAIN_LIMIT
            if reusable:
                response.drain_conn()
                reusable = response.length_remaining == 0
        # The deadline is disarmed now: a connection it has not shut down by now stays usable.
        if reusable and not attempt.expired:
            response.release_conn()
        else:
            response.close()
        return Response(
            status=response.status,
            headers={k.lower(): v for k, v in response.headers.items()},
            excerpt=excerpt.decode("utf-8", errors="replace"),
        )

    def close(self) -> None:
        self.pool.clear()


def _read_excerpt(response: urllib3.BaseHTTPResponse) -> tuple[bytes, bool]:
    """Up to EXCERPT_BYTES of the body as they come, and whether reading ended without an error.

    read1 returns what each receive brings, so what arrived before the deadline shut the socket
    down is kept even when the rest never comes.
    """
    parts: list[bytes] = []
    size = 0
    try:
        while size < EXCERPT_BYTES:
            chunk = response.read1(EXCERPT_BYTES - size, decode_content=False)
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
    except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException):
        return b"".join(parts), False
    return b"".join(parts), True
