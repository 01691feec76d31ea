"""Everything that depends on RQ's storage layout or its private functions, in one place.

Dispatcher writes RQ's structures itself where RQ's public API costs too much (a job hash per
request, a batch of pops, the bookkeeping of many jobs in one pipeline) or has no call for what it
needs (requeueing an abandoned job atomically, scheduling to the millisecond), reads RQ's fields
and results for the status view, and calls a few of RQ's private functions. Key names come from
RQ's classes and prefix (RQ_KEY_PREFIX), never from strings written by hand. A new RQ release is
checked here and in the contract tests: tests/test_enqueue.py, tests/test_rq_tools.py, tests/test_rq_executions.py,
tests/test_rq_prefix.py, tests/test_worker_contract.py (pyproject.toml pins rq narrowly for it).
"""

from __future__ import annotations

import base64
import functools
import json
import time
import zlib
from datetime import datetime
from enum import Enum
from typing import Any, cast
from uuid import uuid4

import redis
from redis.client import Pipeline
from redis.commands.core import Script
from redis.typing import EncodableT
from rq import Queue
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, ScheduledJobRegistry
from rq.results import Result
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from rq.utils import as_text, current_timestamp, now, utcformat

# --- Writing jobs (the API) ------------------------------------------------------------------


def job_data(function: str, payload: dict) -> bytes:
    """A job hash's `data` field as RQ writes it with the JSON serializer: (function, instance,
    args, kwargs), compressed. Level 1, the fastest: RQ decompresses any level, and zlib was a
    sixth of a batch's time."""
    return zlib.compress(JSONSerializer.dumps((function, None, (payload,), {})), 1)


#: Writes jobs as RQ's `Queue.enqueue_many` does (hash, queue list, the set of queues) and indexes
#: them; or, given a due time, as RQ's `Queue.enqueue_at` does (hash without `enqueued_at`, the
#: queue's ScheduledJobRegistry scored by the due time, the set of queues). KEYS: the queue list,
#: RQ's set of queues, our job index, the wake list, the queue's scheduled registry, the key of the
#: request's idempotency record (empty without one), for a batch its hash and its list of job ids
#: (empty without one), then the lists of ordered deliveries the jobs join (KEYS[9] on, if any).
#: ARGV: the job key prefix, the index score, the field/value pairs every job shares (a JSON array:
#: one argument to pack, not 26), WAKE_TOKENS, the idempotency record and its TTL, the due time
#: (Unix seconds; empty: now), the batch's fields (a JSON array) and their TTL, the ordered lists'
#: TTL, how many (list, job) pairs there are (n: the lists are KEYS[9] to KEYS[8 + n]) and their
#: n job ids, then
#: per job its id, data, meta, description and created/enqueued time. Answers an earlier record under
#: the key, writing nothing, or nil. With the record written here, in the same atomic script as the
#: jobs, two requests with one key cannot both enqueue, and none can see the key taken but its jobs
#: not yet written. (dispatcher.idempotency) One script is atomic, and a
#: script that fails on its first write (out of memory, say) has written nothing; the job keys are
#: new random ids, so no later write can fail on a wrong type. (The job keys are not declared: RQ runs
#: on one Redis, not a cluster.)
_WRITE_JOBS = Script(
    None,  # type: ignore[arg-type]  # called with an explicit client
    b"""
if KEYS[6] ~= '' then
  local earlier = redis.call('GET', KEYS[6])
  if earlier then return earlier end
  redis.call('SET', KEYS[6], ARGV[5], 'EX', ARGV[6])
end
local prefix, score, shared, due = ARGV[1], ARGV[2], cjson.decode(ARGV[3]), ARGV[7]
local ordered = tonumber(ARGV[11])
local ids, scored, scheduled = {}, {}, {}
for i = 12 + ordered, #ARGV, 5 do
  local id = ARGV[i]
  if due == '' then
    redis.call('HSET', prefix .. id, 'data', ARGV[i + 1], 'meta', ARGV[i + 2], 'description', ARGV[i + 3],
      'created_at', ARGV[i + 4], 'enqueued_at', ARGV[i + 4], unpack(shared))
  else
    redis.call('HSET', prefix .. id, 'data', ARGV[i + 1], 'meta', ARGV[i + 2], 'description', ARGV[i + 3],
      'created_at', ARGV[i + 4], unpack(shared))
    scheduled[#scheduled + 1] = due
    scheduled[#scheduled + 1] = id
  end
  ids[#ids + 1] = id
  scored[#scored + 1] = score
  scored[#scored + 1] = id
end
-- In slices: unpack() has a limit on how many values it returns.
for i = 1, #ids, 1000 do
  if due == '' then
    redis.call('RPUSH', KEYS[1], unpack(ids, i, math.min(i + 999, #ids)))
  else
    redis.call('ZADD', KEYS[5], unpack(scheduled, 2 * i - 1, math.min(2 * i + 1998, #scheduled)))
  end
  redis.call('ZADD', KEYS[3], unpack(scored, 2 * i - 1, math.min(2 * i + 1998, #scored)))
end
redis.call('SADD', KEYS[2], KEYS[1])
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[7], unpack(cjson.decode(ARGV[8])))
  for i = 1, #ids, 1000 do
    redis.call('RPUSH', KEYS[8], unpack(ids, i, math.min(i + 999, #ids)))
  end
  redis.call('EXPIRE', KEYS[7], ARGV[9])
  redis.call('EXPIRE', KEYS[8], ARGV[9])
end
-- Ordered endpoints' deliveries join their lists here, in the script that writes them: a list's
-- order is the order in which their jobs were accepted, however many publish at once. A list's
-- TTL only ever grows.
for k = 1, ordered do
  local list = KEYS[8 + k]
  redis.call('RPUSH', list, ARGV[11 + k])
  if redis.call('TTL', list) < tonumber(ARGV[10]) then redis.call('EXPIRE', list, ARGV[10]) end
end
-- Wake idle workers that serve several queues (they block on this list, not on a queue): one
-- token per job, at most WAKE_TOKENS in the list however long no worker takes them. A scheduled
-- job wakes no one: RQ's scheduler moves it to the queue list when due, and the workers' next pop
-- finds it there.
local room = due == '' and tonumber(ARGV[4]) - redis.call('LLEN', KEYS[4]) or 0
if room > 0 and #ids > 0 then
  local tokens = {}
  for i = 1, math.min(room, #ids) do tokens[i] = 1 end
  redis.call('RPUSH', KEYS[4], unpack(tokens))
end
""",
)

#: Wake tokens the list holds at most: as many idle multi-queue workers as an enqueue wakes at once.
WAKE_TOKENS = 16


def write_jobs(
    client: redis.Redis | Pipeline,
    queue_name: str,
    index_key: str,
    wake_key: str,
    score: float,
    shared: str,
    jobs: list[Any],
    once: tuple[str, str, int] | None = None,
    due: float | None = None,
    batch: tuple[str, str, str, int] | None = None,
    ordered: list[tuple[str, str]] | None = None,
    ordered_ttl: int = 0,
) -> bytes | None:
    """Write jobs (id, data, meta, description, created time, five per job, flat) to queue `queue_name`,
    index them in `index_key` and wake idle workers (`wake_key`), in one script: all or none.

    `once`: (key, record, ttl) of an idempotency record: the jobs are written only if `key` is free,
    and `record` with them. Returns the record found under `key` instead, if any (writing nothing).
    `due`: Unix time the jobs are scheduled for (with `shared` fields of status `scheduled`); None: now.
    RQ scores its scheduled registry in whole seconds and its scheduler moves a job once the current
    whole second reaches its score; the exact due time as the score is never moved early, and the
    status view shows it as `next_attempt_at` to the millisecond.
    `batch`: its hash key, its job list key, its fields (a JSON array) and their TTL, written with the jobs.
    `ordered`: (list key, job id) pairs: each job id is appended to its list (an ordered endpoint's
    deliveries of one ordering key, workers.endpoints) with the jobs, so in acceptance order; each
    list then lives at least `ordered_ttl` seconds.
    """
    record, ttl, once_key = "", 0, ""
    if once is not None:
        if not isinstance(client, redis.Redis):
            raise TypeError("an idempotency record needs the script's answer: give a client, not a pipeline")
        once_key, record, ttl = once
    batch_keys, batch_args = ["", ""], ["", 0]
    if batch is not None:
        batch_keys, batch_args = list(batch[:2]), [batch[2], batch[3]]
    keys = [
        Queue.redis_queue_namespace_prefix + queue_name,
        Queue.redis_queues_keys,
        index_key,
        wake_key,
        ScheduledJobRegistry.key_template.format(queue_name),
        once_key,
        *batch_keys,
        *(key for key, _ in ordered or ()),
    ]
    when = "" if due is None else repr(due)
    args: list[Any] = [
        Job.redis_job_namespace_prefix, score, shared, WAKE_TOKENS, record, ttl, when, *batch_args,
        ordered_ttl, len(ordered or ()), *(job_id for _, job_id in ordered or ()), *jobs,
    ]
    if isinstance(client, redis.Redis) and len(jobs) > 5:
        # A batch's arguments run to megabytes: let a pipeline check that Redis has the script
        # (SCRIPT EXISTS) instead of sending them twice after a NOSCRIPT answer.
        with client.pipeline(transaction=False) as pipe:
            _WRITE_JOBS(keys, args, client=pipe)
            (earlier,) = pipe.execute()
    else:
        earlier = _WRITE_JOBS(keys, args, client=client)
    return cast(bytes | None, earlier) if once is not None else None


def job_states(connection: redis.Redis, job_ids: list[str]) -> list[tuple[bytes | None, bytes | None]]:
    """Each job's RQ status and end time (None, None for a job that is gone), in one round trip."""
    with connection.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hmget(Job.redis_job_namespace_prefix + job_id, "status", "ended_at")
        return [(status, ended) for status, ended in pipe.execute()]


def announce_queues(connection: redis.Redis, queues: list[Queue]) -> None:
    """List `queues` in RQ's set of queues, as RQ does on a queue's first enqueue: `rq info` and
    rq-dashboard then show every queue a worker serves, even one that never had a job."""
    connection.sadd(Queue.redis_queues_keys, *(queue.key for queue in queues))


#: The fields of a job's hash that `enqueue_many` fills per job; RQ's template supplies the rest.
#: (`_WRITE_JOBS` names them too.)
OWN_FIELDS = frozenset({"data", "meta", "description", "created_at", "enqueued_at"})


@functools.cache
def rq_fields(
    function: str,
    queue_name: str,
    result_ttl: int,
    failure_ttl: int,
    timeout: int,
    status: JobStatus = JobStatus.QUEUED,
) -> str:
    """The hash fields RQ writes for every job of `status` (queued or scheduled) with these settings,
    from one job RQ builds itself.

    As a JSON array of field, value, field, value...: `_WRITE_JOBS` decodes it.
    """
    job = Job.create(
        function,
        args=({},),
        connection=redis.Redis(),  # never connected: `to_dict` does not touch Redis
        result_ttl=result_ttl,
        failure_ttl=failure_ttl,
        timeout=timeout,
        status=status,
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


# --- Popping and starting (the worker) -------------------------------------------------------

# KEYS: per queue, highest priority first, its list and its intermediate list. ARGV: how many.
# Moves up to ARGV[1] ids as RQ's single-queue dequeue does (LMOVE into the queue's intermediate
# list, where a job whose worker dies at once is found again), the first queue drained first, in one
# round trip (so atomically). The first id of a queue by LMOVE, which also tells an empty queue; any
# more in three commands whatever their number (LRANGE, LTRIM, RPUSH), not one each. Answers one
# list of ids per queue.
_POP_MANY = Script(
    None,  # type: ignore[arg-type]  # called with an explicit client
    b"""
local left = tonumber(ARGV[1])
local popped = {}
for q = 1, #KEYS, 2 do
  local ids = {}
  if left > 0 then
    local first = redis.call('LMOVE', KEYS[q], KEYS[q + 1], 'LEFT', 'RIGHT')
    if first then
      ids[1] = first
      left = left - 1
      if left > 0 then
        local more = redis.call('LRANGE', KEYS[q], 0, left - 1)
        if #more > 0 then
          redis.call('LTRIM', KEYS[q], #more, -1)
          redis.call('RPUSH', KEYS[q + 1], unpack(more))
          for i = 1, #more do ids[#ids + 1] = more[i] end
          left = left - #more
        end
      end
    end
  end
  popped[#popped + 1] = ids
end
return popped
""",
)


def pop(
    connection: redis.Redis, queues: list[Queue], limit: int, block: float | None, wake_key: str
) -> list[tuple[Queue, bytes]]:
    """Up to `limit` jobs, each with its queue, moved from `queues` (highest priority first) into
    their intermediate lists, as RQ's single-queue dequeue moves them (so a worker that dies now
    leaves them where they can be found); waiting up to `block` seconds for the first.

    RQ's multi-queue dequeue (BLPOP) loses a job whose worker dies right after it; BLMOVE waits on
    one list only. So a worker of one queue waits on that queue; a worker of several waits on the
    wake list, to which the API adds a token with every enqueue (a job queued by RQ's own tools
    waits for the end of the `block`, then is found by the next pop).
    """
    if block and len(queues) == 1:
        (queue,) = queues
        # redis-py's stub says an int timeout; BLMOVE takes seconds as a float.
        first = connection.blmove(queue.key, queue.intermediate_queue_key, block)  # type: ignore[arg-type]
        if first is None:
            return []
        popped = [(queue, cast(bytes, first))]  # responses are not decoded
        return popped + _pop_many(connection, queues, limit - 1) if limit > 1 else popped
    popped = _pop_many(connection, queues, limit)
    if popped or not block:
        return popped
    if connection.blpop([wake_key], block) is None:  # type: ignore[arg-type]  # (seconds as a float)
        return []
    return _pop_many(connection, queues, limit)


def _pop_many(connection: redis.Redis, queues: list[Queue], limit: int) -> list[tuple[Queue, bytes]]:
    keys = [key for queue in queues for key in (queue.key, queue.intermediate_queue_key)]
    popped = cast(list[list[bytes]], _POP_MANY(keys=keys, args=[limit], client=connection))
    return [(queue, job_id) for queue, ids in zip(queues, popped, strict=True) for job_id in ids]


# --- Executions and registries of a batch (the worker) -------------------------------------------
#
# What RQ's Execution.create and Execution.delete and a registry's add write, for a whole batch of
# jobs: the keys every job of a batch shares (the started registry, the worker's executions set, the
# finished registry) get one command with many members, not one per job. The job's own keys (its
# execution hash and its execution registry) are written per job, in its span of the pipeline.


def _score(ttl: int) -> int | str:
    """A registry entry's score as RQ's registries compute it: now + ttl; -1 never expires."""
    return "+inf" if ttl == -1 else (ttl if ttl < 0 else current_timestamp() + ttl)


def new_execution(job: Job, worker_name: str) -> Execution:
    """An execution of `job` by `worker_name`, as Execution.create makes it, not yet written."""
    execution = Execution(id=uuid4().hex, job_id=job.id, connection=job.connection, worker_name=worker_name)
    execution._job = job  # what Execution.create sets: its `job` property reads it
    return execution


def register_executions(pipe: Pipeline, started: list[tuple[Job, Execution, int]]) -> None:
    """What Execution.create writes to the keys its jobs share, for (job, execution, ttl) of a batch:
    each started registry, one ZADD; the worker's executions set, one SADD and its EXPIRE. Queue it
    before the jobs' own commands, so no prefix of the pipeline leaves a popped job in no list."""
    registries: dict[str, dict[str, int | str]] = {}
    members: dict[str, list[str]] = {}
    longest: dict[str, int] = {}
    for job, execution, ttl in started:
        registries.setdefault(job.started_job_registry.key, {})[execution.composite_key] = _score(ttl)
        if execution.worker_name:
            key = execution.worker_executions_key
            members.setdefault(key, []).append(execution.composite_key)
            longest[key] = max(longest.get(key, ttl), ttl)
    for key, scored in registries.items():
        pipe.zadd(key, scored)  # type: ignore[arg-type]  # "+inf" is a valid score
    for key, ids in members.items():
        pipe.sadd(key, *ids)
        pipe.expire(key, longest[key] + 60)


def save_execution(pipe: Pipeline, execution: Execution, ttl: int) -> None:
    """What Execution.create writes to the job's own keys: the execution's hash and the job's
    execution registry."""
    execution.save(ttl=ttl, pipeline=pipe)
    ExecutionRegistry(job_id=execution.job_id, connection=pipe).add(execution=execution, ttl=ttl, pipeline=pipe)


def forget_execution(pipe: Pipeline, execution: Execution) -> None:
    """What Execution.delete removes from the job's own keys (its execution registry); the shared
    ones and the execution's hash go in `unregister_executions`."""
    ExecutionRegistry(job_id=execution.job_id, connection=execution.connection).remove(execution, pipeline=pipe)


def unregister_executions(pipe: Pipeline, ended: list[tuple[Job, Execution]]) -> None:
    """The rest of what Execution.delete removes, for a batch: the executions' hashes (one DEL), their
    entries in each started registry (one ZREM) and in the worker's executions set (one SREM)."""
    if not ended:
        return
    registries: dict[str, list[str]] = {}
    members: dict[str, list[str]] = {}
    for job, execution in ended:
        registries.setdefault(job.started_job_registry.key, []).append(execution.composite_key)
        if execution.worker_name:
            members.setdefault(execution.worker_executions_key, []).append(execution.composite_key)
    pipe.delete(*(execution.key for _, execution in ended))
    for key, ids in registries.items():
        pipe.zrem(key, *ids)
    for key, ids in members.items():
        pipe.srem(key, *ids)


def add_finished(pipe: Pipeline, finished: list[tuple[Job, int]]) -> None:
    """What FinishedJobRegistry.add writes for (job, result ttl) of a batch: one ZADD per registry."""
    registries: dict[str, dict[str, int | str]] = {}
    for job, ttl in finished:
        registries.setdefault(job.finished_job_registry.key, {})[job.id] = _score(ttl)
    for key, scored in registries.items():
        pipe.zadd(key, scored)  # type: ignore[arg-type]


# --- Finishing (the worker) --------------------------------------------------------------------


def enqueue_at_front(queue: Queue, job: Job, pipe: Pipeline) -> None:
    """Put a started job back at the front of its queue for its next attempt (RQ's private
    `Queue._enqueue_job`: the public calls create a new job)."""
    queue._enqueue_job(job, pipeline=pipe, at_front=True)


def fail(job: Job, error: str, pipe: Pipeline, worker_name: str, execution: Execution, ended: datetime) -> None:
    """RQ's bookkeeping of a job failed for good (its private `Job._handle_failure`: the failed
    registry, which saves the job, and a failure Result). The caller has written its status."""
    job._status = JobStatus.FAILED  # what the registry's save of the job writes
    job._handle_failure(
        error,
        pipeline=pipe,
        worker_name=worker_name,
        execution_id=execution.id,
        execution_started_at=execution.created_at,
        execution_ended_at=ended,
    )


def count_finished(pipe: Pipeline, worker_key: str, succeeded: int, failed: int, seconds: float) -> None:
    """Add to a worker's counts as RQ's `increment_*` do, for a whole batch at once."""
    if succeeded:
        pipe.hincrby(worker_key, "successful_job_count", succeeded)
    if failed:
        pipe.hincrby(worker_key, "failed_job_count", failed)
    if succeeded or failed:
        pipe.hincrbyfloat(worker_key, "total_working_time", seconds)


# --- RQ's worker internals (workers.worker subclasses RQ's worker and runs its own loop) -------------


def exception_handlers(worker: Any) -> list:
    """The exception handlers RQ's worker was given (`exception_handlers=`, `--exception-handler`)."""
    return cast(list, worker._exc_handlers)


def work_horse_killed_handler(worker: Any) -> Any:
    return worker._work_horse_killed_handler


def mark_stop_requested(worker: Any) -> None:
    """What RQ's own request_stop records: a warm shutdown asked for, and when."""
    worker._stop_requested = True
    worker._shutdown_requested_date = now()


def stop_requested(worker: Any) -> bool:
    return bool(worker._stop_requested)


def stop_requested_at(worker: Any) -> datetime | None:
    return cast(datetime | None, worker._shutdown_requested_date)


class Scheduler(RQScheduler):
    """RQ's scheduler, with two differences that make a job start within a second of its due time.

    RQ's compares whole seconds (`current_timestamp()`), so a job due at 09:00:00.001 waited until
    09:00:01 and the pass after; this one moves every job whose due time has passed, to the
    millisecond (a job due on a whole second, as RQ schedules retries, moves as before). And it
    adds wake tokens for what it queued: idle workers of several queues wait on the wake list, not
    on the queues, and would find the jobs only at the end of their wait.
    """

    def __init__(self, *args: Any, wake_key: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wake_key = wake_key

    def enqueue_scheduled_jobs(self) -> None:
        """What RQ's does (its private `Queue._enqueue_job` and `_enqueue_rate_limited_job` per job),
        with the due time in milliseconds."""
        self._status = self.Status.WORKING
        if not self._scheduled_job_registries and self._acquired_locks:
            self.prepare_registries()
        queued = 0
        for registry in self._scheduled_job_registries:
            due = self.connection.zrangebyscore(registry.key, 0, time.time(), start=0, num=1000)
            ids = [as_text(job_id) for job_id in due]
            if not ids:
                continue
            queue = Queue(registry.name, connection=self.connection, serializer=self.serializer)
            jobs = Job.fetch_many(ids, connection=self.connection, serializer=self.serializer)
            with self.connection.pipeline() as pipe:
                for job_id, job in zip(ids, jobs, strict=True):
                    if job is None:
                        registry.remove(job_id, pipeline=pipe)
                    elif not job.has_rate_limit:
                        queue._enqueue_job(job, pipeline=pipe, at_front=job.should_enqueue_at_front())
                        registry.remove(job.id, pipeline=pipe)
                        queued += 1
                pipe.execute()
            for job in jobs:
                if job is not None and job.has_rate_limit:
                    with self.connection.pipeline() as pipe:
                        registry.remove(job.id, pipeline=pipe)
                        queue._enqueue_rate_limited_job(job, pipeline=pipe, at_front=job.should_enqueue_at_front())
                        pipe.execute()
                    queued += 1
        if queued:
            with self.connection.pipeline() as pipe:  # at most WAKE_TOKENS, as the enqueue script keeps it
                pipe.rpush(self.wake_key, *[1] * min(queued, WAKE_TOKENS))
                pipe.ltrim(self.wake_key, -WAKE_TOKENS, -1)
                pipe.execute()
        self._status = self.Status.STARTED


def start_scheduler(
    worker: Any,
    burst: bool,
    logging_level: str | None,
    date_format: str,
    log_format: str,
    wake_key: str,
    name: str | None = None,
) -> None:
    """What RQ's worker does in its private `_start_scheduler` (a process, or in burst mode one pass),
    with Dispatcher's Scheduler, named `name` (default: a new name)."""
    worker.scheduler = Scheduler(
        worker.queues,
        connection=worker.connection,
        logging_level=logging_level if logging_level is not None else worker.log.level,
        date_format=date_format,
        log_format=log_format,
        serializer=worker.serializer,
        wake_key=wake_key,
        name=name,
    )
    worker.scheduler.acquire_locks()
    if worker.scheduler.acquired_locks:
        if burst:
            try:
                worker.scheduler.register_birth()
                worker.scheduler.enqueue_scheduled_jobs()
            finally:
                worker.scheduler.release_locks()
                worker.scheduler.register_death()
        else:
            worker.scheduler.start()


def install_signal_handlers(worker: Any) -> None:
    """RQ's SIGINT/SIGTERM handlers, which call the worker's `request_stop`."""
    worker._install_signal_handlers()


def stop_listener(thread: Any) -> None:
    """Tell RQ's command listener thread (redis-py's PubSubWorkerThread) to stop without waiting:
    its private flag, what its `stop()` clears before it waits."""
    thread._running.clear()


# --- Reading (the status view) -------------------------------------------------------------------

#: A field RQ never writes, set on the job hash by `cancel` beside RQ's status. RQ's scheduler
#: re-saves a due job's whole hash (status `queued`) from a copy it read just before: this field
#: survives that, so the worker and the status view still know the job was canceled.
CANCELED_FIELD = "dispatcher_canceled_at"

#: The job hash fields a status view needs; the job's data (maybe megabytes of attachments) is never read.
VIEW_FIELDS = ("status", "created_at", "enqueued_at", "started_at", "ended_at", "meta", "origin", CANCELED_FIELD)


def read_job_view(pipe: Pipeline, queues: list[Queue], job_id: str) -> int:
    """Queue in `pipe` the reads of what RQ holds of a job for its status view: VIEW_FIELDS of its
    hash, its latest result, its score in each queue's scheduled registry (a job is scheduled in its
    own queue's, and which that is sits in its hash, a round trip away). Returns how many replies
    `job_view` takes."""
    pipe.hmget(queues[0].job_class.key_for(job_id), VIEW_FIELDS)
    pipe.xrevrange(Result.get_key(job_id), "+", "-", count=1)
    for queue in queues:
        pipe.zscore(queue.scheduled_job_registry.key, job_id)
    return 2 + len(queues)


def job_view(replies: list[Any]) -> tuple[list | Exception, float | None, list | Exception]:
    """From `read_job_view`'s replies: the VIEW_FIELDS values (or the error reading them), when the
    job is scheduled for (Unix time, or None) and its latest result (a one-entry XREVRANGE reply)."""
    fields, results, *scores = replies
    scheduled_at = next((score for score in scores if isinstance(score, float)), None)
    return fields, scheduled_at, results


def read_registry_sizes(pipe: Pipeline, queues: list[Queue]) -> int:
    """Queue in `pipe`, per queue, the sizes of its scheduled, started and failed registries, as RQ's
    `count` reports them after its cleanup but without the cleanup's writes (a scrape must not change
    anything): the started and failed registries score an entry by when it expires, so only entries
    not yet expired count; the scheduled registry scores by due time, so every entry counts.
    Returns how many replies each queue takes, in that order."""
    at = current_timestamp()
    for queue in queues:
        pipe.zcard(queue.scheduled_job_registry.key)
        pipe.zcount(queue.started_job_registry.key, f"({at}", "+inf")
        pipe.zcount(queue.failed_job_registry.key, f"({at}", "+inf")
    return 3


def exception_text(results: list) -> str | None:
    """The exception text RQ stored with a result (base64 of zlib, in its `exc_string`), from an
    XREVRANGE reply of its results; None if there is none or it cannot be read."""
    try:
        encoded = results[0][1].get(b"exc_string") if results else None
        if not encoded:
            return None
        return zlib.decompress(base64.b64decode(encoded)).decode(errors="replace")
    except (ValueError, TypeError, AttributeError, IndexError, zlib.error):
        return None


# --- Recovery (the reaper) ---------------------------------------------------------------------

# KEYS: started registry, job hash, queue list, attempts hash, execution hash, scheduled registry,
# the job's execution registry, and (if known) its worker's executions set
# ARGV: registry member, job id, now (ISO), error text, execution id
# The execution is removed wherever RQ lists it, as RQ's Execution.delete does. A job counts as
# abandoned if it is still "started", or "scheduled" without being in the
# scheduled registry (a worker died half-way through rescheduling it). A job whose hash is not a
# hash is requeued as it is: the worker that pops it fails it alone. Garbage in the attempt history
# (or in the execution's other keys) is left alone; it must not make the script fail.
_REQUEUE_STARTED = Script(
    None,  # type: ignore[arg-type]  # called with an explicit client
    b"""
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[5])
if redis.call('TYPE', KEYS[7])['ok'] == 'zset' then redis.call('ZREM', KEYS[7], ARGV[5]) end
if KEYS[8] and redis.call('TYPE', KEYS[8])['ok'] == 'set' then redis.call('SREM', KEYS[8], ARGV[1]) end
local is_hash = redis.call('TYPE', KEYS[2])['ok'] == 'hash'
if is_hash then
  local status = redis.call('HGET', KEYS[2], 'status')
  if status ~= 'started' and not (status == 'scheduled' and not redis.call('ZSCORE', KEYS[6], ARGV[2])) then
    return 0
  end
end
if redis.call('TYPE', KEYS[4])['ok'] == 'hash' then
  local n = redis.call('HGET', KEYS[4], 'n')
  if n and string.match(n, '^%d+$') then
    local raw = redis.call('HGET', KEYS[4], n)
    local ok, attempt = false, nil
    if raw then ok, attempt = pcall(cjson.decode, raw) end
    if ok and type(attempt) == 'table' and (attempt['finished_at'] == cjson.null or attempt['finished_at'] == nil) then
      attempt['finished_at'] = ARGV[3]
      attempt['outcome'] = 'retryable'
      attempt['error'] = ARGV[4]
      redis.call('HSET', KEYS[4], n, cjson.encode(attempt))
    end
  end
end
if is_hash then redis.call('HSET', KEYS[2], 'status', 'queued') end
redis.call('LPUSH', KEYS[3], ARGV[2])
return 1
""",
)


def execution_key(connection: redis.Redis, member: str) -> str:
    """The execution hash of a StartedJobRegistry entry (`job id:execution id`), as RQ names it."""
    job_id, _, execution_id = member.rpartition(":")
    return Execution(execution_id, job_id, connection).key


def requeue_started(
    connection: redis.Redis, queue: Queue, member: str, attempts_key: str, now: str, error: str
) -> bool:
    """Put the job of a StartedJobRegistry entry back at the front of its queue, mark its unfinished
    attempt (in `attempts_key`) with `error`, and remove the execution wherever RQ lists it: its
    job's and its worker's. False if it was no longer running."""
    job_id, _, execution_id = member.rpartition(":")
    key = execution_key(connection, member)
    keys = [
        queue.started_job_registry.key,
        queue.job_class.key_for(job_id),
        queue.key,
        attempts_key,
        key,
        queue.scheduled_job_registry.key,
        ExecutionRegistry(job_id, connection).key,
    ]
    try:  # whose it was, to name that worker's executions set (the script deletes the hash)
        owner = cast(bytes | None, connection.hget(key, "worker_name"))  # not decoded
    except redis.ResponseError:  # not a hash: garbage the script deletes
        owner = None
    if owner:
        worker_name = owner.decode(errors="replace")
        keys.append(Execution(execution_id, job_id, connection, worker_name).worker_executions_key)
    return bool(_REQUEUE_STARTED(keys=keys, args=[member, job_id, now, error, execution_id], client=connection))


# KEYS: intermediate list, job hash, queue list, sighting key. ARGV: job id, LIMBO_AGE, sighting TTL.
# A job in RQ's intermediate list is popped but not started. The first time a reaper sees it there it
# notes when (Redis's clock, the same for every host); it is abandoned once still there LIMBO_AGE later.
# A worker deletes the note as it starts the job, so a job popped again later (a retry) is never
# judged by an earlier pop's note; and the note is only written while the job is in the list.
_REQUEUE_LIMBO = Script(
    None,  # type: ignore[arg-type]  # called with an explicit client
    b"""
if not redis.call('LPOS', KEYS[1], ARGV[1]) then
  redis.call('DEL', KEYS[4])
  return 0
end
local now = tonumber(redis.call('TIME')[1])
local seen = tonumber(redis.call('GET', KEYS[4]) or '')
if not seen then
  redis.call('SET', KEYS[4], now, 'EX', ARGV[3])
  return 0
end
if now - seen < tonumber(ARGV[2]) then return 0 end
redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('DEL', KEYS[4])
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[5], ARGV[4]) end
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind == 'none' then return 0 end
if kind == 'hash' then redis.call('HSET', KEYS[2], 'status', 'queued') end
redis.call('LPUSH', KEYS[3], ARGV[1])
return 1
""",
)


def requeue_limbo(
    connection: redis.Redis, queue: Queue, job_id: str, note_key: str, age: int, ttl: int, stale: str = ""
) -> bool:
    """Note or requeue a job popped into RQ's intermediate list but not started (see _REQUEUE_LIMBO).
    `stale`: its started registry entry without an execution (a worker died while sending the
    pipeline that starts it: the batch's registry entries went first), removed with it."""
    keys = [queue.intermediate_queue_key, queue.job_class.key_for(job_id), queue.key, note_key]
    keys.append(queue.started_job_registry.key)
    return bool(_REQUEUE_LIMBO(keys=keys, args=[job_id, age, ttl, stale], client=connection))


# --- Failing an unreadable job (workers.poison) -------------------------------------------------


def job_keys(queue: Queue, job_id: str) -> dict[str, bytes]:
    """RQ's keys of one job alone, with the type each must have: its hash, results, executions."""
    return {
        queue.job_class.key_for(job_id): b"hash",
        Result.get_key(job_id): b"stream",
        ExecutionRegistry(job_id, queue.connection).key: b"zset",
    }


def fail_unreadable(
    pipe: Pipeline,
    queue: Queue,
    job: Job,
    execution: Execution | None,
    error: str,
    worker_name: str,
    ended: datetime,
    ttl: int,
    keep_record: bool,
) -> None:
    """Queue in `pipe` what RQ shows of a job failed for good, written field by field: RQ's own
    calls would read the job first, and this job cannot be read. `keep_record` False: its hash was
    not a hash (the caller deleted it); write enough of one for RQ and the API."""
    fields: dict[EncodableT, EncodableT] = {"status": JobStatus.FAILED.value, "ended_at": utcformat(ended)}
    if not keep_record:
        nothing = JSONSerializer.dumps((None, None, (), {}))
        fields |= {"origin": queue.name, "created_at": utcformat(ended), "data": zlib.compress(nothing)}
    pipe.hset(job.key, mapping=fields)
    pipe.persist(job.key)
    pipe.expire(job.key, ttl)
    pipe.zadd(queue.failed_job_registry.key, {job.id: ended.timestamp() + ttl})
    pipe.lrem(queue.intermediate_queue_key, 1, job.id)
    if execution is not None:
        pipe.delete(execution.key)
        pipe.zrem(queue.started_job_registry.key, execution.composite_key)
        pipe.srem(execution.worker_executions_key, execution.composite_key)
    Result.create_failure(job, ttl, exc_string=error, worker_name=worker_name, pipeline=pipe)


# --- Ordered deliveries (workers.endpoints) ----------------------------------------------------

# KEYS: an ordered list of job ids (the deliveries of one endpoint and ordering key, in acceptance
# order), the wake list. ARGV: a job id to take out of the list ('' none), a job id whose position
# to answer ('' none), the job key prefix, the queue key prefix, the scheduled registry key prefix,
# CANCELED_FIELD, the `held` reason of a job waiting for its turn, the enqueued time, WAKE_TOKENS.
# Takes the job out; drops from the head every job that will never run again (no hash, finished,
# failed, stopped, canceled); then, if the head waits in its queue's ScheduledJobRegistry held for
# its turn (its meta's `held` reason; not a retry's backoff, not a send_at), moves it to the front
# of its queue as RQ's scheduler would, and wakes idle workers. Answers {head or '', position of
# the asked job or -1}. The job keys are not declared: RQ runs on one Redis, not a cluster.
_ORDER_ADVANCE = Script(
    None,  # type: ignore[arg-type]  # called with an explicit client
    b"""
local list, prefix = KEYS[1], ARGV[3]
if ARGV[1] ~= '' then
  if redis.call('LINDEX', list, 0) == ARGV[1] then
    redis.call('LPOP', list)
  else
    redis.call('LREM', list, 1, ARGV[1])
  end
end
local live = {queued = true, scheduled = true, started = true, deferred = true}
local head = nil
while true do
  head = redis.call('LINDEX', list, 0)
  if not head then break end
  local key = prefix .. head
  if redis.call('TYPE', key)['ok'] == 'hash' then
    local fields = redis.call('HMGET', key, 'status', ARGV[6])
    if fields[1] and live[fields[1]] and not fields[2] then break end
  end
  redis.call('LPOP', list)
end
if head then
  local key = prefix .. head
  local fields = redis.call('HMGET', key, 'status', 'origin', 'meta')
  if fields[1] == 'scheduled' and fields[2] and fields[3] then
    local ok, meta = pcall(cjson.decode, fields[3])
    if ok and type(meta) == 'table' and type(meta['held']) == 'table' and meta['held']['reason'] == ARGV[7]
        and redis.call('ZREM', ARGV[5] .. fields[2], head) == 1 then
      redis.call('HSET', key, 'status', 'queued', 'enqueued_at', ARGV[8])
      redis.call('LPUSH', ARGV[4] .. fields[2], head)
      if redis.call('LLEN', KEYS[2]) < tonumber(ARGV[9]) then redis.call('RPUSH', KEYS[2], 1) end
    end
  end
end
local position = ARGV[2] ~= '' and redis.call('LPOS', list, ARGV[2]) or -1
return {head or '', position}
""",
)


def order_advance(
    client: redis.Redis | Pipeline,
    list_key: str,
    wake_key: str,
    waiting_reason: str,
    remove: str = "",
    ask: str = "",
) -> tuple[str | None, int] | None:
    """Move an ordered list on (see _ORDER_ADVANCE): take `remove` out of it, drop the jobs at its
    head that will never run again, and start the head now if it waits as a scheduled job held
    with `waiting_reason` (a job held for its turn). Returns the head (None: the list is empty) and
    `ask`'s position in the list (-1: not in it); None when queued in a pipeline."""
    template = ScheduledJobRegistry.key_template
    scheduled_prefix = template[: template.index("{")]
    args: list[Any] = [
        remove, ask, Job.redis_job_namespace_prefix, Queue.redis_queue_namespace_prefix, scheduled_prefix,
        CANCELED_FIELD, waiting_reason, utcformat(now()), WAKE_TOKENS,
    ]
    reply = _ORDER_ADVANCE(keys=[list_key, wake_key], args=args, client=client)
    if isinstance(client, Pipeline):  # (a Pipeline is a redis.Redis too)
        return None
    head, position = cast(list, reply)
    return (head.decode() if head else None), int(position)


def job_payload(connection: redis.Redis, job_id: str) -> dict | None:
    """A Dispatcher job's payload (its one argument), or None if it has none that reads."""
    try:
        raw = cast(bytes | None, connection.hget(Job.redis_job_namespace_prefix + job_id, "data"))
        if raw is None:
            return None
        _, _, args, _ = JSONSerializer.loads(zlib.decompress(raw))
    except (redis.ResponseError, zlib.error, ValueError, TypeError):
        return None
    return args[0] if isinstance(args, list) and len(args) == 1 and isinstance(args[0], dict) else None


# --- Job control: cancel, requeue failed jobs (dispatcher.control) ------------------------------

# KEYS: the job hash, its attempts hash, then per queue (highest priority first) its list, its
# ScheduledJobRegistry and its CanceledJobRegistry. ARGV: the job id, the CanceledJobRegistry score
# (what RQ's registry `add` gives it: now), the moment (ISO) for CANCELED_FIELD, the TTL,
# CANCELED_FIELD, the queue names. Answers `done`; `missing` (no hash, or one of another queue); `taken` (queued
# or scheduled but in neither place: a worker popped it, so it is starting); or the job's status
# when it is no longer waiting. Taking the job off its list or registry in the same script that
# marks it is what makes it atomic against a worker's pop (LMOVE) and the scheduler's move.
_CANCEL = Script(
    None,  # type: ignore[arg-type]  # called with an explicit client
    b"""
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return 'missing' end
local fields = redis.call('HMGET', KEYS[1], 'status', 'origin')
local status, origin = fields[1], fields[2]
local q = nil
for i = 6, #ARGV do
  if origin == ARGV[i] then q = i - 5 end
end
if not q then return 'missing' end
if status ~= 'queued' and status ~= 'scheduled' then return status or 'unreadable' end
local list, scheduled, canceled = KEYS[3 * q], KEYS[3 * q + 1], KEYS[3 * q + 2]
if redis.call('LREM', list, 0, ARGV[1]) + redis.call('ZREM', scheduled, ARGV[1]) == 0 then return 'taken' end
redis.call('HSET', KEYS[1], 'status', 'canceled', ARGV[5], ARGV[3])
redis.call('ZADD', canceled, ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 'done'
""",
)


def cancel(connection: redis.Redis, queues: list[Queue], job_id: str, attempts_key: str, ttl: int) -> str:
    """Cancel a queued or scheduled job of `queues` as RQ's `Job.cancel` does (status `canceled`, off
    its queue or ScheduledJobRegistry, into the CanceledJobRegistry), atomically; the job and its
    attempts (`attempts_key`) then expire in `ttl` seconds. Returns what `_CANCEL` answers."""
    keys = [queues[0].job_class.key_for(job_id), attempts_key]
    for queue in queues:
        keys += [queue.key, queue.scheduled_job_registry.key, CanceledJobRegistry(queue.name, queue.connection).key]
    args: list[Any] = [job_id, current_timestamp(), utcformat(now()), ttl, CANCELED_FIELD]
    args += [queue.name for queue in queues]
    reply = _CANCEL(keys=keys, args=args, client=connection)
    return reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)


def was_canceled(raw: dict) -> bool:
    """Whether a job's hash (an HGETALL reply) says it was canceled, by RQ's status or by `cancel`."""
    return raw.get(b"status") == JobStatus.CANCELED.value.encode() or CANCELED_FIELD.encode() in raw


#: What RQ's requeue writes as `exc_info` (it clears the job's exception info: zlib of nothing).
_NO_EXC_INFO = zlib.compress(b"")

# KEYS: the wake list, then per queue its FailedJobRegistry and its list. ARGV: the job key prefix,
# the enqueued time, the cleared exc_info, WAKE_TOKENS, how many queues, their names, then job ids.
# What RQ's FailedJobRegistry.requeue does, for many jobs in one call: a job is requeued only if this
# call takes it out of its queue's FailedJobRegistry (ZREM), so two calls racing requeue it once.
# Its hash loses any expiry its failure gave it (RQ's requeue keeps it; the worker's history drops
# it when the new series begins): a job must not vanish while it waits. Answers id, queue number,
# per requeued job.
_REQUEUE_FAILED = Script(
    None,  # type: ignore[arg-type]  # called with an explicit client
    b"""
local prefix, stamp, exc, nq = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[5])
local done, count = {}, 0
for i = 6 + nq, #ARGV do
  local id = ARGV[i]
  local key = prefix .. id
  if redis.call('TYPE', key)['ok'] == 'hash' then
    local origin = redis.call('HGET', key, 'origin')
    for q = 1, nq do
      if origin == ARGV[5 + q] then
        if redis.call('ZREM', KEYS[2 * q], id) == 1 then
          redis.call('HSET', key, 'status', 'queued', 'started_at', '', 'ended_at', '', 'enqueued_at', stamp,
            'exc_info', exc)
          redis.call('PERSIST', key)
          redis.call('RPUSH', KEYS[2 * q + 1], id)
          done[#done + 1] = id
          done[#done + 1] = q
          count = count + 1
        end
        break
      end
    end
  end
end
local room = math.min(tonumber(ARGV[4]) - redis.call('LLEN', KEYS[1]), count)
if room > 0 then
  local tokens = {}
  for i = 1, room do tokens[i] = 1 end
  redis.call('RPUSH', KEYS[1], unpack(tokens))
end
return done
""",
)


def requeue_failed(
    connection: redis.Redis, queues: list[Queue], job_ids: list[str], wake_key: str
) -> list[tuple[str, Queue]]:
    """Requeue those of `job_ids` that are in their queue's FailedJobRegistry, as RQ's
    `FailedJobRegistry.requeue` does (at the back of their queue, status `queued`), in one script,
    and wake idle workers; returns each requeued job with its queue."""
    if not job_ids:
        return []
    keys = [wake_key]
    for queue in queues:
        keys += [queue.failed_job_registry.key, queue.key]
    args: list[Any] = [Job.redis_job_namespace_prefix, utcformat(now()), _NO_EXC_INFO, WAKE_TOKENS, len(queues)]
    args += [queue.name for queue in queues] + job_ids
    reply = cast(list, _REQUEUE_FAILED(keys=keys, args=args, client=connection))
    return [(reply[i].decode(), queues[int(reply[i + 1]) - 1]) for i in range(0, len(reply), 2)]


def queue_of(connection: redis.Redis, queues: list[Queue], job_id: str) -> Queue | None:
    """The one of `queues` the job belongs to (its hash's `origin`), or None: no such job, or another queue's."""
    try:
        origin = cast(bytes | None, connection.hget(queues[0].job_class.key_for(job_id), "origin"))
    except redis.ResponseError:  # not a hash
        return None
    return next((queue for queue in queues if origin == queue.name.encode()), None)


def failed_page(connection: redis.Redis, queue: Queue, start: int, count: int) -> list[str]:
    """Ids in `queue`'s FailedJobRegistry not yet expired (it scores an entry by when it expires, so
    the oldest failures come first), from position `start`."""
    key = queue.failed_job_registry.key
    ids = cast(list[bytes], connection.zrangebyscore(key, f"({current_timestamp()}", "+inf", start=start, num=count))
    return [job_id.decode(errors="replace") for job_id in ids]


def ended_at(connection: redis.Redis, queue: Queue, job_ids: list[str]) -> list[str | None]:
    """When each job ended (a failed job: when it failed), as RQ writes it (`utcformat`, which sorts
    as text), or None."""
    with connection.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(queue.job_class.key_for(job_id), "ended_at")
        replies = pipe.execute(raise_on_error=False)
    return [r.decode(errors="replace") if isinstance(r, bytes) and r else None for r in replies]


def failed_fields(connection: redis.Redis, queue: Queue, job_ids: list[str]) -> list[tuple[bytes | None, ...]]:
    """Each job's `status`, `created_at` (when it was accepted, as RQ's `utcformat` writes it, which
    sorts as text) and `meta` (JSON), as stored; all None for a job that is gone or unreadable (a
    key that is not a hash). One round trip for them all."""
    with connection.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hmget(queue.job_class.key_for(job_id), "status", "created_at", "meta")
        replies = pipe.execute(raise_on_error=False)
    return [tuple(reply) if isinstance(reply, list) else (None, None, None) for reply in replies]
