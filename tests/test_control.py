"""Job control (issue #11, item 5): cancel, retry and replay, through the API, and alike through RQ's tools.

`DELETE /v1/jobs/<id>` cancels a queued or scheduled job, atomically against a worker popping it
and RQ's scheduler moving it; `POST /v1/jobs/<id>/retry` delivers a failed job again in the same
history; `POST /v1/jobs/replay` does it for many. Real Redis, real workers, real receivers.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from rq.job import Job, cancel_job
from rq.registry import CanceledJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat

from dispatcher.control import JobControl
from dispatcher.enqueue import make_queue
from tests.conftest import API_KEY, AUTH, wait_for, wait_until

BIN = Path(sys.executable).parent
ONCE = {"max_attempts": 1}


def _webhook(svc, url: str, **extra) -> str:
    return svc.post("/v1/webhooks", {"url": url, "event_type": "a.b", "payload": {}, **extra})


def _rq_job(redis_conn, job_id: str) -> Job:
    return Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer)


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == code, error
    return error["message"]


# --- cancel ----------------------------------------------------------------------------------


def test_cancel_through_the_api_and_rqs_cancel_job_agree_and_neither_job_is_delivered(service, receiver, redis_conn):
    svc = service()
    url = receiver.url("ok")
    by_api, by_rq, canary = (_webhook(svc, url, metadata={"n": str(n)}) for n in range(3))

    response = svc.client.delete(f"/v1/jobs/{by_api}", headers=AUTH)
    cancel_job(by_rq, connection=redis_conn, serializer=JSONSerializer)

    assert response.status_code == 200 and response.get_json()["status"] == "canceled", response.get_json()
    queue = make_queue(redis_conn, svc.settings)
    assert queue.get_job_ids() == [canary]
    assert set(CanceledJobRegistry(queue.name, redis_conn).get_job_ids()) == {by_api, by_rq}
    for job_id in (by_api, by_rq):
        assert _rq_job(redis_conn, job_id).get_status() == "canceled"
        again = svc.client.delete(f"/v1/jobs/{job_id}", headers=AUTH)
        assert (
            _error(again, 409, "conflict")
            == f"job {job_id} is canceled; only a queued or scheduled job can be canceled"
        )
    svc.start_worker()
    assert wait_for(svc.client, canary)["status"] == "succeeded", svc.logs()
    assert [r.headers["webhook-id"] for r in receiver.received(url)] == [canary]
    for job_id in (by_api, by_rq):
        assert svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()["status"] == "canceled"


def test_a_cancelled_scheduled_job_is_never_delivered(service, receiver, redis_conn):
    svc = service()
    svc.start_worker()
    url = receiver.url("fail/1/503")
    job_id = _webhook(svc, url, retry={"max_attempts": 3, "backoff": [2]})
    scheduled = wait_for(svc.client, job_id, until=lambda j: j["status"] == "scheduled")

    response = svc.client.delete(f"/v1/jobs/{job_id}", headers=AUTH)

    assert response.status_code == 200, response.get_json()
    view = response.get_json()
    assert view["status"] == "canceled" and len(view["attempts"]) == 1
    due = datetime.fromisoformat(scheduled["next_attempt_at"]).timestamp()
    time.sleep(max(0.0, due - time.time()) + 2.5)  # past its due time, and RQ's scheduler polls every second
    assert len(receiver.received(url)) == 1
    assert svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()["status"] == "canceled"
    queue = make_queue(redis_conn, svc.settings)
    assert job_id not in queue.scheduled_job_registry.get_job_ids() and job_id not in queue.get_job_ids()
    assert 0 < redis_conn.ttl(queue.job_class.key_for(job_id)) <= svc.settings.failure_ttl


def test_a_canceled_job_stays_canceled_when_rqs_scheduler_moves_a_copy_it_read_before(service, receiver, redis_conn):
    """RQ's scheduler reads a due job, then saves it onto its queue as `queued` without checking: a
    cancel between the two must still hold."""
    svc = service()
    url = receiver.url("ok")
    job_id = _webhook(svc, url)
    canary = _webhook(svc, url)
    queue = make_queue(redis_conn, svc.settings)
    stale = _rq_job(redis_conn, job_id)  # what the scheduler read

    assert svc.client.delete(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 200
    queue._enqueue_job(stale)  # what the scheduler then writes (RQ's scheduler.enqueue_scheduled_jobs)
    assert _rq_job(redis_conn, job_id).get_status() == "queued"
    svc.start_worker()

    assert svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()["status"] == "canceled"
    assert wait_for(svc.client, canary)["status"] == "succeeded", svc.logs()
    # The worker pops it, skips it and sets RQ's status back.
    wait_until(lambda: _rq_job(redis_conn, job_id).get_status() == "canceled", 30, "the worker did not skip it")
    assert queue.get_job_ids() == [] and redis_conn.llen(queue.intermediate_queue_key) == 0
    assert [r.headers["webhook-id"] for r in receiver.received(url)] == [canary]


def test_cancel_refuses_a_job_a_worker_took_a_running_one_a_finished_one_and_an_unknown_one(
    service, receiver, redis_conn
):
    svc = service()
    queue = make_queue(redis_conn, svc.settings)
    popped = _webhook(svc, receiver.url("ok"))
    redis_conn.lmove(queue.key, queue.intermediate_queue_key)  # a worker's pop, the instant before the cancel

    message = _error(svc.client.delete(f"/v1/jobs/{popped}", headers=AUTH), 409, "conflict")

    assert message == f"job {popped} has been taken by a worker to run; it can no longer be canceled"
    assert _rq_job(redis_conn, popped).get_status() == "queued"
    redis_conn.delete(queue.intermediate_queue_key)
    svc.start_worker()
    slow = _webhook(svc, receiver.url("slow/1"))
    wait_for(svc.client, slow, until=lambda j: j["status"] == "running")
    message = _error(svc.client.delete(f"/v1/jobs/{slow}", headers=AUTH), 409, "conflict")
    assert message == f"job {slow} has been taken by a worker to run; it can no longer be canceled"
    assert wait_for(svc.client, slow)["status"] == "succeeded"
    message = _error(svc.client.delete(f"/v1/jobs/{slow}", headers=AUTH), 409, "conflict")
    assert message == f"job {slow} is succeeded; only a queued or scheduled job can be canceled"
    assert _error(svc.client.delete("/v1/jobs/wh_nope", headers=AUTH), 404, "not_found")


def test_a_job_held_by_a_worker_for_its_hosts_slot_is_refused_and_delivered_once(service, receiver, redis_conn):
    """A worker holds a job whose host has no free slot: started in RQ's sense, `queued` in the view."""
    svc = service(DISPATCHER_CONCURRENCY="2", DISPATCHER_MAX_PER_HOST="1")
    svc.start_worker()
    busy = _webhook(svc, receiver.url("slow/1.5"))
    wait_for(svc.client, busy, until=lambda j: j["status"] == "running")
    url = receiver.url("ok")
    held = _webhook(svc, url)
    wait_until(lambda: _rq_job(redis_conn, held).get_status() == "started", 30, "the worker did not hold it")

    message = _error(svc.client.delete(f"/v1/jobs/{held}", headers=AUTH), 409, "conflict")

    assert message == f"job {held} has been taken by a worker to run; it can no longer be canceled"
    assert wait_for(svc.client, held)["status"] == "succeeded", svc.logs()
    assert [r.headers["webhook-id"] for r in receiver.received(url)] == [held]


@pytest.mark.parametrize("job_id", ["*", "wh_*", "rq:job:x", "wh_%0D%0AX-Evil:%201", "wh_" + "f" * 2000])
def test_cancel_and_retry_of_an_id_that_is_no_job_answer_404(client, job_id):
    for response in (
        client.delete(f"/v1/jobs/{job_id}", headers=AUTH),
        client.post(f"/v1/jobs/{job_id}/retry", headers=AUTH),
    ):
        assert _error(response, 404, "not_found")


def test_replay_is_no_job_id(client):
    for method in ("GET", "DELETE"):
        response = client.open("/v1/jobs/replay", method=method, headers=AUTH)
        assert _error(response, 405, "method_not_allowed") and "POST" in response.headers["Allow"]


def test_cancel_and_retry_never_touch_another_dispatcher_queues_job(service, receiver, redis_conn):
    ours, theirs = service(), service()
    job_id = _webhook(theirs, receiver.url("ok"))

    assert _error(ours.client.delete(f"/v1/jobs/{job_id}", headers=AUTH), 404, "not_found")
    assert _error(ours.client.post(f"/v1/jobs/{job_id}/retry", headers=AUTH), 404, "not_found")
    assert make_queue(redis_conn, theirs.settings).get_job_ids() == [job_id]
    assert _rq_job(redis_conn, job_id).get_status() == "queued"


# --- retry -----------------------------------------------------------------------------------


def test_retry_through_the_api_rq_requeue_and_the_dashboard_give_the_same_history(
    service, receiver, redis_url, redis_conn
):
    svc = service()
    svc.start_worker()
    urls = [receiver.url("fail/1/500") for _ in range(3)]
    by_api, by_rq, by_dashboard = ids = [_webhook(svc, url, retry=ONCE) for url in urls]
    for job_id in ids:
        assert wait_for(svc.client, job_id)["status"] == "failed", svc.logs()

    response = svc.client.post(f"/v1/jobs/{by_api}/retry", headers=AUTH)
    rq_cli = [BIN / "rq", "requeue", "-u", redis_url, "-S", "json", "--queue", svc.settings.queue_name, by_rq]
    subprocess.run(rq_cli, check=True, capture_output=True, timeout=60)
    login = "Basic " + base64.b64encode(f"ops:{API_KEY}".encode()).decode()
    button = {"Authorization": login, "X-Requested-With": "XMLHttpRequest"}
    assert svc.client.post(f"/dashboard/job/{by_dashboard}/requeue", headers=button).status_code == 200

    assert response.status_code == 202, response.get_json()
    assert response.get_json() == {"id": by_api, "status": "queued", "status_url": f"/v1/jobs/{by_api}"}
    assert response.headers["Location"] == f"/v1/jobs/{by_api}"
    shapes = []
    for job_id, url in zip(ids, urls, strict=True):
        job = wait_for(svc.client, job_id, until=lambda j: j["status"] == "succeeded")
        shapes.append([(a["number"], a["outcome"], a["status_code"]) for a in job["attempts"]])
        assert [r.headers["webhook-id"] for r in receiver.received(url)] == [job_id, job_id]
    assert shapes == [[(1, "retryable", 500), (2, "succeeded", 200)]] * 3
    stats = svc.client.get("/v1/stats", headers=AUTH).get_json()["webhook"]
    assert (stats["succeeded"], stats["failed"]) == (3, 0)
    message = _error(svc.client.post(f"/v1/jobs/{by_api}/retry", headers=AUTH), 409, "conflict")
    assert message == f"job {by_api} is succeeded; only a failed job can be retried"
    assert _error(svc.client.post("/v1/jobs/wh_nope/retry", headers=AUTH), 404, "not_found")


def test_requeue_writes_the_job_as_rqs_failed_registry_requeue_does(service, receiver, redis_conn):
    """The contract of rqstore.requeue_failed: RQ's own requeue and ours leave the same job hash
    (but for what differs per job anyway, and the failure's expiry, which ours removes)."""
    svc = service()
    svc.start_worker()
    theirs, ours = (_webhook(svc, receiver.url("status/500"), retry=ONCE) for _ in range(2))
    for job_id in (theirs, ours):
        assert wait_for(svc.client, job_id)["status"] == "failed", svc.logs()
    svc.stop_all()
    queue = make_queue(redis_conn, svc.settings)

    queue.failed_job_registry.requeue(theirs)
    JobControl.of(redis_conn, svc.settings).retry(ours)

    per_job = {b"data", b"meta", b"description", b"created_at", b"enqueued_at", b"started_at", b"ended_at"}
    per_job |= {b"last_heartbeat", b"worker_name"}
    hashes = [redis_conn.hgetall(queue.job_class.key_for(job_id)) for job_id in (theirs, ours)]
    assert {k: v for k, v in hashes[0].items() if k not in per_job} == {
        k: v for k, v in hashes[1].items() if k not in per_job
    }
    assert set(hashes[0]) == set(hashes[1])
    assert hashes[0][b"started_at"] == hashes[1][b"started_at"] == b""
    assert hashes[0][b"ended_at"] == hashes[1][b"ended_at"] == b""
    assert queue.get_job_ids() == [theirs, ours] and queue.failed_job_registry.get_job_ids() == []
    assert redis_conn.ttl(queue.job_class.key_for(ours)) == -1


# --- replay ----------------------------------------------------------------------------------


def test_a_replay_after_a_receiver_outage_delivers_every_failed_webhook_once_more_with_its_webhook_id(
    service, receiver, smtp_server
):
    svc = service()
    svc.start_worker()
    urls = [receiver.url("fail/1/503") for _ in range(3)]  # the receiver is down for each first request
    webhooks = [_webhook(svc, url, retry=ONCE) for url in urls]
    rcpt = f"temp451-{uuid.uuid4().hex[:8]}@example.com"
    mail = svc.post("/v1/emails", {"to": [rcpt], "subject": "s", "text": "t", "retry": ONCE})
    for job_id in [*webhooks, mail]:
        assert wait_for(svc.client, job_id)["status"] == "failed", svc.logs()

    response = svc.client.post("/v1/jobs/replay", json={"kind": "webhook", "status": "failed"}, headers=AUTH)

    assert response.status_code == 200, response.get_json()
    answer = response.get_json()
    assert answer["requeued"] == 3 and sorted(answer["ids"]) == sorted(webhooks)
    for job_id, url in zip(webhooks, urls, strict=True):
        assert wait_for(svc.client, job_id)["status"] == "succeeded", svc.logs()
        assert [r.headers["webhook-id"] for r in receiver.received(url)] == [job_id, job_id]
    assert svc.client.get(f"/v1/jobs/{mail}", headers=AUTH).get_json()["status"] == "failed"
    again = svc.client.post("/v1/jobs/replay", json={}, headers=AUTH).get_json()
    assert again == {"requeued": 1, "ids": [mail]}
    assert wait_for(svc.client, mail)["status"] == "succeeded", svc.logs()


def test_replay_chooses_by_when_jobs_failed_up_to_the_limit(service, receiver):
    svc = service()
    svc.start_worker()
    first = _webhook(svc, receiver.url("status/500"), retry=ONCE)
    assert wait_for(svc.client, first)["status"] == "failed"
    between = datetime.now(UTC).isoformat()
    later = [_webhook(svc, receiver.url("status/500"), retry=ONCE) for _ in range(2)]
    for job_id in later:
        assert wait_for(svc.client, job_id)["status"] == "failed"
    svc.stop_all()  # what is requeued now stays queued

    def replay(body: dict) -> list[str]:
        response = svc.client.post("/v1/jobs/replay", json=body, headers=AUTH)
        assert response.status_code == 200, response.get_json()
        return response.get_json()["ids"]

    (one,) = replay({"since": between, "limit": 1})
    assert replay({"until": between}) == [first]
    assert replay({"kind": "email"}) == []
    assert replay({"since": between, "until": between}) == []
    assert {one, *replay({})} == set(later)
    for job_id in (first, *later):
        assert svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()["status"] == "queued"


def test_two_replays_at_once_requeue_each_failed_job_once(service, receiver, redis_conn):
    svc = service()
    svc.start_worker()
    items = [{"url": receiver.url("status/500"), "event_type": "a.b", "payload": {}, "retry": ONCE}] * 40
    response = svc.client.post("/v1/webhooks/batch", json={"items": items}, headers=AUTH)
    ids = [item["id"] for item in response.get_json()["items"]]
    for job_id in ids:
        assert wait_for(svc.client, job_id)["status"] == "failed", svc.logs()
    svc.stop_all()
    control = JobControl.of(redis_conn, svc.settings)
    answers: list[list[str]] = []
    start = threading.Barrier(2)

    def replay() -> None:
        start.wait()
        answers.append(control.replay(limit=10_000))

    threads = [threading.Thread(target=replay) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(answers[0] + answers[1]) == sorted(ids)
    assert sorted(make_queue(redis_conn, svc.settings, "low").get_job_ids()) == sorted(ids)


class _CountingConnection(redis.Connection):
    """A redis-py connection that counts what it sends: one round trip per command or pipeline."""

    sent = 0

    def send_packed_command(self, command, check_health=True):  # type: ignore[no-untyped-def]
        type(self).sent += 1
        super().send_packed_command(command, check_health)


def test_a_replay_of_10000_failed_jobs_takes_a_few_round_trips_not_one_per_job(service, receiver, redis_url):
    svc = service()
    item = {"url": receiver.url("ok"), "event_type": "a.b", "payload": {}}
    response = svc.client.post("/v1/webhooks/batch", json={"items": [item] * 10_000}, headers=AUTH)
    ids = [accepted["id"] for accepted in response.get_json()["items"]]
    connection = redis.Redis.from_url(redis_url, connection_class=_CountingConnection)
    queue = make_queue(connection, svc.settings, "low")
    # Failed as RQ leaves a job that failed an hour ago: its status, end time and failed-registry entry.
    ended = utcformat(now() - timedelta(hours=1))
    with connection.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hset(queue.job_class.key_for(job_id), mapping={"status": "failed", "ended_at": ended})
        pipe.zadd(queue.failed_job_registry.key, dict.fromkeys(ids, time.time() + 3600))
        pipe.delete(queue.key)
        pipe.execute()
    since = datetime.now(UTC) - timedelta(hours=2)
    before = _CountingConnection.sent

    try:
        requeued = JobControl.of(connection, svc.settings).replay(since=since, limit=10_000)

        assert _CountingConnection.sent - before < 40
        assert len(requeued) == 10_000 and set(requeued) == set(ids)
        assert sorted(queue.get_job_ids()) == sorted(ids)
    finally:
        connection.delete(queue.key, *(queue.job_class.key_for(job_id) for job_id in ids))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 10_001}, "limit"),
        ({"limit": True}, "limit"),
        ({"limit": "5"}, "limit"),
        ({"limit": 2.5}, "limit"),
        ({"status": "canceled"}, "status"),
        ({"kind": "sms"}, "kind"),
        ({"since": "yesterday"}, "since"),
        ({"since": 1764871200}, "since"),
        ({"since": "2026-12-04T18:00:00"}, "since"),  # no offset: which 18:00?
        ({"until": "2026-12-04"}, "until"),
        ({"until": "2026-02-30T18:00:00Z"}, "until"),
        ({"until": "2026-12-04 18:00:00+01:00"}, "until"),
        ({"until": "\u0662\u0660\u0662\u0666-12-04T18:00:00Z"}, "until"),  # Arabic-Indic digits
        ({"ids": ["wh_1"]}, "ids"),
    ],
)
def test_replay_refuses_a_bad_field_naming_it(client, body, field):
    response = client.post("/v1/jobs/replay", json=body, headers=AUTH)

    assert response.status_code == 422, response.get_json()
    assert [detail["field"] for detail in response.get_json()["error"]["details"]] == [field]
