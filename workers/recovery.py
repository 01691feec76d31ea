"""Liveness and recovery: a job whose worker died is queued again within seconds.

RQ alone notices an abandoned job only when its StartedJobRegistry entry expires
(the job timeout plus two minutes) and a worker next runs maintenance (every 10
minutes, and an idle worker blocks ~400 s per dequeue), and then it fails the
job unless RQ's own retries are left. Dispatcher's workers instead keep a short
liveness key alive from a thread; every few seconds one of them looks for jobs
held by a worker whose key has expired and puts them back at the front of the
queue, in one Lua script (so two reapers cannot both requeue a job, and a
crash between steps cannot lose it). The attempt that was cut short is marked
in the history. A job popped from the queue but never registered (the worker
died between the two steps) is found in RQ's intermediate list the same way.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import UTC, datetime
from typing import cast

import redis
from rq import Queue

from dispatcher import rqstore
from dispatcher.history import isoformat
from dispatcher.keys import Keys
from dispatcher.priorities import split

#: How often a worker renews its liveness key and looks for abandoned jobs.
BEAT_INTERVAL = 3.0
#: A worker whose key is older than this is dead: a few missed beats.
ALIVE_TTL = 10
#: How late a beat may be before the worker checks, as it finishes jobs, that they are still its own.
BEAT_SLACK = 1.0
#: A job popped but not started (in RQ's intermediate list, unregistered) for this long is
#: abandoned: a live worker starts what it pops in one round trip.
LIMBO_AGE = 2 * int(BEAT_INTERVAL)

log = logging.getLogger(__name__)


class Reaper:
    """Renews one worker's liveness and requeues the jobs of workers that have none."""

    def __init__(self, connection: redis.Redis, queues: list[Queue], worker_name: str, index_ttl: int) -> None:
        """`queues`: the worker's, of one Dispatcher queue. `index_ttl`: how long a job stays in the
        API's job index (its longest TTL)."""
        self.index_ttl = index_ttl
        self.connection = connection
        self.queues = queues
        self.worker_name = worker_name
        self.keys = Keys(split(queues[0].name)[0])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: When the last beat that got through was sent, and when a beat got through after a gap in
        #: which the liveness key may have expired (0: never); time.time(), read by the worker's loop.
        self.last_beat = time.time()
        self.lapsed_at = 0.0

    def beat(self) -> None:
        sent = time.time()
        self.connection.set(self.keys.alive(self.worker_name), 1, ex=ALIVE_TTL)
        if time.time() - self.last_beat > ALIVE_TTL:
            self.lapsed_at = time.time()
        self.last_beat = sent

    def out_of_touch(self, since: float) -> bool:
        """Whether jobs this worker has held since `since` (time.time()) may have been requeued for
        others: its liveness key may have expired meanwhile, or may before its next write lands (a
        beat is late: Redis, or the network to it, is away)."""
        return time.time() - self.last_beat > BEAT_INTERVAL + BEAT_SLACK or self.lapsed_at >= since

    def start(self) -> None:
        """Beat now (before the first dequeue), then every BEAT_INTERVAL from a daemon thread."""
        self.beat()
        self._thread = threading.Thread(target=self._run, name="dispatcher-liveness", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=BEAT_INTERVAL + 2)
        with contextlib.suppress(redis.RedisError):
            self.connection.delete(self.keys.alive(self.worker_name))

    def _run(self) -> None:
        while not self._stop.wait(BEAT_INTERVAL):
            try:
                self.beat()
                self.reap()
            except redis.RedisError as exc:
                log.warning("liveness: Redis unavailable (%s); retrying in %ss", exc, BEAT_INTERVAL)
            except Exception:
                log.exception("liveness: unexpected error")

    def reap(self) -> int:
        """Requeue every abandoned job of this worker's queues; return how many."""
        requeued = 0
        for queue in self.queues:
            # One reaper per pass and queue across all workers is enough (workers may serve different queues).
            lock = f"{self.keys.prefix}:reaper:{queue.name}"
            if not self.connection.set(lock, self.worker_name, nx=True, ex=int(BEAT_INTERVAL)):
                continue
            if queue is self.queues[0]:
                # Jobs older than their longest TTL have expired from RQ: drop them from the API's index.
                self.connection.zremrangebyscore(self.keys.index, "-inf", time.time() - self.index_ttl)
            requeued += self._reap_started(queue) + self._reap_limbo(queue)
        return requeued

    def _reap_started(self, queue: Queue) -> int:
        registry = queue.started_job_registry
        entries = [
            (m.decode(errors="replace"), score)
            # Responses are not decoded, and WITHSCORES answers (member, float) pairs.
            for m, score in cast(
                list[tuple[bytes, float]], self.connection.zrange(registry.key, 0, -1, withscores=True)
            )
        ]
        if not entries:
            return 0
        with self.connection.pipeline(transaction=False) as pipe:
            for member, _score in entries:
                pipe.hget(rqstore.execution_key(self.connection, member), "worker_name")
            # An execution hash of the wrong type answers an error for that job only.
            owners = [o if isinstance(o, bytes) else None for o in pipe.execute(raise_on_error=False)]
        with self.connection.pipeline(transaction=False) as pipe:
            for owner in owners:
                pipe.exists(self.keys.alive(owner.decode(errors="replace"))) if owner else pipe.exists("")
            alive = pipe.execute()
        requeued = 0
        for (member, score), owner, is_alive in zip(entries, owners, alive, strict=True):
            if is_alive:
                continue
            if owner is None and score > time.time():
                # Whose it is cannot be read: it may be running on a live worker, so wait for RQ's
                # own verdict, the registry entry's expiry (the workers renew it while it runs).
                continue
            job_id = member.rsplit(":", 1)[0]
            owner_name = owner.decode(errors="replace") if owner else "unknown"
            try:
                done = self.requeue(queue, member, f"interrupted: worker {owner_name} stopped during this attempt")
            except redis.ResponseError as exc:  # this job's keys only; the others still get their turn
                log.error("could not requeue job %s: %s", job_id, exc)
                continue
            if done:
                requeued += 1
                log.warning("requeued job %s: its worker %s stopped while running it", job_id, owner_name)
        return requeued

    def requeue(self, queue: Queue, member: str, error: str) -> bool:
        """Put the job of a StartedJobRegistry entry (`job id:execution id`) of `queue` back at the front
        of it and mark its unfinished attempt with `error`; False if it was no longer running."""
        job_id = member.rpartition(":")[0]
        now = isoformat(datetime.now(UTC))
        return rqstore.requeue_started(self.connection, queue, member, self.keys.attempts(job_id), now, error)

    def _reap_limbo(self, queue: Queue) -> int:
        intermediate_key = queue.intermediate_queue_key
        in_limbo = cast(list[bytes], self.connection.lrange(intermediate_key, 0, -1))  # responses are not decoded
        job_ids = [j.decode(errors="replace") for j in in_limbo]
        if not job_ids:
            return 0
        started = cast(list[bytes], self.connection.zrange(queue.started_job_registry.key, 0, -1))
        members = [member.decode(errors="replace") for member in started]
        with self.connection.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.exists(rqstore.execution_key(self.connection, member))
            executed = pipe.execute()
        # A registry entry without its execution: the worker died while sending the pipeline that
        # starts its batch (the registry entries go first, the job's own keys after). Still in the
        # intermediate list, the job was never started: a pop in limbo like any other, whose entry
        # goes with it (else the reaper would wait for the entry's expiry, minutes away).
        registered = {
            member.rsplit(":", 1)[0]: ("" if has_execution else member)
            for member, has_execution in zip(members, executed, strict=True)
        }
        requeued = 0
        for job_id in job_ids:
            stale = registered.get(job_id, "")
            if job_id in registered and not stale:
                continue
            try:
                done = rqstore.requeue_limbo(
                    self.connection, queue, job_id, self.keys.limbo(job_id), LIMBO_AGE, 4 * LIMBO_AGE, stale
                )
            except redis.ResponseError as exc:
                log.error("could not requeue job %s: %s", job_id, exc)
                continue
            if done:
                requeued += 1
                log.warning("requeued job %s: its worker stopped between dequeuing and starting it", job_id)
        return requeued
