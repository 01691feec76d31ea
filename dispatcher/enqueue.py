"""Turn validated requests into RQ jobs: the job data, the metadata, one pipeline to Redis."""

from __future__ import annotations

import functools
import json
import time
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import redis
from redis.client import Pipeline
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import utcformat

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
) -> str:
    """Enqueue one job and index it, in one round trip; return its id."""
    return enqueue_many(connection, settings, kind, [request])[0]


def enqueue_many(
    connection: redis.Redis, settings: Settings, kind: Kind, requests: Sequence[EmailRequest | WebhookRequest]
) -> list[str]:
    """Enqueue jobs and index them in one round trip; several in one MULTI/EXEC: all of them or none."""
    with connection.pipeline(transaction=len(requests) > 1) as pipe:
        job_ids = write_jobs(pipe, settings, kind, requests)
        pipe.execute()
    return job_ids


def write_jobs(
    pipe: Pipeline, settings: Settings, kind: Kind, requests: Sequence[EmailRequest | WebhookRequest]
) -> list[str]:
    """Queue each request as an RQ job, accepted now: what `Queue.enqueue_many` writes, built without it.

    RQ builds a `Job` object per job and serializes all of it; that was half the cost of accepting a
    request. Every job of a kind shares all but five fields of its hash, so those come from one job RQ
    builds itself (`_rq_fields`) and only the job's own fields are built here; tests check that the
    result is what RQ writes. Old entries leave the index in the workers' maintenance (workers.recovery).
    """
    accepted_at = datetime.now(UTC)
    stamp = utcformat(accepted_at)
    timeout = _job_timeout(settings, kind)
    shared = _rq_fields(settings.queue_name, kind, settings.result_ttl, settings.failure_ttl, timeout)
    function = JOB_FUNCTIONS[kind]
    job_ids = []
    for request in requests:
        if kind == "webhook":
            assert isinstance(request, WebhookRequest)
            job_id, data, meta = webhook_job(request, settings, accepted_at)
            description = f"webhook {request.event_type} to {request.url}"
        else:
            assert isinstance(request, EmailRequest)
            job_id, data, meta = email_job(request, settings, accepted_at)
            recipients = len(request.to) + len(request.cc) + len(request.bcc)
            description = f"email {request.subject!r} to {recipients} recipient(s)"
        own = {
            "data": zlib.compress(JSONSerializer.dumps((function, None, (data,), {}))),
            "meta": JSONSerializer.dumps(meta),
            "description": description,
            "created_at": stamp,
            "enqueued_at": stamp,
        }
        pipe.hset(Job.key_for(job_id), mapping=shared | own)
        job_ids.append(job_id)
    if job_ids:
        pipe.sadd(Queue.redis_queues_keys, Queue.redis_queue_namespace_prefix + settings.queue_name)
        pipe.rpush(Queue.redis_queue_namespace_prefix + settings.queue_name, *job_ids)
        now = time.time()
        pipe.zadd(Keys(settings.queue_name).index, dict.fromkeys(job_ids, now))
    return job_ids


def _job_timeout(settings: Settings, kind: Kind) -> int:
    if kind == "webhook":
        return int(settings.webhook_timeout * 2) + _JOB_TIMEOUT_MARGIN
    return EMAIL_JOB_TIMEOUT


#: The fields of a job's hash that `write_jobs` fills per job; RQ's template supplies the rest.
OWN_FIELDS = frozenset({"data", "meta", "description", "created_at", "enqueued_at"})


@functools.cache
def _rq_fields(queue_name: str, kind: Kind, result_ttl: int, failure_ttl: int, timeout: int) -> dict[str, Any]:
    """The hash fields RQ writes for every queued job of this kind, from one job RQ builds itself."""
    job = Job.create(
        JOB_FUNCTIONS[kind],
        args=({},),
        connection=redis.Redis(),  # never connected: `to_dict` does not touch Redis
        result_ttl=result_ttl,
        failure_ttl=failure_ttl,
        timeout=timeout,
        status=JobStatus.QUEUED,
        origin=queue_name,
        serializer=JSONSerializer,
    )
    return {name: value for name, value in job.to_dict().items() if name not in OWN_FIELDS}
