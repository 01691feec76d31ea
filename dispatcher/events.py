"""Events: one message of an application's, fanned out to every endpoint that subscribes to it.

Publishing an event enqueues one webhook job per enabled endpoint whose `event_types` take it, all
in one atomic call with the event's record (dispatcher.batches.Group): the event exists exactly when
all its deliveries do, with the idempotency key and priority of any send. Each delivery is a
webhook built from the endpoint's record as it is now (its URL, headers and retry policy), signed at
delivery with the endpoint's secrets, which job data never holds (dispatcher.endpoints).

A delivery to an endpoint that is `ordered` joins, in the same atomic call, the list of that
endpoint's deliveries with the event's ordering key (dispatcher.keys.Keys.ordered), so the lists
are in acceptance order; the workers send only the head of each (workers.endpoints).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Annotated, Any

import redis
from pydantic import Field, StringConstraints

from dispatcher.batches import Group, Progress
from dispatcher.channels.webhook import EventDelivery, EventType, Payload
from dispatcher.config import Settings
from dispatcher.endpoints import DELIVERY_CHANNEL, Endpoint, Registry
from dispatcher.enqueue import enqueue_many
from dispatcher.idempotency import Claim
from dispatcher.keys import Keys
from dispatcher.models import RetryPolicy, SafeStr, SendRequest

ID_PREFIX = "ev_"
#: Beyond its jobs' retention, how long an ordered endpoint's list of deliveries (dispatcher.keys)
#: lives after an event last joined it: more than the longest backoff (7 days) plus the longest
#: Retry-After (1 day). Deliveries still waiting when it expires go unordered.
ORDERED_MARGIN = 9 * 24 * 3600

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
    keys = Keys(settings.queue_name)
    ordered = [keys.ordered(e["id"], event.ordering_key) if e["ordered"] else None for e in endpoints]
    job_ids = enqueue_many(
        connection, settings, DELIVERY_CHANNEL, deliveries, event.priority, claim, event.send_at,
        Group(event_id, fields), ordered, _ordered_ttl(settings, event.send_at),
    )
    return event_id, job_ids, endpoint_ids


def _ordered_ttl(settings: Settings, send_at: datetime | None) -> int:
    """How long an ordered list lives at least after an event joins it: its jobs' retention, the
    longest they may wait first (its send_at), and ORDERED_MARGIN for their retries."""
    ahead = 0.0 if send_at is None else max(0.0, (send_at - datetime.now(UTC)).total_seconds())
    return max(settings.result_ttl, settings.failure_ttl) + int(ahead) + ORDERED_MARGIN


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
        ordered=endpoint["ordered"],
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
