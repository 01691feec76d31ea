"""Priority queues: `priority` on every send, one RQ queue per priority, workers serving them in strict
order (`dispatcher worker --queues` for some only), and a job popped from any of them recoverable when
its worker dies at once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis
from rq import Queue
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from dispatcher.config import Settings
from dispatcher.enqueue import make_queue, make_queues
from dispatcher.errors import ConfigError
from dispatcher.keys import Keys
from dispatcher.priorities import PRIORITIES, queue_name
from dispatcher.rqstore import WAKE_TOKENS
from tests.conftest import AUTH, ROOT, process_env, wait_for, wait_until
from tests.test_worker_contract import rq_worker_command, run_in, start_worker
from workers.worker import IDLE_BLOCK, DispatcherWorker

BIN_DISPATCHER = [sys.executable, "-c", "import sys; from dispatcher.cli import main; sys.exit(main())"]
#: A worker process starts, delivers a little and exits within this, on a shared 2-core machine.
EXIT_BOUND = 60
#: Recovery after a SIGKILL, as tests/test_reliability.py bounds it.
RECOVERY_BOUND = 60


def webhook(url: str, **extra) -> dict:
    return {"url": url, "event_type": "priority.test", "payload": {}, **extra}


def email(to: str, **extra) -> dict:
    return {"to": [to], "subject": "priority", "text": "hello", **extra}


def queued_in(redis_conn: redis.Redis, settings: Settings) -> dict[str, list[str]]:
    """Job ids per priority, as RQ lists its queues."""
    return {q.name: q.get_job_ids() for q in make_queues(redis_conn, settings)}


def run_worker(svc, *args: str) -> subprocess.Popen:
    """`dispatcher worker ARGS` in the service's environment, logged with its workers."""
    return start_worker(svc, *args, command=(*BIN_DISPATCHER, "worker"))


# --- the API -----------------------------------------------------------------------------------


def test_each_priority_is_an_rq_queue_single_sends_default_and_batches_low(service, receiver, redis_conn):
    svc = service()
    url = receiver.url("ok")
    names = {p: queue_name(svc.settings.queue_name, p) for p in PRIORITIES}
    assert names == {
        "high": f"{svc.settings.queue_name}-high",
        "default": svc.settings.queue_name,
        "low": f"{svc.settings.queue_name}-low",
    }

    plain = svc.post("/v1/webhooks", webhook(url))
    given = {p: svc.post("/v1/emails", email("p@example.com", priority=p)) for p in PRIORITIES}
    batch = svc.client.post("/v1/webhooks/batch", json={"items": [webhook(url), webhook(url)]}, headers=AUTH)
    urgent = svc.client.post(
        "/v1/emails/batch", json={"items": [email("b@example.com")], "priority": "high"}, headers=AUTH
    )
    assert batch.status_code == urgent.status_code == 202
    batch_ids = [item["id"] for item in batch.get_json()["items"]]
    (urgent_id,) = [item["id"] for item in urgent.get_json()["items"]]

    queues = queued_in(redis_conn, svc.settings)
    assert queues[names["default"]] == [plain, given["default"]]
    assert queues[names["high"]] == [given["high"], urgent_id]
    assert queues[names["low"]] == [given["low"], *batch_ids]
    expected = {plain: "default", batch_ids[0]: "low", urgent_id: "high"} | {i: p for p, i in given.items()}
    for job_id, priority in expected.items():
        view = svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()
        assert (view["priority"], view["status"]) == (priority, "queued")
    # The totals and the job list are one Dispatcher queue's, whatever the priority.
    stats = svc.client.get("/v1/stats", headers=AUTH).get_json()
    assert stats["webhook"]["queued"] == 3 and stats["email"]["queued"] == 4
    listed = svc.client.get("/v1/jobs?limit=100", headers=AUTH).get_json()["jobs"]
    assert {job["id"] for job in listed} == {plain, *given.values(), *batch_ids, urgent_id}


@pytest.mark.parametrize("value", ["urgent", "HIGH", "", None, 1, True, ["high"], {"p": "high"}])
@pytest.mark.parametrize("path", ["/v1/webhooks", "/v1/emails", "/v1/webhooks/batch", "/v1/emails/batch"])
def test_a_priority_that_is_not_one_is_rejected_naming_the_field(service, receiver, path, value):
    svc = service()
    item = webhook(receiver.url("ok")) if "webhooks" in path else email("x@example.com")
    body = {"items": [item], "priority": value} if path.endswith("batch") else item | {"priority": value}
    response = svc.client.post(path, json=body, headers=AUTH)
    assert response.status_code == 422, response.get_json()
    assert [d["field"] for d in response.get_json()["error"]["details"]] == ["priority"]


def test_a_batch_item_with_its_own_priority_is_rejected_and_nothing_is_queued(service, receiver, redis_conn):
    svc = service()
    items = [webhook(receiver.url("ok")), webhook(receiver.url("ok"), priority="high")]
    response = svc.client.post("/v1/webhooks/batch", json={"items": items}, headers=AUTH)
    assert response.status_code == 422
    details = response.get_json()["error"]["details"]
    assert details == [{"field": "items.1.priority", "problem": "give the priority once, for the whole batch"}]
    assert all(ids == [] for ids in queued_in(redis_conn, svc.settings).values())


@pytest.mark.parametrize("name", ["mail-high", "mail-low", "-high"])
def test_a_dispatcher_queue_named_like_a_priority_queue_is_refused(name):
    with pytest.raises(ConfigError, match="DISPATCHER_QUEUE must not end in"):
        Settings.from_env({"DISPATCHER_QUEUE": name})


# --- the worker --------------------------------------------------------------------------------


def test_a_worker_serves_its_queues_in_strict_priority_order(service, receiver):
    svc = service(DISPATCHER_CONCURRENCY="1")
    url = receiver.url("ok")
    order = ["low", "default", "high"] * 3  # queued lowest first, so arrival order alone would be wrong
    ids = {svc.post("/v1/webhooks", webhook(url, priority=p, payload={"p": p})): p for p in order}

    assert run_worker(svc, "--burst").wait(timeout=EXIT_BOUND) == 0, svc.logs()

    delivered = [json.loads(r.body)["data"]["p"] for r in receiver.received(url)]
    assert delivered == ["high"] * 3 + ["default"] * 3 + ["low"] * 3, delivered
    assert {svc.client.get(f"/v1/jobs/{i}", headers=AUTH).get_json()["status"] for i in ids} == {"succeeded"}


def test_dispatcher_worker_queues_serves_only_those_priorities(service, receiver, redis_conn):
    svc = service()
    url = receiver.url("ok")
    ids = {p: svc.post("/v1/webhooks", webhook(url, priority=p)) for p in PRIORITIES}

    assert run_worker(svc, "--queues", "high", "--burst").wait(timeout=EXIT_BOUND) == 0, svc.logs()
    assert [svc.client.get(f"/v1/jobs/{ids[p]}", headers=AUTH).get_json()["status"] for p in PRIORITIES] == [
        "succeeded",
        "queued",
        "queued",
    ]
    assert run_worker(svc, "--queues", "low,high", "--burst").wait(timeout=EXIT_BOUND) == 0, svc.logs()
    assert queued_in(redis_conn, svc.settings)[svc.settings.queue_name] == [ids["default"]]
    assert wait_for(svc.client, ids["low"])["status"] == "succeeded"
    assert len(receiver.received(url)) == 2

    refused = subprocess.run(
        [*BIN_DISPATCHER, "worker", "--queues", "urgent"],
        env=process_env(svc.env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=EXIT_BOUND,
    )
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        "dispatcher worker: Invalid value for '--queues': queues are priorities, some of high, default, low; "
        "got 'urgent' (see dispatcher worker --help)"
    ]


def test_rq_worker_with_dispatchers_class_takes_priority_queues_and_refuses_mixed_ones(service, receiver, redis_url):
    svc = service()
    base = svc.settings.queue_name
    ids = [svc.post("/v1/webhooks", webhook(receiver.url("ok"), priority=p)) for p in ("low", "high")]
    done = run_in(svc, rq_worker_command(svc, redis_url, "--burst", queues=[f"{base}-high", f"{base}-low"]))
    assert done.returncode == 0, done.stderr
    assert [svc.client.get(f"/v1/jobs/{i}", headers=AUTH).get_json()["status"] for i in ids] == ["succeeded"] * 2

    with redis.Redis.from_url(redis_url) as connection, pytest.raises(ValueError, match="one Dispatcher queue"):
        DispatcherWorker(
            [Queue(base, connection=connection), Queue("other-high", connection=connection)], connection=connection
        )


def test_an_idle_worker_of_several_queues_is_woken_by_each_send(service, receiver, redis_conn):
    svc = service()
    keys = Keys(svc.settings.queue_name)
    url = receiver.url("ok")
    # With no worker waiting, every send leaves a wake token, up to WAKE_TOKENS in all.
    for n in range(WAKE_TOKENS + 3):
        svc.post("/v1/webhooks", webhook(url, priority=PRIORITIES[n % 3]))
        assert redis_conn.llen(keys.wake) == min(n + 1, WAKE_TOKENS)
    svc.start_worker()
    wait_until(lambda: len(receiver.received(url)) == WAKE_TOKENS + 3, 30, svc.logs())

    # An idle worker blocks on the wake list, not on one queue: a send to any queue starts at once,
    # not at the end of its IDLE_BLOCK wait.
    latencies = []
    for priority in ("low", "high", "default", "low", "high"):
        time.sleep(IDLE_BLOCK * 1.3)  # idle, blocked in its wait
        single = receiver.url("ok")
        posted = time.monotonic()
        svc.post("/v1/webhooks", webhook(single, priority=priority))
        wait_until(lambda u=single: receiver.received(u), 30, svc.logs())
        latencies.append(time.monotonic() - posted)
    print(f"send to delivery on an idle worker: {[round(s, 3) for s in latencies]}")
    assert max(latencies) < IDLE_BLOCK / 2, latencies  # generous: a woken worker takes milliseconds

    # A job queued by RQ's own tools (no token) is found at the end of the wait at the latest.
    failed_again = svc.post(
        "/v1/webhooks", webhook(receiver.url("fail/1/500"), priority="low", retry={"max_attempts": 1})
    )
    assert wait_for(svc.client, failed_again)["status"] == "failed"
    low = make_queue(redis_conn, svc.settings, "low")
    FailedJobRegistry(queue=low).requeue(failed_again)
    assert wait_for(svc.client, failed_again, timeout=30)["status"] == "succeeded", svc.logs()


def test_a_high_priority_email_overtakes_10000_low_priority_webhooks(service, receiver, smtp_server, redis_conn):
    svc = service()
    url = receiver.url("ok")
    for _ in range(10):
        items = [webhook(url) for _ in range(1000)]
        response = svc.client.post("/v1/webhooks/batch", json={"items": items}, headers=AUTH)
        assert response.status_code == 202
    svc.start_worker()
    svc.start_worker()
    wait_until(lambda: len(receiver.received(url)) >= 500, 60, f"the workers never got going: {svc.logs()}")

    address = f"urgent-{uuid.uuid4().hex[:8]}@example.com"
    posted = time.monotonic()
    job_id = svc.post("/v1/emails", email(address, priority="high"))
    wait_until(lambda: smtp_server.handler.messages_to(address), 30, svc.logs())
    took = time.monotonic() - posted
    behind = len(make_queue(redis_conn, svc.settings, "low"))
    print(f"high-priority email delivered {took:.3f}s after its 202, with {behind} low webhooks still queued")

    # The proof is `behind`: thousands still queued. The time is a generous bound (about 0.1 s on a
    # quiet machine, 1.05 s once under a loaded suite run).
    assert took < 5.0, f"{took:.2f}s, with {behind} low-priority webhooks still queued"
    assert behind > 1000, "the low-priority webhooks were nearly done: this measured nothing"
    assert wait_for(svc.client, job_id)["status"] == "succeeded"


# --- crash safety on every queue ---------------------------------------------------------------


def test_jobs_popped_from_every_queue_by_a_worker_that_died_at_once_are_recovered(service, receiver, redis_conn):
    svc = service()
    url = receiver.url("ok")
    ids = {}
    for priority in PRIORITIES:
        ids[priority] = svc.post("/v1/webhooks", webhook(url, priority=priority))
        queue = make_queue(redis_conn, svc.settings, priority)
        # What a worker killed right after its pop leaves: the id in that queue's intermediate list only.
        assert redis_conn.lmove(queue.key, queue.intermediate_queue_key) == ids[priority].encode()

    svc.start_worker()

    for priority, job_id in ids.items():
        job = wait_for(svc.client, job_id, timeout=RECOVERY_BOUND)
        assert (job["status"], job["priority"]) == ("succeeded", priority), svc.logs()
    assert sorted(r.headers["webhook-id"] for r in receiver.received(url)) == sorted(ids.values())


def test_jobs_of_every_queue_whose_worker_is_killed_mid_delivery_are_recovered(service, receiver):
    svc = service(DISPATCHER_WEBHOOK_TIMEOUT="15")
    first = svc.start_worker()
    url = receiver.url("slow/3")
    ids = {p: svc.post("/v1/webhooks", webhook(url, priority=p, retry={"backoff": [1]})) for p in PRIORITIES}
    wait_until(lambda: len(receiver.received(url)) == 3, 15, f"the first deliveries never all began: {svc.logs()}")

    first.send_signal(signal.SIGKILL)
    svc.start_worker()

    for priority, job_id in ids.items():
        job = wait_for(svc.client, job_id, timeout=RECOVERY_BOUND)
        assert (job["status"], job["priority"]) == ("succeeded", priority), svc.logs()
        assert [a["outcome"] for a in job["attempts"]] == ["retryable", "succeeded"]
    assert sorted(r.headers["webhook-id"] for r in receiver.received(url)) == sorted([*ids.values()] * 2)


def test_sigkill_at_any_moment_loses_no_job_of_any_queue(service, receiver, redis_conn):
    """Workers killed again and again while they pop, start, deliver and record jobs of all three
    queues: every job accepted is delivered in the end, and its history agrees with the totals."""
    svc = service(DISPATCHER_CONCURRENCY="8")
    url = receiver.url("slow/0.05")
    ids = []
    for priority in PRIORITIES:
        items = [webhook(url, payload={"n": n}) for n in range(100)]
        body = {"items": items, "priority": priority}
        response = svc.client.post("/v1/webhooks/batch", json=body, headers=AUTH)
        ids += [item["id"] for item in response.get_json()["items"]]
    kills = 0
    worker = svc.start_worker()
    while kills < 12 and len({r.headers["webhook-id"] for r in receiver.received(url)}) < len(ids):
        time.sleep(0.15 + 0.1 * (kills % 4))  # at different points of its loop each time
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        kills += 1
        worker = svc.start_worker()

    views = [wait_for(svc.client, job_id, timeout=2 * RECOVERY_BOUND) for job_id in ids]
    assert {v["status"] for v in views} == {"succeeded"}, svc.logs()
    assert {r.headers["webhook-id"] for r in receiver.received(url)} == set(ids)
    stats = svc.client.get("/v1/stats", headers=AUTH).get_json()["webhook"]
    assert stats["succeeded"] == len(ids) and stats["queued"] == stats["running"] == 0
    for queue in make_queues(redis_conn, svc.settings):
        assert redis_conn.llen(queue.intermediate_queue_key) == 0
    duplicates = len(receiver.received(url)) - len(ids)
    print(f"{kills} SIGKILLs over {len(ids)} jobs on 3 queues: none lost, {duplicates} delivered twice")
    assert kills >= 3, "the workers finished before they were killed a few times: this tested little"


def test_rq_requeue_of_a_failed_low_priority_job_delivers_it_on_its_own_queue(service, receiver, redis_conn):
    svc = service()
    url = receiver.url("fail/1/500")
    job_id = svc.post("/v1/webhooks", webhook(url, priority="low", retry={"max_attempts": 1}))
    svc.start_worker()
    assert wait_for(svc.client, job_id)["status"] == "failed"

    low = Queue(f"{svc.settings.queue_name}-low", connection=redis_conn, serializer=JSONSerializer)
    FailedJobRegistry(queue=low).requeue(job_id)

    job = wait_for(svc.client, job_id, until=lambda j: j["status"] == "succeeded", timeout=30)
    assert job["priority"] == "low"
    assert [a["outcome"] for a in job["attempts"]] == ["retryable", "succeeded"]
    stats = svc.client.get("/v1/stats", headers=AUTH).get_json()["webhook"]
    assert (stats["succeeded"], stats["failed"]) == (1, 0)
