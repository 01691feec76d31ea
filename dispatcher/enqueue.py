"""Turn validated requests into RQ jobs: the job data, the metadata, one pipeline to Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import redis
from rq import Queue
from rq.job import Job
from rq.queue import EnqueueData
from rq.serializers import JSONSerializer

from dispatcher.config import RetrySchedule, Settings
from dispatcher.history import isoformat
from dispatcher.keys import JOB_FUNCTIONS, Keys, Kind, new_job_id
from dispatcher.models import EmailRequest, RetryPolicy, WebhookRequest

#: Margin the job timeout leaves beyond a delivery's own timeouts; it is only a safety net.
_JOB_TIMEOUT_MARGIN = 60
#: Emails: SMTP connect, TLS, login and a 10 MB DATA take longer than one webhook POST.
EMAIL_JOB_TIMEOUT = 300


def make_queue(connection: redis.Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)


def resolve_retry(policy: RetryPolicy | None, default: RetrySchedule) -> dict:
    """The request's retry policy with the configured defaults filling what it leaves out."""
    max_attempts = default.max_attempts
    backoff = list(default.backoff)
    if policy is not None:
        max_attempts = policy.max_attempts or max_attempts
        backoff = policy.backoff if policy.backoff is not None else backoff
    return {"max_attempts": max_attempts, "backoff": backoff}


def webhook_job(request: WebhookRequest, settings: Settings, accepted_at: datetime) -> tuple[str, dict, dict]:
    """Job id, job data and job meta for one webhook; the signed body is fixed here, at acceptance."""
    job_id = new_job_id("webhook")
    envelope = {"type": request.event_type, "timestamp": isoformat(accepted_at), "data": request.payload}
    data = {
        "url": request.url,
        "headers": request.headers,
        "body": json.dumps(envelope, separators=(",", ":"), ensure_ascii=False),
        "retry": resolve_retry(request.retry, settings.webhook_retry),
    }
    meta = {
        "kind": "webhook",
        "target": {"url": request.url, "event_type": request.event_type},
        "metadata": request.metadata,
    }
    return job_id, data, meta


def email_job(request: EmailRequest, settings: Settings, accepted_at: datetime) -> tuple[str, dict, dict]:
    """Job id, job data and job meta for one email; Message-ID and Date are fixed at acceptance."""
    job_id = new_job_id("email")
    sender = request.from_
    assert sender is not None  # the model fills the default sender or rejects the request
    domain = _ascii_domain(sender.rpartition("@")[2].rstrip(">"))
    data = request.model_dump(
        by_alias=True, exclude={"metadata", "retry"}, exclude_none=True
    ) | {
        "message_id": f"<{job_id}@{domain}>",
        "date": accepted_at.timestamp(),
        "retry": resolve_retry(request.retry, settings.email_retry),
    }
    meta = {
        "kind": "email",
        "target": {"to": request.to, "cc": request.cc, "bcc": request.bcc, "subject": request.subject},
        "metadata": request.metadata,
    }
    return job_id, data, meta


def _ascii_domain(domain: str) -> str:
    """The domain for the Message-ID, which must be ASCII: an internationalized one in its IDNA form."""
    try:
        return domain.encode("idna").decode("ascii") or "dispatcher.invalid"
    except UnicodeError:
        return "dispatcher.invalid"


def enqueue(
    connection: redis.Redis, settings: Settings, kind: Kind, request: EmailRequest | WebhookRequest
) -> Job:
    """Enqueue one job and index it, in one round trip."""
    return enqueue_many(connection, settings, kind, [request])[0]


def enqueue_many(
    connection: redis.Redis, settings: Settings, kind: Kind, requests: Sequence[EmailRequest | WebhookRequest]
) -> list[Job]:
    """Enqueue jobs and index them in one round trip; several in one MULTI/EXEC: all of them or none."""
    queue = make_queue(connection, settings)
    with connection.pipeline(transaction=len(requests) > 1) as pipe:
        jobs = queue.enqueue_many(prepare_jobs(settings, kind, requests), pipeline=pipe)
        # Old entries leave the index in the workers' maintenance (workers.recovery), not on this hot path.
        pipe.zadd(Keys(settings.queue_name).index, {job.id: time.time() for job in jobs})
        pipe.execute()
    return jobs


def prepare_jobs(
    settings: Settings, kind: Kind, requests: Sequence[EmailRequest | WebhookRequest]
) -> list[EnqueueData]:
    """RQ's description of each job to enqueue (for `Queue.enqueue_many`), accepted now."""
    accepted_at = datetime.now(UTC)
    job_datas = []
    for request in requests:
        if kind == "webhook":
            assert isinstance(request, WebhookRequest)
            job_id, data, meta = webhook_job(request, settings, accepted_at)
            timeout = int(settings.webhook_timeout * 2) + _JOB_TIMEOUT_MARGIN
            description = f"webhook {meta['target']['event_type']} to {request.url}"
        else:
            assert isinstance(request, EmailRequest)
            job_id, data, meta = email_job(request, settings, accepted_at)
            timeout = EMAIL_JOB_TIMEOUT
            recipients = len(request.to) + len(request.cc) + len(request.bcc)
            description = f"email {request.subject!r} to {recipients} recipient(s)"
        job_datas.append(
            Queue.prepare_data(
                JOB_FUNCTIONS[kind],
                args=(data,),
                job_id=job_id,
                meta=meta,
                timeout=timeout,
                result_ttl=settings.result_ttl,
                failure_ttl=settings.failure_ttl,
                description=description,
            )
        )
    return job_datas
