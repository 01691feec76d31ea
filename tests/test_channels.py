"""Channels: one module per channel on each side, a versioned payload, a stable job function.

Jobs live in Redis for up to 30 days, across upgrades: a job written by the previous version
(its function named its channel, its payload had no version) still delivers, and a payload of a
version this worker does not know fails visibly instead of being guessed at.
"""

from __future__ import annotations

import ast
import email
import email.policy
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rq.job import Job
from rq.serializers import JSONSerializer

from dispatcher.channels import CHANNELS, JOB_FUNCTION, LEGACY_JOB_FUNCTIONS, PAYLOAD_VERSION
from dispatcher.enqueue import build_job, make_queue
from tests.conftest import ROOT, wait_for
from workers.channels import DELIVERERS

LEGACY_FUNCTION = {channel: function for function, channel in LEGACY_JOB_FUNCTIONS.items()}


def _requests(url: str, rcpt: str) -> dict[str, dict]:
    return {
        "webhook": {"url": url, "event_type": "a.b", "payload": {"n": 1}},
        "email": {"to": [rcpt], "subject": "Hello", "text": "x"},
    }


def test_every_job_names_the_stable_function_and_its_payload_its_channel_and_version(service, receiver, redis_conn):
    svc = service()
    rcpt = f"stable-{uuid.uuid4().hex[:8]}@example.com"
    for channel, body in _requests(receiver.url("ok"), rcpt).items():
        job_id = svc.post(f"/v1/{CHANNELS[channel].path}", body)
        job = Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer)
        assert job.func_name == JOB_FUNCTION
        (payload,) = job.args
        assert (payload["v"], payload["channel"]) == (PAYLOAD_VERSION, channel)


@pytest.mark.parametrize("channel", ["webhook", "email"])
def test_a_job_written_by_the_previous_version_still_delivers(service, receiver, smtp_server, redis_conn, channel):
    """Version 1: the function named the channel (workers.jobs.send_email / deliver_webhook) and the
    payload carried no `v` and no `channel`; otherwise the same fields."""
    svc = service()
    rcpt = f"legacy-{uuid.uuid4().hex[:8]}@example.com"
    kind = CHANNELS[channel]
    url = receiver.url("ok")
    request = kind.request.model_validate(_requests(url, rcpt)[channel], context={"email_from": "a@example.com"})
    job_id, payload, meta, description = build_job(kind, request, datetime.now(UTC), svc.settings)
    legacy = {k: v for k, v in payload.items() if k not in ("v", "channel")}
    queue = make_queue(redis_conn, svc.settings)
    queue.enqueue_call(LEGACY_FUNCTION[channel], args=(legacy,), job_id=job_id, meta=meta, description=description)
    svc.start_worker()

    job = wait_for(svc.client, job_id, timeout=30)

    assert job["status"] == "succeeded", svc.logs()
    if channel == "webhook":
        assert [r.headers["webhook-id"] for r in receiver.received(url)] == [job_id]
    else:
        (mail,) = smtp_server.handler.messages_to(rcpt)
        message = email.message_from_bytes(mail.content, policy=email.policy.default)
        assert str(message["Message-ID"]).startswith(f"<{job_id}@")


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"v": 3}, "payload version 3 is not one this worker reads"),
        ({"channel": "carrier-pigeon"}, "channel 'carrier-pigeon' is not one this worker delivers"),
    ],
)
def test_a_payload_this_worker_cannot_read_fails_visibly_and_is_never_delivered(
    service, receiver, redis_conn, change, error
):
    svc = service()
    url = receiver.url("ok")
    kind = CHANNELS["webhook"]
    request = kind.request.model_validate({"url": url, "event_type": "a.b", "payload": {}})
    job_id, payload, meta, description = build_job(kind, request, datetime.now(UTC), svc.settings)
    queue = make_queue(redis_conn, svc.settings)
    queue.enqueue_call(JOB_FUNCTION, args=(payload | change,), job_id=job_id, meta=meta, description=description)
    svc.start_worker()

    job = wait_for(svc.client, job_id, timeout=30)

    assert job["status"] == "failed", svc.logs()
    assert error in job["error"]
    assert not [r for r in receiver.received(url) if r.headers["webhook-id"] == job_id]


def test_both_registries_name_the_same_channels():
    assert set(CHANNELS) == set(DELIVERERS)
    assert len({c.id_prefix for c in CHANNELS.values()}) == len(CHANNELS)


#: The generic modules: enqueueing, history, status, the API and its document, the attempt, the worker.
GENERIC = [
    "dispatcher/enqueue.py",
    "dispatcher/history.py",
    "dispatcher/status.py",
    "dispatcher/control.py",
    "dispatcher/api.py",
    "dispatcher/openapi.py",
    "dispatcher/views.py",
    "dispatcher/metrics.py",
    "dispatcher/tallies.py",
    "dispatcher/ratelimit.py",
    "workers/attempt.py",
    "workers/worker.py",
    "workers/poison.py",
    "workers/recovery.py",
    "workers/pacer.py",
]


@pytest.mark.parametrize("path", GENERIC)
def test_generic_code_names_no_channel(path):
    """What a channel is lives in its two modules: generic code holds no channel's name as a string."""
    tree = ast.parse(Path(ROOT, path).read_text())
    names = {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in CHANNELS
    }
    assert not names, f"{path} names the channel(s) {sorted(names)}"


def test_a_previous_version_job_delivers_under_a_plain_rq_worker_too(burst_worker, receiver, redis_conn):
    """RQ's own worker imports the version-1 function by name (workers.jobs.deliver_webhook)."""
    worker = burst_worker()
    url = receiver.url("ok")
    kind = CHANNELS["webhook"]
    request = kind.request.model_validate({"url": url, "event_type": "a.b", "payload": {}})
    job_id, payload, meta, description = build_job(kind, request, datetime.now(UTC), worker.settings)
    legacy = {k: v for k, v in payload.items() if k not in ("v", "channel")}
    queue = make_queue(redis_conn, worker.settings)
    queue.enqueue_call(LEGACY_FUNCTION["webhook"], args=(legacy,), job_id=job_id, meta=meta, description=description)

    worker.run()

    assert worker.job(job_id)["status"] == "succeeded"
    assert [r.headers["webhook-id"] for r in receiver.received(url)] == [job_id]
