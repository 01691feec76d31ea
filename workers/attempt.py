"""One delivery attempt: make it, decide what follows, record it. No RQ bookkeeping here.

The worker runs attempts on a thread pool and records many in one pipeline;
the RQ job functions in `workers.jobs` (for a plain `rq worker`) run the same
steps one job at a time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from redis.client import Pipeline
from redis.typing import EncodableT
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import JobTimeoutException

from dispatcher import logs
from dispatcher.config import DEFAULT_FAILURE_TTL, DEFAULT_RESULT_TTL
from dispatcher.history import Attempt, History, isoformat
from dispatcher.keys import Kind
from dispatcher.priorities import split
from workers import context
from workers.channels import DELIVERERS
from workers.errors import DeliveryError, DeliveryHeld, RetryableDeliveryError, ThrottledDeliveryError
from workers.retry import next_delay

#: Beyond the failure TTL, how long an unfinished job's history is kept: more than the longest
#: backoff (7 days) plus the longest Retry-After (1 day).
PENDING_HISTORY_MARGIN = 9 * 24 * 3600


def max_attempts(data: dict) -> int:
    return int(data.get("retry", {}).get("max_attempts", 1))


def run(
    kind: Kind, job_id: str, data: dict, attempt: Attempt, queue: str | None = None, pause_on_throttle: bool = False
) -> float | None:
    """Make the attempt of a job of RQ queue `queue`, filling in `attempt`; return the receiver's
    Retry-After, if any.

    `pause_on_throttle`: let a ThrottledDeliveryError through (the worker slows its channel's rate and
    takes the attempt back) instead of recording it as a retryable failure.
    Safe to call from any thread; records nothing in Redis (a delivery may read and write its own
    keys, such as the suppression list, of `queue`'s Dispatcher queue).
    """
    started = time.monotonic()
    retry_after: float | None = None
    try:
        with context.delivering(queue):
            delivered = DELIVERERS[kind].deliver(job_id, data)
        attempt.outcome = "succeeded"
        attempt.status_code = delivered.status_code
        attempt.response_excerpt = delivered.response_excerpt
        attempt.error = delivered.note
        attempt.suppressed = list(delivered.suppressed) or None
    except DeliveryHeld:
        raise  # not an attempt: the caller takes it back and schedules the job (hold_back)
    except DeliveryError as exc:
        if pause_on_throttle and isinstance(exc, ThrottledDeliveryError):
            raise
        retryable = isinstance(exc, RetryableDeliveryError)
        attempt.outcome = "retryable" if retryable else "permanent"
        attempt.status_code = exc.status_code
        attempt.error = str(exc)
        attempt.response_excerpt = exc.response_excerpt
        attempt.suppressed = list(exc.suppressed) or None
        retry_after = exc.retry_after if isinstance(exc, RetryableDeliveryError) else None
    except JobTimeoutException as exc:
        attempt.outcome = "retryable"
        attempt.error = f"attempt timed out: {exc}"
    except Exception as exc:
        # A bug or undecodable job data: retrying would fail the same way.
        attempt.outcome = "permanent"
        attempt.error = f"unexpected error: {type(exc).__name__}: {exc}"
    finally:
        attempt.finished_at = isoformat(datetime.now(UTC))
        attempt.duration_ms = round((time.monotonic() - started) * 1000)
    return retry_after


@dataclass
class Decision:
    """What an attempt leads to: done, another try after `delay` seconds, or failed for good."""

    verdict: Literal["succeeded", "retry", "failed"]
    attempt: Attempt
    delay: float = 0.0
    #: Attempts made before this series (see dispatcher.history.Began).
    series_start: int = 0

    @property
    def error(self) -> str:
        if self.attempt.outcome == "retryable" and self.verdict == "failed":
            made = self.attempt.number - self.series_start
            return f"gave up after {made} attempt(s): {self.attempt.error}"
        return self.attempt.error or "permanent failure"

    @property
    def rq_delay(self) -> float:
        """The retry delay to hand RQ: it keeps the due time in whole seconds, rounded down,
        so one second more and the attempt is never early (0 still means "requeue now")."""
        return self.delay + 1 if self.delay > 0 else 0

    @property
    def result(self) -> dict:
        return {"status_code": self.attempt.status_code, "attempts": self.attempt.number}


def decide(data: dict, attempt: Attempt, retry_after: float | None = None, series_start: int = 0) -> Decision:
    """Succeeded; retryable with attempts left in its series (after backoff, jitter and Retry-After);
    or failed. `series_start`: attempts made before this series, which do not count."""
    made = attempt.number - series_start
    if attempt.outcome == "succeeded":
        return Decision("succeeded", attempt, series_start=series_start)
    if attempt.outcome == "retryable" and made < max_attempts(data):
        delay = next_delay(data["retry"].get("backoff", []), made + 1, retry_after)
        return Decision("retry", attempt, delay, series_start)
    return Decision("failed", attempt, series_start=series_start)


def settle(kind: Kind, job_id: str, data: dict, decision: Decision, queue: str | None = None) -> None:
    """The channel's follow-up of a decided attempt (workers.channels.Deliverer.settle) of a job of
    RQ queue `queue`, whose Dispatcher queue's keys it uses (as `run`). Its failure is logged, never
    the job's: the attempt happened and is recorded either way."""
    try:
        with context.delivering(queue):
            DELIVERERS[kind].settle(job_id, data, decision)
    except Exception:
        logging.getLogger(__name__).exception("could not settle job %s after its attempt", job_id)


def result_ttl(job: Job) -> int:
    """The job's own TTL as the API set it; jobs enqueued by other means get Dispatcher's default."""
    return job.result_ttl if job.result_ttl is not None and job.result_ttl > 0 else DEFAULT_RESULT_TTL


def failure_ttl(job: Job) -> int:
    return job.failure_ttl if job.failure_ttl is not None and job.failure_ttl > 0 else DEFAULT_FAILURE_TTL


def history_ttl(job: Job) -> int:
    """How long an unfinished job's history is kept."""
    return failure_ttl(job) + PENDING_HISTORY_MARGIN


def settled(last: Attempt) -> Decision:
    """What a job whose history is already complete (a rerun after a crash) comes to."""
    return Decision("succeeded" if last.outcome == "succeeded" else "failed", last)


def hold_back(pipe: Pipeline, history: History, job: Job, queue: Queue, number: int, held: DeliveryHeld) -> None:
    """Queue in `pipe`: a delivery held before anything was sent waits as a scheduled job, its attempt
    `number` taken back, and the reason in its meta (the job view and rq-dashboard show it). The
    caller removes its execution, as for any job that stops running."""
    history.unbegin(pipe, job.id, number)
    if not isinstance(job.meta, dict) or "unserialized" in job.meta:
        job.meta = {}
    until = datetime.now(UTC) + timedelta(seconds=held.delay)
    job.meta["held"] = {"reason": held.reason, "until": isoformat(until)}
    pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
    queue.schedule_job(job, until, pipeline=pipe)


def record(
    pipe: Pipeline,
    history: History,
    kind: Kind,
    job: Job,
    decision: Decision,
    job_fields: dict[EncodableT, EncodableT] | None = None,
) -> None:
    """Queue in `pipe` the attempt, the outcome totals and a summary in job.meta for rq-dashboard;
    `job_fields` (RQ's status and end time, say) go in the same write of the job's hash."""
    attempt = decision.attempt
    if not isinstance(job.meta, dict) or "unserialized" in job.meta:
        job.meta = {}  # RQ hands over undecodable meta as {"unserialized": raw bytes}: replace it
    job.meta["attempts"] = attempt.number
    job.meta["last_attempt"] = asdict(attempt)
    job.meta.pop("held", None)  # it went, so it is held no more
    fields: dict[EncodableT, EncodableT] = {"meta": job.serializer.dumps(job.meta), **(job_fields or {})}
    pipe.hset(job.key, mapping=fields)
    if decision.verdict == "retry":
        history.finish(pipe, kind, job.id, attempt, final=False)
    else:
        ttl = result_ttl(job) if decision.verdict == "succeeded" else failure_ttl(job)
        history.finish(pipe, kind, job.id, attempt, final=True, ttl=ttl, target=job.meta.get("target"))


def log(kind: Kind, job_id: str, data: dict, decision: Decision, queue: str) -> None:
    """The attempt's one log line, from what the attempt already holds (no Redis)."""
    if not logs.attempt_log.isEnabledFor(logging.INFO):
        return
    attempt = decision.attempt
    logs.log_attempt(
        job_id,
        kind,
        attempt.number,
        attempt.outcome,
        attempt.status_code,
        attempt.duration_ms,
        DELIVERERS[kind].target_host(data),
        queue,
        split(queue)[1],
        decision.verdict,
    )
