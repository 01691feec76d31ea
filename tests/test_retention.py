"""Retention (issue #11 item 9): every key a job leaves in Redis expires within its retention once the
job is over, so Redis does not grow without bound; a batch's record expires too."""

from __future__ import annotations

import time

from dispatcher.batches import RETRY_MARGIN
from tests.conftest import AUTH, wait_for

SUCCEEDED, FAILED = 2, 3


def keys_naming(redis_conn, name: str) -> dict[str, int]:
    """Every key whose name holds `name`, with its TTL in seconds (-1: none)."""
    return {key.decode(): redis_conn.ttl(key) for key in redis_conn.scan_iter(f"*{name}*", count=1000)}


def test_every_key_of_a_finished_job_expires_within_its_retention(service, receiver, redis_conn):
    svc = service(
        DISPATCHER_RETENTION_SUCCEEDED=str(SUCCEEDED),
        DISPATCHER_RETENTION_FAILED=str(FAILED),
        DISPATCHER_WEBHOOK_MAX_ATTEMPTS="1",
    )
    svc.start_worker()
    ok = svc.post("/v1/webhooks", {"url": receiver.url("ok"), "event_type": "a.b", "payload": {}})
    refused = svc.post("/v1/webhooks", {"url": receiver.url("status/410"), "event_type": "a.b", "payload": {}})
    batch = svc.client.post(
        "/v1/webhooks/batch",
        json={"items": [{"url": receiver.url("ok"), "event_type": "a.b", "payload": {}}]},
        headers=AUTH,
    ).get_json()
    wait_for(svc.client, ok, until=lambda job: job["status"] == "succeeded")
    wait_for(svc.client, refused, until=lambda job: job["status"] == "failed")
    wait_for(svc.client, batch["items"][0]["id"], until=lambda job: job["status"] == "succeeded")

    settled = {job_id: keys_naming(redis_conn, job_id) for job_id in (ok, refused, batch["items"][0]["id"])}
    batch_keys = keys_naming(redis_conn, batch["batch_id"])

    for job_id, keys in settled.items():
        assert len(keys) >= 2, keys  # RQ's job hash and our attempt history at least
        bound = FAILED if job_id == refused else SUCCEEDED
        assert all(0 < ttl <= bound for ttl in keys.values()), (job_id, keys)
    assert len(batch_keys) == 2
    assert all(0 < ttl <= FAILED + RETRY_MARGIN for ttl in batch_keys.values()), batch_keys

    time.sleep(FAILED + 1)
    assert {job_id: keys_naming(redis_conn, job_id) for job_id in settled} == {job_id: {} for job_id in settled}
    assert svc.client.get(f"/v1/jobs/{ok}", headers=AUTH).status_code == 404
