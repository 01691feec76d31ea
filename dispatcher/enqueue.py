"""Turn validated requests into RQ jobs, for any channel: its payload, the metadata, one call to Redis."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import redis
from pydantic import BaseModel
from redis.client import Pipeline
from rq import Queue
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from rq.utils import utcformat

from dispatcher import rqstore
from dispatcher.batches import Group, batch_record
from dispatcher.channels import CHANNELS, JOB_FUNCTION, Channel
from dispatcher.config import Settings
from dispatcher.errors import AlreadyAccepted
from dispatcher.idempotency import IDEMPOTENCY_TTL, Claim
from dispatcher.keys import Keys
from dispatcher.priorities import DEFAULT_PRIORITY, PRIORITIES, Priority, queue_name


def make_queue(connection: redis.Redis, settings: Settings, priority: Priority = DEFAULT_PRIORITY) -> Queue:
    return Queue(queue_name(settings.queue_name, priority), connection=connection, serializer=JSONSerializer)


def make_queues(
    connection: redis.Redis, settings: Settings, priorities: tuple[Priority, ...] = PRIORITIES
) -> list[Queue]:
    """The RQ queues of `priorities`, highest priority first."""
    return [make_queue(connection, settings, p) for p in PRIORITIES if p in priorities]


def build_job(
    channel: Channel, request: BaseModel, accepted_at: datetime, settings: Settings
) -> tuple[str, dict, dict, str]:
    """A new job's id, payload, meta (for rq-dashboard and the status view) and description."""
    job_id = channel.id_prefix + secrets.token_hex(16)  # 128 random bits, a fifth of uuid4's cost
    parts = channel.job(request, job_id, accepted_at, settings)
    meta = {"kind": channel.name, "target": parts.target, "metadata": getattr(request, "metadata", {})}
    return job_id, parts.payload, meta, parts.description


def enqueue(
    connection: redis.Redis,
    settings: Settings,
    channel: str,
    request: BaseModel,
    priority: Priority = DEFAULT_PRIORITY,
    claim: Claim | None = None,
    send_at: datetime | None = None,
) -> str:
    """Enqueue one job and index it, in one round trip; return its id."""
    return enqueue_many(connection, settings, channel, [request], priority, claim, send_at)[0]


def enqueue_many(
    client: redis.Redis | Pipeline,
    settings: Settings,
    channel: str,
    requests: Sequence[BaseModel],
    priority: Priority = DEFAULT_PRIORITY,
    claim: Claim | None = None,
    send_at: datetime | None = None,
    group: Group | None = None,
    ordered: Sequence[str | None] | None = None,
    ordered_ttl: int = 0,
) -> list[str]:
    """Enqueue each request as an RQ job of `priority`'s queue, accepted now, in one Redis call: all
    of them or none, with the record of their `group` if given (dispatcher.batches). With a `claim`
    on an idempotency key, only if the key is free (the record is written in the same call);
    AlreadyAccepted, with the record found, if it is not. With `send_at`, the jobs wait as
    `scheduled` in the queue's ScheduledJobRegistry until then, as RQ's `enqueue_at` leaves them:
    RQ's scheduler, which every worker runs, moves them to the queue when due.

    This writes what `Queue.enqueue_many` writes, without it: RQ builds a `Job` object per job and
    serializes all of it, and redis-py packs each field of each hash in Python; together that was
    most of the cost of accepting a request. Every job of a channel shares all but five fields of its
    hash, so those come from one job RQ builds itself (`rqstore.rq_fields`), travel once per call,
    and `rqstore.write_jobs` adds them to each job's own; tests/test_enqueue.py checks the result is
    what RQ writes. Old entries leave the index in the workers' maintenance (workers.recovery).

    `ordered`: per request, the list of an ordered endpoint's deliveries its job joins, in the same
    call (so in acceptance order), or None; each list lives at least `ordered_ttl` seconds.
    """
    if not requests and group is None:
        return []
    kind = CHANNELS[channel]
    accepted_at = datetime.now(UTC)
    stamp = utcformat(accepted_at)
    queue = queue_name(settings.queue_name, priority)
    status = JobStatus.QUEUED if send_at is None else JobStatus.SCHEDULED
    shared = rqstore.rq_fields(
        JOB_FUNCTION, queue, settings.result_ttl, settings.failure_ttl, kind.job_timeout(settings), status
    )
    jobs: list[Any] = []
    job_ids = []
    for request in requests:
        job_id, payload, meta, description = build_job(kind, request, accepted_at, settings)
        jobs += (job_id, rqstore.job_data(JOB_FUNCTION, payload), JSONSerializer.dumps(meta), description, stamp)
        job_ids.append(job_id)
    keys = Keys(settings.queue_name)
    group_id = None if group is None else group.id
    once = None if claim is None else (claim.record_key, claim.record(job_ids, group_id), IDEMPOTENCY_TTL)
    due = None if send_at is None else send_at.timestamp()
    record = None
    if group is not None:
        ttl = max(settings.result_ttl, settings.failure_ttl)
        record = batch_record(keys, group, job_ids, channel, priority, accepted_at, ttl)
    lists = [(key, job_id) for key, job_id in zip(ordered or [None] * len(job_ids), job_ids, strict=True) if key]
    earlier = rqstore.write_jobs(
        client, queue, keys.index, keys.wake, time.time(), shared, jobs, once, due, record, lists, ordered_ttl
    )
    if earlier is not None:
        raise AlreadyAccepted(earlier)
    return job_ids
