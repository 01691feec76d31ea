"""The RQ job functions: one call is one delivery attempt.

RQ's own `Retry` cannot express our policy (it repeats the first interval,
knows no jitter or Retry-After, and retries on any exception), so a job is
enqueued without one and each attempt decides: success returns a result; a
retryable failure with attempts left returns `rq.Retry` with the exact delay,
which RQ turns into a wait in the ScheduledJobRegistry; anything else raises
DeliveryFailed, which RQ records in its FailedJobRegistry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime

from rq import Retry, get_current_job
from rq.job import Job
from rq.timeouts import JobTimeoutException

from dispatcher.config import DEFAULT_FAILURE_TTL, DEFAULT_RESULT_TTL
from dispatcher.history import Attempt, History, isoformat
from dispatcher.keys import Keys, Kind
from workers import context
from workers.errors import DeliveryError, DeliveryFailed, RetryableDeliveryError
from workers.mail import build_message, envelope
from workers.retry import next_delay

#: Beyond the failure TTL, how long an unfinished job's history is kept: more than the longest
#: backoff (7 days) plus the longest Retry-After (1 day).
PENDING_HISTORY_MARGIN = 9 * 24 * 3600


def deliver_webhook(data: dict) -> dict | Retry:
    job = _job()
    return _attempt(job, "webhook", data, lambda: context.current().webhooks.send(job.id, data))


def send_email(data: dict) -> dict | Retry:
    job = _job()

    def send() -> tuple[int, str | None]:
        sender, recipients = envelope(data)
        return context.current().mail.send(build_message(data), sender, recipients)

    return _attempt(job, "email", data, send)


def _result_ttl(job: Job) -> int:
    """The job's own TTL as the API set it; jobs enqueued by other means get Dispatcher's default."""
    return job.result_ttl if job.result_ttl is not None and job.result_ttl > 0 else DEFAULT_RESULT_TTL


def _failure_ttl(job: Job) -> int:
    return job.failure_ttl if job.failure_ttl is not None and job.failure_ttl > 0 else DEFAULT_FAILURE_TTL


def _job() -> Job:
    job = get_current_job()
    if job is None:
        raise RuntimeError("Dispatcher job functions run inside an RQ worker")
    return job


def _attempt(job: Job, kind: Kind, data: dict, deliver: Callable[[], tuple[int, str | None]]) -> dict | Retry:
    history = History(job.connection, Keys(job.origin))
    last = history.last_attempt(job.id)
    # A job runs again after its worker died (the reaper requeued it): settle what is already known.
    if last is not None and last.outcome == "succeeded":
        return {"status_code": last.status_code, "attempts": last.number}  # delivered before the crash
    if last is not None and last.outcome == "permanent":
        raise DeliveryFailed(last.error or "permanent failure")
    if last is not None and last.number >= int(data.get("retry", {}).get("max_attempts", 1)):
        return _conclude(job, kind, data, history, last, None)  # the last allowed attempt was cut short
    # Outlives the longest wait before a next attempt (backoff and Retry-After are capped below this).
    attempt = history.start_attempt(job.id, keep_for=_failure_ttl(job) + PENDING_HISTORY_MARGIN)
    started = time.monotonic()
    retry_after: float | None = None
    try:
        attempt.status_code, note = deliver()
        attempt.outcome = "succeeded"
        if kind == "webhook":
            attempt.response_excerpt = note
        else:
            attempt.error = note
    except DeliveryError as exc:
        retryable = isinstance(exc, RetryableDeliveryError)
        attempt.outcome = "retryable" if retryable else "permanent"
        attempt.status_code = exc.status_code
        attempt.error = str(exc)
        attempt.response_excerpt = exc.response_excerpt
        retry_after = exc.retry_after if isinstance(exc, RetryableDeliveryError) else None
    except JobTimeoutException as exc:
        attempt.outcome = "retryable"
        attempt.error = f"attempt timed out: {exc}"
    except Exception as exc:
        # A bug or undecodable job data: retrying would fail the same way.
        attempt.outcome = "permanent"
        attempt.error = f"unexpected error: {type(exc).__name__}: {exc}"
    except (SystemExit, KeyboardInterrupt):
        # A second stop signal (cold shutdown) while delivering: put the job back rather than let
        # RQ fail it; the worker exits once this returns, as its first signal asked.
        attempt.outcome = "retryable"
        attempt.error = "interrupted: the worker was shut down during this attempt"
        attempt.finished_at = isoformat(datetime.now(UTC))
        attempt.duration_ms = round((time.monotonic() - started) * 1000)
        history.finish_attempt(kind, job.id, attempt, final=False)
        return Retry(max=(job.number_of_retries or 0) + 1, interval=0, enqueue_at_front=True)
    attempt.finished_at = isoformat(datetime.now(UTC))
    attempt.duration_ms = round((time.monotonic() - started) * 1000)
    return _conclude(job, kind, data, history, attempt, retry_after)


def _conclude(
    job: Job, kind: Kind, data: dict, history: History, attempt: Attempt, retry_after: float | None
) -> dict | Retry:
    target = job.meta.get("target")
    # A copy for rq-dashboard, which shows job.meta; the full history is the attempts hash.
    job.meta["attempts"] = attempt.number
    job.meta["last_attempt"] = asdict(attempt)
    mirror = (job.key.decode() if isinstance(job.key, bytes) else job.key, job.serializer.dumps(job.meta))
    if attempt.outcome == "succeeded":
        history.finish_attempt(kind, job.id, attempt, final=True, ttl=_result_ttl(job), mirror=mirror)
        return {"status_code": attempt.status_code, "attempts": attempt.number}
    max_attempts = int(data.get("retry", {}).get("max_attempts", 1))
    if attempt.outcome == "retryable" and attempt.number < max_attempts:
        delay = next_delay(data["retry"].get("backoff", []), attempt.number + 1, retry_after)
        history.finish_attempt(kind, job.id, attempt, final=False, mirror=mirror)
        # RQ keeps the due time in whole seconds, rounded down: one second more and it is never early.
        # RQ counts its own retries; a max one above that count lets us alone decide when to stop.
        return Retry(max=(job.number_of_retries or 0) + 1, interval=[delay + 1 if delay > 0 else 0])
    history.finish_attempt(kind, job.id, attempt, final=True, ttl=_failure_ttl(job), target=target, mirror=mirror)
    if attempt.outcome == "retryable":
        raise DeliveryFailed(f"gave up after {attempt.number} attempt(s): {attempt.error}")
    raise DeliveryFailed(attempt.error or "permanent failure")
