"""The webhook channel, how to deliver: sign the payload's body and POST it through the guarded
HTTP client (workers.webhook, workers.http)."""

from __future__ import annotations

from urllib.parse import urlsplit

from workers import context, endpoints
from workers.channels import Delivered, Deliverer
from workers.decision import Decision

_DEFAULT_PORTS = {"http": 80, "https": 443}


def deliver(job_id: str, payload: dict) -> Delivered:
    deliveries = context.current()
    secrets = None
    endpoint_id = payload.get("endpoint")
    if endpoint_id is not None:  # an event's delivery to a registered endpoint
        _, secrets = endpoints.admit(deliveries.registry(), str(endpoint_id), job_id, payload, deliveries.settings)
    status_code, excerpt = deliveries.webhooks.send(job_id, payload, secrets)
    return Delivered(status_code, response_excerpt=excerpt)


def settle(job_id: str, payload: dict, decision: Decision) -> None:
    endpoint_id = payload.get("endpoint")
    if endpoint_id is not None:
        deliveries = context.current()
        registry, settings = deliveries.registry(), deliveries.queue_settings()
        endpoints.settle(registry, str(endpoint_id), job_id, payload, decision, settings)


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


DELIVERER = Deliverer("webhook", deliver, host, settle=settle)
