"""Batches you can follow: the record a batch's acceptance writes, and its progress read back.

A batch's hash (kind, priority, count, acceptance time) and the list of its job ids are written by
the same script that writes its jobs (dispatcher.rqstore.write_jobs), so a batch exists exactly
when all its jobs do. Its progress is read from the jobs themselves, RQ's status field of each, so
it agrees with GET /v1/jobs/<id>, rq-dashboard and RQ's requeue and cancel whatever did them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Group:
    """Jobs accepted together and followed together: a batch, or an event's deliveries. Its record
    is written in the same script as the jobs (rqstore.write_jobs)."""

    #: None: a batch, named after its first job (batch_id_of); an event names itself.
    id: str | None = None
    #: More fields of the record, besides those of every batch.
    fields: dict[str, str] = field(default_factory=dict)

    def named(self, job_ids: list[str]) -> str:
        assert self.id is not None or job_ids, "a group without jobs needs an id"
        return self.id or batch_id_of(job_ids)


def batch_record(
    keys: Keys, group: Group, job_ids: list[str], kind: str, priority: str, accepted_at: datetime, ttl: int
) -> tuple[str, str, str, int]:
    """What rqstore.write_jobs writes for a group: its keys, its fields and their TTL."""
    group_id = group.named(job_ids)
    fields = ["kind", kind, "priority", priority, "count", str(len(job_ids)), "created_at", isoformat(accepted_at)]
    for name, value in group.fields.items():
        fields += [name, value]
    return keys.batch(group_id), keys.batch_jobs(group_id), json.dumps(fields), ttl + RETRY_MARGIN


@dataclass(frozen=True)
class Progress:
    """Where a group's jobs stand, read from each job's RQ status."""

    #: Each job's status as the API names it, in the group's order; GONE for a job no longer in Redis.
    statuses: list[str]
    ends: list[datetime]

    @classmethod
    def of(cls, connection: redis.Redis, job_ids: list[str]) -> Progress:
        statuses, ends = [], []
        for raw_status, ended_at in rqstore.job_states(connection, job_ids):
            # A job whose hash is gone expired after it ended, or was deleted (rq-dashboard's Delete).
            statuses.append(GONE if raw_status is None else FROM_RQ.get(raw_status, Status.FAILED).value)
            if ended_at:
                ends.append(utcparse(ended_at.decode()).replace(tzinfo=UTC))
        return cls(statuses, ends)

    def summary(self) -> dict:
        """`count`, `by_status` and `percent_done`."""
        by_status = {status.value: 0 for status in Status} | {GONE: 0}
        for status in self.statuses:
            by_status[status] += 1
        count = len(self.statuses)
        percent = round(100 * self._done() / count, 1) if count else 100.0
        return {"count": count, "by_status": by_status, "percent_done": percent}

    def finished_at(self) -> str | None:
        """When the last job ended, once all are over."""
        return isoformat(max(self.ends)) if self._done() == len(self.statuses) and self.ends else None

    def _done(self) -> int:
        return sum(1 for status in self.statuses if status in DONE)


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
    progress = Progress.of(connection, job_ids)
    failed = [job_id for job_id, status in zip(job_ids, progress.statuses, strict=True) if status == Status.FAILED]
    page = failed[failed_offset : failed_offset + failed_limit]
    return {
        "id": batch_id,
        "kind": record[b"kind"].decode(),
        "priority": record[b"priority"].decode(),
        **progress.summary(),
        "created_at": record[b"created_at"].decode(),
        "finished_at": progress.finished_at(),
        "failed": {
            "count": len(failed),
            "ids": page,
            "next_offset": failed_offset + len(page) if failed_offset + len(page) < len(failed) else None,
        },
    }
