"""Batches you can follow (issue #11 item 2): the 202 names the batch, GET /v1/batches/<id> counts its
jobs by status as real workers deliver them, and `dispatcher status <batch id> --watch` shows it live."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rq.job import Job
from rq.serializers import JSONSerializer

from dispatcher.batches import RETRY_MARGIN
from dispatcher.keys import Keys
from tests.conftest import AUTH, ROOT, process_env, wait_until

DISPATCHER = str(Path(sys.executable).parent / "dispatcher")


def webhooks(urls: list[str]) -> dict:
    return {"items": [{"url": url, "event_type": "order.created", "payload": {"n": n}} for n, url in enumerate(urls)]}


def batch_of(svc, urls: list[str]) -> dict:
    response = svc.client.post("/v1/webhooks/batch", json=webhooks(urls), headers=AUTH)
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def progress(svc, batch_id: str, **query: int) -> dict:
    response = svc.client.get(f"/v1/batches/{batch_id}", query_string=query, headers=AUTH)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_the_answer_names_the_batch_and_its_record_lives_as_long_as_its_jobs(service, receiver, redis_conn):
    svc = service()

    accepted = batch_of(svc, [receiver.url("ok") for _ in range(3)])

    assert accepted["batch_id"].startswith("ba_") and accepted["count"] == 3
    assert accepted["status_url"] == f"/v1/batches/{accepted['batch_id']}"
    view = progress(svc, accepted["batch_id"])
    assert (view["count"], view["kind"], view["priority"]) == (3, "webhook", "low")
    assert view["by_status"] == {
        "queued": 3, "scheduled": 0, "running": 0, "succeeded": 0, "failed": 0, "canceled": 0, "gone": 0
    }
    assert (view["percent_done"], view["finished_at"], view["failed"]) == (0.0, None, {
        "count": 0, "ids": [], "next_offset": None
    })
    keys = Keys(svc.settings.queue_name)
    listed = [raw.decode() for raw in redis_conn.lrange(keys.batch_jobs(accepted["batch_id"]), 0, -1)]
    assert listed == [item["id"] for item in accepted["items"]]
    least = max(svc.settings.result_ttl, svc.settings.failure_ttl) + RETRY_MARGIN - 60
    assert redis_conn.ttl(keys.batch(accepted["batch_id"])) > least
    assert redis_conn.ttl(keys.batch_jobs(accepted["batch_id"])) > least


def test_a_refused_batch_leaves_no_record(service, receiver, redis_conn):
    svc = service()
    body = webhooks([receiver.url("ok"), "ftp://example.com/x"])

    response = svc.client.post("/v1/webhooks/batch", json=body, headers=AUTH)

    assert response.status_code == 422
    assert not list(redis_conn.scan_iter(f"{Keys(svc.settings.queue_name).prefix}:batch:*"))


def test_a_thousand_webhooks_are_followed_to_100_percent_with_their_failures_paged(service, receiver):
    """Real workers deliver 1,000 webhooks, 10 refused for good; `dispatcher status --watch` runs
    throughout and exits 1 (something failed) once the bar is full."""
    # 410 fails for good at once; a webhook slowed past its deadline by a busy machine is tried again.
    svc = service(DISPATCHER_WEBHOOK_MAX_ATTEMPTS="3", DISPATCHER_WEBHOOK_BACKOFF="0")
    urls = [receiver.url("status/410") if n % 100 == 7 else receiver.url("ok") for n in range(1000)]
    accepted = batch_of(svc, urls)
    batch_id = accepted["batch_id"]
    watch = subprocess.Popen(
        [DISPATCHER, "status", batch_id, "--watch"],
        env=process_env(svc.env), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    svc.start_worker()
    svc.start_worker()

    wait_until(lambda: progress(svc, batch_id)["percent_done"] == 100, 60, "the batch did not finish")
    out, err = watch.communicate(timeout=60)

    view = progress(svc, batch_id, failed_limit=4)
    assert view["by_status"]["succeeded"] == 990 and view["by_status"]["failed"] == 10
    refused = {item["id"] for n, item in enumerate(accepted["items"]) if n % 100 == 7}
    pages, offset = [], 0
    while offset is not None:
        page = progress(svc, batch_id, failed_offset=offset, failed_limit=4)["failed"]
        pages.append(page["ids"])
        offset = page["next_offset"]
    assert [len(page) for page in pages] == [4, 4, 2] and {i for page in pages for i in page} == refused
    assert view["finished_at"] is not None and view["finished_at"] >= view["created_at"]
    assert watch.returncode == 1, out + err
    lines = out.splitlines()
    assert lines[0] == f"{batch_id}  webhook batch of 1000  (priority low)"
    bars = [line for line in lines if line.startswith("  [")]
    assert bars[-1].startswith("  [" + "#" * 30 + "] 100.0%  succeeded 990  failed 10"), lines
    assert any(line.startswith("  failed: ") for line in lines)


def test_a_job_deleted_from_a_batch_counts_as_gone(service, receiver, redis_conn):
    svc = service()
    accepted = batch_of(svc, [receiver.url("ok") for _ in range(2)])

    Job.fetch(accepted["items"][0]["id"], connection=redis_conn, serializer=JSONSerializer).delete()

    view = progress(svc, accepted["batch_id"])
    assert (view["by_status"]["gone"], view["by_status"]["queued"], view["percent_done"]) == (1, 1, 50.0)


def test_an_unknown_batch_is_404_and_a_bad_page_is_422_naming_it(service):
    svc = service()

    missing = svc.client.get("/v1/batches/ba_nope", headers=AUTH)
    bad = svc.client.get("/v1/batches/ba_nope?failed_limit=0", headers=AUTH)
    unauthorized = svc.client.get("/v1/batches/ba_nope")

    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"
    assert bad.status_code == 422 and bad.get_json()["error"]["details"][0]["field"] == "failed_limit"
    assert unauthorized.status_code == 401
