"""Job control: cancel a waiting job, deliver a failed one again, replay many failed ones, recover
an endpoint's failed deliveries of a window of events.

The API (DELETE /v1/jobs/<id>, POST /v1/jobs/<id>/retry, POST /v1/jobs/replay, POST
/v1/applications/<app>/endpoints/<id>/recover) and the command line (`dispatcher cancel`, `retry`,
`replay`, `recover`) both call this module. Each operation is RQ's own
(`Job.cancel`, `FailedJobRegistry.requeue`), done atomically in one script per call
(dispatcher.rqstore), so what RQ's tools and rq-dashboard show afterwards is what they would show
had they done it: a canceled job is in RQ's CanceledJobRegistry, a requeued one back on its queue.
A requeued job keeps its id, so its `webhook-id` or `Message-ID`, and the worker appends its new
series of attempts to the same history.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis
from rq import Queue
from rq.utils import utcformat

from dispatcher import rqstore
from dispatcher.channels import CHANNELS
from dispatcher.config import Settings
from dispatcher.endpoints import DELIVERY_CHANNEL, release_ordered
from dispatcher.enqueue import make_queues
from dispatcher.errors import FieldProblem, JobStateConflict, NoSuchJob
from dispatcher.keys import Keys, Kind
from dispatcher.status import StatusReader

#: Most jobs one replay requeues.
MAX_REPLAY = 10_000
#: Failed-registry entries read per round trip while a replay looks for matches.
_REPLAY_PAGE = 2_000
#: Jobs requeued per script: each call holds Redis for well under a millisecond per job.
_REQUEUE_CHUNK = 1_000

#: The longest window one recovery covers: the default retention of a failed job
#: (DISPATCHER_RETENTION_FAILED); a delivery that failed before it has expired.
MAX_RECOVERY_WINDOW = timedelta(days=30)
#: RQ's statuses of a job that failed for good (the API shows both as `failed`).
_FAILED = (b"failed", b"stopped")

#: `_CANCEL`'s answers for jobs no longer waiting, as the API names their status.
_NOT_WAITING = {
    "finished": "succeeded",
    "failed": "failed",
    "stopped": "failed",
    "canceled": "canceled",
}


def recovery_window(since: datetime, until: datetime | None) -> datetime:
    """The end of a recovery's window (`until`, or now); FieldProblem naming `since` or `until` when
    the window is empty or longer than MAX_RECOVERY_WINDOW."""
    if until is None:
        until = datetime.now(UTC)
        if since >= until:
            raise FieldProblem("since", "must be in the past (until defaults to now)")
    elif since >= until:
        raise FieldProblem("until", "must be after since")
    if until - since > MAX_RECOVERY_WINDOW:
        raise FieldProblem("since", f"must be at most {MAX_RECOVERY_WINDOW.days} days before until")
    return until


@dataclass
class Recovered:
    """What `JobControl.recover` did: the ids it requeued, and how many more matched beyond its limit."""

    ids: list[str]
    remaining: int


@dataclass
class JobControl:
    """Cancel, retry and replay the jobs of one Dispatcher queue (all its priorities)."""

    connection: redis.Redis
    queues: list[Queue]
    keys: Keys
    #: How long a canceled job stays readable (DISPATCHER_RETENTION_FAILED).
    keep_canceled: int

    @classmethod
    def of(cls, connection: redis.Redis, settings: Settings) -> JobControl:
        return cls(connection, make_queues(connection, settings), Keys(settings.queue_name), settings.failure_ttl)

    def cancel(self, job_id: str) -> None:
        """Cancel a queued or scheduled job: it is never delivered.

        Raises NoSuchJob, or JobStateConflict when it is running, being started by a worker, or over.
        """
        outcome = rqstore.cancel(self.connection, self.queues, job_id, self.keys.attempts(job_id), self.keep_canceled)
        if outcome == "done":
            if job_id.startswith(CHANNELS[DELIVERY_CHANNEL].id_prefix):  # an ordered delivery: the next one goes
                payload = rqstore.job_payload(self.connection, job_id)
                if payload is not None:
                    release_ordered(self.connection, self.keys, job_id, payload)
            return
        if outcome == "missing":
            raise NoSuchJob(job_id)
        if outcome in ("taken", "started"):  # (started: delivering, or held by the worker for a slot for its host)
            raise JobStateConflict(f"job {job_id} has been taken by a worker to run; it can no longer be canceled")
        shown = _NOT_WAITING.get(outcome, outcome[:40])
        raise JobStateConflict(f"job {job_id} is {shown}; only a queued or scheduled job can be canceled")

    def retry(self, job_id: str) -> Queue:
        """Deliver a failed job again, as a new series of attempts in the same history; returns its queue.

        Raises NoSuchJob, or JobStateConflict when it is not failed.
        """
        requeued = rqstore.requeue_failed(self.connection, self.queues, [job_id], self.keys.wake)
        if requeued:
            return requeued[0][1]
        view = StatusReader(self.connection, self.queues, self.keys).job(job_id)
        if view is None or rqstore.queue_of(self.connection, self.queues, job_id) is None:
            raise NoSuchJob(job_id)
        if view["status"] != "failed":
            raise JobStateConflict(f"job {job_id} is {view['status']}; only a failed job can be retried")
        raise JobStateConflict(f"job {job_id} is failed but no longer in RQ's failed job registry, so not requeued")

    def replay(
        self, kind: Kind | None = None, since: datetime | None = None, until: datetime | None = None, limit: int = 1000
    ) -> list[str]:
        """Deliver failed jobs again, as `retry` does, up to `limit` of them: of `kind` (None: every
        kind), failed at or after `since` and before `until` (None: no bound). Highest priority first,
        then oldest failure first. Returns the ids requeued: a job another replay (or retry, or RQ's
        requeue) takes first is not counted."""
        prefix = CHANNELS[kind].id_prefix if kind else ""
        low = utcformat(since.astimezone(UTC)) if since else None
        high = utcformat(until.astimezone(UTC)) if until else None
        chosen: list[str] = []
        for queue in self.queues:
            start = 0
            while len(chosen) < limit:
                page = rqstore.failed_page(self.connection, queue, start, _REPLAY_PAGE)
                if not page:
                    break
                start += len(page)
                ids = [job_id for job_id in page if job_id.startswith(prefix)]
                if ids and (low or high):
                    ended = rqstore.ended_at(self.connection, queue, ids)
                    ids = [
                        job_id
                        for job_id, at in zip(ids, ended, strict=True)
                        if at is not None and (low is None or at >= low) and (high is None or at < high)
                    ]
                chosen += ids[: limit - len(chosen)]
        requeued: list[str] = []
        for start in range(0, len(chosen), _REQUEUE_CHUNK):
            chunk = chosen[start : start + _REQUEUE_CHUNK]
            requeued += [
                job_id for job_id, _ in rqstore.requeue_failed(self.connection, self.queues, chunk, self.keys.wake)
            ]
        return requeued

    def recover(self, endpoint_id: str, since: datetime, until: datetime, limit: int = 1000) -> Recovered:
        """Deliver again, as `retry` does, every delivery to endpoint `endpoint_id` of an event
        accepted at or after `since` and before `until` that failed for good: up to `limit` of them,
        oldest event first. Returns the ids requeued and how many more matched (a second call with
        the same window takes those: the ones requeued are no longer failed).

        Only failed deliveries are requeued: one still queued, scheduled or running is on its way;
        one that succeeded is not sent again; a canceled one was canceled on purpose and stays so.
        A requeued job keeps its id, so its `webhook-id`, and its URL and headers (those of the
        endpoint when the event was published); the worker signs it with the endpoint's secrets of
        the moment of delivery, as always.

        Where it looks: the failed job registries of the queue's priorities, not the job index
        (Keys.index). A delivery that can be requeued is, by definition, in one of them (RQ's
        requeue, which this is, takes it from there), and they hold only the jobs that failed and
        are still retained, usually a small part of all the jobs accepted in a window that may be
        30 days long. Each page of ids is read in one pipelined round trip (status, acceptance time
        and meta of each, `rqstore.failed_fields`); the acceptance time is the job's `created_at`,
        the same instant for every delivery of one event. A per-endpoint index of jobs would have
        to be written by every enqueue and trimmed besides, for an operation that is rare.
        """
        low, high = utcformat(since.astimezone(UTC)), utcformat(until.astimezone(UTC))
        prefix = CHANNELS[DELIVERY_CHANNEL].id_prefix
        needle = endpoint_id.encode()
        matched: list[tuple[str, str]] = []  # (accepted at, id)
        for queue in self.queues:
            start = 0
            while True:
                page = rqstore.failed_page(self.connection, queue, start, _REPLAY_PAGE)
                if not page:
                    break
                start += len(page)
                ids = [job_id for job_id in page if job_id.startswith(prefix)]
                for job_id, (status, created, meta) in zip(
                    ids, rqstore.failed_fields(self.connection, queue, ids), strict=True
                ):
                    if status not in _FAILED or not created or not meta or needle not in meta:
                        continue
                    accepted = created.decode(errors="replace")
                    if low <= accepted < high and _endpoint_of(meta) == endpoint_id:
                        matched.append((accepted, job_id))
        matched.sort()
        chosen = [job_id for _, job_id in matched[:limit]]
        requeued: list[str] = []
        for start in range(0, len(chosen), _REQUEUE_CHUNK):
            chunk = chosen[start : start + _REQUEUE_CHUNK]
            requeued += [
                job_id for job_id, _ in rqstore.requeue_failed(self.connection, self.queues, chunk, self.keys.wake)
            ]
        return Recovered(requeued, len(matched) - len(chosen))


def _endpoint_of(meta: bytes) -> str | None:
    """The endpoint a job's meta names as its target's (an event's delivery), or None."""
    try:
        target = json.loads(meta).get("target")
    except (ValueError, AttributeError):  # not JSON, or not an object
        return None
    endpoint = target.get("endpoint") if isinstance(target, dict) else None
    return endpoint if isinstance(endpoint, str) else None
