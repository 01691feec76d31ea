"""Email events: what became of an email, published as events of the application it names.

An email accepted with `"application": "<app id>"` carries the id (and its metadata) in its payload.
Once an attempt of it is decided (workers.attempt.settle, in the delivery thread), the email channel
publishes to that application (dispatcher.events.publish), so its endpoints that subscribe get:

- `email.delivered`: the server took the message (for at least one recipient);
- `email.failed`: it failed for good (a permanent refusal, or the last retryable attempt); an attempt
  followed by a retry publishes nothing;
- `email.suppressed`: the deciding attempt left recipients out because they are on the suppression
  list. It comes beside `email.delivered`, or beside `email.failed` when every recipient was
  suppressed (the message was not sent): each type is complete on its own, so an endpoint that
  subscribes only to `email.failed` still hears of every failure, and one that subscribes only to
  `email.suppressed` of every recipient left out.

Each event's data says which email, to whom (addresses only), its subject and metadata, the attempt,
the SMTP code and error; never the body or attachments. Each is published once per attempt: its
enqueue claims an idempotency key made of the email's id, the attempt's number and the event type
(dispatcher.idempotency.Claim), in the same atomic call, so a settle run twice for one attempt (the
same job run twice, a worker taken for dead) publishes it once. A rerun after a crash that lost the
attempt makes a new attempt, with a new number: the email was sent again, and its events say so.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from dispatcher.addresses import split_mailbox
from dispatcher.config import Settings
from dispatcher.errors import AlreadyAccepted
from dispatcher.events import EventRequest, NoSuchApplication, publish
from dispatcher.idempotency import Claim
from dispatcher.keys import Keys
from workers.decision import Decision

DELIVERED = "email.delivered"
FAILED = "email.failed"
SUPPRESSED = "email.suppressed"
EVENT_TYPES = (DELIVERED, FAILED, SUPPRESSED)
#: The idempotency keys of email events, apart from every API key's (whose scopes are hashes).
CLAIM_SCOPE = "email-events"
#: One event per email, attempt and type: nothing else to tell apart, so one fingerprint for all.
FINGERPRINT = "email-event"

log = logging.getLogger("dispatcher.worker")


def event_types(decision: Decision) -> list[str]:
    """The events a decided attempt makes: none while the email will be tried again."""
    if decision.verdict == "retry":
        return []
    outcome = [DELIVERED if decision.verdict == "succeeded" else FAILED]
    return outcome + ([SUPPRESSED] if decision.attempt.suppressed else [])


def event_data(job_id: str, payload: dict, decision: Decision) -> dict[str, Any]:
    """What an email's events carry (all its types the same): never its body or attachments."""
    attempt = decision.attempt
    failed = decision.verdict == "failed"
    metadata = payload.get("metadata")
    return {
        "email_id": job_id,
        "status": "failed" if failed else "succeeded",
        "to": _addresses(payload.get("to")),
        "cc": _addresses(payload.get("cc")),
        "subject": payload.get("subject") if isinstance(payload.get("subject"), str) else None,
        "metadata": metadata if isinstance(metadata, dict) else {},
        "attempt": attempt.number,
        "smtp_code": attempt.status_code,
        # A failure's reason; a success's note (recipients the server refused), if any.
        "error": decision.error if failed else attempt.error,
        "suppressed": list(attempt.suppressed or ()),
        "finished_at": attempt.finished_at,
    }


def publish_events(
    connection: redis.Redis, settings: Settings, job_id: str, payload: dict, decision: Decision
) -> list[str]:
    """Publish the events of an email's decided attempt to the application its payload names, on
    `settings`' queue; the ids of the events published now (not those published before)."""
    application = payload.get("application")
    if not isinstance(application, str) or not application:
        return []
    types = event_types(decision)
    if not types:
        return []
    data = event_data(job_id, payload, decision)
    keys = Keys(settings.queue_name)
    published: list[str] = []
    for event_type in types:
        claim = Claim(keys.idempotency(CLAIM_SCOPE, f"{job_id}:{decision.attempt.number}:{event_type}"), FINGERPRINT)
        event = EventRequest.model_construct(event_type=event_type, payload=data, ordering_key=None)
        try:
            event_id, _, _ = publish(connection, settings, application, event, claim)
        except AlreadyAccepted:
            continue  # published by an earlier settle of this attempt
        except NoSuchApplication:
            log.info("job %s: application %s no longer exists; its email events go nowhere", job_id, application)
            return published
        published.append(event_id)
    return published


def _addresses(mailboxes: object) -> list[str]:
    """The addresses of a payload's mailboxes, without their display names."""
    if not isinstance(mailboxes, list):
        return []
    return [split_mailbox(mailbox)[1] for mailbox in mailboxes if isinstance(mailbox, str)]
