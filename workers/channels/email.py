"""The email channel, how to deliver: build the MIME message (workers.mail) from the payload and
send it through this thread's mail transport (SMTP or the outbox, workers.smtp), to the recipients
not on the suppression list (dispatcher.suppressions); a hard bounce adds its recipient there. Once
an attempt is decided, an email that names an application publishes its events (workers.email_events)."""

from __future__ import annotations

import logging

import redis

from dispatcher import suppressions
from dispatcher.suppressions import Suppression, SuppressionList
from workers import context, email_events
from workers.channels import Delivered, Deliverer
from workers.decision import Decision
from workers.errors import DeliveryError, PermanentDeliveryError, RetryableDeliveryError
from workers.mail import build_message, envelope
from workers.smtp import Refusals, hard_bounces

log = logging.getLogger("dispatcher.worker")


def deliver(job_id: str, payload: dict) -> Delivered:
    sender, recipients = envelope(payload)
    message = build_message(payload)
    listed = context.current().suppressions()
    try:
        suppressed = listed.find(recipients)  # one HMGET
    except redis.RedisError as exc:
        raise RetryableDeliveryError(f"could not read the suppression list: {exc}") from None
    skipped = tuple(suppressed)
    if skipped:
        recipients = [address for address in recipients if address not in suppressed]
        if not recipients:
            error = PermanentDeliveryError(
                "not sent: every recipient is on the suppression list: "
                + "; ".join(f"{address} ({_why(record)})" for address, record in suppressed.items())
            )
            error.suppressed = skipped
            raise error
    refused: Refusals = {}
    try:
        status_code, note = context.current().mail().send(message, sender, recipients, refused.update)
    except DeliveryError as exc:
        exc.suppressed = skipped
        raise
    finally:
        _suppress_bounces(listed, refused, job_id)
    return Delivered(status_code, note=note, suppressed=skipped)


def _why(record: Suppression) -> str:
    if record["reason"] == "bounce" and record["smtp_code"] is not None:
        return f"bounced with {record['smtp_code']}"
    return record["reason"]


def _suppress_bounces(listed: SuppressionList, refused: Refusals, job_id: str) -> None:
    """Add the hard-bounced recipients to the list. Never fails the attempt: the message went to the
    others, or failed for a reason of its own already."""
    bounces = hard_bounces(refused)
    if not bounces:
        return
    try:
        listed.add(suppressions.bounce(address, code, text, job_id) for address, (code, text) in bounces.items())
    except redis.RedisError as exc:
        # (The log names no recipient: see README, Logs.)
        log.warning(
            "job %s: could not add %d bounced recipient(s) to the suppression list: %s", job_id, len(bounces), exc
        )


def relay(payload: dict) -> str:
    """Where this worker sends mail, for its log lines: the SMTP server's host:port (never the URL's
    user or password, nor a recipient), or `outbox`."""
    smtp = context.current().settings.smtp
    return f"{smtp.host}:{smtp.port}" if smtp is not None else "outbox"


def settle(job_id: str, payload: dict, decision: Decision) -> None:
    """An email that names an application: publish its events there (workers.email_events), on the
    Dispatcher queue of the job. A failure here is logged (workers.attempt.settle), never the email's."""
    if payload.get("application") is None:
        return
    deliveries = context.current()
    email_events.publish_events(deliveries.connection(), deliveries.queue_settings(), job_id, payload, decision)


DELIVERER = Deliverer("email", deliver, log_host=relay, settle=settle)
