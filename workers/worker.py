"""Dispatcher's RQ worker: many deliveries in flight, RQ's bookkeeping batched.

RQ's stock loop runs one job at a time and makes about 57 Redis calls for it; a
delivery mostly waits on the network. This worker keeps up to `concurrency`
attempts running on a thread pool, dequeues and starts jobs in batches, and
records finished ones in one pipeline per batch, with RQ's own functions
(`Execution.create`, `Job.prepare_for_execution`, `Job._handle_success`,
`Job._handle_retry_result`, `Job._handle_failure`). So the jobs, registries,
results and worker entries are exactly RQ's: `rq info`, rq-dashboard and the
API read them as usual.

It listens on one queue only: RQ then moves each job into an intermediate list
as it pops it, from which a job whose worker dies at once can be recovered.
"""

from __future__ import annotations

import signal
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import timedelta

from redis.client import Pipeline
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.results import Result
from rq.utils import now, utcformat
from rq.worker import SimpleWorker, WorkerStatus

from dispatcher.config import DEFAULT_CONCURRENCY, DEFAULT_FAILURE_TTL
from dispatcher.history import Attempt, History
from dispatcher.keys import JOB_FUNCTIONS, Keys, Kind
from workers.attempt import Decision, decide, failure_ttl, history_ttl, max_attempts, record, result_ttl, run, settled
from workers.recovery import Reaper

#: RQ's defaults (420 s TTL, so a ~400 s blocking dequeue, and maintenance every 10 minutes)
#: make an idle worker slow to notice anything; these keep it responsive.
WORKER_TTL = 60
MAINTENANCE_INTERVAL = 60
#: Cap on the wait between reconnection attempts while Redis is away (RQ's default is 60 s).
MAX_CONNECTION_WAIT = 5.0
#: How long an idle worker blocks on the queue; also bounds how late it notices a stop signal.
IDLE_BLOCK = 1.0
#: With deliveries running and room for more, how long to wait for a new job before
#: collecting finished ones: short, so a job arriving then starts at once.
BUSY_BLOCK = 0.005
#: How often the worker renews its RQ heartbeat and checks for maintenance.
HOUSEKEEPING_INTERVAL = 5.0

_KINDS: dict[str, Kind] = {func: kind for kind, func in JOB_FUNCTIONS.items()}

# KEYS: queue list, intermediate list. ARGV: how many. Pops up to ARGV[1] ids the way RQ's
# single-queue dequeue does (LMOVE into the intermediate list), in one round trip.
_POP_MANY = """
local ids = {}
for i = 1, tonumber(ARGV[1]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then break end
  ids[#ids + 1] = id
end
return ids
"""


@dataclass
class Running:
    """A job being delivered: what the main loop needs to record it when the thread is done."""

    job: Job
    kind: Kind
    data: dict
    execution: Execution
    attempt: Attempt
    decision: Decision | None = None

    def perform(self) -> None:
        retry_after = run(self.kind, self.job.id, self.data, self.attempt)
        self.decision = decide(self.data, self.attempt, retry_after)


class DispatcherWorker(SimpleWorker):
    max_connection_wait_time = MAX_CONNECTION_WAIT

    def __init__(  # type: ignore[no-untyped-def]
        self, *args, concurrency: int = DEFAULT_CONCURRENCY, index_ttl: int = DEFAULT_FAILURE_TTL, **kwargs
    ) -> None:
        kwargs.setdefault("worker_ttl", WORKER_TTL)
        kwargs.setdefault("maintenance_interval", MAINTENANCE_INTERVAL)
        super().__init__(*args, **kwargs)
        if len(self.queues) != 1:
            raise ValueError(f"a DispatcherWorker listens on exactly one queue, got {len(self.queues)}")
        self.queue = self.queues[0]
        self.concurrency = concurrency
        self.history = History(self.connection, Keys(self.queue.name))
        self.reaper = Reaper(self.connection, self.queue, self.name, index_ttl)
        self.stop_requested_by_signal = False
        self._force_stop = False
        self._pop_many = self.connection.register_script(_POP_MANY)

    # --- lifecycle -----------------------------------------------------------------------

    def bootstrap(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().bootstrap(*args, **kwargs)
        self.reaper.start()

    def teardown(self) -> None:
        self.reaper.stop()
        super().teardown()

    def request_stop(self, signum, frame) -> None:  # type: ignore[no-untyped-def]
        """First SIGTERM/SIGINT: take no new jobs, finish the deliveries in flight, then exit."""
        self.log.info("Worker %s: warm shut down requested; finishing deliveries in flight", self.name)
        self.stop_requested_by_signal = True
        self._stop_requested = True
        self._shutdown_requested_date = now()
        signal.signal(signal.SIGINT, self.request_force_stop)
        signal.signal(signal.SIGTERM, self.request_force_stop)

    def request_force_stop(self, signum, frame) -> None:  # type: ignore[no-untyped-def]
        """Second signal: put the jobs in flight back on the queue and exit now."""
        if self._shutdown_requested_date and now() - self._shutdown_requested_date < timedelta(seconds=1):
            return  # the same stop, delivered twice (a process group and its parent)
        self.log.warning("Worker %s: cold shut down", self.name)
        self._force_stop = True

    # --- the loop ------------------------------------------------------------------------

    def work(self, burst: bool = False, logging_level: str = "INFO", with_scheduler: bool = True, **_: object) -> bool:
        self.bootstrap(logging_level)
        if with_scheduler:
            self._start_scheduler(burst, logging_level)
        self._install_signal_handlers()
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="delivery")
        running: dict[Future, Running] = {}
        completed = 0
        last_housekeeping = now() - timedelta(seconds=HOUSEKEEPING_INTERVAL)
        try:
            while True:
                if self._force_stop:
                    self._put_back(running.values())
                    break
                if self._stop_requested and not running:
                    break
                if now() - last_housekeeping > timedelta(seconds=HOUSEKEEPING_INTERVAL):
                    self._housekeeping()
                    last_housekeeping = now()
                free = self.concurrency - len(running)
                started = 0
                if free and not self._stop_requested:
                    block = None if burst else (BUSY_BLOCK if running else IDLE_BLOCK)
                    for item in self._start(free, block):
                        running[pool.submit(item.perform)] = item
                        started += 1
                if not running:
                    if burst and not started:
                        break
                    continue
                if len(running) < self.concurrency and not self._stop_requested:
                    done = [future for future in running if future.done()]
                else:
                    done = list(wait(running, timeout=IDLE_BLOCK, return_when=FIRST_COMPLETED)[0])
                if done:
                    self._finish([running.pop(future) for future in done])
                    completed += len(done)
        finally:
            pool.shutdown(wait=not self._force_stop, cancel_futures=True)
            self.teardown()
        return bool(completed)

    def _housekeeping(self) -> None:
        self.heartbeat()
        if self.should_run_maintenance_tasks:
            self.run_maintenance_tasks()

    # --- starting jobs -------------------------------------------------------------------

    def _start(self, limit: int, block: float | None) -> list[Running]:
        """Pop up to `limit` jobs, mark them started as RQ does and begin their attempts."""
        queue, connection = self.queue, self.connection
        ids: list[bytes] = []
        if block:
            first = connection.blmove(queue.key, queue.intermediate_queue_key, block)
            if first is None:
                return []
            ids.append(first)
        ids += self._pop_many(keys=[queue.key, queue.intermediate_queue_key], args=[limit - len(ids)])
        if not ids:
            return []
        with connection.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(queue.job_class.key_for(job_id.decode()))
            raw_jobs = pipe.execute()

        ready: list[tuple[Job, Kind, dict]] = []
        poisoned: list[tuple[str, str]] = []
        for job_id, raw in zip((i.decode() for i in ids), raw_jobs, strict=True):
            try:
                job = self._restore(job_id, raw)
                kind = _KINDS.get(job.func_name or "")
                if kind is None:
                    raise ValueError(f"{job.func_name!r} is not a Dispatcher job function")
                data = job.args[0]
                ready.append((job, kind, data))
            except Exception as exc:  # undecodable or foreign: fail it visibly, keep going
                poisoned.append((job_id, f"{type(exc).__name__}: {exc}"))
        if poisoned:
            self._fail_unreadable(poisoned)
        if not ready:
            return []

        with connection.pipeline(transaction=False) as pipe:
            begins = []
            for job, _kind, data in ready:
                execution = Execution.create(job, self.get_heartbeat_ttl(job), pipeline=pipe, worker_name=self.name)
                job.prepare_for_execution(self.name, pipeline=pipe)
                pipe.persist(job.key)
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                index = len(pipe.command_stack)
                started_at = self.history.begin(pipe, job.id, max_attempts(data), history_ttl(job))
                begins.append((execution, index, started_at))
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            replies = pipe.execute()

        items, settled_items = [], []
        for (job, kind, data), (execution, index, started_at) in zip(ready, begins, strict=True):
            attempt, fresh = History.began(replies[index], started_at)
            item = Running(job, kind, data, execution, attempt)
            if fresh:
                items.append(item)
            else:  # a rerun after a crash whose history is already complete: settle, don't deliver
                item.decision = settled(attempt)
                settled_items.append(item)
        if settled_items:
            self._finish(settled_items, rerecord=False)
        return items

    def _restore(self, job_id: str, raw: dict) -> Job:
        if not raw:
            raise LookupError(f"job {job_id} has no data")
        job = self.job_class(job_id, connection=self.connection, serializer=self.serializer)
        job.restore(raw)
        return job

    def _fail_unreadable(self, poisoned: list[tuple[str, str]]) -> None:
        """Fail jobs that cannot even be read, writing what can be written without decoding them."""
        registry = self.queue.failed_job_registry
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id, error in poisoned:
                self.log.error("Worker %s: job %s cannot be run: %s", self.name, job_id, error)
                job = self.job_class(job_id, connection=self.connection, serializer=self.serializer)
                pipe.hset(job.key, mapping={"status": JobStatus.FAILED.value, "ended_at": utcformat(now())})
                pipe.zadd(registry.key, {job_id: now().timestamp() + failure_ttl(job)})
                pipe.lrem(self.queue.intermediate_queue_key, 1, job_id)
                Result.create_failure(
                    job, failure_ttl(job), exc_string=f"the worker could not read the job: {error}",
                    worker_name=self.name, pipeline=pipe,
                )
            pipe.execute()

    # --- finishing jobs ------------------------------------------------------------------

    def _finish(self, items: list[Running], rerecord: bool = True) -> None:
        """Record a batch of finished attempts and move their jobs on, all in one round trip."""
        broken: list[tuple[Running, str]] = []
        with self.connection.pipeline(transaction=False) as pipe:
            for item in items:
                decision = item.decision
                assert decision is not None
                try:
                    if rerecord or decision.attempt.outcome == "retryable":
                        record(pipe, self.history, item.kind, item.job, decision)
                    self._move_on(pipe, item, decision)
                except Exception as exc:
                    # One job's bad data must not stop the others being recorded.
                    self.log.exception("Worker %s: could not record job %s", self.name, item.job.id)
                    broken.append((item, f"{type(exc).__name__}: {exc}"))
            pipe.execute()
        if broken:
            with self.connection.pipeline(transaction=False) as pipe:
                for item, _error in broken:
                    item.execution.delete(job=item.job, pipeline=pipe)
                pipe.execute()
            self._fail_unreadable([(item.job.id, error) for item, error in broken])

    def _move_on(self, pipe: Pipeline, item: Running, decision: Decision) -> None:
        job, execution = item.job, item.execution
        job.ended_at = now()
        started_at = execution.created_at
        if decision.verdict == "succeeded":
            # What RQ's Job._handle_success writes, less its full re-save of the job (which
            # re-serializes the job's data on every delivery): only the fields that changed.
            ttl = result_ttl(job)
            job.set_status(JobStatus.FINISHED, pipeline=pipe)
            pipe.hset(job.key, "ended_at", utcformat(job.ended_at))
            Result.create(
                job, Result.Type.SUCCESSFUL, ttl=ttl, return_value=decision.result, worker_name=self.name,
                pipeline=pipe, execution_id=execution.id, execution_started_at=started_at,
                execution_ended_at=job.ended_at,
            )
            job.finished_job_registry.add(job, ttl, pipe)
            pipe.expire(job.key, ttl)
            self.increment_successful_job_count(pipeline=pipe)
        elif decision.verdict == "retry":
            # (RQ's Job._handle_retry_result would do this, but it writes the status outside the
            # pipeline: a crash before the pipeline ran would leave a "scheduled" job nowhere.)
            delay = decision.rq_delay
            Result.create_retried(
                job, failure_ttl(job), return_value=None, worker_name=self.name, execution_id=execution.id,
                execution_started_at=started_at, execution_ended_at=job.ended_at, pipeline=pipe,
            )
            job.number_of_retries = (job.number_of_retries or 0) + 1
            if delay:
                self.queue.schedule_job(job, now() + timedelta(seconds=delay), pipeline=pipe)
            else:
                self.queue._enqueue_job(job, pipeline=pipe, at_front=True)
            self.increment_failed_job_count(pipeline=pipe)
        else:
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            job._handle_failure(
                decision.error, pipeline=pipe, worker_name=self.name, execution_id=execution.id,
                execution_started_at=started_at, execution_ended_at=job.ended_at,
            )
            self.increment_failed_job_count(pipeline=pipe)
        execution.delete(job=job, pipeline=pipe)

    def _put_back(self, items) -> None:  # type: ignore[no-untyped-def]
        """Cold shutdown: return every job in flight to the front of the queue, its attempt marked."""
        for item in items:
            member = f"{item.job.id}:{item.execution.id}"
            self.reaper.requeue(member, "interrupted: the worker was shut down during this attempt")
