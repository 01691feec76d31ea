"""The receiving side of Dispatcher's webhooks: check a request's signature, and see each webhook once.

A receiver (your app, not Dispatcher) imports this module alone: it needs the `standardwebhooks`
package, and `redis` for the `Deduplicator`, never Flask, RQ or pydantic, so it fits any web framework.

    verify(request_body, request_headers, "whsec_...")   # raises VerificationError if forged or stale
    if Deduplicator(redis_client).first_time(request_headers["webhook-id"]):
        ...  # handle it

Delivery is at least once (a retry after a lost answer, a worker killed mid-request), and every attempt
of one webhook carries the same `webhook-id`: that is what to de-duplicate on.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from standardwebhooks import Webhook

if TYPE_CHECKING:  # only a type: verify() works without redis installed
    import redis

__all__ = [
    "DEFAULT_TOLERANCE",
    "DEFAULT_TTL",
    "Deduplicator",
    "DuplicateHeader",
    "InvalidSecret",
    "InvalidTimestamp",
    "InvalidWebhookId",
    "MissingHeader",
    "NoMatchingSignature",
    "TimestampOutOfRange",
    "TimestampTooNew",
    "TimestampTooOld",
    "VerificationError",
    "verify",
]

#: Seconds a `webhook-timestamp` may lie from this machine's clock, either way (the Standard Webhooks
#: default). Dispatcher signs every attempt afresh, so only a replayed request or a skewed clock is off.
DEFAULT_TOLERANCE = 300
#: Seconds a seen `webhook-id` is remembered: 7 days. Dispatcher's default webhook schedule retries for
#: about 28 h (33 h with its jitter), so a duplicate from a retry arrives well within it, with room for an
#: operator's retry or replay of the job later that week. A retry policy of your own (backoff up to
#: 7 days a step) can outlast it: then pass a longer ttl.
DEFAULT_TTL = 7 * 24 * 3600
#: The longest `webhook-id` accepted. Dispatcher's ids are 35 characters (`wh_` and 32 hex digits); the
#: bound keeps a hostile header from becoming a huge Redis key.
MAX_ID_LENGTH = 256
#: The Standard Webhooks spec: a signing secret is 24 to 64 random bytes (Dispatcher refuses others too).
SECRET_BYTES = (24, 64)
SECRET_PREFIX = "whsec_"
_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


class VerificationError(Exception):
    """The request is not a genuine, fresh webhook: answer it with a 4xx (Dispatcher does not retry those)."""


class MissingHeader(VerificationError):
    """A `webhook-*` header is absent or empty."""


class DuplicateHeader(VerificationError):
    """A `webhook-*` header is given twice: the value verified might not be the value the app reads."""


class InvalidWebhookId(VerificationError):
    """The `webhook-id` is empty, longer than MAX_ID_LENGTH, or not visible ASCII."""


class InvalidTimestamp(VerificationError):
    """The `webhook-timestamp` is not whole Unix seconds."""


class TimestampOutOfRange(VerificationError):
    """The `webhook-timestamp` is further than the tolerance from this machine's clock."""


class TimestampTooOld(TimestampOutOfRange):
    """Older than the tolerance: a replay of a captured request, or this machine's clock runs fast."""


class TimestampTooNew(TimestampOutOfRange):
    """Newer than the tolerance: a request made for later use, or this machine's clock runs slow."""


class NoMatchingSignature(VerificationError):
    """No `v1` signature in the header matches the body with any of the secrets."""


class InvalidSecret(ValueError):
    """A configured secret is not `whsec_<base64>` of 24-64 bytes.

    Deliberately not a VerificationError: it is the receiver's misconfiguration, not a forged request,
    and should surface as a 500, which Dispatcher retries until it is fixed, not a 4xx that ends delivery.
    """


class HeaderItems(Protocol):
    """A dict of headers, or a framework's header object (Flask's `request.headers`): anything with items()."""

    def items(self) -> Iterable[tuple[str, str]]: ...


def verify(
    body: bytes | str,
    headers: HeaderItems,
    secrets: str | Iterable[str],
    *,
    tolerance: int = DEFAULT_TOLERANCE,
) -> None:
    """Check a webhook's Standard Webhooks signature and timestamp; raise a VerificationError if it fails.

    `body` is the raw request body, exactly as received (re-serialised JSON would not match). Header names
    are matched in any case. It passes when any of `secrets` matches any `v1,<base64>` signature in the
    space-separated `webhook-signature`: give the old and the new secret while you rotate it, and a sender
    rotating its own signs with both (the spec's way), so either passes. Comparisons take constant time.
    """
    keys = [_parse_secret(secret) for secret in _secret_list(secrets)]  # misconfiguration first, always
    if tolerance < 0:
        raise ValueError(f"tolerance must be 0 or more seconds, got {tolerance}")
    found = _webhook_headers(headers)
    webhook_id = _check_id(found["webhook-id"])
    timestamp = _check_timestamp(found["webhook-timestamp"], tolerance)
    signed = datetime.fromtimestamp(timestamp, UTC)
    offered = [_ascii(signature) for signature in found["webhook-signature"].split(" ") if signature]
    matched = False
    for key in keys:
        expected = Webhook(key).sign(webhook_id, signed, body).encode()
        for signature in offered:
            # No early exit: the time taken does not depend on which signature or secret matched.
            matched |= hmac.compare_digest(expected, signature)
    if not matched:
        raise NoMatchingSignature("no webhook-signature matches the body with the secret(s) given")


class Deduplicator:
    """Remembers the `webhook-id`s seen in Redis (`SET NX EX`, one key each), so a webhook is handled once.

    Call it after verify(), on the verified request: `once()` marks the id and forgets it again if
    handling raises, so that Dispatcher's retry of the 5xx that follows is handled, not taken for a
    duplicate and dropped (first_time() and forget() do the same by hand).
    """

    def __init__(self, client: redis.Redis, *, prefix: str = "webhook-seen:", ttl: int = DEFAULT_TTL) -> None:
        if ttl < 1:
            raise ValueError(f"ttl must be at least 1 second, got {ttl}")
        self.client = client
        self.prefix = prefix
        self.ttl = ttl

    def key(self, webhook_id: str) -> str:
        """The Redis key of one id; raises InvalidWebhookId for an id a hostile header could make huge."""
        return self.prefix + _check_id(webhook_id)

    def first_time(self, webhook_id: str) -> bool:
        """True if this id was not seen within the ttl (and mark it seen), False for a duplicate. Atomic:
        of two concurrent deliveries of one webhook, exactly one gets True."""
        return bool(self.client.set(self.key(webhook_id), b"1", nx=True, ex=self.ttl))

    def forget(self, webhook_id: str) -> None:
        """Unmark an id, so that its next delivery counts as the first (after handling it failed)."""
        self.client.delete(self.key(webhook_id))

    @contextmanager
    def once(self, webhook_id: str) -> Iterator[bool]:
        """`with seen.once(webhook_id) as first:` handle the webhook if `first`; should handling
        raise, the id is forgotten again (first_time, then forget), so Dispatcher's retry of the
        5xx that follows is handled, not dropped as a duplicate."""
        first = self.first_time(webhook_id)
        try:
            yield first
        except BaseException:
            if first:
                self.forget(webhook_id)
            raise


def _secret_list(secrets: str | Iterable[str]) -> list[str]:
    if isinstance(secrets, str):
        return [secrets]
    if isinstance(secrets, bytes | bytearray):
        raise InvalidSecret("give secrets as str, whsec_<base64>, not bytes")
    listed = list(secrets)
    if not listed:
        raise InvalidSecret("no secret given")
    return listed


def _parse_secret(secret: str) -> bytes:
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise InvalidSecret("a webhook secret must look like whsec_<base64>, got one without whsec_")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSecret("a webhook secret must be whsec_ followed by base64") from None
    low, high = SECRET_BYTES
    if not low <= len(key) <= high:
        raise InvalidSecret(f"a webhook secret must decode to {low}-{high} bytes, got {len(key)}")
    return key


def _webhook_headers(headers: HeaderItems) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _HEADERS:
            if lowered in found:
                raise DuplicateHeader(f"{lowered} is given twice")
            found[lowered] = value
    for name in _HEADERS:
        if not found.get(name, "").strip():
            raise MissingHeader(f"{name} is missing")
    return found


def _check_id(webhook_id: str) -> str:
    if not isinstance(webhook_id, str) or not webhook_id:
        raise InvalidWebhookId("webhook-id is empty")
    if len(webhook_id) > MAX_ID_LENGTH:
        raise InvalidWebhookId(f"webhook-id is longer than {MAX_ID_LENGTH} characters")
    if not all("!" <= char <= "~" for char in webhook_id):
        raise InvalidWebhookId("webhook-id must be visible ASCII, without spaces or control characters")
    return webhook_id


def _check_timestamp(value: str, tolerance: int) -> int:
    # Whole seconds in ASCII digits only: int() would also take "+1", " 1", "1_0" or Arabic-Indic digits.
    # No leading zero either: the signature is made over str(int(value)), which must be the header itself.
    if not (value.isascii() and value.isdigit() and len(value) <= 12 and not value.startswith("0")):
        raise InvalidTimestamp(f"webhook-timestamp must be whole Unix seconds, got {value[:40]!r}")
    timestamp = int(value)
    now = time.time()
    if timestamp < now - tolerance:
        raise TimestampTooOld(f"webhook-timestamp is {now - timestamp:.0f} s old, over the {tolerance} s tolerance")
    if timestamp > now + tolerance:
        raise TimestampTooNew(f"webhook-timestamp is {timestamp - now:.0f} s ahead, over the {tolerance} s tolerance")
    return timestamp


def _ascii(signature: str) -> bytes:
    # compare_digest needs bytes for non-ASCII input; a replaced character cannot match base64 anyway.
    return signature.encode("ascii", "replace")
