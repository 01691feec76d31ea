"""The jobs the API writes are the jobs RQ would write: same hash, same queue, same registries."""

from __future__ import annotations

import dataclasses
import json
import uuid
import zlib
from datetime import UTC, datetime

import pytest
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import utcparse

from dispatcher.enqueue import OWN_FIELDS, enqueue_many, make_queue
from dispatcher.keys import JOB_FUNCTIONS, Keys
from dispatcher.models import EmailRequest, WebhookRequest

REQUESTS = {
    "webhook": lambda: WebhookRequest.model_validate(
        {"url": "http://127.0.0.1:1/hook", "event_type": "order.paid", "payload": {"order": 7, "note": "ü"}}
    ),
    "email": lambda: EmailRequest.model_validate(
        {"from": "shop@example.com", "to": ["a@example.com"], "bcc": ["b@example.com"],
         "subject": "Your order", "text": "hello"}
    ),
}


@pytest.fixture
def queue_settings(settings):
    """A queue no worker listens to, so the jobs stay as the API wrote them."""
    return dataclasses.replace(settings, queue_name=f"format-{uuid.uuid4().hex[:10]}")


def rq_rewrite(redis_conn, queue: Queue, job: Job) -> dict[bytes, bytes]:
    """Delete `job` and let RQ's own `enqueue_many` write the same job; return RQ's hash."""
    args, meta, description = job.args, job.meta, job.description
    redis_conn.delete(job.key)
    redis_conn.lrem(queue.key, 0, job.id)
    data = Queue.prepare_data(
        job.func_name,
        args=args,
        job_id=job.id,
        meta=meta,
        description=description,
        timeout=job.timeout,
        result_ttl=job.result_ttl,
        failure_ttl=job.failure_ttl,
    )
    queue.enqueue_many([data])
    return redis_conn.hgetall(job.key)


@pytest.mark.parametrize("kind", ["webhook", "email"])
def test_job_hash_is_the_one_rq_writes(redis_conn, queue_settings, kind):
    before = datetime.now(UTC).replace(microsecond=0)
    (job_id,) = enqueue_many(redis_conn, queue_settings, kind, [REQUESTS[kind]()])
    ours = redis_conn.hgetall(Job.key_for(job_id))
    queue = make_queue(redis_conn, queue_settings)
    job = Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer)

    assert job.func_name == JOB_FUNCTIONS[kind]
    assert job.get_status() == JobStatus.QUEUED
    assert job.origin == queue_settings.queue_name
    assert queue.get_job_ids() == [job_id]
    assert before <= utcparse(ours[b"enqueued_at"].decode()).replace(tzinfo=UTC) <= datetime.now(UTC)

    theirs = rq_rewrite(redis_conn, queue, job)

    assert ours.keys() == theirs.keys()
    for field in ours.keys() - {b"created_at", b"enqueued_at", b"data", b"meta"}:
        assert ours[field] == theirs[field], field
    assert json.loads(zlib.decompress(ours[b"data"])) == json.loads(zlib.decompress(theirs[b"data"]))
    assert json.loads(ours[b"meta"]) == json.loads(theirs[b"meta"])
    assert {name.decode() for name in ours} >= OWN_FIELDS


def test_many_jobs_keep_their_order_and_are_indexed(redis_conn, queue_settings):
    requests = [
        WebhookRequest.model_validate({"url": "http://127.0.0.1:1/hook", "event_type": "n", "payload": {"n": i}})
        for i in range(5)
    ]

    job_ids = enqueue_many(redis_conn, queue_settings, "webhook", requests)

    assert len(set(job_ids)) == 5
    assert make_queue(redis_conn, queue_settings).get_job_ids() == job_ids
    payloads = [
        json.loads(Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).args[0]["body"])["data"]
        for job_id in job_ids
    ]
    assert payloads == [{"n": i} for i in range(5)]
    assert set(redis_conn.zrange(Keys(queue_settings.queue_name).index, 0, -1)) == {i.encode() for i in job_ids}
    queues = {queue.name for queue in Queue.all(connection=redis_conn)}
    assert queue_settings.queue_name in queues
