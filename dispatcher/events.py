"""Events: one message of an application's, fanned out to every endpoint that subscribes to it.

Publishing an event enqueues one webhook job per enabled endpoint whose `event_types` take it, all
in one atomic call with the event's record (dispatcher.batches.Group): the event exists exactly when
all its deliveries do, with the idempotency key and priority of any send. Each delivery is a
webhook built from the endpoint's record as it is now (its URL, headers and retry policy), signed at
delivery with the endpoint's secrets, which job data never holds (dispatcher.endpoints).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Collection
from typing import Annotated, Any

import redis
from pydantic import Field, StringConstraints

from dispatcher.batches import Group, Progress
from dispatcher.channels.webhook import EventDelivery, EventType, Payload
from dispatcher.config import Settings
from dispatcher.endpoints import Endpoint, Registry
from dispatcher.enqueue import enqueue_many
from dispatcher.idempotency import Claim
from dispatcher.keys import Keys
from dispatcher.models import RetryPolicy, SafeStr, SendRequest

ID_PREFIX = "ev_"

OrderingKey = Annotated[SafeStr, StringConstraints(min_length=1, max_length=256)]


class EventRequest(SendRequest):
    """POST /v1/applications/<app>/events."""

    event_type: EventType
    payload: Payload
    ordering_key: OrderingKey | None = Field(
        default=None, description="an ordered endpoint gets the events of one key in acceptance order"
    )


class NoSuchApplication(LookupError):
    pass


def publish(
    connection: redis.Redis,
    settings: Settings,
    application_id: str,
    event: EventRequest,
    claim: Claim | None,
    exclude: Collection[str] = (),
) -> tuple[str, list[str], list[str]]:
    """Enqueue the event's deliveries; its id, their job ids and their endpoints' ids, in order.
    `exclude`: endpoints not to deliver it to (an endpoint's own health events: dispatcher.health).

    Raises NoSuchApplication, or AlreadyAccepted (dispatcher.errors) when the claim's key was used.
    """
    registry = Registry(connection, Keys(settings.queue_name))
    if registry.application(application_id) is None:
        raise NoSuchApplication(application_id)
    endpoints = [e for e in registry.subscribed(application_id, event.event_type) if e["id"] not in exclude]
    event_id = ID_PREFIX + secrets.token_hex(16)
    deliveries = [_delivery(endpoint, application_id, event_id, event) for endpoint in endpoints]
    endpoint_ids = [endpoint["id"] for endpoint in endpoints]
    fields = {
        "application": application_id,
        "event_type": event.event_type,
        "endpoints": json.dumps(endpoint_ids),
        **({"ordering_key": event.ordering_key} if event.ordering_key is not None else {}),
    }
    job_ids = enqueue_many(
        connection, settings, "webhook", deliveries, event.priority, claim, event.send_at, Group(event_id, fields)
    )
    return event_id, job_ids, endpoint_ids


def _delivery(endpoint: Endpoint, application_id: str, event_id: str, event: EventRequest) -> EventDelivery:
    # Built, not validated: the endpoint's fields were when it was registered (the network guard
    # judges its URL again at delivery), and the event's just now.
    return EventDelivery.model_construct(
        url=endpoint["url"],
        event_type=event.event_type,
        payload=event.payload,
        headers=endpoint["headers"],
        metadata={},
        retry=None if endpoint["retry"] is None else RetryPolicy.model_construct(**endpoint["retry"]),
        endpoint=endpoint["id"],
        application=application_id,
        event=event_id,
        ordering_key=event.ordering_key,
    )


def event_view(connection: redis.Redis, keys: Keys, event_id: str) -> dict[str, Any] | None:
    """GET /v1/events/<id>: the event and each delivery's status; None if there is no such event
    (or it expired)."""
    if not event_id.startswith(ID_PREFIX):
        return None
    with connection.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.batch(event_id))
        pipe.lrange(keys.batch_jobs(event_id), 0, -1)
        record, ids = pipe.execute()
    if not record or b"application" not in record:
        return None
    job_ids = [raw.decode() for raw in ids]
    endpoint_ids = json.loads(record[b"endpoints"])
    progress = Progress.of(connection, job_ids)
    ordering_key = record.get(b"ordering_key")
    return {
        "id": event_id,
        "application": record[b"application"].decode(),
        "event_type": record[b"event_type"].decode(),
        "ordering_key": None if ordering_key is None else ordering_key.decode(),
        "priority": record[b"priority"].decode(),
        "created_at": record[b"created_at"].decode(),
        **progress.summary(),
        "finished_at": progress.finished_at(),
        "deliveries": [
            {"id": job_id, "endpoint": endpoint_id, "status": status, "status_url": f"/v1/jobs/{job_id}"}
            for job_id, endpoint_id, status in zip(job_ids, endpoint_ids, progress.statuses, strict=True)
        ],
    }
