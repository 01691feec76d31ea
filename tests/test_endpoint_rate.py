"""An endpoint's rate limit (issue #12, item 5): shared by every worker through Redis; a delivery
that may not go yet waits as scheduled and is not an attempt. Real workers, real receivers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import AUTH, ROOT, process_env, wait_until
from tests.test_endpoints import event, new_application, new_endpoint, publish


def started_per_window(times: list[float], window: float = 1.0) -> int:
    """The most deliveries that arrived within any `window` seconds."""
    times = sorted(times)
    most, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= window:
            start += 1
        most = max(most, end - start + 1)
    return most


def test_a_rate_of_20_per_second_is_held_across_3_worker_processes(service, receiver):
    """The issue's acceptance test: 60 deliveries to one endpoint limited to 20/s, three workers."""
    svc = service()
    app = new_application(svc)
    url = receiver.url()
    new_endpoint(svc, app, url, rate_limit=20)
    events = [publish(svc, app, payload={"n": n}).get_json()["id"] for n in range(60)]
    for _ in range(3):
        svc.start_worker()

    wait_until(lambda: len(receiver.received(url)) >= 60, 60, "the deliveries did not all arrive")
    wait_until(lambda: all(event(svc, e)["percent_done"] == 100 for e in events), 30, "not all settled")

    times = [request.received_at for request in receiver.received(url)]
    assert len(times) == 60
    # 20 a second, and the slots of one horizon (a quarter of a second) after the start: at most 21-26.
    assert started_per_window(times) <= 26, sorted(times)
    assert max(times) - min(times) >= 59 / 20 * 0.8  # not all at once: about 3 s
    for event_id in events[:20]:
        (delivery,) = event(svc, event_id)["deliveries"]
        job = svc.client.get(delivery["status_url"], headers=AUTH).get_json()
        assert [a["number"] for a in job["attempts"]] == [1]  # waiting was no attempt


def test_a_held_delivery_is_shown_scheduled_with_the_reason_and_no_attempt(service, receiver):
    svc = service()
    app = new_application(svc)
    url = receiver.url()
    new_endpoint(svc, app, url, rate_limit=0.5)  # one every two seconds
    events = [publish(svc, app, payload={"n": n}).get_json()["id"] for n in range(3)]
    svc.start_worker()

    def held() -> list[dict]:
        jobs = [svc.client.get(event(svc, e)["deliveries"][0]["status_url"], headers=AUTH).get_json() for e in events]
        return [job for job in jobs if job["status"] == "scheduled" and job["held"]]

    wait_until(lambda: held(), 20, "no delivery was held")
    job = held()[0]
    assert job["held"] == "the endpoint's rate limit (0.5/s)"
    assert job["attempts"] == [] and job["next_attempt_at"] is not None
    wait_until(lambda: len(receiver.received(url)) == 3, 30, "the held deliveries did not go")
    times = sorted(request.received_at for request in receiver.received(url))
    assert times[2] - times[0] >= 2 * 2 * 0.8
    done = svc.client.get(event(svc, events[2])["deliveries"][0]["status_url"], headers=AUTH).get_json()
    assert (done["status"], done["held"], len(done["attempts"])) == ("succeeded", None, 1)


def test_endpoints_have_rates_of_their_own(service, receiver):
    svc = service()
    app = new_application(svc)
    slow, fast = receiver.url(), receiver.url()
    new_endpoint(svc, app, slow, rate_limit=2)
    new_endpoint(svc, app, fast)
    for n in range(6):
        publish(svc, app, payload={"n": n})
    svc.start_worker()

    wait_until(lambda: len(receiver.received(fast)) == 6, 30, "the unlimited endpoint was held")
    assert len(receiver.received(slow)) < 6  # the limited one is still going
    wait_until(lambda: len(receiver.received(slow)) == 6, 30, "the limited endpoint stopped")
    assert started_per_window([r.received_at for r in receiver.received(slow)]) <= 3


@pytest.mark.parametrize("rate", [0, -1, 10_001, "5", True])
def test_a_rate_limit_out_of_bounds_is_a_422(service, receiver, rate):
    svc = service()
    app = new_application(svc)

    response = svc.client.post(f"/v1/applications/{app}/endpoints", json={"url": receiver.url(), "rate_limit": rate},
                               headers=AUTH)

    assert response.status_code == 422
    assert response.get_json()["error"]["details"][0]["field"] == "rate_limit"


def test_under_a_plain_rq_worker_a_held_delivery_waits_without_an_attempt_too(service, receiver, tmp_path):
    """The job function (workers.jobs) hands RQ a Retry for a held delivery and takes its attempt back."""
    svc = service()
    app = new_application(svc)
    url = receiver.url()
    new_endpoint(svc, app, url, rate_limit=1)
    events = [publish(svc, app, payload={"n": n}).get_json()["id"] for n in range(3)]
    rq = str(Path(sys.executable).parent / "rq")
    command = [rq, "worker", "--with-scheduler", "-u", svc.settings.redis_url, "-S", "rq.serializers.JSONSerializer",
               svc.settings.queue_name]
    with open(tmp_path / "rq.log", "wb") as out:
        worker = subprocess.Popen(command, cwd=ROOT, env=process_env(svc.env), stdout=out, stderr=out)
    try:
        wait_until(lambda: len(receiver.received(url)) == 3, 60, (tmp_path / "rq.log").read_text())
    finally:
        worker.kill()
        worker.wait()

    times = sorted(request.received_at for request in receiver.received(url))
    assert times[2] - times[0] >= 2 * 0.8
    for event_id in events:
        job = svc.client.get(event(svc, event_id)["deliveries"][0]["status_url"], headers=AUTH).get_json()
        assert [(a["number"], a["outcome"]) for a in job["attempts"]] == [(1, "succeeded")]
