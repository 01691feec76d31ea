"""Dispatcher's RQ worker: many deliveries in flight, RQ's bookkeeping batched.

RQ's stock loop runs one job at a time and makes about 57 Redis calls for it; a
delivery mostly waits on the network. This worker keeps up to `concurrency`
attempts running on a thread pool, dequeues and starts jobs in batches, and
records finished ones in one pipeline per batch, with RQ's own functions
(`Execution.create`, `Job.prepare_for_execution`, `Result.create`, the
registries) and, where RQ has no public call for it, `dispatcher.rqstore`. So the
jobs, registries, results and worker entries are exactly RQ's: `rq info`,
rq-dashboard and the API read them as usual.

Queues: it serves the priorities' queues of one Dispatcher queue (dispatcher.priorities),
in strict priority order, and pops as RQ's single-queue dequeue does, moving each job
into its queue's intermediate list, from which a job whose worker dies at once can be
recovered (RQ's multi-queue BLPOP would lose it).

Fairness: one webhook host (host and port) may hold at most `max_per_host`
delivery slots. A job popped while its host is at that limit is started in RQ's
sense (registered as this worker's, heartbeat kept) but held without beginning
an attempt; held jobs get slots first, oldest first, as their hosts free some.
A host that has proven fast (its last FAST_SAMPLES attempts each under
FAST_ATTEMPT, none in hand older than that) may use every slot but a share:
capping a fast receiver at a quarter of the slots cost a third of the
throughput to one host, and a share stays free for the others should it turn
slow (it is capped again as soon as one of its attempts passes FAST_ATTEMPT).

Sending rates: a channel with a rate (DISPATCHER_SMTP_RATE for email, dispatcher.ratelimit) shares
it with every worker through Redis. Its jobs are always held when popped, and begin their attempts
as the slots this worker reserved open (workers.pacer). A receiver's answer that we send too fast
(workers.errors.ThrottledDeliveryError) is not an attempt: the attempt is taken back, the shared
rate slowed down, and the job held again, first in line; after MAX_THROTTLES such answers in a row
the next one counts as an ordinary retryable attempt, so a receiver that always says so cannot keep
a message forever.

Poison: one job's garbage (a key of the wrong type, a field that does not parse,
a history that is not ours) fails that job alone. Every batch pipeline runs with
`raise_on_error=False` and its replies are mapped back to the job that queued
them (see `workers.batch`).
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta

import redis
from redis.client import Pipeline
from redis.typing import EncodableT
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.results import Result
from rq.suspension import is_suspended
from rq.utils import now, utcformat
from rq.worker import DequeueStrategy, SimpleWorker, WorkerStatus

from dispatcher import logs, ratelimit, rqstore
from dispatcher.config import DEFAULT_CONCURRENCY, DEFAULT_FAILURE_TTL, Settings, default_max_per_host
from dispatcher.errors import NotReplicated
from dispatcher.history import Attempt, History, UnreadableHistory
from dispatcher.keys import Keys, Kind
from dispatcher.priorities import split
from dispatcher.replicas import Replicas
from dispatcher.tallies import Tally
from workers.attempt import (
    Decision,
    decide,
    failure_ttl,
    history_ttl,
    hold_back,
    max_attempts,
    record,
    result_ttl,
    run,
    settle,
    settled,
)
from workers.attempt import log as log_attempt
from workers.errors import DeliveryHeld, ThrottledDeliveryError
from workers.pacer import Pacer
from workers.poison import Batch, JobGone, Poisoned, fail_alone, read_job, repair_and_replay
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
#: How often the worker renews its RQ heartbeat (and its jobs') and checks for maintenance.
HOUSEKEEPING_INTERVAL = 5.0
#: How often the worker looks for `rq suspend`'s key (RQ's own worker looks before each job).
SUSPENSION_CHECK_INTERVAL = 1.0
#: How long a stopping worker waits for RQ's command listener thread (a daemon thread) to end.
PUBSUB_STOP_WAIT = 2.0
#: Jobs held waiting for their host, per delivery slot; popping pauses beyond it.
HELD_PER_SLOT = 4
#: A host whose last FAST_SAMPLES attempts each took less than FAST_ATTEMPT seconds, and none of
#: whose attempts in hand has run longer, is fast: it may use all slots but `max_per_host`.
FAST_ATTEMPT = 1.0
FAST_SAMPLES = 8
#: Answers "you send too fast" one job may meet in a row without their counting as attempts.
MAX_THROTTLES = 5


@dataclass
class Running:
    """A job started in RQ's sense: delivering (`attempt` set) or held for its host (`attempt` None)."""

    job: Job
    queue: Queue
    kind: Kind
    data: dict
    execution: Execution
    host: str | None
    attempt: Attempt | None = None
    decision: Decision | None = None
    began: float = 0.0
    series_start: int = 0
    #: Whether a throttling answer may pause the job instead of counting as an attempt.
    may_pause: bool = False
    #: The throttling answer that paused the last attempt; how many paused it so far.
    throttled: ThrottledDeliveryError | None = None
    throttles: int = 0
    #: Why the delivery may not go yet (nothing was sent), and for how long: not an attempt.
    held_back: DeliveryHeld | None = None

    def perform(self) -> None:
        attempt = self.attempt
        assert attempt is not None
        try:
            retry_after = run(self.kind, self.job.id, self.data, attempt, self.queue.name, self.may_pause)
            self.decision = decide(self.data, attempt, retry_after, self.series_start)
            settle(self.kind, self.job.id, self.data, self.decision, self.queue.name)
        except ThrottledDeliveryError as exc:  # not an attempt: the worker takes it back (_slow_down)
            self.throttled = exc
            return
        except DeliveryHeld as exc:  # not an attempt either: the job waits as scheduled (_hold_back)
            self.held_back = exc
            return
        except Exception as exc:  # a bug, or data read_job let through: this job fails, the loop goes on
            attempt.outcome = "permanent"
            attempt.error = f"unexpected error: {type(exc).__name__}: {exc}"
            self.decision = Decision("failed", attempt)
        log_attempt(self.kind, self.job.id, self.data, self.decision, self.queue.name)  # in the delivery thread


class DispatcherWorker(SimpleWorker):
    max_connection_wait_time = MAX_CONNECTION_WAIT

    def __init__(  # type: ignore[no-untyped-def]
        self,
        *args,
        concurrency: int = DEFAULT_CONCURRENCY,
        index_ttl: int = DEFAULT_FAILURE_TTL,
        max_per_host: int | None = None,
        rates: dict[Kind, float] | None = None,
        replicas: Replicas | None = None,
        scheduler_name: str | None = None,
        **kwargs,
    ) -> None:
        """`max_per_host`: delivery slots one webhook host may hold (default a quarter, at least 1).
        `rates`: channels' shared sending rates, messages per second, and `replicas`: the replicas an
        outcome must reach (default: the environment's settings, as under `rq worker -w`, whose
        deliveries read them too). `scheduler_name`: its scheduler's, which owns the scheduler lock
        (default: a new one); a worker taking over from one whose Redis went away passes the old
        one's, so it takes back the lock at once rather than wait for it to expire."""
        kwargs.setdefault("worker_ttl", WORKER_TTL)
        kwargs.setdefault("maintenance_interval", MAINTENANCE_INTERVAL)
        super().__init__(*args, **kwargs)
        bases = sorted({split(queue.name)[0] for queue in self.queues})
        if len(bases) != 1:
            raise ValueError(
                "a DispatcherWorker serves the priorities of one Dispatcher queue "
                f"(like dispatcher-high, dispatcher, dispatcher-low), got {', '.join(q.name for q in self.queues)}"
            )
        # RQ options it cannot honour: it records every failure itself and runs no work horse.
        if rqstore.exception_handlers(self):
            raise ValueError("a DispatcherWorker does not support exception_handlers (it records failures itself)")
        if self.disable_default_exception_handler:
            raise ValueError("a DispatcherWorker does not support disable_default_exception_handler")
        if rqstore.work_horse_killed_handler(self) is not None:
            raise ValueError("a DispatcherWorker does not support work_horse_killed_handler (it runs no work horse)")
        self.concurrency = concurrency
        self.max_per_host = max_per_host if max_per_host is not None else default_max_per_host(concurrency)
        if not 1 <= self.max_per_host <= concurrency:
            raise ValueError(f"max_per_host must be from 1 to the concurrency ({concurrency}), got {max_per_host}")
        self.max_held = HELD_PER_SLOT * concurrency
        self.history = History(self.connection, Keys(bases[0]))
        if rates is None or replicas is None:
            settings = Settings.from_env()
            rates = ratelimit.configured(settings) if rates is None else rates
            replicas = settings.replicas if replicas is None else replicas
        self.replicas = replicas
        self.scheduler_name = scheduler_name
        #: Per rate-limited channel, this worker's share of its rate.
        self.pacers = {
            kind: Pacer(shared)
            for kind, shared in ratelimit.shared_rates(self.connection, self.history.keys, rates).items()
        }
        self.reaper = Reaper(self.connection, self.queues, self.name, index_ttl)
        self.stop_requested_by_signal = False
        self._force_stop = False
        #: Jobs held for their host, oldest first; webhooks in the pool per host.
        self.held: deque[Running] = deque()
        self.per_host: Counter[str] = Counter()
        #: Per host: when each of its attempts in hand began (monotonic), and how long its last ones took.
        self.began: dict[str, list[float]] = {}
        self.took: dict[str, deque[float]] = {}
        self.fast_cap = max(self.max_per_host, concurrency - self.max_per_host)
        #: Jobs this worker has finished, one per RQ job count it added (what `max_jobs` counts).
        self.jobs_done = 0
        #: Whether `rq suspend` was in force when last looked at, and when to look again (monotonic).
        self.suspended = False
        self._next_suspension_check = 0.0

    # --- lifecycle -----------------------------------------------------------------------

    def bootstrap(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        logs.ensure_configured()  # under `rq worker -w`, whose set-up covers RQ's loggers only
        super().bootstrap(*args, **kwargs)
        rqstore.announce_queues(self.connection, self.queues)
        self.reaper.start()

    def teardown(self) -> None:
        self.reaper.stop()
        super().teardown()

    def unsubscribe(self) -> None:
        """Stop listening on RQ's command channel. RQ sends UNSUBSCRIBE before it tells its listener
        thread to stop: the thread can read the reply, loop, and wait 60 s for a subscription, with
        RQ waiting on it (a worker that quits soon after starting often did). Told first, it ends
        with the reply."""
        thread = self.pubsub_thread
        if not thread or self.pubsub is None:
            return
        self.log.info("Worker %s: unsubscribing from channel %s", self.name, self.pubsub_channel_name)
        rqstore.stop_listener(thread)  # what stop() does, without its wait: the reply is what wakes the thread
        self.pubsub.unsubscribe()
        thread.join(timeout=PUBSUB_STOP_WAIT)
        self.pubsub.close()

    def request_stop(self, signum, frame) -> None:  # type: ignore[no-untyped-def]
        """First SIGTERM/SIGINT: take no new jobs, finish the deliveries in flight, then exit."""
        self.log.info("Worker %s: warm shut down requested; finishing deliveries in flight", self.name)
        self.stop_requested_by_signal = True
        rqstore.mark_stop_requested(self)
        signal.signal(signal.SIGINT, self.request_force_stop)
        signal.signal(signal.SIGTERM, self.request_force_stop)

    def request_force_stop(self, signum, frame) -> None:  # type: ignore[no-untyped-def]
        """Second signal: put the jobs in flight back on the queue and exit now."""
        requested = rqstore.stop_requested_at(self)
        if requested and now() - requested < timedelta(seconds=1):
            return  # the same stop, delivered twice (a process group and its parent)
        self.log.warning("Worker %s: cold shut down", self.name)
        self._force_stop = True

    # --- the loop ------------------------------------------------------------------------

    def work(
        self,
        burst: bool = False,
        logging_level: str | None = "INFO",
        date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
        log_format: str = DEFAULT_LOGGING_FORMAT,
        max_jobs: int | None = None,
        max_idle_time: int | None = None,
        with_scheduler: bool = True,
        dequeue_strategy: DequeueStrategy | str = DequeueStrategy.DEFAULT,
        **unsupported: object,
    ) -> bool:
        """RQ's work loop with many jobs in flight, on RQ's terms: `rq suspend` and `rq resume`, the
        worker states and counts, `burst` (quit once the queue is empty), `max_jobs` (quit after that
        many jobs) and `max_idle_time` (quit after that many seconds without a job). Raises ValueError,
        before starting, for an option it cannot honour. True if it finished any job."""
        self._refuse_options(max_jobs, max_idle_time, dequeue_strategy, unsupported)
        self.bootstrap(logging_level, date_format, log_format)
        if with_scheduler:
            rqstore.start_scheduler(
                self, burst, logging_level, date_format, log_format, self.history.keys.wake, self.scheduler_name
            )
        rqstore.install_signal_handlers(self)
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="delivery")
        running: dict[Future, Running] = {}
        self.jobs_done = 0
        last_housekeeping = now() - timedelta(seconds=HOUSEKEEPING_INTERVAL)
        idle_since = time.monotonic()

        def submit(items: list[Running]) -> None:
            for item in items:
                running[pool.submit(item.perform)] = item
                if item.host is not None:
                    self.per_host[item.host] += 1
                    item.began = time.monotonic()
                    self.began.setdefault(item.host, []).append(item.began)

        try:
            while True:
                if self._force_stop:
                    self._put_back([*running.values(), *self.held], "interrupted: the worker was shut down")
                    self.held.clear()
                    break
                suspended = self._check_suspension(burst, bool(running or self.held))
                # A burst worker quits when suspended, as RQ's does; any other waits for `rq resume`.
                quitting = rqstore.stop_requested(self) or (burst and suspended)
                if (quitting or suspended) and self.held:
                    self._put_back(list(self.held), None)  # never begun: back to the queue as they were
                    self.held.clear()
                if quitting and not running:
                    break
                if now() - last_housekeeping > timedelta(seconds=HOUSEKEEPING_INTERVAL):
                    self._housekeeping(list(running.values()))
                    last_housekeeping = now()
                started = 0
                if self.held:
                    admitted = self._admit(self.concurrency - len(running))
                    submit(admitted)
                    started += len(admitted)
                free = self.concurrency - len(running)
                room = self.max_held - len(self.held)
                # Under `max_jobs`, never take more jobs than are left to do.
                in_hand = len(running) + len(self.held)
                left = self.concurrency if max_jobs is None else max_jobs - self.jobs_done - in_hand
                may_pop = free > 0 and room > 0 and left > 0 and not quitting and not suspended
                # With nothing running but jobs held for their rate: how long until a slot opens.
                pause = None if running else self._pause()
                if may_pop:
                    if burst or (not running and pause is None and self.get_state() != WorkerStatus.IDLE):
                        block = None  # (just out of work: look once without waiting before reporting idle)
                    else:
                        block = BUSY_BLOCK if running else (pause or IDLE_BLOCK)
                    if block is not None:
                        pause = None  # the pop waited for it (or for a new job)
                    fresh = self._start(min(self.concurrency, free + room, left), free, block)
                    submit(fresh)
                    started += len(fresh)
                if not running:
                    if self.held or started:
                        idle_since = time.monotonic()
                        if pause and not started:  # held only for their rate: wait for a slot to open
                            time.sleep(pause)
                        continue
                    if max_jobs is not None and self.jobs_done >= max_jobs:
                        self.log.info("Worker %s: finished executing %d jobs, quitting", self.name, self.jobs_done)
                        break
                    if burst:
                        self.log.info("Worker %s: done, quitting", self.name)
                        break
                    if suspended:  # nothing to take or wait for until `rq resume`; not idle time, as in RQ
                        time.sleep(IDLE_BLOCK)
                        idle_since = time.monotonic()
                        continue
                    self._report_idle()
                    if max_idle_time is not None and time.monotonic() - idle_since >= max_idle_time:
                        self.log.info("Worker %s: idle for %d seconds, quitting", self.name, max_idle_time)
                        break
                    continue
                idle_since = time.monotonic()
                if may_pop and len(running) < self.concurrency:
                    done = [future for future in running if future.done()]
                else:
                    pause = self._pause() if len(running) < self.concurrency else None
                    timeout = IDLE_BLOCK if pause is None else pause
                    done = list(wait(running, timeout=timeout, return_when=FIRST_COMPLETED)[0])
                if done:
                    finished = [running.pop(future) for future in done]
                    for item in finished:
                        if item.host is not None:
                            self._done_with(item)
                    throttled = [item for item in finished if item.throttled is not None]
                    if throttled:
                        finished = [item for item in finished if item.throttled is None]
                        self._slow_down(throttled)
                    held_back = [item for item in finished if item.held_back is not None]
                    if held_back:
                        finished = [item for item in finished if item.held_back is None]
                        self._hold_back(held_back)
                    if finished:
                        self._finish(finished)
        finally:
            pool.shutdown(wait=not self._force_stop, cancel_futures=True)
            self.teardown()
        return bool(self.jobs_done)

    @staticmethod
    def _refuse_options(
        max_jobs: int | None, max_idle_time: int | None, dequeue_strategy: object, unsupported: dict[str, object]
    ) -> None:
        """Raise ValueError naming the first work() option this loop cannot honour, or a value out of range."""
        for name, value in unsupported.items():
            raise ValueError(f"DispatcherWorker.work() does not support the option {name}={value!r}")
        if dequeue_strategy != DequeueStrategy.DEFAULT:
            strategy = getattr(dequeue_strategy, "value", dequeue_strategy)
            raise ValueError(
                f"dequeue_strategy must be 'default' (a DispatcherWorker serves its queues in priority order), "
                f"got {strategy!r}"
            )
        if max_jobs is not None and max_jobs < 1:
            raise ValueError(f"max_jobs must be at least 1, got {max_jobs!r}")
        if max_idle_time is not None and max_idle_time <= 0:
            raise ValueError(f"max_idle_time must be a positive number of seconds, got {max_idle_time!r}")

    def _check_suspension(self, burst: bool, in_hand: bool) -> bool:
        """Whether `rq suspend` is in force, looked up at most every SUSPENSION_CHECK_INTERVAL. A change is
        logged in one line and shown in the worker's state, as RQ's `check_for_suspension` does."""
        if time.monotonic() < self._next_suspension_check:
            return self.suspended
        self._next_suspension_check = time.monotonic() + SUSPENSION_CHECK_INTERVAL
        suspended = bool(is_suspended(self.connection))
        if suspended and not self.suspended:
            if burst:
                self.log.info("Worker %s: suspended in burst mode, exiting (jobs may remain on the queue)", self.name)
            else:
                self.log.info("Worker %s: suspended, run `rq resume` to resume", self.name)
                self.set_state(WorkerStatus.SUSPENDED)
        elif self.suspended and not suspended:
            self.log.info("Worker %s: resumed", self.name)
            self.set_state(WorkerStatus.BUSY if in_hand else WorkerStatus.IDLE)
        self.suspended = suspended
        return suspended

    def _report_idle(self) -> None:
        """Nothing in hand: RQ's `idle` state (starting jobs sets `busy`, in the same round trip)."""
        if self.get_state() != WorkerStatus.IDLE:
            self.set_state(WorkerStatus.IDLE)

    def count_finished(self, pipe: Pipeline, succeeded: int, failed: int, seconds: float = 0.0) -> None:
        """Queue the worker's counts of a batch of finished jobs in `pipe` (RQ's counts: one failure
        per failed attempt, retried or not, as RQ's own worker counts) and add them to `jobs_done`."""
        rqstore.count_finished(pipe, self.key, succeeded, failed, seconds)
        self.jobs_done += succeeded + failed

    def _housekeeping(self, running: list[Running]) -> None:
        self.heartbeat()
        taken = {id(item) for item in self._taken([*running, *self.held])}
        if taken:  # held jobs the reaper gave to others: never begin them here too
            for item in self.held:
                if id(item) in taken:
                    self.log.warning(
                        "Worker %s: job %s was requeued while Redis was out of reach; dropped", self.name, item.job.id
                    )
            self.held = deque(item for item in self.held if id(item) not in taken)
        self._prolong([item for item in [*running, *self.held] if id(item) not in taken])
        if self.should_run_maintenance_tasks:
            try:
                self.run_maintenance_tasks()
            except (redis.ConnectionError, redis.TimeoutError):
                raise
            except Exception:  # RQ's registry cleanup reading one damaged job must not stop the worker
                self.log.exception("Worker %s: maintenance failed; trying again next time", self.name)

    def _prolong(self, items: list[Running]) -> None:
        """Renew the executions' heartbeats, so RQ's registry cleanup never takes a held job for abandoned."""
        if not items:
            return
        with self.connection.pipeline(transaction=False) as pipe:
            for item in items:
                item.execution.heartbeat(item.queue.started_job_registry, self.get_heartbeat_ttl(item.job), pipe)
            pipe.execute(raise_on_error=False)  # one job's damaged keys: its own problem, seen at its finish

    # --- starting jobs -------------------------------------------------------------------

    def _room(self, host: str | None, planned: Counter[str]) -> bool:
        if host is None:
            return True
        return self.per_host[host] + planned[host] < (self.fast_cap if self._fast(host) else self.max_per_host)

    def _fast(self, host: str) -> bool:
        took = self.took.get(host)
        if took is None or len(took) < FAST_SAMPLES or max(took) >= FAST_ATTEMPT:
            return False
        began = self.began.get(host)
        return not began or time.monotonic() - min(began) < FAST_ATTEMPT

    def _done_with(self, item: Running) -> None:
        """Book a finished attempt against its host: one slot free, and how long it took."""
        host = item.host
        assert host is not None
        self.per_host[host] -= 1
        if not self.per_host[host]:
            del self.per_host[host]
        began = self.began[host]
        began.remove(item.began)
        if not began:
            del self.began[host]
        took = self.took.setdefault(host, deque(maxlen=FAST_SAMPLES))
        took.append(time.monotonic() - item.began)
        if len(self.took) > 4 * self.concurrency * HELD_PER_SLOT:  # forget hosts long gone
            for gone in [h for h in self.took if h not in self.per_host][: len(self.took) // 2]:
                del self.took[gone]

    def _start(self, limit: int, free: int, block: float | None) -> list[Running]:
        """Pop up to `limit` jobs and mark them started as RQ does; begin the attempts of up to `free`
        of them whose host has a slot, and hold the others. Returns the attempts begun."""
        popped = self._pop(limit, block)
        if not popped:
            return []
        planned: Counter[str] = Counter()
        now_flags = []
        for _, _, kind, _, host in popped:
            # (a rate-limited job waits for a slot of its rate: _admit starts it)
            run_now = free > 0 and kind not in self.pacers and self._room(host, planned)
            if run_now:
                free -= 1
                if host is not None:
                    planned[host] += 1
            now_flags.append(run_now)

        batch = Batch()
        started = [(job, rqstore.new_execution(job, self.name), self.get_heartbeat_ttl(job)) for _, job, *_ in popped]
        with self.connection.pipeline(transaction=False) as pipe:
            # RQ's registries first, for the whole batch; then each job's own keys, in its span.
            rqstore.register_executions(pipe, started)
            begins = []
            for (queue, job, kind, data, _host), run_now, (_, execution, ttl) in zip(
                popped, now_flags, started, strict=True
            ):
                with batch.span(pipe):
                    rqstore.save_execution(pipe, execution, ttl)
                    job.prepare_for_execution(self.name, pipeline=pipe)
                    pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                    begin = None
                    if run_now:
                        index = len(pipe.command_stack)
                        begin = (index, self._begin(pipe, queue, kind, job, data))
                begins.append((execution, begin))
            # Started: forget any reaper's note of these pops, so a later pop is judged afresh.
            pipe.delete(*(self.history.keys.limbo(job.id) for _, job, *_ in popped))
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            replies = batch.execute(pipe)

        items: list[Running] = []
        poisoned: list[Poisoned] = []
        for index, ((queue, job, kind, data, host), (execution, begin)) in enumerate(zip(popped, begins, strict=True)):
            error = batch.error(index)
            if error:
                poisoned.append(Poisoned(job.id, queue, error, job, execution))
                continue
            item = Running(job, queue, kind, data, execution, host)
            if begin is None:
                self.held.append(item)
            else:
                items.append(item)
                self._began(item, replies[begin[0]], begin[1], poisoned)
        self._fail_alone(poisoned)
        return [item for item in items if item.attempt is not None and item.decision is None]

    def _admit(self, free: int) -> list[Running]:
        """Begin the attempts of held jobs whose host has a free slot now, and whose channel's rate
        lets them start, oldest first."""
        planned: Counter[str] = Counter()
        chosen: list[Running] = []
        paced = self._paced(free)
        used: Counter[Kind] = Counter()
        for item in self.held:
            if len(chosen) >= free:
                break
            if item.kind in paced and used[item.kind] >= paced[item.kind]:
                continue
            if self._room(item.host, planned):
                chosen.append(item)
                if item.host is not None:
                    planned[item.host] += 1
                if item.kind in paced:
                    used[item.kind] += 1
                    item.may_pause = item.throttles < MAX_THROTTLES
        for kind, count in used.items():
            self.pacers[kind].use(count)
        if not chosen:
            return []
        for item in chosen:
            self.held.remove(item)
        batch = Batch()
        with self.connection.pipeline(transaction=False) as pipe:
            begins = []
            for item in chosen:
                with batch.span(pipe):
                    begins.append(self._begin(pipe, item.queue, item.kind, item.job, item.data))
            replies = batch.execute(pipe)
        poisoned: list[Poisoned] = []
        for index, (item, started_at) in enumerate(zip(chosen, begins, strict=True)):
            error = batch.error(index)
            reply = replies[batch.start(index)]
            if error:
                poisoned.append(Poisoned(item.job.id, item.queue, error, item.job, item.execution))
            else:
                self._began(item, reply, started_at, poisoned)
        self._fail_alone(poisoned)
        return [item for item in chosen if item.attempt is not None and item.decision is None]

    def _paced(self, free: int) -> dict[Kind, int]:
        """Per rate-limited channel with jobs held: how many of them may start now (at most `free`)."""
        if not self.pacers:
            return {}
        waiting = Counter(item.kind for item in self.held if item.kind in self.pacers)
        return {kind: self.pacers[kind].ready(min(free, count)) for kind, count in waiting.items()}

    def _pause(self) -> float | None:
        """Seconds until a job held for its channel's rate may start (None when none is held for one)."""
        if not self.pacers:
            return None
        kinds = {item.kind for item in self.held if item.kind in self.pacers}
        if not kinds:
            return None
        # (at least BUSY_BLOCK: a slot open but unusable for now must not make the loop spin)
        return max(BUSY_BLOCK, min(IDLE_BLOCK, *(self.pacers[kind].wake_in() for kind in kinds)))

    def _slow_down(self, items: list[Running]) -> None:
        """The receiver refused these messages for our sending too fast: take their attempts back
        (nothing was delivered), slow their channels' shared rates down, and hold them again, first."""
        kinds = sorted({item.kind for item in items})
        with self.connection.pipeline(transaction=False) as pipe:
            for item in items:
                assert item.attempt is not None
                self.history.unbegin(pipe, item.job.id, item.attempt.number)
            for kind in kinds:
                self.pacers[kind].shared.slow_down(pipe)
            # (one job's damaged history fails that job at its next begin, not here)
            replies = pipe.execute(raise_on_error=False)[len(items) :]
        for kind, reply in zip(kinds, replies, strict=True):
            pacer = self.pacers[kind]
            pacer.forget()
            codes = sorted({str(item.throttled.status_code) for item in items if item.kind == kind and item.throttled})
            if isinstance(reply, Exception):
                self.log.error("Worker %s: could not slow the %s rate down: %s", self.name, kind, reply)
                continue
            lowered, rate = pacer.shared.slowed(reply)
            self.log.warning(
                "Worker %s: %d %s message(s) refused for sending too fast (%s); they wait without using an "
                "attempt; the shared rate is %s %.3g/s (of %.3g/s)",
                self.name,
                sum(item.kind == kind for item in items),
                kind,
                ", ".join(codes),
                "lowered to" if lowered else "now",
                rate,
                pacer.shared.rate,
            )
        for item in reversed(items):
            item.attempt = item.decision = item.throttled = None
            item.throttles += 1
            self.held.appendleft(item)

    def _hold_back(self, items: list[Running]) -> None:
        """These deliveries may not go yet (nothing was sent): take their attempts back and let them
        wait as scheduled jobs, no longer this worker's, in one round trip."""
        with self.connection.pipeline(transaction=False) as pipe:
            for item in items:
                assert item.attempt is not None and item.held_back is not None
                hold_back(pipe, self.history, item.job, item.queue, item.attempt.number, item.held_back)
                rqstore.forget_execution(pipe, item.execution)
            rqstore.unregister_executions(pipe, [(item.job, item.execution) for item in items])
            for item in items:
                assert item.held_back is not None
                if item.held_back.then is not None:  # once the job is scheduled and no longer this worker's
                    item.held_back.then(pipe)
            # (one job's damaged keys fail it at its next begin, not here)
            pipe.execute(raise_on_error=False)

    def _begin(self, pipe: Pipeline, queue: Queue, kind: Kind, job: Job, data: dict) -> datetime:
        failed = queue.failed_job_registry.key
        return self.history.begin(pipe, kind, job.id, max_attempts(data), history_ttl(job), failed, job.key)

    def _began(self, item: Running, reply: object, started_at, poisoned: list[Poisoned]) -> None:  # type: ignore[no-untyped-def]
        """Read History.begin's reply: an attempt to make, a job already settled, or an unreadable history."""
        try:
            attempt, fresh, item.series_start = History.began(reply, started_at)  # type: ignore[arg-type]
        except UnreadableHistory as exc:
            error = f"its attempt history cannot be read: {exc}"
            poisoned.append(Poisoned(item.job.id, item.queue, error, item.job, item.execution))
            return
        item.attempt = attempt
        if not fresh:  # a rerun after a crash whose history is already complete: settle, don't deliver
            item.decision = settled(attempt)
            self._finish([item], rerecord=False)

    def _pop(self, limit: int, block: float | None) -> list[tuple[Queue, Job, Kind, dict, str | None]]:
        """Pop up to `limit` jobs, highest priority first, and read them; fail alone those that cannot be read."""
        connection = self.connection
        popped = rqstore.pop(connection, self.queues, limit, block, self.history.keys.wake)
        if not popped:
            return []
        with connection.pipeline(transaction=False) as pipe:
            for queue, raw_id in popped:
                pipe.hgetall(queue.job_class.key_for(raw_id.decode(errors="replace")))
            raw_jobs = pipe.execute(raise_on_error=False)
        ready = []
        poisoned = []
        seen: set[str] = set()
        for (queue, raw_id), raw in zip(popped, raw_jobs, strict=True):
            job_id = raw_id.decode(errors="replace")
            if job_id in seen:  # a duplicate queue entry: running it twice would deliver it twice
                connection.lrem(queue.intermediate_queue_key, 1, job_id)
                continue
            seen.add(job_id)
            try:
                ready.append((queue, *read_job(self, queue, job_id, raw)))
            except JobGone as gone:  # RQ's tools took it back after it was queued: never deliver it
                connection.lrem(queue.intermediate_queue_key, 1, job_id)
                if str(gone) == "canceled":  # (RQ's scheduler may have re-saved a canceled job as queued)
                    connection.hset(queue.job_class.key_for(job_id), "status", JobStatus.CANCELED.value)
                self.log.info("Worker %s: job %s was %s; skipped", self.name, job_id, gone)
            except ValueError as exc:  # undecodable, foreign or damaged: fail it visibly, keep going
                poisoned.append(Poisoned(job_id, queue, str(exc)))
        self._fail_alone(poisoned)
        return ready

    def _fail_alone(self, poisoned: list[Poisoned]) -> None:
        if poisoned:
            for item in poisoned:
                self.log.error("Worker %s: job %s cannot be run: %s", self.name, item.job_id, item.error)
            fail_alone(self, poisoned)

    # --- finishing jobs ------------------------------------------------------------------

    def _finish(self, items: list[Running], rerecord: bool = True) -> None:
        """Record a batch of finished attempts and move their jobs on, all in one round trip.

        A job whose own keys turn out to be of the wrong type (replaced while it ran) has those
        keys repaired and its failed commands replayed; failing that, it fails alone.
        """
        if rerecord:
            taken = self._taken(items)
            if taken:
                self._record_taken(taken)
                gone = {id(item) for item in taken}
                items = [item for item in items if id(item) not in gone]
                if not items:
                    return
        batch = Batch()
        broken: list[Poisoned] = []
        succeeded = failed = 0
        working_time = 0.0
        ended_executions: list[tuple[Job, Execution]] = []
        finished: list[tuple[Job, int]] = []
        tally = Tally()  # for /metrics: the batch's attempts, one command per distinct field
        with self.connection.pipeline(transaction=False) as pipe:
            for item in items:
                decision = item.decision
                assert decision is not None
                ended = now()
                # RQ's status and end time of a finished job, in the one write of its hash that records it.
                fields: dict[EncodableT, EncodableT] = {}
                if decision.verdict != "retry":
                    status = JobStatus.FINISHED if decision.verdict == "succeeded" else JobStatus.FAILED
                    fields = {"status": status.value, "ended_at": utcformat(ended)}
                try:
                    with batch.span(pipe, keep_on_error=False):
                        if rerecord or decision.attempt.outcome == "retryable":
                            record(pipe, self.history, item.kind, item.job, decision, fields)
                        elif fields:
                            pipe.hset(item.job.key, mapping=fields)
                        self._move_on(pipe, item, decision, ended, finished)
                except Exception as exc:  # could not even queue the commands: bad data in memory
                    self.log.exception("Worker %s: could not record job %s", self.name, item.job.id)
                    broken.append(
                        Poisoned(item.job.id, item.queue, f"{type(exc).__name__}: {exc}", item.job, item.execution)
                    )
                    continue
                # RQ's worker counts one failure per failed attempt, retried or not; so does this one.
                succeeded += decision.verdict == "succeeded"
                failed += decision.verdict != "succeeded"
                working_time += (ended - item.execution.created_at).total_seconds()
                ended_executions.append((item.job, item.execution))
                if rerecord:  # an attempt made now, not a settled job's rerun
                    tally.add(item.kind, item.queue.name, decision.attempt)
            # RQ's registries, and the worker's counts, once per batch (RQ's calls add one job at a time).
            rqstore.add_finished(pipe, finished)
            rqstore.unregister_executions(pipe, ended_executions)
            self.count_finished(pipe, succeeded, failed, working_time)
            tally.write(pipe, self.history.keys)
            self.replicas.wait(pipe)
            replies = batch.execute(pipe)
        try:
            self.replicas.check(replies)
        except NotReplicated as exc:
            # Recorded on the master only: a failover now would have these jobs delivered again (as
            # the reaper requeues a lost worker's jobs), never lost. Waiting longer would stall
            # every delivery behind one slow replica; the warning says what is at stake.
            self.log.warning("Worker %s: outcomes of %d jobs not on enough replicas: %s", self.name, len(items), exc)
        for index, item in enumerate(items):
            error = batch.error(index)
            assert item.decision is not None
            if error and not repair_and_replay(self, item.job, batch, index, item.decision.attempt.number):
                broken.append(Poisoned(item.job.id, item.queue, error, item.job, item.execution))
        self._fail_alone(broken)

    def _taken(self, items: list[Running]) -> list[Running]:
        """Those of `items` no longer this worker's: out of touch with Redis long enough for its liveness
        key to expire (a host cut off), it had them requeued by another worker's reaper. Costs a round
        trip only when a beat was late or lapsed. (A finish already on its way when the link goes stays
        a race: it lands when the link returns.)"""
        if not items or not self.reaper.out_of_touch(min(item.execution.created_at for item in items).timestamp()):
            return []
        with self.connection.pipeline(transaction=False) as pipe:
            for item in items:
                pipe.zscore(item.queue.started_job_registry.key, item.execution.composite_key)
            scores = pipe.execute(raise_on_error=False)  # (an error: not ours to judge here; kept)
        return [item for item, score in zip(items, scores, strict=True) if score is None]

    def _record_taken(self, items: list[Running]) -> None:
        """Finished attempts of jobs the reaper gave to others: their outcomes go in the history (where
        the first outcome that settles a job wins), and nothing else. RQ's state of those jobs (status,
        registries, a retry) is the new run's to write: a stale retry or failure written there would
        turn a job delivered meanwhile back into a scheduled or failed one."""
        with self.connection.pipeline(transaction=False) as pipe:
            for item in items:
                assert item.decision is not None
                final = item.decision.verdict != "retry"
                self.history.finish(pipe, item.kind, item.job.id, item.decision.attempt, final=final)
            pipe.execute(raise_on_error=False)  # (a damaged history is the new run's to find)
        for item in items:
            assert item.decision is not None
            self.log.warning(
                "Worker %s: job %s was requeued while Redis was out of reach; attempt %d (%s) recorded, "
                "the job left to the worker that has it",
                self.name,
                item.job.id,
                item.decision.attempt.number,
                item.decision.attempt.outcome,
            )

    def _move_on(
        self, pipe: Pipeline, item: Running, decision: Decision, ended: datetime, finished: list[tuple[Job, int]]
    ) -> None:
        """RQ's bookkeeping for a finished attempt, of the job's own keys; the caller has written a
        finished job's status and end time, and writes the keys every job shares: the finished
        registry (adding this job to `finished` if it succeeded) and what lists its execution."""
        job, execution = item.job, item.execution
        job.ended_at = ended
        started_at = execution.created_at
        if decision.verdict == "succeeded":
            # What RQ's Job._handle_success writes, less its full re-save of the job (which
            # re-serializes the job's data on every delivery): only the fields that changed.
            ttl = result_ttl(job)
            Result.create(
                job,
                Result.Type.SUCCESSFUL,
                ttl=ttl,
                return_value=decision.result,
                worker_name=self.name,
                pipeline=pipe,
                execution_id=execution.id,
                execution_started_at=started_at,
                execution_ended_at=job.ended_at,
            )
            finished.append((job, ttl))
            pipe.expire(job.key, ttl)
        elif decision.verdict == "retry":
            # (RQ's Job._handle_retry_result would do this, but it writes the status outside the
            # pipeline: a crash before the pipeline ran would leave a "scheduled" job nowhere.)
            delay = decision.rq_delay
            Result.create_retried(
                job,
                failure_ttl(job),
                return_value=None,
                worker_name=self.name,
                execution_id=execution.id,
                execution_started_at=started_at,
                execution_ended_at=job.ended_at,
                pipeline=pipe,
            )
            job.number_of_retries = (job.number_of_retries or 0) + 1
            if delay:
                item.queue.schedule_job(job, now() + timedelta(seconds=delay), pipeline=pipe)
            else:
                rqstore.enqueue_at_front(item.queue, job, pipe)
        else:
            rqstore.fail(job, decision.error, pipe, self.name, execution, ended)
        rqstore.forget_execution(pipe, execution)

    def _put_back(self, items: list[Running], error: str | None) -> None:
        """Return jobs to the front of the queue, newest first so the oldest ends up first; an attempt
        in flight is marked with `error` (held jobs have none)."""
        for item in reversed(items):
            member = f"{item.job.id}:{item.execution.id}"
            with contextlib.suppress(redis.ResponseError):  # its keys are garbage: the reaper's limbo pass
                self.reaper.requeue(item.queue, member, error or "interrupted: the worker was shut down")
