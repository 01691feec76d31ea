"""Poison jobs fail alone: reading a job defensively, and batch pipelines whose errors stay per job.

The worker queues the commands of many jobs in one pipeline. Run the usual way,
one job's key of the wrong type (WRONGTYPE) raises for the whole batch, the
worker loop restarts, and every job of the batch is requeued and delivered
again. Here a `Batch` runs the pipeline with `raise_on_error=False` and maps each
error back to the job that queued the command; that job alone is repaired (a key
of its own replaced while it ran: delete it, write it again from memory) or
failed (`fail_alone`), and its error says what could not be read.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
from redis.client import Pipeline
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.utils import now

from dispatcher import rqstore
from dispatcher.channels import JOB_FUNCTION, LEGACY_JOB_FUNCTIONS, kind_of
from dispatcher.history import UNREADABLE, History
from dispatcher.keys import Kind
from workers.attempt import failure_ttl
from workers.channels import DELIVERERS, UnknownPayload, channel_of


class Worker(Protocol):
    """What reading, repairing and failing jobs need of the worker (workers.worker.DispatcherWorker)."""

    name: str
    connection: redis.Redis
    job_class: type[Job]
    serializer: Any
    history: History
    queues: list[Queue]
    log: logging.Logger

    def count_finished(self, pipe: Pipeline, succeeded: int, failed: int, seconds: float = 0.0) -> None: ...

#: Longest error text kept from an exception about garbage (it may quote the garbage).
_MAX_ERROR = 300


class UnreadableJob(ValueError):
    """A job's Redis data cannot be read as a Dispatcher job; the message says what."""


class JobGone(Exception):
    """A popped job that must not run: deleted (rq-dashboard's Delete) or canceled (`rq cancel`)."""


@dataclass
class Poisoned:
    """A job to fail alone, with what could not be read; `job` and `execution` when they got that far."""

    job_id: str
    #: The queue it was popped from.
    queue: Queue
    error: str
    job: Job | None = None
    execution: Execution | None = None


@dataclass
class Batch:
    """One pipeline's commands grouped into spans (one per job), and each span's errors after it ran."""

    _spans: list[tuple[int, int]] = field(default_factory=list)
    _commands: list[tuple[tuple, dict]] = field(default_factory=list)
    _replies: list[Any] = field(default_factory=list)

    @contextlib.contextmanager
    def span(self, pipe: Pipeline, keep_on_error: bool = True) -> Iterator[int]:
        """Group the commands queued inside the block; yields the span's index.

        If the block raises and not `keep_on_error`, its commands are dropped from the pipeline.
        """
        start = len(pipe.command_stack)
        index = len(self._spans)
        self._spans.append((start, start))
        try:
            yield index
        except BaseException:
            if not keep_on_error:
                del pipe.command_stack[start:]
            raise
        finally:
            self._spans[index] = (start, len(pipe.command_stack))

    def execute(self, pipe: Pipeline) -> list[Any]:
        """Run the pipeline; errors come back as replies (a connection error still raises)."""
        self._commands = list(pipe.command_stack)
        self._replies = pipe.execute(raise_on_error=False)
        return self._replies

    def failed(self, index: int) -> list[tuple[tuple, Exception]]:
        """The commands of span `index` that answered an error, with the error."""
        start, end = self._spans[index]
        return [
            (self._commands[i][0], reply)
            for i, reply in enumerate(self._replies[start:end], start)
            if isinstance(reply, Exception)
        ]

    def start(self, index: int) -> int:
        """The position of span `index`'s first command (and reply) in the pipeline."""
        return self._spans[index][0]

    def commands(self, index: int) -> list[tuple[tuple, dict]]:
        start, end = self._spans[index]
        return self._commands[start:end]

    def error(self, index: int) -> str | None:
        """What span `index`'s first failed command met, naming the key, or None."""
        failed = self.failed(index)
        if not failed:
            return None
        args, exc = failed[0]
        if args[0] in ("EVALSHA", "EVAL"):
            return f"a script on its keys failed ({short(exc)})"
        return f"its key {_text(args[1]) if len(args) > 1 else '?'} cannot be used ({short(exc)})"


def short(exc: BaseException | str) -> str:
    return str(exc).split("\n")[0][:_MAX_ERROR]


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# --- reading a job ---------------------------------------------------------------------------


def read_job(
    worker: Worker, queue: Queue, job_id: str, raw: dict | Exception
) -> tuple[Job, Kind, dict, str | None]:
    """The job, its kind, its data and its webhook host (None for emails), from its HGETALL reply
    (popped from `queue`).

    Raises UnreadableJob saying what cannot be read, JobGone for a job deleted or canceled.
    """
    if isinstance(raw, Exception):
        raise UnreadableJob(f"its record cannot be read ({short(raw)})")
    if not raw:
        raise JobGone("deleted")
    if rqstore.was_canceled(raw):
        raise JobGone("canceled")
    job = _restore(worker, job_id, raw)
    if job.origin != queue.name:
        raise UnreadableJob(f"its origin {job.origin[:80]!r} is not this queue")
    if getattr(job, "_unreadable_meta", None) is not None or not isinstance(job.meta, dict):
        raise UnreadableJob("its meta cannot be read")
    try:
        func_name, args = job.func_name, job.args
    except Exception as exc:  # the serializer's own error types
        raise UnreadableJob(f"its data cannot be decoded ({type(exc).__name__}: {short(exc)})") from None
    if func_name != JOB_FUNCTION and func_name not in LEGACY_JOB_FUNCTIONS:
        raise UnreadableJob(f"{str(func_name)[:80]!r} is not a Dispatcher job function")
    if not isinstance(args, list | tuple) or len(args) != 1 or not isinstance(args[0], dict):
        raise UnreadableJob("its data is not a Dispatcher job's arguments")
    data = args[0]
    try:
        kind = channel_of(func_name, data)
    except UnknownPayload as exc:
        raise UnreadableJob(str(exc)) from None
    _check_retry(data)
    return job, kind, data, DELIVERERS[kind].host(data)


def _restore(worker: Worker, job_id: str, raw: dict) -> Job:
    job = worker.job_class(job_id, connection=worker.connection, serializer=worker.serializer)
    try:
        job.restore(raw)
        return job
    except Exception as exc:
        error = exc
    # Name the field: the one whose removal makes the rest restorable.
    for name in raw:
        if name == b"data":
            continue
        trial = {k: v for k, v in raw.items() if k != name}
        try:
            worker.job_class(job_id, connection=worker.connection, serializer=worker.serializer).restore(trial)
        except Exception:
            continue
        raise UnreadableJob(f"its field {_text(name)[:40]!r} cannot be read ({type(error).__name__}: {short(error)})")
    raise UnreadableJob(f"its record cannot be read ({type(error).__name__}: {short(error)})")


def _check_retry(data: dict) -> None:
    """The retry policy `decide` will read: max_attempts a positive int, backoff a list of seconds."""
    retry = data.get("retry", {})
    attempts = retry.get("max_attempts", 1) if isinstance(retry, dict) else None
    backoff = retry.get("backoff", []) if isinstance(retry, dict) else None
    if (
        not isinstance(attempts, int)
        or isinstance(attempts, bool)
        or attempts < 1
        or not isinstance(backoff, list)
        or not all(isinstance(d, int | float) and not isinstance(d, bool) and d >= 0 for d in backoff)
    ):
        raise UnreadableJob("its retry policy cannot be read")


# --- repairing and failing --------------------------------------------------------------------


def own_keys(job_id: str, worker: Worker) -> dict[str, bytes]:
    """The keys that belong to this one job, with the type each must have."""
    return rqstore.job_keys(worker.queues[0], job_id) | {worker.history.keys.attempts(job_id): b"hash"}


def repair_and_replay(worker: Worker, job: Job, batch: Batch, index: int, attempt_number: int) -> bool:
    """Span `index` of `batch` failed on keys of this job's own of the wrong type: delete them, write
    the job's hash again from memory if it was one of them, replay the span's commands on those keys.

    True if that worked; False if a failure was on another key, or not a wrong type, or the replay failed.
    """
    own = own_keys(job.id, worker)
    failed = [_keys_of(args) for args, _exc in batch.failed(index)]
    # A command names its key; a failed script does not say which of its keys failed it: any of
    # the job's own among them may have.
    suspects = {key for keys in failed for key in keys if len(keys) == 1 or key in own}
    if not suspects or not suspects <= own.keys():
        return False
    connection = worker.connection
    with connection.pipeline(transaction=False) as pipe:
        for key in suspects:
            pipe.type(key)
        types = pipe.execute()
    broken = {key for key, t in zip(suspects, types, strict=True) if t not in (own[key], b"none")}
    if not broken or any(not broken & set(keys) for keys in failed):
        return False  # a failure on keys of the right type: something else failed (out of memory, say)
    with connection.pipeline(transaction=False) as pipe:
        for key in broken:
            pipe.delete(key)
        if job.key in broken:
            job.save(pipeline=pipe)
        if worker.history.keys.attempts(job.id) in broken:
            pipe.hset(worker.history.keys.attempts(job.id), "n", attempt_number)
        for args, options in batch.commands(index):
            if broken & set(_keys_of(args)):
                pipe.execute_command(*args, **options)
        replies = pipe.execute(raise_on_error=False)
    if any(isinstance(r, Exception) for r in replies):
        return False
    worker.log.warning("Worker %s: job %s: replaced its keys of the wrong type %s", worker.name, job.id, sorted(broken))
    return True


def _keys_of(args: tuple) -> list[str]:
    """The keys a queued command acts on: a script's KEYS, else its first argument."""
    if args and args[0] in ("EVALSHA", "EVAL") and len(args) > 2:
        return [_text(key) for key in args[3 : 3 + int(args[2])]]
    return [_text(args[1])] if len(args) > 1 else []


def fail_alone(worker: Worker, poisoned: list[Poisoned]) -> None:
    """Mark each job failed, with an error saying what could not be read, whatever its keys hold.

    A key of the job's own that has the wrong type is deleted first (it belongs to that job
    only); shared keys are only ever added to. Never raises for one job's garbage.
    """
    connection = worker.connection
    with connection.pipeline(transaction=False) as pipe:
        for item in poisoned:
            for key in own_keys(item.job_id, worker):
                pipe.type(key)
        types = pipe.execute(raise_on_error=False)
    with connection.pipeline(transaction=False) as pipe:
        for i, item in enumerate(poisoned):
            keys = own_keys(item.job_id, worker)
            kinds = dict(zip(keys, types[i * len(keys) : (i + 1) * len(keys)], strict=True))
            for key, expected in keys.items():
                if kinds[key] not in (expected, b"none"):
                    pipe.delete(key)
            job = item.job or worker.job_class(item.job_id, connection=connection, serializer=worker.serializer)
            ttl = failure_ttl(job)
            ended = now()
            error = f"{UNREADABLE}: {item.error}"
            rqstore.fail_unreadable(
                pipe, item.queue, job, item.execution, error, worker.name, ended, ttl, kinds[job.key] == b"hash"
            )
            kind = kind_of(item.job_id)
            if kind is not None:
                worker.history.count(
                    pipe, kind, item.job_id, succeeded=False, at=ended, attempt=None, error=error, ttl=ttl
                )
            else:
                pipe.expire(worker.history.keys.attempts(item.job_id), ttl)
        worker.count_finished(pipe, 0, len(poisoned))
        replies = pipe.execute(raise_on_error=False)
    errors = [r for r in replies if isinstance(r, Exception)]
    if errors:
        worker.log.error("Worker %s: failing %d unreadable job(s) met %s", worker.name, len(poisoned), short(errors[0]))
