"""The webhook channel, how to deliver: sign the payload's body and POST it through the guarded
HTTP client (workers.webhook, workers.http)."""

from __future__ import annotations

from urllib.parse import urlsplit

from dispatcher.endpoints import Registry
from workers import context
from workers.channels import Delivered, Deliverer
from workers.errors import PermanentDeliveryError

_DEFAULT_PORTS = {"http": 80, "https": 443}


def deliver(job_id: str, payload: dict) -> Delivered:
    deliveries = context.current()
    secrets = None
    endpoint_id = payload.get("endpoint")
    if endpoint_id is not None:  # an event's delivery to a registered endpoint
        secrets = endpoint_secrets(deliveries.registry(), str(endpoint_id))
    status_code, excerpt = deliveries.webhooks.send(job_id, payload, secrets)
    return Delivered(status_code, response_excerpt=excerpt)


def endpoint_secrets(registry: Registry, endpoint_id: str) -> list[str]:
    """The secrets to sign a delivery to the endpoint with; PermanentDeliveryError if the endpoint
    was deleted or disabled since the event was published."""
    endpoint, secrets = registry.delivery_config(endpoint_id)
    if endpoint is None or not secrets:
        raise PermanentDeliveryError(f"endpoint {endpoint_id} no longer exists")
    if endpoint["disabled"]:
        raise PermanentDeliveryError(f"endpoint {endpoint_id} is disabled")
    return secrets


def host(payload: dict) -> str | None:
    """`host:port` of the webhook's URL, the unit the per-host share counts; None if it has none."""
    url = payload.get("url")
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None
    return f"{parts.hostname}:{port}" if parts.hostname else None


DELIVERER = Deliverer("webhook", deliver, host)
