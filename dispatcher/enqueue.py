"""Turn validated requests into RQ jobs, for any channel: its payload, the metadata, one call to Redis."""

from __future__ import annotations

import functools
import json
import secrets
import time
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import redis
from pydantic import BaseModel
from redis.client import Pipeline
from redis.commands.core import Script
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import utcformat

from dispatcher.channels import CHANNELS, JOB_FUNCTION, Channel
from dispatcher.config import Settings
from dispatcher.keys import Keys


def make_queue(connection: redis.Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)


def build_job(
    channel: Channel, request: BaseModel, accepted_at: datetime, settings: Settings
) -> tuple[str, dict, dict, str]:
    """A new job's id, payload, meta (for rq-dashboard and the status view) and description."""
    job_id = channel.id_prefix + secrets.token_hex(16)  # 128 random bits, a fifth of uuid4's cost
    parts = channel.job(request, job_id, accepted_at, settings)
    meta = {"kind": channel.name, "target": parts.target, "metadata": getattr(request, "metadata", {})}
    return job_id, parts.payload, meta, parts.description


def enqueue(connection: redis.Redis, settings: Settings, channel: str, request: BaseModel) -> str:
    """Enqueue one job and index it, in one round trip; return its id."""
    return enqueue_many(connection, settings, channel, [request])[0]


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
    client: redis.Redis | Pipeline, settings: Settings, channel: str, requests: Sequence[BaseModel]
) -> list[str]:
    """Enqueue each request as an RQ job, accepted now, in one Redis call: all of them or none.

    This writes what `Queue.enqueue_many` writes, without it: RQ builds a `Job` object per job and
    serializes all of it, and redis-py packs each field of each hash in Python; together that was
    most of the cost of accepting a request. Every job of a channel shares all but five fields of its
    hash, so those come from one job RQ builds itself (`_rq_fields`), travel once per call, and
    `_WRITE_JOBS` adds them to each job's own; tests/test_enqueue.py checks the result is what RQ
    writes. Old entries leave the index in the workers' maintenance (workers.recovery).
    """
    if not requests:
        return []
    kind = CHANNELS[channel]
    accepted_at = datetime.now(UTC)
    stamp = utcformat(accepted_at)
    shared = _rq_fields(settings.queue_name, settings.result_ttl, settings.failure_ttl, kind.job_timeout(settings))
    args: list[Any] = [Job.redis_job_namespace_prefix, time.time(), shared]
    job_ids = []
    for request in requests:
        job_id, payload, meta, description = build_job(kind, request, accepted_at, settings)
        # Level 1, the fastest: RQ decompresses any level, and zlib was a sixth of a batch's time.
        data_bytes = zlib.compress(JSONSerializer.dumps((JOB_FUNCTION, None, (payload,), {})), 1)
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


#: The fields of a job's hash that `enqueue_many` fills per job; RQ's template supplies the rest.
#: (`_WRITE_JOBS` names them too.)
OWN_FIELDS = frozenset({"data", "meta", "description", "created_at", "enqueued_at"})


@functools.cache
def _rq_fields(queue_name: str, result_ttl: int, failure_ttl: int, timeout: int) -> str:
    """The hash fields RQ writes for every queued job with these settings, from one job RQ builds itself.

    As a JSON array of field, value, field, value...: `_WRITE_JOBS` decodes it.
    """
    job = Job.create(
        JOB_FUNCTION,
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
