"""The RQ job functions, for when a job runs under a plain RQ worker: one call is one attempt.

Dispatcher's own worker (`workers.worker`) recognises these by name and runs the
same steps (`workers.attempt`) on a thread pool instead, with RQ's bookkeeping
batched. Here, RQ does the bookkeeping: RQ's own `Retry` cannot express our
policy (it repeats the first interval, knows no jitter or Retry-After, and
retries on any exception), so a job is enqueued without one and each attempt
decides: success returns a result; a retry returns `rq.Retry` with the exact
delay, which RQ turns into a wait in the ScheduledJobRegistry; a failure raises
DeliveryFailed, which RQ records in its FailedJobRegistry.
"""

from __future__ import annotations

from rq import Retry, get_current_job
from rq.job import Job

from dispatcher import logs
from dispatcher.channels import JOB_FUNCTION
from dispatcher.history import UNREADABLE, History, UnreadableHistory
from dispatcher.keys import Keys, Kind
from dispatcher.priorities import split
from dispatcher.tallies import Tally
from workers.attempt import Decision, decide, history_ttl, log, max_attempts, record, run, settle, settled
from workers.channels import UnknownPayload, channel_of
from workers.errors import DeliveryFailed, DeliveryHeld


def deliver(payload: dict) -> dict | Retry:
    """Every job's function (dispatcher.channels.JOB_FUNCTION): the payload names its channel."""
    try:
        channel = channel_of(JOB_FUNCTION, payload)
    except UnknownPayload as exc:
        raise DeliveryFailed(f"{UNREADABLE}: {exc}") from None
    return _run(_job(), channel, payload)


# Version-1 jobs (before channels) name their channel by their function; they still deliver.
def deliver_webhook(data: dict) -> dict | Retry:
    return _legacy(data)


def send_email(data: dict) -> dict | Retry:
    return _legacy(data)


def _legacy(data: dict) -> dict | Retry:
    job = _job()
    return _run(job, channel_of(job.func_name, data), data)


def _job() -> Job:
    job = get_current_job()
    if job is None:
        raise RuntimeError("Dispatcher job functions run inside an RQ worker")
    return job


def _run(job: Job, kind: Kind, data: dict) -> dict | Retry:
    logs.ensure_configured()  # before anything is sent: a bad DISPATCHER_LOG_FORMAT fails the job unsent
    history = History(job.connection, Keys(split(job.origin)[0]))
    with job.connection.pipeline() as pipe:
        failed = job.failed_job_registry.key
        started = history.begin(pipe, kind, job.id, max_attempts(data), history_ttl(job), failed, job.key)
        (reply,) = pipe.execute()
    try:
        attempt, fresh, series_start = history.began(reply, started)
    except UnreadableHistory as exc:
        raise DeliveryFailed(f"{UNREADABLE}: its attempt history cannot be read: {exc}") from None
    if not fresh:  # a rerun after a crash, with nothing left to do but settle
        decision = settled(attempt)
    else:
        try:
            retry_after = run(kind, job.id, data, attempt, job.origin)
        except DeliveryHeld as held:
            # Not an attempt: taken back, and the job waits as scheduled. RQ moves it there itself
            # from the Retry (counting a retry of its own, which decides nothing here).
            with job.connection.pipeline() as pipe:
                history.unbegin(pipe, job.id, attempt.number)
                pipe.execute()
            return Retry(max=(job.number_of_retries or 0) + 1, interval=[held.delay])  # type: ignore[list-item]
        except (SystemExit, KeyboardInterrupt):
            # A second stop signal (cold shutdown) while delivering: put the job back rather than let
            # RQ fail it; the worker exits once this returns, as its first signal asked.
            attempt.outcome = "retryable"
            attempt.error = "interrupted: the worker was shut down during this attempt"
            decision = Decision("retry", attempt)
        else:
            decision = decide(data, attempt, retry_after, series_start)
            settle(kind, job.id, data, decision, job.origin)
        log(kind, job.id, data, decision, job.origin)
    if fresh or decision.attempt.outcome == "retryable":
        with job.connection.pipeline() as pipe:
            record(pipe, history, kind, job, decision)
            if fresh:  # an attempt made now, counted for /metrics
                Tally().add(kind, job.origin, decision.attempt).write(pipe, history.keys)
            pipe.execute()
    return _to_rq(job, decision)


def _to_rq(job: Job, decision: Decision) -> dict | Retry:
    if decision.verdict == "succeeded":
        return decision.result
    if decision.verdict == "failed":
        raise DeliveryFailed(decision.error)
    # RQ counts its own retries; a max one above that count lets us alone decide when to stop.
    delay = decision.rq_delay
    # RQ annotates the interval as int seconds; it schedules with a timedelta, so a float is fine.
    return Retry(max=(job.number_of_retries or 0) + 1, interval=[delay], enqueue_at_front=delay == 0)  # type: ignore[list-item]
