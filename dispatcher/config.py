"""Settings read from the environment, validated once at start-up."""

from __future__ import annotations

import base64
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from dispatcher.errors import ConfigError
from dispatcher.priorities import reserved_suffix
from dispatcher.replicas import Replicas

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Milliseconds a write waits for DISPATCHER_MIN_REPLICAS replicas: well inside the API's answer time.
DEFAULT_MIN_REPLICAS_TIMEOUT = 500
DEFAULT_QUEUE = "dispatcher"
DEFAULT_OUTBOX_DIR = "./var/outbox"
DEFAULT_WEBHOOK_TIMEOUT = 15.0
#: Webhooks: attempts at 0 s, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
DEFAULT_WEBHOOK_BACKOFF = (5, 300, 1800, 7200, 18000, 36000, 36000)
#: Emails: attempts at 0 s, then 1 min, 5 min, 30 min, 2 h, 6 h.
DEFAULT_EMAIL_BACKOFF = (60, 300, 1800, 7200, 21600)
#: How long a succeeded job (and its attempts) stays readable: 7 days.
#: RQ's own default (500 s) would make the status API answer 404 after minutes.
DEFAULT_RESULT_TTL = 7 * 24 * 3600
#: How long a failed job stays readable: 30 days.
DEFAULT_FAILURE_TTL = 30 * 24 * 3600
#: Deliveries one worker process has in flight at once (a thread each, mostly waiting on the network).
DEFAULT_CONCURRENCY = 32
#: Seconds one SMTP send may take in all (connect, TLS, login, MAIL, RCPT, DATA of up to ~14 MB).
DEFAULT_SMTP_TIMEOUT = 60.0
#: Seconds the API waits in all for the DNS lookups of one request's webhook hosts.
DEFAULT_DNS_TIMEOUT = 2.0
#: Where `dispatcher web` listens by default; `dispatcher dev` listens on loopback only.
DEFAULT_WEB_HOST = "0.0.0.0"
DEV_WEB_HOST = "127.0.0.1"
#: The Standard Webhooks spec: a signing secret is 24 to 64 random bytes.
WEBHOOK_SECRET_BYTES = (24, 64)
#: DISPATCHER_LOG_FORMAT's values (dispatcher.logs): a JSON object per line, or text for humans.
LOG_FORMATS = ("json", "text")
#: The range of DISPATCHER_SMTP_RATE, in messages per second: from one per 100 s to beyond any relay.
MIN_RATE, MAX_RATE = 0.01, 100_000.0
#: Endpoint health (dispatcher.health): consecutive failed attempts that open an endpoint's circuit
#: breaker, the seconds it stays open before one probe (doubled after each failed probe, up to
#: BREAKER_MAX_COOLDOWN or the setting, if longer), and how long an endpoint may fail without a
#: success before it is disabled: 5 days.
DEFAULT_BREAKER_FAILURES = 5
DEFAULT_BREAKER_COOLDOWN = 60.0
BREAKER_MAX_COOLDOWN = 3600.0
DEFAULT_ENDPOINT_DISABLE_AFTER = 5 * 24 * 3600


def default_max_per_host(concurrency: int) -> int:
    """A quarter of the delivery slots, at least one: one slow webhook host cannot hold the rest."""
    return max(1, concurrency // 4)


MAX_ATTEMPTS_LIMIT = 20
MAX_BACKOFF_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class RetrySchedule:
    """How many attempts a job gets and the delays before the 2nd, 3rd, ... attempt."""

    max_attempts: int
    backoff: tuple[float, ...]

    def delay_before(self, attempt: int) -> float:
        """Delay before attempt number `attempt` (2 or more); the last value repeats."""
        if not self.backoff:
            return 0.0
        return float(self.backoff[min(attempt - 2, len(self.backoff) - 1)])


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False
    starttls: bool = False


@dataclass(frozen=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    queue_name: str = DEFAULT_QUEUE
    port: int = 8000
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    email_from: str | None = None
    smtp: SmtpSettings | None = None
    outbox_dir: Path = Path(DEFAULT_OUTBOX_DIR)
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_timeout: float = DEFAULT_WEBHOOK_TIMEOUT
    allowed_networks: tuple[IPNetwork, ...] = ()
    webhook_retry: RetrySchedule = RetrySchedule(8, DEFAULT_WEBHOOK_BACKOFF)
    email_retry: RetrySchedule = RetrySchedule(6, DEFAULT_EMAIL_BACKOFF)
    result_ttl: int = DEFAULT_RESULT_TTL
    failure_ttl: int = DEFAULT_FAILURE_TTL
    concurrency: int = DEFAULT_CONCURRENCY
    #: Delivery slots of one worker that webhooks to one host (name and port) may hold at once.
    max_per_host: int = default_max_per_host(DEFAULT_CONCURRENCY)
    smtp_timeout: float = DEFAULT_SMTP_TIMEOUT
    dns_timeout: float = DEFAULT_DNS_TIMEOUT
    #: The web process's listening address; None: the command's default (DEFAULT_WEB_HOST or DEV_WEB_HOST).
    web_host: str | None = None
    #: Bearer token GET /metrics requires; None: /metrics is open.
    metrics_key: str | None = field(default=None, repr=False)
    #: "json" or "text" (dispatcher.logs).
    log_format: str = LOG_FORMATS[0]
    #: Emails per second every worker together may send (dispatcher.ratelimit); None: no limit.
    smtp_rate: float | None = None
    #: Consecutive failed attempts that open an endpoint's circuit breaker (dispatcher.health).
    breaker_failures: int = DEFAULT_BREAKER_FAILURES
    #: Seconds an open breaker holds deliveries before it lets one through as a probe.
    breaker_cooldown: float = DEFAULT_BREAKER_COOLDOWN
    #: Seconds an endpoint may fail without a success before it is disabled.
    endpoint_disable_after: int = DEFAULT_ENDPOINT_DISABLE_AFTER
    #: Replicas a write must reach (Redis WAIT) before the API answers 202 or a worker moves on; 0: none.
    min_replicas: int = 0
    #: Milliseconds that WAIT gives them.
    min_replicas_timeout: int = DEFAULT_MIN_REPLICAS_TIMEOUT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting; raise ConfigError naming the first bad variable."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        secret = get("DISPATCHER_WEBHOOK_SECRET")
        if secret is not None:
            parse_webhook_secret(secret)
        concurrency = _parse_int("DISPATCHER_CONCURRENCY", get("DISPATCHER_CONCURRENCY"), DEFAULT_CONCURRENCY, 1, 1024)
        return cls(
            redis_url=parse_redis_url(get("REDIS_URL") or DEFAULT_REDIS_URL),
            queue_name=_parse_queue_name(get("DISPATCHER_QUEUE") or DEFAULT_QUEUE),
            port=_parse_int("PORT", get("PORT"), 8000, 1, 65535),
            api_keys=tuple(k.strip() for k in (get("DISPATCHER_API_KEYS") or "").split(",") if k.strip()),
            email_from=_parse_email_from(get("DISPATCHER_EMAIL_FROM")),
            smtp=parse_smtp_url(get("DISPATCHER_SMTP_URL")),
            outbox_dir=Path(get("DISPATCHER_OUTBOX_DIR") or DEFAULT_OUTBOX_DIR),
            webhook_secret=secret,
            webhook_timeout=_parse_float(
                "DISPATCHER_WEBHOOK_TIMEOUT", get("DISPATCHER_WEBHOOK_TIMEOUT"), DEFAULT_WEBHOOK_TIMEOUT, 0.1, 300
            ),
            allowed_networks=parse_networks(get("DISPATCHER_ALLOWED_NETWORKS")),
            webhook_retry=_parse_schedule("WEBHOOK", env, 8, DEFAULT_WEBHOOK_BACKOFF),
            email_retry=_parse_schedule("EMAIL", env, 6, DEFAULT_EMAIL_BACKOFF),
            result_ttl=_parse_retention(env, "SUCCEEDED", "DISPATCHER_RESULT_TTL", DEFAULT_RESULT_TTL),
            failure_ttl=_parse_retention(env, "FAILED", "DISPATCHER_FAILURE_TTL", DEFAULT_FAILURE_TTL),
            concurrency=concurrency,
            max_per_host=_parse_int(
                "DISPATCHER_MAX_PER_HOST",
                get("DISPATCHER_MAX_PER_HOST"),
                default_max_per_host(concurrency),
                1,
                concurrency,
            ),
            smtp_timeout=_parse_float(
                "DISPATCHER_SMTP_TIMEOUT", get("DISPATCHER_SMTP_TIMEOUT"), DEFAULT_SMTP_TIMEOUT, 1, 600
            ),
            dns_timeout=_parse_float(
                "DISPATCHER_DNS_TIMEOUT", get("DISPATCHER_DNS_TIMEOUT"), DEFAULT_DNS_TIMEOUT, 0.1, 30
            ),
            web_host=_parse_host(get("DISPATCHER_HOST")),
            metrics_key=get("DISPATCHER_METRICS_KEY"),
            log_format=parse_log_format(get("DISPATCHER_LOG_FORMAT")),
            smtp_rate=_parse_rate("DISPATCHER_SMTP_RATE", get("DISPATCHER_SMTP_RATE")),
            breaker_failures=_parse_int(
                "DISPATCHER_BREAKER_FAILURES", get("DISPATCHER_BREAKER_FAILURES"), DEFAULT_BREAKER_FAILURES, 1, 1000
            ),
            breaker_cooldown=_parse_float(
                "DISPATCHER_BREAKER_COOLDOWN", get("DISPATCHER_BREAKER_COOLDOWN"), DEFAULT_BREAKER_COOLDOWN, 0.1, 86400
            ),
            endpoint_disable_after=_parse_int(
                "DISPATCHER_ENDPOINT_DISABLE_AFTER",
                get("DISPATCHER_ENDPOINT_DISABLE_AFTER"),
                DEFAULT_ENDPOINT_DISABLE_AFTER,
                1,
                365 * 24 * 3600,
            ),
            min_replicas=_parse_int("DISPATCHER_MIN_REPLICAS", get("DISPATCHER_MIN_REPLICAS"), 0, 0, 16),
            min_replicas_timeout=_parse_int(
                "DISPATCHER_MIN_REPLICAS_TIMEOUT",
                get("DISPATCHER_MIN_REPLICAS_TIMEOUT"),
                DEFAULT_MIN_REPLICAS_TIMEOUT,
                1,
                60_000,
            ),
        )

    @property
    def replicas(self) -> Replicas:
        return Replicas(self.min_replicas, self.min_replicas_timeout)

    def require_api_keys(self) -> None:
        if not self.api_keys:
            raise ConfigError(
                "DISPATCHER_API_KEYS is not set: give one or more comma-separated bearer tokens "
                "(or run `dispatcher dev`, which generates one)"
            )

    def require_webhook_secret(self) -> str:
        if not self.webhook_secret:
            raise ConfigError(
                "DISPATCHER_WEBHOOK_SECRET is not set: give a Standard Webhooks secret like whsec_<base64> "
                "(or run `dispatcher dev`, which generates one)"
            )
        return self.webhook_secret


def parse_webhook_secret(value: str) -> bytes:
    """Decode a `whsec_<base64>` signing secret; raise ConfigError when it is not one."""
    if not value.startswith("whsec_"):
        raise ConfigError("DISPATCHER_WEBHOOK_SECRET must look like whsec_<base64>, got a value without whsec_")
    try:
        key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
    except ValueError:
        raise ConfigError("DISPATCHER_WEBHOOK_SECRET must be whsec_ followed by base64") from None
    low, high = WEBHOOK_SECRET_BYTES
    if not low <= len(key) <= high:
        raise ConfigError(
            f"DISPATCHER_WEBHOOK_SECRET must decode to {low}-{high} bytes (the Standard Webhooks spec), got {len(key)}"
        )
    return key


def parse_redis_url(value: str) -> str:
    """Check REDIS_URL's form without connecting (dispatcher.connection); raise ConfigError naming the fault."""
    from dispatcher.connection import check_url  # redis-py is imported only where a URL is read

    return check_url(value)


def parse_log_format(value: str | None) -> str:
    """DISPATCHER_LOG_FORMAT: json (also when unset) or text; ConfigError naming it otherwise."""
    if value is None:
        return LOG_FORMATS[0]
    if value.lower() not in LOG_FORMATS:
        raise ConfigError(f"DISPATCHER_LOG_FORMAT must be json or text, got {value!r}")
    return value.lower()


def _parse_host(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(
            f"DISPATCHER_HOST must be an IP address to listen on, e.g. 127.0.0.1 or 0.0.0.0, got {value!r}"
        ) from None
    return value


def parse_smtp_url(value: str | None) -> SmtpSettings | None:
    """Parse `smtp://[user:pass@]host:port[?starttls=true]` or `smtps://...`."""
    if value is None:
        return None
    name = "DISPATCHER_SMTP_URL"
    parts = urlsplit(value)
    if parts.scheme not in ("smtp", "smtps"):
        raise ConfigError(f"{name} must start with smtp:// or smtps://, got {parts.scheme or 'no'} scheme")
    if not parts.hostname:
        raise ConfigError(f"{name} has no host")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{name} has an invalid port") from None
    if port == 0:  # not "no port": without this check `or` below would turn 0 into the default
        raise ConfigError(f"{name} has an invalid port")
    port = port or (465 if parts.scheme == "smtps" else 25)
    query = parse_qs(parts.query)
    unknown = set(query) - {"starttls"}
    if unknown:
        raise ConfigError(f"{name} has unknown options: {', '.join(sorted(unknown))} (only starttls)")
    starttls_raw = query.get("starttls", ["false"])[-1].lower()
    if starttls_raw not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"{name}: starttls must be true or false, got {starttls_raw!r}")
    starttls = starttls_raw in ("true", "1", "yes")
    if starttls and parts.scheme == "smtps":
        raise ConfigError(f"{name}: smtps:// is already TLS; starttls applies to smtp:// only")
    return SmtpSettings(
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ssl=parts.scheme == "smtps",
        starttls=starttls,
    )


def parse_networks(value: str | None) -> tuple[IPNetwork, ...]:
    if value is None:
        return ()
    networks = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"DISPATCHER_ALLOWED_NETWORKS: {item!r} is not a CIDR like 127.0.0.0/8") from None
    return tuple(networks)


def parse_backoff(text: str) -> tuple[float, ...]:
    """Parse a comma-separated list of delays in seconds; raise ValueError on bad input."""
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        number = float(item)
        if not 0 <= number <= MAX_BACKOFF_SECONDS:
            raise ValueError(f"{item} is outside 0..{MAX_BACKOFF_SECONDS}")
        values.append(number)
    return tuple(values)


def _parse_retention(env: Mapping[str, str], outcome: str, old_name: str, default: int) -> int:
    """DISPATCHER_RETENTION_<outcome>, in seconds; `old_name`, its name before, is still read when
    it alone is set."""
    name = f"DISPATCHER_RETENTION_{outcome}"
    raw, old = env.get(name, "").strip() or None, env.get(old_name, "").strip() or None
    if raw is not None and old is not None and raw != old:
        raise ConfigError(f"{name} and {old_name} (its old name) differ: set {name} only")
    return _parse_int(name if raw is not None or old is None else old_name, raw or old, default, 1, 10**9)


def _parse_schedule(kind: str, env: Mapping[str, str], attempts: int, backoff: tuple[float, ...]) -> RetrySchedule:
    attempts_name = f"DISPATCHER_{kind}_MAX_ATTEMPTS"
    backoff_name = f"DISPATCHER_{kind}_BACKOFF"
    max_attempts = _parse_int(attempts_name, env.get(attempts_name, "").strip() or None, attempts, 1, 20)
    raw = env.get(backoff_name, "").strip()
    if raw:
        try:
            backoff = parse_backoff(raw)
        except ValueError as exc:
            raise ConfigError(f"{backoff_name} must be comma-separated seconds, e.g. 5,300,1800: {exc}") from None
    return RetrySchedule(max_attempts, tuple(float(b) for b in backoff))


def _parse_int(name: str, raw: str | None, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _parse_float(name: str, raw: str | None, default: float, low: float, high: float) -> float:
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _parse_rate(name: str, raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of messages per second, got {raw!r}") from None
    if not MIN_RATE <= value <= MAX_RATE:  # (NaN fails this too)
        raise ConfigError(f"{name} must be between {MIN_RATE:g} and {MAX_RATE:g} messages per second, got {raw}")
    return value


def _parse_queue_name(value: str) -> str:
    if not all(c.isalnum() or c in "-_." for c in value):
        raise ConfigError(f"DISPATCHER_QUEUE may hold letters, digits, '-', '_' and '.', got {value!r}")
    suffix = reserved_suffix(value)
    if suffix:
        raise ConfigError(f"DISPATCHER_QUEUE must not end in {suffix!r} (a priority's queue), got {value!r}")
    return value


def _parse_email_from(value: str | None) -> str | None:
    if value is None:
        return None
    from dispatcher.addresses import AddressError, parse_mailbox

    try:
        parse_mailbox(value)
    except AddressError as exc:
        raise ConfigError(f"DISPATCHER_EMAIL_FROM is not a valid address: {exc}") from None
    return value
