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
from rq.executions import Execution, ExecutionRegistry

from dispatcher.history import isoformat
from dispatcher.keys import Keys

#: How often a worker renews its liveness key and looks for abandoned jobs.
BEAT_INTERVAL = 3.0
#: A worker whose key is older than this is dead: a few missed beats.
ALIVE_TTL = 10
#: A job popped but not started (in RQ's intermediate list, unregistered) for this long is
#: abandoned: a live worker starts what it pops in one round trip.
LIMBO_AGE = 2 * int(BEAT_INTERVAL)

log = logging.getLogger(__name__)

# KEYS: started registry, job hash, queue list, attempts hash, execution hash, scheduled registry,
# the job's execution registry, and (if known) its worker's executions set
# ARGV: registry member, job id, now (ISO), error text, execution id
# The execution is removed wherever RQ lists it, as RQ's Execution.delete does. A job counts as
# abandoned if it is still "started", or "scheduled" without being in the
# scheduled registry (a worker died half-way through rescheduling it). A job whose hash is not a
# hash is requeued as it is: the worker that pops it fails it alone. Garbage in the attempt history
# (or in the execution's other keys) is left alone; it must not make the script fail.
_REQUEUE_STARTED = """
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
"""

# KEYS: intermediate list, job hash, queue list, sighting key. ARGV: job id, LIMBO_AGE, sighting TTL.
# A job in RQ's intermediate list is popped but not started. The first time a reaper sees it there it
# notes when (Redis's clock, the same for every host); it is abandoned once still there LIMBO_AGE later.
# A worker deletes the note as it starts the job, so a job popped again later (a retry) is never
# judged by an earlier pop's note; and the note is only written while the job is in the list.
_REQUEUE_LIMBO = """
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
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind == 'none' then return 0 end
if kind == 'hash' then redis.call('HSET', KEYS[2], 'status', 'queued') end
redis.call('LPUSH', KEYS[3], ARGV[1])
return 1
"""


class Reaper:
    """Renews one worker's liveness and requeues the jobs of workers that have none."""

    def __init__(self, connection: redis.Redis, queue: Queue, worker_name: str, index_ttl: int) -> None:
        """`index_ttl`: how long a job stays in the API's job index (its longest TTL)."""
        self.index_ttl = index_ttl
        self.connection = connection
        self.queue = queue
        self.worker_name = worker_name
        self.keys = Keys(queue.name)
        self._requeue_started = connection.register_script(_REQUEUE_STARTED)
        self._requeue_limbo = connection.register_script(_REQUEUE_LIMBO)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def alive_key(self, worker_name: str) -> str:
        return f"{self.keys.prefix}:alive:{worker_name}"

    def beat(self) -> None:
        self.connection.set(self.alive_key(self.worker_name), 1, ex=ALIVE_TTL)

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
            self.connection.delete(self.alive_key(self.worker_name))

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
        """Requeue every abandoned job of this queue; return how many."""
        # One reaper per pass across all workers is enough.
        if not self.connection.set(f"{self.keys.prefix}:reaper", self.worker_name, nx=True, ex=int(BEAT_INTERVAL)):
            return 0
        # Jobs older than their longest TTL have expired from RQ: drop them from the API's index.
        self.connection.zremrangebyscore(self.keys.index, "-inf", time.time() - self.index_ttl)
        return self._reap_started() + self._reap_limbo()

    def _reap_started(self) -> int:
        registry = self.queue.started_job_registry
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
                pipe.hget(self._execution_key(member), "worker_name")
            # An execution hash of the wrong type answers an error for that job only.
            owners = [o if isinstance(o, bytes) else None for o in pipe.execute(raise_on_error=False)]
        with self.connection.pipeline(transaction=False) as pipe:
            for owner in owners:
                pipe.exists(self.alive_key(owner.decode(errors="replace"))) if owner else pipe.exists("")
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
                done = self.requeue(member, f"interrupted: worker {owner_name} stopped during this attempt")
            except redis.ResponseError as exc:  # this job's keys only; the others still get their turn
                log.error("could not requeue job %s: %s", job_id, exc)
                continue
            if done:
                requeued += 1
                log.warning("requeued job %s: its worker %s stopped while running it", job_id, owner_name)
        return requeued

    def _execution_key(self, member: str) -> str:
        """The execution hash of a StartedJobRegistry entry, named by RQ (it follows RQ_KEY_PREFIX)."""
        job_id, _, execution_id = member.rpartition(":")
        return Execution(execution_id, job_id, self.connection).key

    def requeue(self, member: str, error: str) -> bool:
        """Put the job of a StartedJobRegistry entry (`job id:execution id`) back at the front of
        the queue and mark its unfinished attempt with `error`; False if it was no longer running.
        The execution goes from every list RQ keeps of it: its job's and its worker's."""
        job_id, _, execution_id = member.rpartition(":")
        execution_key = self._execution_key(member)
        keys = [
            self.queue.started_job_registry.key,
            self.queue.job_class.key_for(job_id),
            self.queue.key,
            self.keys.attempts(job_id),
            execution_key,
            self.queue.scheduled_job_registry.key,
            ExecutionRegistry(job_id, self.connection).key,
        ]
        try:  # whose it was, to name that worker's executions set (the script deletes the hash)
            owner = cast(bytes | None, self.connection.hget(execution_key, "worker_name"))  # not decoded
        except redis.ResponseError:  # not a hash: garbage the script deletes
            owner = None
        if owner:
            worker_name = owner.decode(errors="replace")
            keys.append(Execution(execution_id, job_id, self.connection, worker_name).worker_executions_key)
        return bool(
            self._requeue_started(keys=keys, args=[member, job_id, isoformat(datetime.now(UTC)), error, execution_id])
        )

    def _reap_limbo(self) -> int:
        intermediate_key = self.queue.intermediate_queue_key
        in_limbo = cast(list[bytes], self.connection.lrange(intermediate_key, 0, -1))  # responses are not decoded
        job_ids = [j.decode(errors="replace") for j in in_limbo]
        if not job_ids:
            return 0
        started = cast(list[bytes], self.connection.zrange(self.queue.started_job_registry.key, 0, -1))
        registered = {member.decode(errors="replace").rsplit(":", 1)[0] for member in started}
        requeued = 0
        for job_id in job_ids:
            if job_id in registered:
                continue
            keys = [intermediate_key, self.queue.job_class.key_for(job_id), self.queue.key, self.keys.limbo(job_id)]
            try:
                done = self._requeue_limbo(keys=keys, args=[job_id, LIMBO_AGE, 4 * LIMBO_AGE])
            except redis.ResponseError as exc:
                log.error("could not requeue job %s: %s", job_id, exc)
                continue
            if done:
                requeued += 1
                log.warning("requeued job %s: its worker stopped between dequeuing and starting it", job_id)
        return requeued
