"""The worker writes RQ's executions and registries for a whole batch of jobs at once
(dispatcher.rqstore: one command per shared key, not one per job). What it writes must be what RQ's
own `Execution.create`, `Execution.delete` and `FinishedJobRegistry.add` write, read back by RQ's
own code. Run with and without RQ_KEY_PREFIX (tests/test_rq_prefix.py)."""

from __future__ import annotations

import uuid

import redis
from rq import Queue
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from dispatcher import rqstore

TTL = 300
WORKER = "contract-worker"


def _jobs(connection: redis.Redis, queue: Queue, n: int) -> list[Job]:
    jobs = []
    for _ in range(n):
        job = Job.create(
            "workers.jobs.deliver", args=({},), connection=connection, origin=queue.name, serializer=JSONSerializer
        )
        job.save()
        jobs.append(job)
    return jobs


def _shape(connection: redis.Redis, execution: Execution) -> tuple:
    """What can be compared between two executions: key types, hash fields, TTLs to within a few seconds."""
    registry = ExecutionRegistry(job_id=execution.job_id, connection=connection)
    return (
        connection.type(execution.key),
        tuple(sorted(connection.hkeys(execution.key))),
        round(connection.ttl(execution.key) / 5),
        connection.type(registry.key),
        round(connection.ttl(registry.key) / 5),
    )


def test_a_batch_of_executions_is_what_rqs_execution_calls_write_and_remove(redis_conn):
    queue = Queue(f"exec-{uuid.uuid4().hex[:8]}", connection=redis_conn, serializer=JSONSerializer)
    theirs_jobs, ours_jobs = _jobs(redis_conn, queue, 2), _jobs(redis_conn, queue, 3)
    with redis_conn.pipeline(transaction=False) as pipe:
        theirs = [Execution.create(job, TTL, pipeline=pipe, worker_name=WORKER) for job in theirs_jobs]
        pipe.execute()
    started = [(job, rqstore.new_execution(job, WORKER), TTL) for job in ours_jobs]
    with redis_conn.pipeline(transaction=False) as pipe:
        rqstore.register_executions(pipe, started)
        for _, execution, ttl in started:
            rqstore.save_execution(pipe, execution, ttl)
        pipe.execute()
    ours = [execution for _, execution, _ in started]

    # RQ reads them back the same way.
    registry = StartedJobRegistry(queue=queue)
    assert sorted(registry.get_job_ids()) == sorted(job.id for job in theirs_jobs + ours_jobs)
    scores = dict(redis_conn.zrange(registry.key, 0, -1, withscores=True))
    assert max(scores.values()) - min(scores.values()) <= 2
    worker_set = theirs[0].worker_executions_key
    assert redis_conn.smembers(worker_set) == {e.composite_key.encode() for e in theirs + ours}
    assert abs(redis_conn.ttl(worker_set) - (TTL + 60)) <= 2
    for job, execution in zip(ours_jobs, ours, strict=True):
        (found,) = job.get_executions()
        assert (found.id, found.worker_name, found.job_id) == (execution.id, WORKER, job.id)
    assert {_shape(redis_conn, e) for e in ours} == {_shape(redis_conn, e) for e in theirs}

    # Finished: the finished registry as FinishedJobRegistry.add writes it; executions gone everywhere.
    with redis_conn.pipeline(transaction=False) as pipe:
        for job, execution in zip(theirs_jobs, theirs, strict=True):
            FinishedJobRegistry(queue=queue).add(job, TTL, pipe)
            execution.delete(job=job, pipeline=pipe)
        pipe.execute()
    with redis_conn.pipeline(transaction=False) as pipe:
        for execution in ours:
            rqstore.forget_execution(pipe, execution)
        rqstore.add_finished(pipe, [(job, TTL) for job in ours_jobs])
        rqstore.unregister_executions(pipe, list(zip(ours_jobs, ours, strict=True)))
        pipe.execute()

    assert registry.get_job_ids() == []
    assert redis_conn.scard(worker_set) == 0
    for job, execution in zip(theirs_jobs + ours_jobs, theirs + ours, strict=True):
        assert not redis_conn.exists(execution.key)
        assert job.get_executions() == []
    finished = FinishedJobRegistry(queue=queue)
    assert sorted(finished.get_job_ids()) == sorted(job.id for job in theirs_jobs + ours_jobs)
    finished_scores = dict(redis_conn.zrange(finished.key, 0, -1, withscores=True))
    assert max(finished_scores.values()) - min(finished_scores.values()) <= 2
