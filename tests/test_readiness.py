"""GET /readyz tells the truth about delivery: per priority, the jobs waiting and the workers alive
that serve that queue, with a warning where jobs wait and nobody will deliver them."""

from __future__ import annotations

import signal

from tests.conftest import wait_until


def readiness(svc) -> dict:
    response = svc.client.get("/readyz")
    assert response.status_code == 200
    return response.get_json()


def test_readyz_reports_workers_alive_per_queue_and_warns_when_jobs_wait_for_none(service, receiver):
    svc = service()
    base = svc.settings.queue_name
    svc.post("/v1/webhooks", {"url": receiver.url("slow/30"), "event_type": "a.b", "payload": {}, "priority": "low"})
    svc.post("/v1/webhooks", {"url": receiver.url("ok"), "event_type": "a.b", "payload": {}, "priority": "low"})

    ready = readiness(svc)
    assert ready["queues"]["low"] == {"queue": f"{base}-low", "queued": 2, "workers": 0}
    assert ready["queues"]["high"] == {"queue": f"{base}-high", "queued": 0, "workers": 0}
    assert ready["warnings"] == [f"2 job(s) wait in {base}-low and no worker serving it is alive"]

    worker = svc.start_worker()
    wait_until(lambda: readiness(svc)["queues"]["low"]["workers"] == 1, 30, svc.logs())
    assert readiness(svc)["warnings"] == []
    assert {q["workers"] for q in readiness(svc)["queues"].values()} == {1}

    # Killed: RQ still lists it for minutes; its liveness key expires within seconds, and so does
    # its count here. (The slow webhook it held waits for the reaper of a live worker.)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    wait_until(lambda: readiness(svc)["queues"]["low"]["workers"] == 0, 30, "a killed worker still counted as alive")
