"""The email channel, how to deliver: build the MIME message (workers.mail) from the payload and
send it through this thread's mail transport (SMTP or the outbox, workers.smtp)."""

from __future__ import annotations

from workers import context
from workers.channels import Delivered, Deliverer
from workers.mail import build_message, envelope


def deliver(job_id: str, payload: dict) -> Delivered:
    sender, recipients = envelope(payload)
    status_code, note = context.current().mail().send(build_message(payload), sender, recipients)
    return Delivered(status_code, note=note)


def relay(payload: dict) -> str:
    """Where this worker sends mail, for its log lines: the SMTP server's host:port (never the URL's
    user or password, nor a recipient), or `outbox`."""
    smtp = context.current().settings.smtp
    return f"{smtp.host}:{smtp.port}" if smtp is not None else "outbox"


DELIVERER = Deliverer("email", deliver, log_host=relay)
