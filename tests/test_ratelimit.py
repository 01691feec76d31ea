"""Sending rates: DISPATCHER_SMTP_RATE is one rate shared by every worker through Redis; messages
waiting for it, or refused by the server for sending too fast, use no attempt. And GET /v1/stats
lists the recent successes beside the recent failures."""

from __future__ import annotations

import bisect
import math
import subprocess
import sys
import time
import uuid
from datetime import datetime

from dispatcher.app import create_app
from dispatcher.channels.email import EmailRequest
from dispatcher.keys import Keys
from dispatcher.ratelimit import BURST_SECONDS, MIN_SHARE, SharedRate
from tests.conftest import AUTH, ROOT, THROTTLING, process_env, wait_for, wait_until
from workers.worker import MAX_THROTTLES

RATE = 20
MESSAGES = 80
WORKERS = 3


def _email(to: str, **extra: object) -> dict:
    return {"to": [to], "subject": "rate", "text": "x", **extra}


def _attempt_lines(svc) -> list[int]:
    """How many attempt lines each worker of `svc` logged."""
    return [path.read_text().count('"message": "attempt"') for path in sorted(svc.log_dir.glob("worker-*.log"))]


def _moment(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def _busiest(times: list[float]) -> int:
    """The most of `times` (sorted) in any one second."""
    return max(bisect.bisect_left(times, start + 1.0) - i for i, start in enumerate(times))


def _rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def test_a_rate_of_20_per_second_is_held_across_three_worker_processes(service, smtp_server):
    # Two delivery slots a worker: each holds few jobs, so all three take their share of the queue.
    svc = service(DISPATCHER_SMTP_RATE=str(RATE), DISPATCHER_CONCURRENCY="2")
    for _ in range(WORKERS):
        svc.start_worker()
    wait_until(
        lambda: svc.client.get("/readyz").get_json()["queues"]["default"]["workers"] == WORKERS,
        30,
        f"the workers did not start: {svc.logs()}",
    )
    tag = uuid.uuid4().hex[:8]
    recipients = [f"rate-{tag}-{i}@example.com" for i in range(MESSAGES)]
    response = svc.client.post("/v1/emails/batch", json={"items": [_email(to) for to in recipients]}, headers=AUTH)
    assert response.status_code == 202, response.get_json()
    ids = {item["id"] for item in response.get_json()["items"]}

    def arrived() -> list[float]:
        with smtp_server.handler.lock:
            return sorted(m.received_at for m in smtp_server.handler.messages if m.rcpt_tos[0] in recipients)

    wait_until(lambda: len(arrived()) >= MESSAGES, 30, f"not every message arrived: {svc.logs()}")

    times = arrived()
    assert len(times) == MESSAGES  # each once

    def listed() -> list[dict]:
        jobs = svc.client.get("/v1/jobs?kind=email&limit=200", headers=AUTH).get_json()["jobs"]
        return [job for job in jobs if job["id"] in ids]

    def all_done() -> bool:
        return {(job["status"], len(job["attempts"])) for job in listed()} == {("succeeded", 1)}

    wait_until(all_done, 10, "not every job succeeded with one attempt")
    starts = sorted(_moment(job["attempts"][0]["started_at"]) for job in listed())
    burst = max(1, math.floor(RATE * BURST_SECONDS))
    print(f"\nbusiest second: {_busiest(starts)} sends started, {_busiest(times)} arrived; overall", end=" ")
    print(f"{_rate(starts):.1f}/s started, {_rate(times):.1f}/s arrived")
    # Sends started (each attempt's start, in the workers): in any one second, the rate, the burst a
    # quiet schedule allows, and the slots a late-waking worker may use together before they lapse.
    assert _busiest(starts) <= RATE + 2 * burst + 1
    assert (MESSAGES - burst - 1) / (starts[-1] - starts[0]) <= RATE * 1.05
    # At the server, with room for the jitter of the SMTP path on a loaded machine (a first message
    # also opens its connection, so the first arrivals come late).
    assert _busiest(times) <= RATE * 1.5
    assert (MESSAGES - burst - 1) / (times[-1] - times[0]) <= RATE * 1.1
    assert all(lines > 0 for lines in _attempt_lines(svc)), _attempt_lines(svc)


def test_throttling_replies_slow_the_shared_rate_and_use_no_attempt(service, smtp_server, redis_conn):
    """The server refuses the first two tries of each message, for sending too fast: a 421, 454 or
    450 saying "rate" at RCPT, a 421 at MAIL. With one attempt allowed, each is still delivered."""
    svc = service(DISPATCHER_SMTP_RATE="50")
    tag = uuid.uuid4().hex[:8]
    once = {"max_attempts": 1}
    sends = {f"{prefix}-{tag}@example.com": _email(f"{prefix}-{tag}@example.com", retry=once) for prefix in THROTTLING}
    sender = f"throttle421-mail-{tag}@example.com"
    sends["MAIL " + sender] = _email(f"ok-{tag}@example.com", retry=once, **{"from": sender})
    ids = {key: svc.post("/v1/emails", body) for key, body in sends.items()}
    svc.start_worker()

    jobs = {key: wait_for(svc.client, job_id) for key, job_id in ids.items()}

    for key, job in jobs.items():
        assert job["status"] == "succeeded", (job, svc.logs())
        assert [(a["number"], a["outcome"]) for a in job["attempts"]] == [(1, "succeeded")]
        assert smtp_server.handler.seen[key] == 3  # two refusals, then the delivery
    shared = SharedRate(redis_conn, Keys(svc.settings.queue_name).rate("email"), 50)
    assert shared.current() < 50
    (gauge,) = [
        line
        for line in svc.client.get("/metrics").get_data(as_text=True).splitlines()
        if line.startswith('dispatcher_send_rate{channel="email"} ')
    ]
    assert float(gauge.split()[-1]) < 50
    assert "refused for sending too fast" in svc.logs()
    shown = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "stats"],
        env=process_env(svc.env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "email sending rate: " in shown.stdout and "/s now, of 50/s" in shown.stdout, shown


def test_a_server_that_always_throttles_spends_an_attempt_after_a_bounded_number_of_refusals(service, smtp_server):
    svc = service(DISPATCHER_SMTP_RATE="50")
    to = f"throttled-{uuid.uuid4().hex[:8]}@example.com"
    job_id = svc.post("/v1/emails", _email(to, retry={"max_attempts": 1}))
    svc.start_worker()

    job = wait_for(svc.client, job_id)

    assert job["status"] == "failed", job
    assert [(a["number"], a["outcome"], a["status_code"]) for a in job["attempts"]] == [(1, "retryable", 421)]
    assert smtp_server.handler.seen[to] == MAX_THROTTLES + 1


def test_without_a_rate_a_throttling_reply_is_an_ordinary_retryable_attempt(burst_worker):
    worker = burst_worker()
    request = EmailRequest.model_validate(
        _email(f"throttle421-{uuid.uuid4().hex[:8]}@example.com"), context={"email_from": "a@example.com"}
    )
    job_id = worker.enqueue("email", request)

    worker.run()

    job = worker.job(job_id)
    assert job["status"] == "scheduled"
    assert [(a["outcome"], a["status_code"]) for a in job["attempts"]] == [("retryable", 421)]


def test_throttling_halves_the_shared_rate_once_per_hold_down_to_a_floor_then_it_recovers(redis_conn):
    key = f"test-rate-{uuid.uuid4().hex}"

    def slow(shared: SharedRate) -> tuple[bool, float]:
        with redis_conn.pipeline() as pipe:
            shared.slow_down(pipe)
            (reply,) = pipe.execute()
        return SharedRate.slowed(reply)

    steady = SharedRate(redis_conn, key, 64, hold=60, recovery=60)
    assert steady.current() == 64
    assert slow(steady) == (True, 32)
    assert slow(steady) == (False, 32)  # the messages in flight meet the same refusal: one signal
    eager = SharedRate(redis_conn, key, 64, hold=0, recovery=60)
    for _ in range(10):
        slow(eager)
    assert eager.current() == 64 * MIN_SHARE
    quick = SharedRate(redis_conn, key, 64, recovery=0.1)
    time.sleep(0.7)  # at least six doublings
    assert quick.current() == 64


def test_stats_list_the_ten_most_recent_successes_newest_first(burst_worker, receiver):
    worker = burst_worker()
    client = create_app(worker.settings).test_client()

    def post(scenario: str) -> str:
        body = {"url": receiver.url(scenario), "event_type": "a.b", "payload": {}}
        return client.post("/v1/webhooks", json=body, headers=AUTH).get_json()["id"]

    ids = [post("ok"), post("ok")]
    failed = post("status/410")
    ids += [post("ok") for _ in range(10)]

    worker.run()

    stats = client.get("/v1/stats", headers=AUTH).get_json()
    successes = stats["recent_successes"]
    assert [s["id"] for s in successes] == ids[::-1][:10]
    assert {(s["kind"], s["attempts"]) for s in successes} == {("webhook", 1)}
    assert all(s["succeeded_at"] and s["target"]["url"].startswith("http://127.0.0.1:") for s in successes)
    assert [f["id"] for f in stats["recent_failures"]] == [failed]
