"""An HTTP client whose every new connection passes the network guard.

The guard runs on the peer address of the socket just connected, before a byte
is sent, so a hostname that resolved to a public address for the API and to a
private one now (DNS rebinding) is still refused. Connections are pooled per
host and kept alive; redirects are never followed.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from dispatcher.netguard import NetworkGuard

#: The first bytes of a response kept in the attempt record.
EXCERPT_BYTES = 1024
#: A response body up to this size is read to the end so its connection can be reused;
#: a larger one closes the connection instead.
DRAIN_LIMIT = 64 * 1024
USER_AGENT = "Dispatcher/0.1 (+webhooks)"


class _GuardedMixin:
    guard: NetworkGuard

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        try:
            self.guard.check_address(sock.getpeername()[0])
        except Exception:
            sock.close()
            raise
        return sock


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
        self.timeout = urllib3.Timeout(connect=min(timeout, 10.0), read=timeout)

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> Response:
        """POST once; raise DestinationRefused or urllib3.exceptions.HTTPError when no response came."""
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
        try:
            excerpt = response.read(EXCERPT_BYTES, decode_content=False)
            remaining = response.length_remaining
            if remaining is not None and remaining <= DRAIN_LIMIT:
                response.drain_conn()
                response.release_conn()
            else:
                response.close()
        except urllib3.exceptions.HTTPError:
            response.close()
            excerpt = b""
        return Response(
            status=response.status,
            headers={k.lower(): v for k, v in response.headers.items()},
            excerpt=excerpt.decode("utf-8", errors="replace"),
        )

    def close(self) -> None:
        self.pool.clear()
