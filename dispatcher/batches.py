"""Batches you can follow: the record a batch's acceptance writes, and its progress read back.

A batch's hash (kind, priority, count, acceptance time) and the list of its job ids are written by
the same script that writes its jobs (dispatcher.rqstore.write_jobs), so a batch exists exactly
when all its jobs do. Its progress is read from the jobs themselves, RQ's status field of each, so
it agrees with GET /v1/jobs/<id>, rq-dashboard and RQ's requeue and cancel whatever did them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import redis
from rq.utils import utcparse

from dispatcher import rqstore
from dispatcher.history import isoformat
from dispatcher.keys import Keys
from dispatcher.status import FROM_RQ, Status

ID_PREFIX = "ba_"
#: Beyond the failure TTL, how long a batch's record is kept: its jobs may wait as long for their
#: retries (the longest backoff, 7 days, plus the longest Retry-After, 1 day).
RETRY_MARGIN = 9 * 24 * 3600
#: The count of a batch's jobs no longer in Redis.
GONE = "gone"
#: The statuses after which nothing more happens to a job.
DONE = (Status.SUCCEEDED.value, Status.FAILED.value, Status.CANCELED.value, GONE)
#: Failed job ids one answer lists at most.
MAX_FAILED_PAGE = 1000


def batch_id_of(job_ids: list[str]) -> str:
    """A batch's id, from its first job's (random, so unique): an idempotent repeat, which has only
    the job ids, answers the same batch id."""
    return ID_PREFIX + job_ids[0].partition("_")[2]


def batch_record(
    keys: Keys, batch_id: str, kind: str, priority: str, count: int, accepted_at: datetime, ttl: int
) -> tuple[str, str, str, int]:
    """What rqstore.write_jobs writes for a batch: its keys, its fields and their TTL."""
    fields = ["kind", kind, "priority", priority, "count", str(count), "created_at", isoformat(accepted_at)]
    return keys.batch(batch_id), keys.batch_jobs(batch_id), json.dumps(fields), ttl + RETRY_MARGIN


def batch_view(
    connection: redis.Redis, keys: Keys, batch_id: str, failed_offset: int, failed_limit: int
) -> dict | None:
    """GET /v1/batches/<id>: counts by status, percent done, when it finished, a page of failed ids;
    None when there is no such batch (or it expired)."""
    with connection.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.batch(batch_id))
        pipe.lrange(keys.batch_jobs(batch_id), 0, -1)
        record, ids = pipe.execute()
    if not record:
        return None
    job_ids = [raw.decode() for raw in ids]
    by_status = {status.value: 0 for status in Status} | {GONE: 0}
    failed: list[str] = []
    ends: list[datetime] = []
    for job_id, (raw_status, ended_at) in zip(job_ids, rqstore.job_states(connection, job_ids), strict=True):
        # A job whose hash is gone expired after it ended, or was deleted (rq-dashboard's Delete).
        status = GONE if raw_status is None else FROM_RQ.get(raw_status, Status.FAILED).value
        by_status[status] += 1
        if status == Status.FAILED:
            failed.append(job_id)
        if ended_at:
            ends.append(utcparse(ended_at.decode()).replace(tzinfo=UTC))
    count = int(record[b"count"])
    done = sum(by_status[status] for status in DONE)
    page = failed[failed_offset : failed_offset + failed_limit]
    return {
        "id": batch_id,
        "kind": record[b"kind"].decode(),
        "priority": record[b"priority"].decode(),
        "count": count,
        "by_status": by_status,
        "percent_done": round(100 * done / count, 1) if count else 100.0,
        "created_at": record[b"created_at"].decode(),
        "finished_at": isoformat(max(ends)) if done == count and ends else None,
        "failed": {
            "count": len(failed),
            "ids": page,
            "next_offset": failed_offset + len(page) if failed_offset + len(page) < len(failed) else None,
        },
    }
