"""Webhook delivery: a signed Standard Webhooks POST, its answer judged retryable or permanent."""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime

import urllib3
from standardwebhooks import Webhook

from dispatcher.errors import DestinationRefused
from workers.errors import PermanentDeliveryError, RetryableDeliveryError
from workers.http import DeadlineExceeded, HttpClient
from workers.retry import parse_retry_after

#: Answers worth another attempt besides 5xx (the Standard Webhooks spec; 410 Gone means stop).
RETRYABLE_STATUSES = frozenset({408, 425, 429})
#: Answers whose Retry-After is honoured.
RETRY_AFTER_STATUSES = frozenset({429, 503})


class WebhookSender:
    def __init__(self, client: HttpClient, secret: str) -> None:
        self.client = client
        self.signer = Webhook(secret)

    def send(self, message_id: str, data: dict, secrets: list[str] | None = None) -> tuple[int, str]:
        """Deliver one attempt, signed with each of `secrets` (an endpoint's: dispatcher.endpoints),
        else with DISPATCHER_WEBHOOK_SECRET; return (status code, response excerpt) or raise a DeliveryError."""
        body: str = data["body"]
        timestamp = int(time.time())
        signers = [self.signer] if secrets is None else [_signer(secret) for secret in secrets]
        at = datetime.fromtimestamp(timestamp, UTC)
        # Several secrets (a rotation's grace period): every signature, space-separated, as the spec allows.
        signature = " ".join(signer.sign(message_id, at, body) for signer in signers)
        headers = {
            **data.get("headers", {}),
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
        }
        try:
            response = self.client.post(data["url"], body.encode(), headers)
        except DestinationRefused as exc:
            raise PermanentDeliveryError(f"destination refused by the network guard: {exc}") from None
        except DeadlineExceeded as exc:
            raise RetryableDeliveryError(f"timed out: {exc} (DISPATCHER_WEBHOOK_TIMEOUT)") from None
        except urllib3.exceptions.HTTPError as exc:
            raise RetryableDeliveryError(f"no response: {_describe(exc)}") from None
        status = response.status
        if 200 <= status < 300:
            return status, response.excerpt
        message = f"HTTP {status}"
        if status in RETRYABLE_STATUSES or 500 <= status < 600:
            retry_after = (
                parse_retry_after(response.headers.get("retry-after")) if status in RETRY_AFTER_STATUSES else None
            )
            raise RetryableDeliveryError(message, status, response.excerpt, retry_after)
        if 300 <= status < 400:
            message += f" redirect to {response.headers.get('location', '?')} (redirects are not followed)"
        raise PermanentDeliveryError(message, status, response.excerpt)


@functools.lru_cache(maxsize=1024)
def _signer(secret: str) -> Webhook:
    return Webhook(secret)


def _describe(exc: urllib3.exceptions.HTTPError) -> str:
    reason = getattr(exc, "reason", None) or exc
    return f"{type(reason).__name__}: {reason}"
