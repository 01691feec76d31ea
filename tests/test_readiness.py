"""GET /readyz tells the truth about delivery: per priority, the jobs waiting and the workers alive
that serve that queue, with a warning where jobs wait and nobody will deliver them."""

from __future__ import annotations

import json
import os
import signal
import urllib.request

from tests.conftest import API_KEY, free_port, process_env, start_dispatcher, wait_until


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


def test_the_web_process_warns_in_its_log_when_jobs_wait_for_no_worker(service, receiver, tmp_path):
    svc = service()
    port = free_port()
    log = tmp_path / "web.log"
    env = process_env(svc.env | {"PORT": str(port), "WEB_CONCURRENCY": "1"})
    web = start_dispatcher("web", env, log)
    try:
        wait_until(lambda: b"Booting worker" in log.read_bytes(), 30, "dispatcher web did not start")
        body = json.dumps({"url": receiver.url("ok"), "event_type": "a.b", "payload": {}, "priority": "high"})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/webhooks", data=body.encode(), method="POST",
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 202
        queue = f"{svc.settings.queue_name}-high"
        warning = f"1 job(s) wait in {queue} and no worker serving it is alive: start `dispatcher worker`"
        wait_until(lambda: warning in log.read_text(errors="replace"), 30, log.read_text(errors="replace"))

        svc.start_worker()
        back = f"{queue}: no job waits without a live worker any more"
        wait_until(lambda: back in log.read_text(errors="replace"), 30, log.read_text(errors="replace"))
        assert log.read_text(errors="replace").count(warning) == 1  # said once, not at every check
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(timeout=30)
