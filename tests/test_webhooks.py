"""Webhook delivery through the API and a real worker process to a real HTTP receiver."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import pytest
from rq.job import Job, cancel_job
from rq.serializers import JSONSerializer
from standardwebhooks import Webhook

from dispatcher.channels.webhook import WebhookRequest
from tests.conftest import AUTH, TERMINAL, TEST_WEBHOOK_TIMEOUT, WEBHOOK_SECRET, free_port, wait_for


def post_webhook(client, url: str, **fields) -> str:
    body = {"url": url, "event_type": "order.created", "payload": {"order": 42}} | fields
    response = client.post("/v1/webhooks", json=body, headers=AUTH)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def test_delivered_webhook_verifies_with_standardwebhooks(api, receiver):
    url = receiver.url("ok")
    job_id = post_webhook(api, url, payload={"order": 42, "total": "9.99"}, headers={"X-Tenant": "acme"})

    job = wait_for(api, job_id)

    assert job["status"] == "succeeded"
    (request,) = receiver.received(url)
    payload = Webhook(WEBHOOK_SECRET).verify(request.body, request.headers)
    assert payload["type"] == "order.created"
    assert payload["data"] == {"order": 42, "total": "9.99"}
    accepted = datetime.fromisoformat(payload["timestamp"])
    assert accepted.tzinfo is not None
    assert abs((accepted - datetime.fromisoformat(job["created_at"])).total_seconds()) < 1
    assert request.headers["webhook-id"] == job_id
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-tenant"] == "acme"
    assert job["attempts"][0]["status_code"] == 200
    assert json.loads(job["attempts"][0]["response_excerpt"]) == {"seen": 1}


def webhook_stats(client) -> dict:
    response = client.get("/v1/stats", headers=AUTH)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_retry_on_500_then_success_resends_the_same_signed_message(api, receiver):
    url = receiver.url("fail/1/500")
    job_id = post_webhook(api, url, retry={"max_attempts": 3, "backoff": [1]})

    job = wait_for(api, job_id)

    assert job["status"] == "succeeded", job
    first, second = job["attempts"]
    assert (first["number"], first["outcome"], first["status_code"]) == (1, "retryable", 500)
    assert (second["number"], second["outcome"], second["status_code"]) == (2, "succeeded", 200)
    assert job["error"] is None
    assert job["next_attempt_at"] is None
    requests = receiver.received(url)
    assert len(requests) == 2
    for request in requests:
        assert request.headers["webhook-id"] == job_id
        Webhook(WEBHOOK_SECRET).verify(request.body, request.headers)
    assert requests[0].body == requests[1].body


def test_waiting_retry_shows_as_scheduled(api, receiver, redis_conn):
    url = receiver.url("status/500")
    job_id = post_webhook(api, url, retry={"max_attempts": 2, "backoff": [30]})
    try:
        job = wait_for(api, job_id, until=lambda job: job["status"] in ("scheduled", *TERMINAL), timeout=10)

        assert job["status"] == "scheduled", job
        (attempt,) = job["attempts"]
        assert (attempt["outcome"], attempt["status_code"]) == ("retryable", 500)
        assert job["error"] and "500" in job["error"]
        assert job["next_attempt_at"] is not None
        due_in = (datetime.fromisoformat(job["next_attempt_at"]) - datetime.now(UTC)).total_seconds()
        # 30 s backoff with +/-20 % jitter: due 24 to 37 s after the attempt, never now.
        assert 20 < due_in < 40, job["next_attempt_at"]
        assert len(receiver.received(url)) == 1
    finally:
        # Don't leave a retry behind to hit the receiver later in the session.
        cancel_job(job_id, connection=redis_conn, serializer=JSONSerializer)


def test_retry_after_is_a_floor_for_the_next_attempt(api, receiver):
    url = receiver.url("retry-after/3")
    job_id = post_webhook(api, url, retry={"max_attempts": 3, "backoff": [1]})

    job = wait_for(api, job_id)

    assert job["status"] == "succeeded", job
    assert [a["status_code"] for a in job["attempts"]] == [503, 200]
    first, second = receiver.received(url)
    assert second.received_at - first.received_at >= 3.0


def test_exhausted_retries_fail_the_job_and_show_in_lists_and_stats(api, receiver):
    failed_before = webhook_stats(api)["webhook"]["failed"]
    url = receiver.url("status/503")
    job_id = post_webhook(api, url, retry={"max_attempts": 2, "backoff": [1]})

    job = wait_for(api, job_id)

    assert job["status"] == "failed", job
    assert [(a["outcome"], a["status_code"]) for a in job["attempts"]] == [("retryable", 503), ("retryable", 503)]
    assert "503" in job["error"]
    assert len(receiver.received(url)) == 2
    listed = api.get("/v1/jobs?status=failed&kind=webhook", headers=AUTH).get_json()["jobs"]
    assert job_id in [j["id"] for j in listed]
    assert all(j["status"] == "failed" for j in listed)
    stats = webhook_stats(api)
    assert stats["webhook"]["failed"] > failed_before
    (failure,) = [f for f in stats["recent_failures"] if f["id"] == job_id]
    assert failure["kind"] == "webhook"
    assert failure["attempts"] == 2
    assert "503" in failure["error"]
    assert failure["target"]["url"] == url


@pytest.mark.parametrize("code", [400, 410])
def test_client_errors_are_not_retried(api, receiver, code):
    url = receiver.url(f"status/{code}")
    job_id = post_webhook(api, url, retry={"max_attempts": 5, "backoff": [1]})

    job = wait_for(api, job_id)

    assert job["status"] == "failed", job
    (attempt,) = job["attempts"]
    assert (attempt["outcome"], attempt["status_code"]) == ("permanent", code)
    assert str(code) in job["error"]
    time.sleep(1.5)
    assert len(receiver.received(url)) == 1
    assert len(wait_for(api, job_id)["attempts"]) == 1


@pytest.mark.parametrize("code", [429, 408, 502])
def test_retryable_statuses_are_retried(api, receiver, code):
    url = receiver.url(f"fail/1/{code}")
    job_id = post_webhook(api, url, retry={"max_attempts": 2, "backoff": [1]})

    job = wait_for(api, job_id)

    assert job["status"] == "succeeded", job
    assert [(a["outcome"], a["status_code"]) for a in job["attempts"]] == [("retryable", code), ("succeeded", 200)]
    assert len(receiver.received(url)) == 2


def test_redirects_are_not_followed(api, receiver):
    url = receiver.url("redirect")
    target = url.replace("/redirect/", "/ok/")
    job_id = post_webhook(api, url, retry={"max_attempts": 3, "backoff": [1]})

    job = wait_for(api, job_id)

    assert job["status"] == "failed", job
    (attempt,) = job["attempts"]
    assert (attempt["outcome"], attempt["status_code"]) == ("permanent", 302)
    assert "redirect" in job["error"]
    assert len(receiver.received(url)) == 1
    assert receiver.received(target) == []


def test_slow_receiver_times_out(api, receiver):
    url = receiver.url("slow/5")
    job_id = post_webhook(api, url, retry={"max_attempts": 1})

    job = wait_for(api, job_id)

    assert job["status"] == "failed", job
    (attempt,) = job["attempts"]
    assert attempt["outcome"] == "retryable"
    assert attempt["status_code"] is None
    assert "timed out" in job["error"].lower() or "timeout" in job["error"].lower()
    # The worker gave up at its 2 s timeout rather than waiting out the 5 s answer.
    assert TEST_WEBHOOK_TIMEOUT * 1000 * 0.9 <= attempt["duration_ms"] < 4500


def test_connection_refused_is_retryable(api):
    url = f"http://127.0.0.1:{free_port()}/ok/{uuid.uuid4().hex}"
    job_id = post_webhook(api, url, retry={"max_attempts": 1})

    job = wait_for(api, job_id)

    assert job["status"] == "failed", job
    (attempt,) = job["attempts"]
    assert attempt["outcome"] == "retryable"
    assert attempt["status_code"] is None
    assert "refused" in job["error"].lower()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_network_guard_refuses_at_delivery(burst_worker, receiver, host):
    # A worker that allows no private networks, fed directly: as if the host had resolved to a
    # public address when the API accepted it and to loopback now (DNS rebinding).
    worker = burst_worker(allowed_networks=())
    url = receiver.url("ok", host=host)
    request = WebhookRequest.model_validate(
        {"url": url, "event_type": "order.created", "payload": {"order": 1}, "retry": {"max_attempts": 3}}
    )
    job_id = worker.enqueue("webhook", request)

    worker.run()

    job = worker.job(job_id)
    assert job["status"] == "failed", job
    (attempt,) = job["attempts"]
    assert attempt["outcome"] == "permanent"
    assert "network guard" in job["error"]
    assert "not a public address" in job["error"]
    assert receiver.received(url) == []


def test_metadata_is_kept_in_the_job_and_never_sent(api, receiver):
    marker = uuid.uuid4().hex
    metadata = {"customer_ref": f"cust-{marker}", f"note{marker[:8]}": "internal"}
    url = receiver.url("ok")
    job_id = post_webhook(api, url, metadata=metadata)

    job = wait_for(api, job_id)

    assert job["status"] == "succeeded", job
    assert job["metadata"] == metadata
    (request,) = receiver.received(url)
    assert marker.encode() not in request.body
    assert marker[:8].encode() not in request.body
    assert b"internal" not in request.body
    for name, value in request.headers.items():
        assert marker not in name and marker not in value
        assert marker[:8] not in name and marker[:8] not in value
    assert "metadata" not in Webhook(WEBHOOK_SECRET).verify(request.body, request.headers)


def test_rq_job_meta_carries_an_attempt_summary_and_no_secret(api, receiver, redis_conn):
    url = receiver.url("fail/1/500")
    job_id = post_webhook(api, url, retry={"max_attempts": 2, "backoff": [1]})

    assert wait_for(api, job_id)["status"] == "succeeded"

    job = Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer)
    assert job.meta["kind"] == "webhook"
    assert job.meta["attempts"] == 2
    assert job.meta["last_attempt"]["outcome"] == "succeeded"
    assert job.meta["last_attempt"]["number"] == 2
    raw = b"".join(redis_conn.hgetall(job.key).values())
    assert WEBHOOK_SECRET.removeprefix("whsec_").encode() not in raw
    assert b"whsec_" not in raw
