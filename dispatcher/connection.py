"""How every process reaches Redis: REDIS_URL, read once here, for the web process, the workers,
their scheduler and reaper, the CLI and rq-dashboard alike.

- `redis://[user:password@]host[:port][/db]` and `rediss://...` (TLS), with redis-py's own query
  options, e.g. `?ssl_ca_certs=/etc/ca.pem&ssl_certfile=client.pem&ssl_keyfile=client.key`;
- `unix:///path/to/redis.sock?db=0`;
- `redis+sentinel://[user:password@]host[:port][,host[:port]...]/<master name>[/<db>]` (and
  `rediss+sentinel://` for TLS to the sentinels and the master): the sentinels are asked for the
  master at each new connection, so after a failover the next connection finds the new one. The
  user info is the master's; `?sentinel_password=` (and `sentinel_username=`) are the sentinels'.

redis-py reads the first three itself; a Sentinel URL is parsed here into its `Sentinel` client.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.connection
from redis.sentinel import Sentinel

from dispatcher.errors import ConfigError

#: URL schemes REDIS_URL may have.
SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
SENTINEL_PORT = 26379
#: Query options that are the sentinels' own, not the master's.
SENTINEL_OPTIONS = ("sentinel_password", "sentinel_username")
#: Query options naming a file redis-py opens (TLS): checked at start-up, not at the first connection.
FILE_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path")
#: Query values never shown in a message.
SECRET_OPTIONS = ("password", "sentinel_password")


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed `redis(s)+sentinel://` URL."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    #: The master's connection options (db, credentials, TLS, timeouts), redis-py's names.
    options: dict[str, Any] = field(default_factory=dict)
    #: The sentinels' own: their credentials and the same TLS options.
    sentinel_options: dict[str, Any] = field(default_factory=dict)


def check_url(value: str) -> str:
    """Check REDIS_URL's form (scheme, hosts, ports, database, option files) without connecting;
    raise ConfigError naming the fault."""
    scheme = urlsplit(value).scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigError(
            "REDIS_URL must start with redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel://, "
            f"got {scheme + '://' if scheme else 'no scheme'}"
        )
    if is_sentinel(value):
        options = parse_sentinel_url(value).options
    else:
        try:
            options = redis.connection.parse_url(value)
            urlsplit(value).port  # noqa: B018 - raises ValueError on a port out of range
        except ValueError as exc:
            raise ConfigError(f"REDIS_URL is not a valid Redis URL: {exc}") from None
        database = urlsplit(value).path.strip("/") if scheme != "unix" else ""
        if database and not (database.isascii() and database.isdigit()):
            raise ConfigError(f"REDIS_URL: the database after the host must be a number, got {database!r}")
    for name in FILE_OPTIONS:
        path = options.get(name)
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"REDIS_URL: {name} names a file that cannot be read: {path}")
    return value


def parse_sentinel_url(value: str) -> SentinelTarget:
    """`redis+sentinel://[user:password@]host[:port],.../<master>[/<db>][?options]`; ConfigError if malformed."""
    parts = urlsplit(value)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = []
    for address in hosts.split(","):
        host, port = _host_and_port(address)
        sentinels.append((host, port))
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ConfigError(f"REDIS_URL: a Sentinel URL ends in /<master name>[/<db>], got {parts.path or 'nothing'!r}")
    master, database = path[0], path[1] if len(path) > 1 else "0"
    if not (database.isascii() and database.isdigit()):
        raise ConfigError(f"REDIS_URL: the database after the master name must be a number, got {database!r}")
    query = dict(parse_qsl(parts.query))
    try:
        # redis-py's own parser turns the query's options into typed keyword arguments.
        options = redis.connection.parse_url(f"redis://h/?{parts.query}") if parts.query else {}
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL is not a valid Redis URL: {exc}") from None
    options.pop("host", None)
    sentinel_options = {name.removeprefix("sentinel_"): options.pop(name) for name in SENTINEL_OPTIONS if name in query}
    options["db"] = int(options.get("db", database))
    if userinfo:
        user, _, password = userinfo.partition(":")
        options |= {"username": unquote(user) or None, "password": unquote(password) or None}
    if parts.scheme.lower().startswith("rediss"):
        options["ssl"] = True
    tls = {name: value for name, value in options.items() if name == "ssl" or name.startswith("ssl_")}
    return SentinelTarget(tuple(sentinels), master, options, tls | sentinel_options)


def _host_and_port(address: str) -> tuple[str, int]:
    try:
        parts = urlsplit(f"//{address}")
        port = parts.port or SENTINEL_PORT
    except ValueError:
        raise ConfigError(f"REDIS_URL: a sentinel's port must be a number 1-65535, got {address!r}") from None
    if not parts.hostname:
        raise ConfigError(f"REDIS_URL: a sentinel address has no host: {address!r}")
    return parts.hostname, port


def is_sentinel(url: str) -> bool:
    return urlsplit(url).scheme.lower().endswith("+sentinel")


def connect(url: str, **options: Any) -> redis.Redis:
    """A client for REDIS_URL's Redis (a Sentinel URL's current master), with `options` (timeouts,
    retry, health checks) for its connections; nothing connects until the first command."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    timeouts = {k: v for k, v in options.items() if k in ("socket_timeout", "socket_connect_timeout")}
    sentinel = Sentinel(target.sentinels, sentinel_kwargs=target.sentinel_options | timeouts, **target.options)
    return sentinel.master_for(target.master, redis_class=redis.Redis, **options)


def rq_cli_settings(url: str) -> dict[str, Any]:
    """Settings for RQ's own command line (`rq info -c workers.rqconfig`): REDIS_URL as RQ reads it."""
    if not is_sentinel(url):
        return {"REDIS_URL": url}
    target = parse_sentinel_url(url)
    options = dict(target.options)
    return {
        "SENTINEL": {
            "INSTANCES": list(target.sentinels),
            "MASTER_NAME": target.master,
            "DB": options.pop("db"),
            "USERNAME": options.pop("username", None),
            "PASSWORD": options.pop("password", None),
            "SSL": options.pop("ssl", False),
            "CONNECTION_KWARGS": options,
            "SENTINEL_KWARGS": target.sentinel_options,
        }
    }


def shown_url(url: str) -> str:
    """REDIS_URL for a message: its passwords (the master's and the sentinels') masked."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    pairs = parse_qsl(parts.query)
    if not password and not any(name in SECRET_OPTIONS for name, _ in pairs):
        return url  # (not rebuilt: urlunsplit would write unix:///path as unix:/path)
    netloc = f"{user}:***@{hosts}" if password else parts.netloc
    query = "&".join(f"{name}={'***' if name in SECRET_OPTIONS else value}" for name, value in pairs)
    return parts._replace(netloc=netloc, query=query).geturl()
