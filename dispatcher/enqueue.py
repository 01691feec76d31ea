"""Turn validated requests into RQ jobs: the job data, the metadata, one pipeline to Redis."""

from __future__ import annotations

import functools
import json
import time
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import redis
from redis.client import Pipeline
from redis.commands.core import Script
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import utcformat

from dispatcher.addresses import AddressError, split_mailbox, wire_address
from dispatcher.config import RetrySchedule, Settings
from dispatcher.history import isoformat
from dispatcher.keys import JOB_FUNCTIONS, Keys, Kind, new_job_id
from dispatcher.models import EmailRequest, JsonObject, RetryPolicy, WebhookRequest, json_text

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
    # The envelope as json.dumps(separators=(",", ":"), ensure_ascii=False) writes it, with the
    # payload's text from validation (models.JsonObject) rather than encoding it a second time.
    payload = request.payload.text if isinstance(request.payload, JsonObject) else json_text(request.payload, "payload")
    body = (
        f'{{"type":{json.dumps(request.event_type, ensure_ascii=False)},'
        f'"timestamp":"{_timestamp(accepted_at)}","data":{payload}}}'
    )
    data = {
        "url": request.url,
        "headers": request.headers,
        "body": body,
        "retry": resolve_retry(request.retry, settings.webhook_retry),
    }
    meta = {
        "kind": "webhook",
        "target": {"url": request.url, "event_type": request.event_type},
        "metadata": request.metadata,
    }
    return job_id, data, meta


@functools.lru_cache(maxsize=1)  # the jobs of a batch share their acceptance time
def _timestamp(accepted_at: datetime) -> str:
    return isoformat(accepted_at)


def email_job(request: EmailRequest, settings: Settings, accepted_at: datetime) -> tuple[str, dict, dict]:
    """Job id, job data and job meta for one email; Message-ID and Date are fixed at acceptance."""
    job_id = new_job_id("email")
    sender = request.from_
    assert sender is not None  # the model fills the default sender or rejects the request
    domain = _ascii_domain(sender)
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


def _ascii_domain(sender: str) -> str:
    """The sender's domain for the Message-ID, which must be ASCII: as its A-label, as the worker
    writes it in From (IDNA 2008, via email_validator)."""
    try:
        return wire_address(split_mailbox(sender)[1]).rpartition("@")[2]
    except AddressError:
        return "dispatcher.invalid"


def enqueue(
    connection: redis.Redis, settings: Settings, kind: Kind, request: EmailRequest | WebhookRequest
) -> str:
    """Enqueue one job and index it, in one round trip; return its id."""
    return enqueue_many(connection, settings, kind, [request])[0]


#: Writes jobs as RQ's `Queue.enqueue_many` does (hash, queue list, the set of queues) and indexes
#: them. KEYS: the queue list, RQ's set of queues, our job index. ARGV: the job key prefix, the index
#: score, the field/value pairs every job shares (a JSON array: one argument to pack, not 26), then
#: per job its id, data, meta, description and created/enqueued time. One script is atomic, and a
#: script that fails on its first write (out of memory, say) has written nothing; the job keys are
#: new random ids, so no later write can fail on a wrong type. (The job keys are not declared: RQ runs
#: on one Redis, not a cluster.)
_WRITE_JOBS = Script(
    None,  # type: ignore[arg-type]  # called with an explicit client
    b"""
local prefix, score, shared = ARGV[1], ARGV[2], cjson.decode(ARGV[3])
local ids, scored = {}, {}
for i = 4, #ARGV, 5 do
  local id = ARGV[i]
  redis.call('HSET', prefix .. id, 'data', ARGV[i + 1], 'meta', ARGV[i + 2], 'description', ARGV[i + 3],
    'created_at', ARGV[i + 4], 'enqueued_at', ARGV[i + 4], unpack(shared))
  ids[#ids + 1] = id
  scored[#scored + 1] = score
  scored[#scored + 1] = id
end
-- In slices: unpack() has a limit on how many values it returns.
for i = 1, #ids, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(ids, i, math.min(i + 999, #ids)))
  redis.call('ZADD', KEYS[3], unpack(scored, 2 * i - 1, math.min(2 * i + 1998, #scored)))
end
redis.call('SADD', KEYS[2], KEYS[1])
""",
)


def enqueue_many(
    client: redis.Redis | Pipeline, settings: Settings, kind: Kind, requests: Sequence[EmailRequest | WebhookRequest]
) -> list[str]:
    """Enqueue each request as an RQ job, accepted now, in one Redis call: all of them or none.

    This writes what `Queue.enqueue_many` writes, without it: RQ builds a `Job` object per job and
    serializes all of it, and redis-py packs each field of each hash in Python; together that was
    most of the cost of accepting a request. Every job of a kind shares all but five fields of its
    hash, so those come from one job RQ builds itself (`_rq_fields`), travel once per call, and
    `_WRITE_JOBS` adds them to each job's own; tests/test_enqueue.py checks the result is what RQ
    writes. Old entries leave the index in the workers' maintenance (workers.recovery).
    """
    if not requests:
        return []
    accepted_at = datetime.now(UTC)
    stamp = utcformat(accepted_at)
    timeout = _job_timeout(settings, kind)
    shared = _rq_fields(settings.queue_name, kind, settings.result_ttl, settings.failure_ttl, timeout)
    function = JOB_FUNCTIONS[kind]
    args: list[Any] = [Job.redis_job_namespace_prefix, time.time(), shared]
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
        # Level 1, the fastest: RQ decompresses any level, and zlib was a sixth of a batch's time.
        data_bytes = zlib.compress(JSONSerializer.dumps((function, None, (data,), {})), 1)
        args += (job_id, data_bytes, JSONSerializer.dumps(meta), description, stamp)
        job_ids.append(job_id)
    queue_key = Queue.redis_queue_namespace_prefix + settings.queue_name
    keys = [queue_key, Queue.redis_queues_keys, Keys(settings.queue_name).index]
    if isinstance(client, redis.Redis) and len(job_ids) > 1:
        # A batch's arguments run to megabytes: let a pipeline check that Redis has the script
        # (SCRIPT EXISTS) instead of sending them twice after a NOSCRIPT answer.
        with client.pipeline(transaction=False) as pipe:
            _WRITE_JOBS(keys, args, client=pipe)
            pipe.execute()
    else:
        _WRITE_JOBS(keys, args, client=client)
    return job_ids


def _job_timeout(settings: Settings, kind: Kind) -> int:
    if kind == "webhook":
        return int(settings.webhook_timeout * 2) + _JOB_TIMEOUT_MARGIN
    return EMAIL_JOB_TIMEOUT


#: The fields of a job's hash that `enqueue_many` fills per job; RQ's template supplies the rest.
#: (`_WRITE_JOBS` names them too.)
OWN_FIELDS = frozenset({"data", "meta", "description", "created_at", "enqueued_at"})


@functools.cache
def _rq_fields(queue_name: str, kind: Kind, result_ttl: int, failure_ttl: int, timeout: int) -> str:
    """The hash fields RQ writes for every queued job of this kind, from one job RQ builds itself.

    As a JSON array of field, value, field, value...: `_WRITE_JOBS` decodes it.
    """
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
    pairs = [(name, _as_text(value)) for name, value in job.to_dict().items() if name not in OWN_FIELDS]
    return json.dumps([item for pair in pairs for item in pair])


def _as_text(value: Any) -> str:
    """A hash value as Redis stores it: RQ's enums by their value, numbers in decimal."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)
