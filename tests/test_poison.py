"""Poison jobs fail alone: garbage in any Redis key of one job, among many good ones in flight.

Every case runs against one long-lived worker process. Garbage written while the job is queued
(in the same MULTI/EXEC as its enqueue, so no worker sees it clean) leaves the job unreadable: it
must fail, undelivered, with an error saying what. Garbage written while its attempt runs hits
keys the worker has already read: the delivery was made, so the worker replaces its keys of the
wrong type from memory and records the truth (succeeded). Either way every good job is delivered
exactly once and succeeds, the worker loop never restarts, and the API answers 200.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import redis
from rq.executions import ExecutionRegistry
from rq.job import Job
from rq.results import Result

from dispatcher.channels.webhook import WebhookRequest
from dispatcher.enqueue import enqueue_many, make_queue
from dispatcher.keys import Keys
from tests.conftest import AUTH, Receiver, Service, wait_for, wait_until

#: (name, how to write it) pairs of garbage for one hash field.
FIELD_GARBAGE = {"text": b"garbage", "bytes": b"\xff\xfe\x00", "json": b"[1, 2]"}
#: Key garbage: what replaces a whole key.
KEY_GARBAGE: dict[str, Callable[[redis.client.Pipeline, str], None]] = {
    "string": lambda pipe, key: (pipe.delete(key), pipe.set(key, "garbage")),
    "list": lambda pipe, key: (pipe.delete(key), pipe.rpush(key, "a", "b")),
}
#: The job hash's fields and the garbage each is tried with (some values are readable text for RQ).
JOB_FIELDS = {
    "data": ("text", "bytes", "json"),
    "meta": ("text", "bytes", "json"),
    "status": ("text", "bytes"),
    "created_at": ("text", "bytes"),
    "enqueued_at": ("text", "bytes"),
    "started_at": ("text", "bytes"),
    "timeout": ("text",),
    "result_ttl": ("text",),
    "failure_ttl": ("text",),
    "origin": ("text", "bytes"),
    "retry_intervals": ("text",),
}


def _job_key(job_id: str, keys: Keys) -> str:
    return Job.key_for(job_id)


def _attempts_key(job_id: str, keys: Keys) -> str:
    return keys.attempts(job_id)


def _results_key(job_id: str, keys: Keys) -> str:
    return Result.get_key(job_id)


def _executions_key(job_id: str, keys: Keys) -> str:
    return ExecutionRegistry(job_id, connection=None).key  # type: ignore[arg-type]


OWN_KEYS = {"job": _job_key, "attempts": _attempts_key, "results": _results_key, "executions": _executions_key}
#: Garbage inside the attempts hash: (name, fields to write). A record is the last (the counter's).
HISTORY_GARBAGE = {
    "counter-text": {"n": "abc"},
    "counter-float": {"n": "1.5"},
    "record-not-json": {"n": "1", "1": "{not json"},
    "record-list": {"n": "1", "1": "[1, 2]"},
    "record-bad-outcome": {"n": "1", "1": '{"started_at": "x", "outcome": 5}'},
    "record-bad-types": {"n": "1", "1": '{"started_at": 5}'},
}


def cases() -> Iterator[tuple[str, str, str]]:
    """(target, garbage, expected outcome when written while queued)."""
    for name in OWN_KEYS:
        for garbage in KEY_GARBAGE:
            # The results stream is never read before delivery: the job runs and the stream is replaced.
            yield f"key:{name}", garbage, "succeeded" if name == "results" else "failed"
    for field, kinds in JOB_FIELDS.items():
        for garbage in kinds:
            yield f"field:{field}", garbage, "failed"
    for garbage in HISTORY_GARBAGE:
        yield "history", garbage, "failed"


def poison(pipe: redis.client.Pipeline, job_id: str, keys: Keys, target: str, garbage: str) -> None:
    kind, _, name = target.partition(":")
    if kind == "key":
        KEY_GARBAGE[garbage](pipe, OWN_KEYS[name](job_id, keys))
    elif kind == "field":
        pipe.hset(Job.key_for(job_id), name, FIELD_GARBAGE[garbage])
    else:
        pipe.delete(keys.attempts(job_id))
        pipe.hset(keys.attempts(job_id), mapping=HISTORY_GARBAGE[garbage])


@pytest.fixture(scope="module")
def poison_service(service_env, tmp_path_factory) -> Iterator[Service]:
    """One Dispatcher on its own queue with one worker process that every case shares."""
    env = service_env | {"DISPATCHER_QUEUE": f"poison-{time.time_ns()}", "DISPATCHER_WEBHOOK_TIMEOUT": "10"}
    svc = Service(env, tmp_path_factory.mktemp("poison"))
    svc.start_worker()
    try:
        yield svc
    finally:
        svc.stop_all()


def _good_jobs(svc: Service, receiver: Receiver, scenario: str, count: int) -> dict[str, str]:
    urls = [receiver.url(scenario) for _ in range(count)]
    items = [{"url": url, "event_type": "good.job", "payload": {"i": i}} for i, url in enumerate(urls)]
    response = svc.client.post("/v1/webhooks/batch", json={"items": items}, headers=AUTH)
    assert response.status_code == 202, response.get_json()
    return {item["id"]: url for item, url in zip(response.get_json()["items"], urls, strict=True)}


def _check_service(svc: Service, receiver: Receiver, good: dict[str, str], poisoned: list[str]) -> dict[str, dict]:
    """Every good job delivered once and succeeded; the worker never restarted; the API answers 200.

    Returns the views of the poisoned jobs.
    """
    for job_id, url in good.items():
        view = wait_for(svc.client, job_id, timeout=30)
        assert view["status"] == "succeeded", (view, svc.logs())
        assert len(receiver.received(url)) == 1, (job_id, svc.logs())
    views = {job_id: wait_for(svc.client, job_id, timeout=30) for job_id in poisoned}
    listing = svc.client.get("/v1/jobs?limit=1000", headers=AUTH)
    assert listing.status_code == 200, listing.get_json()
    listed = {job["id"]: job for job in listing.get_json()["jobs"]}
    assert all(listed[job_id] == view for job_id, view in views.items())
    assert svc.workers[0].poll() is None, svc.logs()
    log = svc.logs()
    assert "starting a new one" not in log and "Redis unavailable" not in log, log
    return views


#: The words a queued poisoned job's error must contain: what could not be read.
WHAT = {
    "key:job": "its record cannot be read",
    "key:attempts": "its attempt history cannot be read",
    "key:executions": "rq:executions:",
    "history": "its attempt history cannot be read",
} | {f"field:{name}": name for name in JOB_FIELDS}


def test_garbage_written_while_queued_fails_that_job_alone(poison_service, receiver, redis_conn):
    """Every case at once, each poisoned job between batches of good ones (so in the same pops)."""
    svc = poison_service
    keys = Keys(svc.settings.queue_name)
    good: dict[str, str] = {}
    poisoned: dict[str, tuple[str, str, str, str]] = {}
    for target, garbage, expected in cases():
        good |= _good_jobs(svc, receiver, "ok", 3)
        url = receiver.url("ok")
        with redis_conn.pipeline(transaction=True) as pipe:  # enqueued and poisoned in one step
            request = WebhookRequest(url=url, event_type="poisoned", payload={})
            (job_id,) = enqueue_many(pipe, svc.settings, "webhook", [request])
            poison(pipe, job_id, keys, target, garbage)
            pipe.execute()
        poisoned[job_id] = (target, garbage, expected, url)
    good |= _good_jobs(svc, receiver, "ok", 3)

    views = _check_service(svc, receiver, good, list(poisoned))

    wrong = []
    for job_id, (target, garbage, expected, url) in poisoned.items():
        view, deliveries = views[job_id], len(receiver.received(url))
        if expected == "failed":
            ok = deliveries == 0 and view["status"] == "failed"
            ok = (
                ok and view["error"].startswith("the worker could not read the job: ") and WHAT[target] in view["error"]
            )
        else:
            ok = deliveries == 1 and view["status"] == "succeeded"
        if not ok:
            wrong.append((target, garbage, expected, deliveries, view["status"], view["error"]))
    assert not wrong, wrong


def test_garbage_written_while_running_leaves_one_delivery_recorded(poison_service, receiver, redis_conn):
    """Every case at once, written while each poisoned job's attempt is at its receiver."""
    svc = poison_service
    keys = Keys(svc.settings.queue_name)
    good = _good_jobs(svc, receiver, "slow/0.3", 10)
    poisoned: dict[str, tuple[str, str, str]] = {}
    for target, garbage, _ in cases():
        url = receiver.url("slow/1.5")
        poisoned[svc.post("/v1/webhooks", {"url": url, "event_type": "poisoned", "payload": {}})] = (
            target,
            garbage,
            url,
        )
    good |= _good_jobs(svc, receiver, "slow/0.3", 10)
    for job_id, (target, garbage, url) in poisoned.items():
        wait_until(lambda url=url: receiver.received(url), 10, "the poisoned job's delivery never started")
        with redis_conn.pipeline(transaction=True) as pipe:
            poison(pipe, job_id, keys, target, garbage)
            pipe.execute()

    views = _check_service(svc, receiver, good, list(poisoned))

    wrong = []
    for job_id, (target, garbage, url) in poisoned.items():
        view, deliveries = views[job_id], len(receiver.received(url))
        outcomes = [a["outcome"] for a in view["attempts"]][-1:]
        if not (deliveries == 1 and view["status"] == "succeeded" and outcomes == ["succeeded"]):
            wrong.append((target, garbage, deliveries, view["status"], view["error"], view["attempts"]))
    assert not wrong, wrong


def test_execution_hash_garbled_while_running_is_not_taken_for_abandoned(poison_service, receiver, redis_conn):
    """The reaper cannot read whose execution it is: it must not requeue it (a second delivery)."""
    svc = poison_service
    queue = make_queue(redis_conn, svc.settings)
    url = receiver.url("slow/7")  # two passes of the reaper, at least
    job_id = svc.post("/v1/webhooks", {"url": url, "event_type": "poisoned", "payload": {}})
    wait_until(lambda: receiver.received(url), 10, "the delivery never started")
    (member,) = [m.decode() for m in redis_conn.zrange(queue.started_job_registry.key, 0, -1) if job_id in m.decode()]
    redis_conn.delete(f"rq:execution:{member}")
    redis_conn.set(f"rq:execution:{member}", "garbage")

    assert wait_for(svc.client, job_id)["status"] == "succeeded", svc.logs()
    assert len(receiver.received(url)) == 1
    assert svc.workers[0].poll() is None
    assert "liveness:" not in svc.logs(), "the reaper must get past a job it cannot read"


def _unread_service(service_env, tmp_path) -> Service:
    return Service(service_env | {"DISPATCHER_QUEUE": f"unread-{time.time_ns()}"}, tmp_path)


@pytest.mark.parametrize(("target", "garbage"), [(t, g) for t, g, _ in cases()])
def test_status_api_answers_for_a_garbled_job_no_worker_has_seen(service_env, tmp_path, redis_conn, target, garbage):
    """With no worker to fail it yet: GET /v1/jobs/<id> and the list answer 200 for it and the others."""
    svc = _unread_service(service_env, tmp_path)
    keys = Keys(svc.settings.queue_name)
    body = {"url": "http://127.0.0.1:9/x", "event_type": "a.b", "payload": {}, "metadata": {"k": "v"}}
    before, job_id, after = (svc.post("/v1/webhooks", body) for _ in range(3))
    with redis_conn.pipeline(transaction=True) as pipe:
        poison(pipe, job_id, keys, target, garbage)
        pipe.execute()

    one = svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH)
    listing = svc.client.get("/v1/jobs", headers=AUTH)

    assert one.status_code == 200, one.get_json()
    assert listing.status_code == 200, listing.get_json()
    views = {view["id"]: view for view in listing.get_json()["jobs"]}
    assert views[job_id] == one.get_json()
    assert views[before]["status"] == views[after]["status"] == "queued"
    view = one.get_json()
    if target == "key:job" or target == "field:status":
        assert view["status"] == "failed"
        assert view["error"].startswith("the job cannot be read: its "), view
    else:
        assert view["status"] in ("queued", "failed"), view
