"""Job status read from RQ's own job hashes and registries, plus the attempt history."""

from __future__ import annotations

import base64
import zlib
from datetime import UTC, datetime
from enum import StrEnum

import redis
from rq import Queue
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import utcparse

from dispatcher.history import History, isoformat, parse_attempts
from dispatcher.keys import KINDS, Keys, kind_of


class Status(StrEnum):
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


#: RQ's job statuses as the API names them.
_FROM_RQ = {
    "queued": Status.QUEUED,
    "deferred": Status.QUEUED,
    "scheduled": Status.SCHEDULED,
    "started": Status.RUNNING,
    "finished": Status.SUCCEEDED,
    "failed": Status.FAILED,
    "stopped": Status.FAILED,
    "canceled": Status.CANCELED,
}
#: The job hash fields a status view needs; the job's data (maybe megabytes of attachments) is never read.
_FIELDS = ("status", "created_at", "enqueued_at", "started_at", "ended_at", "meta")
_LIST_PAGE = 200
#: How far back GET /v1/jobs looks for matches before it stops.
_LIST_SCAN_LIMIT = 20_000


class StatusReader:
    def __init__(self, connection: redis.Redis, queue: Queue, keys: Keys) -> None:
        self.connection = connection
        self.queue = queue
        self.keys = keys
        self.history = History(connection, keys)

    def job(self, job_id: str) -> dict | None:
        """The API view of one job, or None when it does not exist (or has expired)."""
        views = self._views([job_id])
        return views[0]

    def list(self, kind: str | None, status: str | None, limit: int) -> list[dict]:
        """Newest first, filtered by kind and status."""
        found: list[dict] = []
        start = 0
        while len(found) < limit and start < _LIST_SCAN_LIMIT:
            ids = [i.decode() for i in self.connection.zrevrange(self.keys.index, start, start + _LIST_PAGE - 1)]
            if not ids:
                break
            start += len(ids)
            if kind:
                ids = [i for i in ids if kind_of(i) == kind]
            views = self._views(ids)
            expired = [job_id for job_id, view in zip(ids, views, strict=True) if view is None]
            if expired:
                self.connection.zrem(self.keys.index, *expired)
                start -= len(expired)
            found.extend(v for v in views if v is not None and (status is None or v["status"] == status))
        return found[:limit]

    def stats(self) -> dict:
        counts = {kind: {s: 0 for s in ("queued", "scheduled", "running", "succeeded", "failed")} for kind in KINDS}
        current = (
            ("queued", self.queue.get_job_ids()),
            ("scheduled", self.queue.scheduled_job_registry.get_job_ids()),
            ("running", self.queue.started_job_registry.get_job_ids()),
        )
        for status, ids in current:
            for job_id in ids:
                kind = kind_of(job_id)
                if kind:
                    counts[kind][status] += 1
        for field, value in self.history.totals().items():
            kind, _, status = field.partition(":")
            if kind in counts and status in counts[kind]:
                counts[kind][status] = value
        return {**counts, "recent_failures": self.history.recent_failures()}

    def _views(self, ids: list[str]) -> list[dict | None]:
        scheduled_key = self.queue.scheduled_job_registry.key
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self.queue.job_class.key_for(job_id), _FIELDS)
                pipe.hgetall(self.keys.attempts(job_id))
                pipe.zscore(scheduled_key, job_id)
                pipe.xrevrange(Result.get_key(job_id), "+", "-", count=1)
            replies = pipe.execute()
        return [_view(job_id, *replies[i * 4 : i * 4 + 4]) for i, job_id in enumerate(ids)]


def _view(
    job_id: str, fields: list[bytes | None], raw_attempts: dict, scheduled_at: float | None, results: list
) -> dict | None:
    values = dict(zip(_FIELDS, fields, strict=True))
    if values["status"] is None:
        return None
    try:
        meta = JSONSerializer.loads(values["meta"]) if values["meta"] else {}
    except ValueError:
        meta = {}  # a damaged job still gets a status
    attempts = parse_attempts(raw_attempts)
    status = _FROM_RQ.get(values["status"].decode(), Status.QUEUED)
    times = [_iso(values[name]) for name in ("created_at", "enqueued_at", "started_at", "ended_at")]
    times += [a["finished_at"] or a["started_at"] for a in attempts]
    errors = [a["error"] for a in attempts if a.get("error")]
    if status is Status.FAILED and not errors:
        errors = [_rq_failure(results)]  # failed before our code ran: undecodable data, missing function
    return {
        "id": job_id,
        "kind": meta.get("kind") or kind_of(job_id),
        "status": status.value,
        "created_at": _iso(values["created_at"]),
        "updated_at": max((t for t in times if t), default=None),
        "next_attempt_at": (
            isoformat(datetime.fromtimestamp(scheduled_at, UTC))
            if scheduled_at is not None and status is Status.SCHEDULED
            else None
        ),
        "attempts": attempts,
        "error": errors[-1] if errors and status is not Status.SUCCEEDED else None,
        "metadata": meta.get("metadata", {}),
        "target": meta.get("target"),
    }


def _rq_failure(results: list) -> str:
    """The last line of the traceback RQ recorded with the job's latest result."""
    if results:
        encoded = results[0][1].get(b"exc_string")
        if encoded:
            lines = zlib.decompress(base64.b64decode(encoded)).decode(errors="replace").strip().splitlines()
            if lines:
                return f"the worker could not run the job: {lines[-1]}"
    return "the worker could not run the job"


def _iso(raw: bytes | None) -> str | None:
    if not raw:
        return None
    return isoformat(utcparse(raw.decode()).replace(tzinfo=UTC))
