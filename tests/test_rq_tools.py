"""RQ's own tools on Dispatcher's jobs: requeue, delete and cancel act as an RQ user expects.

Requeueing a failed job (RQ's API, `rq requeue`, rq-dashboard's Requeue) delivers it again: a new
series of attempts with the same id (so the same `webhook-id` or `Message-ID`), appended to the same
history, with its own `max_attempts`, and the totals count the job once. A job deleted or canceled
while queued or scheduled is never delivered.
"""

from __future__ import annotations

import base64
import email
import email.policy
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from rq.job import Job, cancel_job
from rq.serializers import JSONSerializer

from dispatcher.app import create_app
from dispatcher.enqueue import make_queue
from tests.conftest import API_KEY, AUTH, wait_for

BIN = Path(sys.executable).parent
RETRY = {"max_attempts": 2, "backoff": [1]}


def _stats(svc, kind: str) -> tuple[int, int]:
    stats = svc.client.get("/v1/stats", headers=AUTH).get_json()[kind]
    return stats["succeeded"], stats["failed"]


def _failed_webhook(svc, receiver, failures: int) -> tuple[str, str]:
    """A webhook whose receiver fails its first `failures` requests with 500; it runs out of its
    two attempts and fails."""
    url = receiver.url(f"fail/{failures}/500")
    job_id = svc.post("/v1/webhooks", {"url": url, "event_type": "a.b", "payload": {}, "retry": RETRY})
    job = wait_for(svc.client, job_id, timeout=30)
    assert job["status"] == "failed", svc.logs()
    assert _stats(svc, "webhook") == (0, 1)
    return job_id, url


def test_requeue_through_rqs_api_delivers_a_new_series_in_the_same_history(service, receiver, redis_conn):
    svc = service()
    svc.start_worker()
    job_id, url = _failed_webhook(svc, receiver, failures=3)

    queue = make_queue(redis_conn, svc.settings)
    queue.failed_job_registry.requeue(job_id)

    job = wait_for(svc.client, job_id, timeout=30, until=lambda j: j["status"] == "succeeded")
    # The new series has its own two attempts: the third request fails, the fourth succeeds.
    assert [a["status_code"] for a in job["attempts"]] == [500, 500, 500, 200]
    assert [a["number"] for a in job["attempts"]] == [1, 2, 3, 4]
    requests = receiver.received(url)
    assert len(requests) == 4
    assert {r.headers["webhook-id"] for r in requests} == {job_id}
    assert _stats(svc, "webhook") == (1, 0)


def test_a_requeued_job_loses_its_failure_expiry_so_it_cannot_vanish_while_it_waits_for_a_retry(
    service, receiver, redis_conn
):
    svc = service(DISPATCHER_RETENTION_FAILED="60")
    svc.start_worker()
    url = receiver.url("fail/3/500")
    retry = {"max_attempts": 2, "backoff": [3]}
    job_id = svc.post("/v1/webhooks", {"url": url, "event_type": "a.b", "payload": {}, "retry": retry})
    assert wait_for(svc.client, job_id, timeout=30)["status"] == "failed", svc.logs()
    queue = make_queue(redis_conn, svc.settings)
    job_key = queue.job_class.key_for(job_id)
    queue.failed_job_registry.requeue(job_id)
    assert 0 < redis_conn.ttl(job_key) <= 60  # failing gave it an expiry, and RQ's requeue keeps it

    # The new series' first attempt fails too: the job waits for its retry, and must not expire meanwhile.
    job = wait_for(svc.client, job_id, timeout=30, until=lambda j: j["status"] == "scheduled")
    assert len(job["attempts"]) == 3
    assert redis_conn.ttl(job_key) == -1
    job = wait_for(svc.client, job_id, timeout=30, until=lambda j: j["status"] == "succeeded")
    assert [a["status_code"] for a in job["attempts"]] == [500, 500, 500, 200]


def test_rq_requeue_command_delivers_a_failed_email_again(service, smtp_server, redis_url):
    svc = service()
    svc.start_worker()
    rcpt = f"temp451-{uuid.uuid4().hex[:8]}@example.com"  # refused once, then accepted
    job_id = svc.post("/v1/emails", {"to": [rcpt], "subject": "Again", "text": "x", "retry": {"max_attempts": 1}})
    assert wait_for(svc.client, job_id, timeout=30)["status"] == "failed", svc.logs()

    subprocess.run(
        [BIN / "rq", "requeue", "-u", redis_url, "-S", "json", "--queue", svc.settings.queue_name, job_id],
        check=True,
        capture_output=True,
        timeout=60,
    )

    job = wait_for(svc.client, job_id, timeout=30, until=lambda j: j["status"] == "succeeded")
    assert [a["status_code"] for a in job["attempts"]] == [451, 250]
    (mail,) = smtp_server.handler.messages_to(rcpt)
    message = email.message_from_bytes(mail.content, policy=email.policy.default)
    assert str(message["Message-ID"]).startswith(f"<{job_id}@")
    assert _stats(svc, "email") == (1, 0)


@pytest.fixture
def dashboard(settings):
    """rq-dashboard as the web process serves it at /dashboard/, logged in: `dashboard(path)` POSTs as its
    buttons do, `dashboard.get(path)` reads. It shows every queue in Redis, whatever the settings' queue."""
    client = create_app(settings).test_client()
    login = {"Authorization": "Basic " + base64.b64encode(f"ops:{API_KEY}".encode()).decode()}

    def post(path: str) -> dict:
        response = client.post(f"/dashboard{path}", headers=login | {"X-Requested-With": "XMLHttpRequest"})
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()

    def get(path: str) -> dict:
        response = client.get(f"/dashboard{path}", headers=login)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()

    post.get = get  # type: ignore[attr-defined]  # for the tests that read too
    return post


def test_rq_dashboard_requeue_delivers_a_failed_webhook_again(service, receiver, dashboard):
    svc = service()
    svc.start_worker()
    job_id, url = _failed_webhook(svc, receiver, failures=2)

    assert dashboard(f"/job/{job_id}/requeue") == {"status": "OK"}

    job = wait_for(svc.client, job_id, timeout=30, until=lambda j: j["status"] == "succeeded")
    assert [a["status_code"] for a in job["attempts"]] == [500, 500, 200]
    assert {r.headers["webhook-id"] for r in receiver.received(url)} == {job_id}
    assert _stats(svc, "webhook") == (1, 0)


def test_rq_dashboard_shows_each_priority_as_a_queue_with_its_jobs(service, receiver, dashboard):
    svc = service()
    url = receiver.url("ok")
    for priority, n in (("high", 1), ("default", 2), ("low", 3)):
        for _ in range(n):
            svc.post("/v1/webhooks", {"url": url, "event_type": "a.b", "payload": {}, "priority": priority})

    counts = {q["name"]: q["count"] for q in dashboard.get("/0/data/queues.json")["queues"]}

    base = svc.settings.queue_name
    assert {name: counts.get(name) for name in (f"{base}-high", base, f"{base}-low")} == {
        f"{base}-high": 1,
        base: 2,
        f"{base}-low": 3,
    }


def test_rq_dashboard_delete_of_a_queued_job_means_it_is_never_delivered(service, receiver, dashboard):
    svc = service()
    url = receiver.url("ok")
    deleted = svc.post("/v1/webhooks", {"url": url, "event_type": "a.b", "payload": {"n": 1}})
    kept = svc.post("/v1/webhooks", {"url": url, "event_type": "a.b", "payload": {"n": 2}})

    assert dashboard(f"/job/{deleted}/delete") == {"status": "OK"}
    svc.start_worker()

    assert wait_for(svc.client, kept, timeout=30)["status"] == "succeeded", svc.logs()
    assert [r.headers["webhook-id"] for r in receiver.received(url)] == [kept]
    assert svc.client.get(f"/v1/jobs/{deleted}", headers=AUTH).status_code == 404


def test_a_canceled_job_is_never_delivered_even_if_a_worker_pops_it(service, receiver, redis_conn):
    """RQ's `cancel_job` takes a queued job off its queue; a worker that pops its id anyway (it was
    popped as it was canceled) skips it instead of delivering it."""
    svc = service()
    url = receiver.url("ok")
    job_id = svc.post("/v1/webhooks", {"url": url, "event_type": "a.b", "payload": {}})
    cancel_job(job_id, connection=redis_conn, serializer=JSONSerializer)
    queue = make_queue(redis_conn, svc.settings)
    assert queue.get_job_ids() == []
    redis_conn.rpush(queue.key, job_id)  # the pop that raced the cancel
    canary = svc.post("/v1/webhooks", {"url": url, "event_type": "a.b", "payload": {"canary": True}})

    svc.start_worker()

    assert wait_for(svc.client, canary, timeout=30)["status"] == "succeeded", svc.logs()
    assert [r.headers["webhook-id"] for r in receiver.received(url)] == [canary]
    assert svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()["status"] == "canceled"
    assert Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).get_status() == "canceled"
    assert redis_conn.llen(queue.intermediate_queue_key) == 0


def test_a_canceled_scheduled_job_is_never_delivered(service, receiver, redis_conn):
    """A job waiting for its retry is canceled with RQ's API; its due time passes; nothing is sent."""
    svc = service()
    svc.start_worker()
    url = receiver.url("fail/1/503")
    job_id = svc.post(
        "/v1/webhooks", {"url": url, "event_type": "a.b", "payload": {}, "retry": {"max_attempts": 3, "backoff": [3]}}
    )
    wait_for(svc.client, job_id, timeout=30, until=lambda j: j["status"] == "scheduled")

    Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).cancel()
    time.sleep(6)  # past the retry's due time (3 s, +20 % jitter, +1 s of RQ's rounding)

    assert len(receiver.received(url)) == 1
    assert svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()["status"] == "canceled"
