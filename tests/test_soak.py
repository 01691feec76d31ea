"""Soak with faults: thousands of jobs, flaky receivers, workers killed with SIGKILL along the way.

At the end every job has succeeded, every id reached the receiver at least once,
and the test prints how many duplicates arrived (at-least-once delivery).
"""

from __future__ import annotations

import email
import email.policy
import random
import signal
import threading
import time
import uuid
from collections import Counter

import pytest
from aiosmtpd.controller import Controller

from tests.conftest import AUTH, SmtpHandler, free_port

WEBHOOKS = 2000
EMAILS = 500
KILLS = 3
WORKERS = 2
#: A job may fail 30 % of its attempts at random; 20 attempts make giving up practically impossible.
RETRY = {"max_attempts": 20, "backoff": [1]}

pytestmark = pytest.mark.soak


def run_soak(svc, submit, total: int, done, timeout: float) -> dict:
    """Start the workers, submit `total` jobs from a thread, SIGKILL a worker KILLS times meanwhile,
    and wait until `done()` counts every job settled."""
    for _ in range(WORKERS):
        svc.start_worker()
    ids: list[str] = []
    submitter = threading.Thread(target=lambda: ids.extend(submit(total)))
    started = time.monotonic()
    submitter.start()
    for _ in range(KILLS):
        time.sleep(2.5)
        victim = random.choice([w for w in svc.workers if w.poll() is None])
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        svc.start_worker()
    submitter.join()
    accepted_in = time.monotonic() - started
    deadline = started + timeout
    while True:
        stats = done()
        if stats["succeeded"] + stats["failed"] >= total or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return {"ids": ids, "accepted_in": accepted_in, "elapsed": time.monotonic() - started, **stats}


def report(capsys, kind: str, figures: dict) -> None:
    with capsys.disabled():
        print(
            f"\nSOAK {kind}: {figures['total']} accepted in {figures['accepted_in']:.1f}s, "
            f"all settled in {figures['elapsed']:.1f}s; succeeded {figures['succeeded']}, failed {figures['failed']}; "
            f"{figures['deliveries']} deliveries for {figures['unique']} ids -> {figures['duplicates']} duplicates; "
            f"{figures['attempts']} attempts, {figures['interrupted']} interrupted by {KILLS} SIGKILLs"
        )


def check_and_report(capsys, svc, kind: str, figures: dict, seen: Counter, expected: int) -> None:
    """Print the figures, then assert: every job accepted and succeeded, every id delivered at least once."""
    ids = figures["ids"]
    figures.update(
        total=len(ids), deliveries=sum(seen.values()), unique=len(seen), duplicates=sum(seen.values()) - len(seen)
    )
    figures["attempts"], figures["interrupted"], statuses = attempt_counts(svc, ids)
    report(capsys, kind, figures)

    assert len(ids) == expected
    assert figures["succeeded"] == expected, svc.logs()
    assert figures["failed"] == 0
    # The totals count jobs, not runs: a job delivered twice is still one success, so when they
    # say every job is done, every job is.
    assert statuses == Counter({"succeeded": expected}), statuses
    assert set(ids) <= set(seen), f"{len(set(ids) - set(seen))} {kind} never reached the receiver"


def attempt_counts(svc, ids: list[str]) -> tuple[int, int, Counter]:
    attempts = interrupted = 0
    statuses: Counter = Counter()
    for job_id in ids:
        job = svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()
        statuses[job["status"]] += 1
        attempts += len(job["attempts"])
        interrupted += sum(1 for a in job["attempts"] if "interrupted" in (a["error"] or ""))
    return attempts, interrupted, statuses


def test_webhook_soak_with_flaky_receiver_and_killed_workers(service, receiver, capsys):
    svc = service(DISPATCHER_WEBHOOK_TIMEOUT="5")
    url = receiver.url("random/30")

    def submit(n: int) -> list[str]:
        return [svc.post("/v1/webhooks", {"url": url, "event_type": "soak.test", "payload": {"i": i}, "retry": RETRY})
                for i in range(n)]

    def done() -> dict:
        return svc.client.get("/v1/stats", headers=AUTH).get_json()["webhook"]

    figures = run_soak(svc, submit, WEBHOOKS, done, timeout=240)
    seen = Counter(r.headers["webhook-id"] for r in receiver.received(url) if r.status_ok)
    check_and_report(capsys, svc, "webhooks", figures, seen, WEBHOOKS)


def test_email_soak_with_flaky_smtp_and_killed_workers(service, capsys):
    handler = SmtpHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        svc = service(DISPATCHER_SMTP_URL=f"smtp://127.0.0.1:{port}")
        tag = uuid.uuid4().hex[:8]

        def submit(n: int) -> list[str]:
            return [svc.post("/v1/emails", {"to": [f"random451-{tag}-{i}@example.com"], "subject": f"soak {i}",
                                            "text": "x", "retry": RETRY}) for i in range(n)]

        def done() -> dict:
            return svc.client.get("/v1/stats", headers=AUTH).get_json()["email"]

        figures = run_soak(svc, submit, EMAILS, done, timeout=240)
    finally:
        controller.stop()
    with handler.lock:
        messages = [m for m in handler.messages if any(tag in r for r in m.rcpt_tos)]
    seen = Counter(
        str(email.message_from_bytes(m.content, policy=email.policy.default)["Message-ID"]).strip("<>").split("@")[0]
        for m in messages
    )
    check_and_report(capsys, svc, "emails", figures, seen, EMAILS)
