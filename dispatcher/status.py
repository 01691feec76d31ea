"""Job status read from RQ's own job hashes and registries, plus the attempt history."""

from __future__ import annotations

import builtins
from datetime import UTC, datetime
from enum import StrEnum
from typing import cast

import redis
from rq import Queue, Worker
from rq.serializers import JSONSerializer
from rq.utils import utcparse

from dispatcher import rqstore
from dispatcher.channels import KINDS, kind_of
from dispatcher.history import UNREADABLE, History, isoformat, read_attempts
from dispatcher.keys import Keys
from dispatcher.priorities import split


class Status(StrEnum):
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


#: RQ's job statuses as the API names them.
FROM_RQ: dict[bytes, Status] = {
    b"created": Status.QUEUED,
    b"queued": Status.QUEUED,
    b"deferred": Status.QUEUED,
    b"scheduled": Status.SCHEDULED,
    b"started": Status.RUNNING,
    b"finished": Status.SUCCEEDED,
    b"failed": Status.FAILED,
    b"stopped": Status.FAILED,
    b"canceled": Status.CANCELED,
}
#: Most jobs GET /v1/jobs answers at once.
MAX_LIST_LIMIT = 1000
_LIST_PAGE = 200
#: How far back GET /v1/jobs looks for matches before it stops.
_LIST_SCAN_LIMIT = 20_000


class StatusReader:
    def __init__(self, connection: redis.Redis, queues: builtins.list[Queue], keys: Keys) -> None:
        """`queues`: every priority's queue of the Dispatcher queue whose `keys` these are."""
        self.connection = connection
        self.queues = queues
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
            page = cast(builtins.list[bytes], self.connection.zrevrange(self.keys.index, start, start + _LIST_PAGE - 1))
            ids = [i.decode() for i in page]
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
        counts: dict[str, dict[str, int]] = {
            kind: {s: 0 for s in ("queued", "scheduled", "running", "succeeded", "failed")} for kind in KINDS
        }
        current = [
            (status, ids)
            for queue in self.queues
            for status, ids in (
                ("queued", queue.get_job_ids()),
                ("scheduled", queue.scheduled_job_registry.get_job_ids()),
                ("running", queue.started_job_registry.get_job_ids()),
            )
        ]
        for status, ids in current:
            for job_id in ids:
                kind: str | None = kind_of(job_id)
                if kind:
                    counts[kind][status] += 1
        for field, value in self.history.totals().items():
            kind, _, status = field.partition(":")
            if kind in counts and status in counts[kind]:
                counts[kind][status] = value
        return {
            **counts,
            "recent_failures": self.history.recent_failures(),
            "recent_successes": self.history.recent_successes(),
        }

    def readiness(self) -> dict:
        """Per priority: the jobs waiting in its queue and the workers alive that serve it (RQ's
        worker registrations, each confirmed by its liveness key, which expires within seconds of
        its death; RQ's own entries outlive a killed worker by minutes)."""
        with self.connection.pipeline(transaction=False) as pipe:
            names = []
            for queue in self.queues:
                keys = Worker.all_keys(connection=self.connection, queue=queue)
                names.append([key.removeprefix(Worker.redis_worker_namespace_prefix) for key in keys])
                for name in names[-1]:
                    pipe.exists(self.keys.alive(name))
                pipe.llen(queue.key)
            replies = pipe.execute()
        queues: dict[str, dict] = {}
        warnings = []
        for queue, served_by in zip(self.queues, names, strict=True):
            alive = sum(bool(replies.pop(0)) for _ in served_by)
            queued = int(replies.pop(0))
            queues[split(queue.name)[1]] = {"queue": queue.name, "queued": queued, "workers": alive}
            if queued and not alive:
                warnings.append(f"{queued} job(s) wait in {queue.name} and no worker serving it is alive")
        return {"queues": queues, "warnings": warnings}

    # (`builtins.list`: in this class, `list` is the method above)
    def _views(self, ids: builtins.list[str]) -> builtins.list[dict | None]:
        n = 0
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.keys.attempts(job_id))
                n = 1 + rqstore.read_job_view(pipe, self.queues, job_id)
            # One job's key of the wrong type answers an error for its own commands only: that job
            # is shown as unreadable, every other one as usual.
            replies = pipe.execute(raise_on_error=False)
        views = []
        for i, job_id in enumerate(ids):
            raw_attempts, *rq_replies = replies[i * n : (i + 1) * n]
            fields, scheduled_at, results = rqstore.job_view(rq_replies)
            views.append(_view(job_id, fields, raw_attempts, scheduled_at, results))
        return views


def _view(job_id: str, fields: list | Exception, raw_attempts: dict | Exception, scheduled_at, results) -> dict | None:
    """The API view of one job from its raw replies; whatever cannot be read is named in `error`.

    A job whose record or status cannot be read is shown as failed.
    """
    fatal: list[str] = []  # what leaves the job's state unknown
    problems: list[str] = []  # what leaves parts of the view empty
    if isinstance(fields, Exception):
        fatal.append(f"its record cannot be read ({_redis_error(fields)})")
        fields = [None] * len(rqstore.VIEW_FIELDS)
    values = dict(zip(rqstore.VIEW_FIELDS, fields, strict=True))
    if not fatal and all(v is None for v in fields):
        return None
    status = FROM_RQ.get(values["status"]) if values["status"] is not None else None
    if status is None and not fatal:
        fatal.append(
            "its status is missing" if values["status"] is None else f"its status {values['status'][:40]!r} is unknown"
        )
    meta = _meta(values["meta"], problems)
    attempts: list[dict] = []
    if isinstance(raw_attempts, Exception):
        problems.append(f"its attempt history cannot be read ({_redis_error(raw_attempts)})")
    else:
        attempts, unreadable = read_attempts(raw_attempts)
        problems += unreadable
    times = {
        name: _iso(name, values[name], problems) for name in ("created_at", "enqueued_at", "started_at", "ended_at")
    }
    moments = [t for t in times.values() if t] + [a["finished_at"] or a["started_at"] for a in attempts]
    if isinstance(results, Exception):
        problems.append(f"its results cannot be read ({_redis_error(results)})")
        results = []
    if fatal:
        status = Status.FAILED
    elif values[rqstore.CANCELED_FIELD] is not None:  # canceled, even if RQ's scheduler re-saved it as queued
        status = Status.CANCELED
    assert status is not None
    if status is Status.RUNNING and (not attempts or attempts[-1]["finished_at"] is not None):
        # Started in RQ's sense but no attempt in hand: held by a worker until its host has a free slot.
        status = Status.QUEUED
    error = None
    if status is Status.FAILED:
        candidates = [f"the job cannot be read: {'; '.join(fatal)}" if fatal else None, _unreadable_failure(results)]
        candidates += [a["error"] for a in attempts if a.get("error")][-1:]
        candidates += [f"the job cannot be read: {'; '.join(problems)}" if problems else None, _rq_failure(results)]
        error = next(e for e in candidates if e)
    elif status is not Status.SUCCEEDED:
        error = next((a["error"] for a in reversed(attempts) if a.get("error")), None)
    return {
        "id": job_id,
        "kind": meta.get("kind") if meta.get("kind") in KINDS else kind_of(job_id),
        "status": status.value,
        "priority": _priority(values["origin"]),
        "created_at": times["created_at"],
        "updated_at": max(moments, default=None),
        "next_attempt_at": (
            isoformat(datetime.fromtimestamp(scheduled_at, UTC))
            if isinstance(scheduled_at, float) and status is Status.SCHEDULED
            else None
        ),
        "attempts": attempts,
        "error": error,
        "metadata": meta.get("metadata") if isinstance(meta.get("metadata"), dict) else {},
        "target": meta.get("target") if isinstance(meta.get("target"), dict) else None,
        "held": _held(meta) if status is Status.SCHEDULED else None,
    }


def _held(meta: dict) -> str | None:
    """Why a scheduled job waits without an attempt (workers.attempt.hold_back), if it does."""
    held = meta.get("held")
    reason = held.get("reason") if isinstance(held, dict) else None
    return reason if isinstance(reason, str) else None


def _priority(origin: bytes | None) -> str | None:
    """The priority of the job's queue (None if its hash names none)."""
    return split(origin.decode(errors="replace"))[1] if origin else None


def _meta(raw: bytes | None, problems: list[str]) -> dict:
    if not raw:
        return {}
    try:
        meta = JSONSerializer.loads(raw)
    except ValueError:  # UnicodeDecodeError is one too
        meta = None
    if not isinstance(meta, dict):
        problems.append("its meta cannot be read")
        return {}
    return meta


def _redis_error(exc: Exception) -> str:
    return str(exc).split("\n")[0][:200]


def _unreadable_failure(results: list) -> str | None:
    """The error of the job's latest result when it says the worker could not read the job."""
    text = _exc_string(results)
    return text if text and text.startswith(UNREADABLE) else None


def _rq_failure(results: list) -> str:
    """The last line of the traceback RQ recorded with the job's latest result."""
    text = _exc_string(results)
    if text:
        return f"the worker could not run the job: {text}"
    return "the worker could not run the job"


def _exc_string(results: list) -> str | None:
    """The last line of the exception text of the latest result, if it has a readable one."""
    text = rqstore.exception_text(results)
    lines = text.strip().splitlines() if text else []
    return lines[-1] if lines else None


def _iso(name: str, raw: bytes | None, problems: list[str]) -> str | None:
    if not raw:
        return None
    try:
        return isoformat(utcparse(raw.decode()).replace(tzinfo=UTC))
    except (ValueError, OverflowError):  # UnicodeDecodeError is a ValueError
        problems.append(f"its {name} cannot be read")
        return None
