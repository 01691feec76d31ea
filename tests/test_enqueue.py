"""The jobs the API writes are the jobs RQ would write: same hash, same queue, same registries."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
import urllib.request
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import utcparse

from dispatcher.channels import JOB_FUNCTION
from dispatcher.channels.email import EmailRequest
from dispatcher.channels.webhook import WebhookRequest
from dispatcher.enqueue import enqueue_many, make_queue
from dispatcher.keys import Keys
from dispatcher.rqstore import OWN_FIELDS, Scheduler
from tests.conftest import free_port

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

    assert job.func_name == JOB_FUNCTION
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


@pytest.mark.parametrize("kind", ["webhook", "email"])
def test_a_scheduled_job_is_the_one_rqs_enqueue_at_writes(redis_conn, queue_settings, kind):
    send_at = datetime.now(UTC).replace(microsecond=250_000) + timedelta(hours=1)
    (job_id,) = enqueue_many(redis_conn, queue_settings, kind, [REQUESTS[kind]()], send_at=send_at)
    ours = redis_conn.hgetall(Job.key_for(job_id))
    queue = make_queue(redis_conn, queue_settings)
    registry = queue.scheduled_job_registry
    job = Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer)

    assert job.get_status() == JobStatus.SCHEDULED
    assert queue.get_job_ids() == [] and registry.get_job_ids() == [job_id]
    assert redis_conn.zscore(registry.key, job_id) == send_at.timestamp()  # to the millisecond, not RQ's whole second
    assert queue.key.encode() in redis_conn.smembers(Queue.redis_queues_keys)

    redis_conn.delete(job.key)
    registry.remove(job_id)
    queue.enqueue_at(
        send_at, job.func_name, *job.args, job_id=job_id, meta=job.meta, description=job.description,
        job_timeout=job.timeout, result_ttl=job.result_ttl, failure_ttl=job.failure_ttl,
    )
    theirs = redis_conn.hgetall(job.key)

    assert ours.keys() == theirs.keys()
    for field in ours.keys() - {b"created_at", b"data", b"meta"}:
        assert ours[field] == theirs[field], field
    assert json.loads(zlib.decompress(ours[b"data"])) == json.loads(zlib.decompress(theirs[b"data"]))


def test_the_scheduler_queues_a_scheduled_job_once_due_to_the_millisecond_and_wakes_workers(
    redis_conn, queue_settings
):
    """The workers' scheduler (rqstore.Scheduler, RQ's with millisecond due times) on jobs the API
    scheduled: RQ's own would wait for the next whole second."""
    due = datetime.now(UTC) - timedelta(seconds=1)
    later = datetime.now(UTC) + timedelta(seconds=0.3)
    (due_id,) = enqueue_many(redis_conn, queue_settings, "webhook", [REQUESTS["webhook"]()], send_at=due)
    (later_id,) = enqueue_many(redis_conn, queue_settings, "webhook", [REQUESTS["webhook"]()], send_at=later)
    queue = make_queue(redis_conn, queue_settings)
    wake = Keys(queue_settings.queue_name).wake
    scheduler = Scheduler([queue], connection=redis_conn, serializer=JSONSerializer, wake_key=wake)
    scheduler.acquire_locks()
    try:
        scheduler.enqueue_scheduled_jobs()
        moved, tokens = queue.get_job_ids(), redis_conn.llen(wake)
        while datetime.now(UTC) < later:
            time.sleep(0.01)
        scheduler.enqueue_scheduled_jobs()
        moved_later = queue.get_job_ids()
    finally:
        scheduler.release_locks()

    assert (moved, tokens) == ([due_id], 1)
    assert moved_later == [due_id, later_id]
    assert Job.fetch(due_id, connection=redis_conn, serializer=JSONSerializer).get_status() == JobStatus.QUEUED
    assert queue.scheduled_job_registry.get_job_ids() == []


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


def test_rq_info_and_rq_dashboard_read_the_jobs_the_api_writes(redis_conn, redis_url, queue_settings):
    """The README's two commands, run for real against jobs written by the API's enqueue."""
    requests = [REQUESTS["webhook"](), REQUESTS["email"](), REQUESTS["webhook"]()]
    job_ids = [enqueue_many(redis_conn, queue_settings, request_kind(r), [r])[0] for r in requests]
    bin_dir = Path(sys.executable).parent

    info = subprocess.run(
        [bin_dir / "rq", "info", "-u", redis_url, "--serializer", "rq.serializers.JSONSerializer",
         "--only-queues", queue_settings.queue_name],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert re.search(rf"^{re.escape(queue_settings.queue_name)} \|\S* 3, 0 executing", info.stdout, re.M), info.stdout

    port = free_port()
    with subprocess.Popen(
        [bin_dir / "rq-dashboard", "-u", redis_url, "--json", "-b", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    ) as dashboard:
        try:
            base = f"http://127.0.0.1:{port}/0/data"
            queues = wait_until_json(f"{base}/queues.json", dashboard)
            listed = {queue["name"]: queue["count"] for queue in queues["queues"]}
            assert listed[queue_settings.queue_name] == 3
            page = wait_until_json(f"{base}/jobs/{queue_settings.queue_name}/queued/10/asc/1.json", dashboard)
            assert [job["id"] for job in page["jobs"]] == job_ids
            job = wait_until_json(f"{base}/job/{job_ids[1]}.json", dashboard)
            assert job["status"] == "queued"
            assert job["origin"] == queue_settings.queue_name
            assert "email 'Your order' to 2 recipient(s)" in job["description"]
            assert json.loads(job["metadata"])["kind"] == "email"
        finally:
            dashboard.terminate()


def request_kind(request: WebhookRequest | EmailRequest) -> str:
    return "webhook" if isinstance(request, WebhookRequest) else "email"


def wait_until_json(url: str, process: subprocess.Popen, timeout: float = 30) -> dict:
    """GET `url` as JSON, retrying while the server starts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if process.poll() is not None:
                raise AssertionError(f"exited {process.returncode}: {process.stderr.read().decode()[-2000:]}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
