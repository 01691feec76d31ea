"""Idempotency keys (issue #11, item 4): a POST with `Idempotency-Key` is accepted once per key and
API key for 24 h; a repeat answers the first answer with 200 and enqueues nothing, another request
under the key is a 409. Checked through the API (Flask test client) and over real HTTP against
`dispatcher web` with two worker processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import redis
import requests

from dispatcher import idempotency
from dispatcher.channels.webhook import WebhookRequest
from dispatcher.config import Settings
from dispatcher.enqueue import enqueue_many, make_queues
from dispatcher.errors import AlreadyAccepted
from dispatcher.idempotency import HEADER, IDEMPOTENCY_TTL, MAX_KEY_LENGTH, Claim
from dispatcher.keys import Keys
from dispatcher.openapi import openapi_document
from tests.conftest import API_KEY, AUTH, ROOT, Service, free_port, process_env, wait_until

EMAIL = {"to": ["ada@example.com"], "subject": "Your order", "text": "Thanks!"}
WEBHOOK = {"url": "http://127.0.0.1:1/hook", "event_type": "order.created", "payload": {"id": 1042}}
#: Each POST operation with a valid body.
POSTS = {
    "/v1/emails": EMAIL,
    "/v1/webhooks": WEBHOOK,
    "/v1/emails/batch": {"items": [EMAIL, EMAIL | {"subject": "Second"}]},
    "/v1/webhooks/batch": {"items": [WEBHOOK, WEBHOOK | {"event_type": "order.paid"}], "priority": "high"},
}
ANY_PROBLEM = "already used for a request with another method, path or body"
#: Every character class a key may hold (visible ASCII but the comma), at the longest a key may be.
LONGEST_KEY = ("!\"#$%&'()*+-./09:;<=>?@AZ[\\]^_`az{|}~" + uuid.uuid4().hex * 8)[:MAX_KEY_LENGTH]


def new_key() -> str:
    return uuid.uuid4().hex


def post(svc: Service, path: str, body: dict, key: str, auth: dict[str, str] = AUTH):
    return svc.client.post(path, json=body, headers=auth | {HEADER: key})


def jobs_made(svc: Service, redis_conn: redis.Redis) -> set[str]:
    """Every job the service's queue namespace holds: its index, and the same ids in its queues."""
    indexed = {job_id.decode() for job_id in redis_conn.zrange(Keys(svc.settings.queue_name).index, 0, -1)}
    queued = {job_id for queue in make_queues(redis_conn, svc.settings) for job_id in queue.get_job_ids()}
    assert indexed == queued
    return indexed


def records(svc: Service, redis_conn: redis.Redis) -> list[bytes]:
    return list(redis_conn.scan_iter(match=f"{Keys(svc.settings.queue_name).prefix}:idempotency:*"))


def ids_of(answer: dict) -> list[str]:
    return [item["id"] for item in answer.get("items", [answer])]


@pytest.mark.parametrize("path", POSTS)
def test_a_repeat_answers_the_first_answer_with_200_and_enqueues_nothing(service, redis_conn, path):
    svc = service()
    first = post(svc, path, POSTS[path], LONGEST_KEY)
    made = jobs_made(svc, redis_conn)

    again = post(svc, path, POSTS[path], LONGEST_KEY)

    assert first.status_code == 202, first.get_json()
    assert again.status_code == 200, again.get_json()
    assert again.get_json() == first.get_json()
    assert again.headers.get("Location") == first.headers.get("Location")
    assert set(ids_of(first.get_json())) == made == jobs_made(svc, redis_conn)


def test_the_same_json_written_otherwise_is_the_same_request(service, redis_conn):
    svc = service()
    key = new_key()
    first = post(svc, "/v1/webhooks", WEBHOOK, key)
    reordered = json.dumps(dict(reversed(list(WEBHOOK.items()))), indent=3)

    headers = AUTH | {HEADER: key}
    again = svc.client.post("/v1/webhooks", data=reordered, content_type="application/json", headers=headers)

    assert again.status_code == 200 and again.get_json() == first.get_json()
    assert len(jobs_made(svc, redis_conn)) == 1


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/emails", EMAIL | {"subject": "Another order"}),  # another body
        ("/v1/emails", EMAIL | {"priority": "default"}),  # the same request once defaults apply, but not the same body
        ("/v1/emails/batch", {"items": [EMAIL]}),  # another path
        ("/v1/webhooks", WEBHOOK),  # another channel
    ],
    ids=["body", "explicit-default", "batch", "channel"],
)
def test_the_same_key_with_another_request_is_409_naming_the_header(service, redis_conn, path, body):
    svc = service()
    key = new_key()
    assert post(svc, "/v1/emails", EMAIL, key).status_code == 202
    made = jobs_made(svc, redis_conn)

    answer = post(svc, path, body, key)

    assert answer.status_code == 409, answer.get_json()
    error = answer.get_json()["error"]
    assert error["code"] == "idempotency_conflict"
    assert [detail["field"] for detail in error["details"]] == [HEADER]
    assert jobs_made(svc, redis_conn) == made


def test_keys_are_scoped_per_api_key(service, redis_conn):
    other = "other-key-" + uuid.uuid4().hex
    svc = service(DISPATCHER_API_KEYS=f"{API_KEY},{other}")
    key = new_key()

    mine = post(svc, "/v1/emails", EMAIL, key)
    theirs = post(svc, "/v1/emails", EMAIL | {"subject": "Theirs"}, key, {"Authorization": f"Bearer {other}"})
    theirs_again = post(svc, "/v1/emails", EMAIL | {"subject": "Theirs"}, key, {"Authorization": f"Bearer {other}"})

    assert (mine.status_code, theirs.status_code, theirs_again.status_code) == (202, 202, 200)
    assert mine.get_json()["id"] != theirs.get_json()["id"] == theirs_again.get_json()["id"]
    assert len(jobs_made(svc, redis_conn)) == 2


def test_the_record_names_no_api_key_and_lasts_24_h_then_the_key_is_free(service, redis_conn):
    svc = service()
    key = new_key()
    first = post(svc, "/v1/emails", EMAIL, key).get_json()

    (record,) = records(svc, redis_conn)
    assert API_KEY.encode() not in record + redis_conn.get(record)
    assert IDEMPOTENCY_TTL - 60 <= redis_conn.ttl(record) <= IDEMPOTENCY_TTL == 24 * 3600

    redis_conn.pexpire(record, 1)  # 24 h later
    wait_until(lambda: not redis_conn.exists(record), 5, "the record did not expire")
    later = post(svc, "/v1/emails", EMAIL, key)

    assert later.status_code == 202 and later.get_json()["id"] != first["id"]
    assert len(jobs_made(svc, redis_conn)) == 2


@pytest.mark.parametrize(
    "value",
    ["", " ", "a b", "a,b", "x" * (MAX_KEY_LENGTH + 1), "caf\xe9", "a\x7f", "a\tb", "a\x00b"],
    ids=["empty", "space", "inner-space", "comma", "too-long", "latin-1", "del", "tab", "nul"],
)
@pytest.mark.parametrize("path", POSTS)
def test_a_key_that_is_no_key_is_422_naming_the_header_and_enqueues_nothing(service, redis_conn, path, value):
    svc = service()

    answer = post(svc, path, POSTS[path], value)

    assert answer.status_code == 422, answer.get_json()
    assert [detail["field"] for detail in answer.get_json()["error"]["details"]] == [HEADER]
    assert jobs_made(svc, redis_conn) == set() and records(svc, redis_conn) == []


def test_a_refused_request_leaves_the_key_free(service, redis_conn):
    svc = service()
    key = new_key()

    refused = post(svc, "/v1/emails", EMAIL | {"to": ["not an address"]}, key)
    accepted = post(svc, "/v1/emails", EMAIL, key)

    assert (refused.status_code, accepted.status_code) == (422, 202)
    assert len(jobs_made(svc, redis_conn)) == 1


def test_a_repeat_is_answered_without_being_validated_again(service, redis_conn):
    """A repeat skips validation and its DNS lookups: once accepted, a request keeps its answer for
    24 h even if its host no longer passes the guard (here: the network was allowed, then not)."""
    allowed = service()
    key = new_key()
    first = post(allowed, "/v1/webhooks", WEBHOOK, key)
    guarded = service(DISPATCHER_QUEUE=allowed.settings.queue_name, DISPATCHER_ALLOWED_NETWORKS="")

    again = post(guarded, "/v1/webhooks", WEBHOOK, key)
    fresh = post(guarded, "/v1/webhooks", WEBHOOK, new_key())

    assert (first.status_code, again.status_code, fresh.status_code) == (202, 200, 422)
    assert again.get_json() == first.get_json()
    assert len(jobs_made(allowed, redis_conn)) == 1


def test_the_enqueue_script_itself_refuses_a_taken_key_and_writes_nothing(service, redis_conn):
    """The API looks for an earlier record first; the check that makes concurrent requests safe is
    the one in the write script, tried here on its own."""
    svc = service()
    keys = Keys(svc.settings.queue_name)
    claim = Claim(keys.idempotency("client", new_key()), "fingerprint")
    request = WebhookRequest.model_validate(WEBHOOK)
    (job_id,) = enqueue_many(redis_conn, svc.settings, "webhook", [request], claim=claim)

    with pytest.raises(AlreadyAccepted) as raised:
        enqueue_many(redis_conn, svc.settings, "webhook", [request] * 7, claim=claim)  # a batch, pipelined

    assert claim.earlier_ids(raised.value.record) == [job_id]
    assert jobs_made(svc, redis_conn) == {job_id}


def test_every_post_operation_documents_the_header_and_its_answers():
    document = openapi_document()
    operations = {path: ops["post"] for path, ops in document["paths"].items() if "post" in ops}

    others = {"/v1/jobs/{id}/retry", "/v1/jobs/replay", "/v1/templates", "/v1/suppressions", "/v1/applications",
              "/v1/applications/{app}/endpoints", "/v1/applications/{app}/endpoints/{endpoint}/secret/rotate",
              "/v1/applications/{app}/endpoints/{endpoint}/recover", "/v1/applications/{app}/events"}
    assert set(operations) == set(POSTS) | others
    for operation in operations.values():
        assert [p["name"] for p in operation["parameters"] if p["in"] == "header"] == [HEADER]
        responses = operation["responses"]
        assert {"200", "409", "422"} <= set(responses)
        for first in ("201", "202"):
            if first in responses:
                assert responses["200"]["content"] == responses[first]["content"]


# --- The POSTs that do more than enqueue: retry, replay, a stored template, a suppression -----


def failed_webhooks(svc: Service, receiver, count: int) -> list[str]:
    """`count` webhooks that failed (one attempt each, at a receiver answering 500); no worker left running."""
    svc.start_worker()
    ids = [svc.post("/v1/webhooks", WEBHOOK | {"url": receiver.url("status/500"), "retry": {"max_attempts": 1}})
           for _ in range(count)]
    for job_id in ids:
        wait_until(lambda job_id=job_id: svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()["status"]
                   == "failed", 30, "the webhook did not fail")
    svc.stop_all()
    return ids


def test_a_repeated_retry_answers_the_first_answer_and_requeues_nothing_more(service, receiver, redis_conn):
    svc = service()
    (job_id,) = failed_webhooks(svc, receiver, 1)
    key = new_key()

    first = svc.client.post(f"/v1/jobs/{job_id}/retry", headers=AUTH | {HEADER: key})
    again = svc.client.post(f"/v1/jobs/{job_id}/retry", headers=AUTH | {HEADER: key})

    assert first.status_code == 202, first.get_json()
    assert again.status_code == 200, again.get_json()
    assert again.data == first.data and again.headers["Location"] == first.headers["Location"]
    assert [queue.get_job_ids() for queue in make_queues(redis_conn, svc.settings)] == [[], [job_id], []]
    # Without the key, the same request is a new one: the job is queued, not failed.
    assert svc.client.post(f"/v1/jobs/{job_id}/retry", headers=AUTH).status_code == 409


def test_a_repeated_replay_answers_the_first_answer_and_requeues_none_that_failed_since(service, receiver):
    svc = service()
    ids = failed_webhooks(svc, receiver, 2)
    key = new_key()
    first = svc.client.post("/v1/jobs/replay", json={"kind": "webhook"}, headers=AUTH | {HEADER: key})
    assert first.status_code == 200 and sorted(first.get_json()["ids"]) == sorted(ids), first.get_json()
    # A worker delivers the two again (they fail again) and one more webhook fails; then it stops.
    svc.start_worker()
    later = svc.post("/v1/webhooks", WEBHOOK | {"url": receiver.url("status/500"), "retry": {"max_attempts": 1}})
    wait_until(lambda: all(svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()["status"] == "failed"
                           for job_id in [*ids, later]), 60, "the replayed webhooks did not fail again")
    svc.stop_all()

    again = svc.client.post("/v1/jobs/replay", json={"kind": "webhook"}, headers=AUTH | {HEADER: key})

    assert again.status_code == 200 and again.data == first.data
    for job_id in [*ids, later]:  # the repeat requeued nothing
        assert svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()["status"] == "failed"
    fresh = svc.client.post("/v1/jobs/replay", json={"kind": "webhook"}, headers=AUTH | {HEADER: new_key()})
    assert sorted(fresh.get_json()["ids"]) == sorted([*ids, later])


def test_a_repeated_template_post_stores_one_template(service):
    svc = service()
    key = new_key()
    template = {"subject": "Hi {{ name }}", "text": "Hello"}

    first = svc.client.post("/v1/templates", json=template, headers=AUTH | {HEADER: key})
    again = svc.client.post("/v1/templates", json=template, headers=AUTH | {HEADER: key})

    assert (first.status_code, again.status_code) == (201, 200)
    assert again.data == first.data and again.headers["Location"] == first.headers["Location"]
    assert [t["id"] for t in svc.client.get("/v1/templates", headers=AUTH).get_json()["templates"]] == [
        first.get_json()["id"]
    ]


def test_a_repeated_suppression_post_does_nothing_again(service):
    """Even after the address was taken off the list, the repeat answers the first answer and does not add it back."""
    svc = service()
    key = new_key()
    body = {"address": "bounced@example.com"}
    first = svc.client.post("/v1/suppressions", json=body, headers=AUTH | {HEADER: key})
    assert first.status_code == 201, first.get_json()
    assert svc.client.delete("/v1/suppressions/bounced@example.com", headers=AUTH).status_code == 204

    again = svc.client.post("/v1/suppressions", json=body, headers=AUTH | {HEADER: key})

    assert again.status_code == 200 and again.data == first.data
    assert svc.client.get("/v1/suppressions/bounced@example.com", headers=AUTH).status_code == 404


#: Each POST that does more than enqueue, two different requests to it.
OTHER_POSTS = {
    "retry": ("/v1/jobs/{job}/retry", None, "/v1/jobs/{other}/retry", None),
    "replay": ("/v1/jobs/replay", {"kind": "webhook"}, "/v1/jobs/replay", {"kind": "email"}),
    "template": ("/v1/templates", {"subject": "a", "text": "b"}, "/v1/templates", {"subject": "a", "text": "c"}),
    "suppression": ("/v1/suppressions", {"address": "a@example.com"}, "/v1/suppressions", {"address": "b@example.com"}),
}


@pytest.mark.parametrize("operation", OTHER_POSTS)
def test_another_request_under_a_used_key_is_409_and_does_nothing(service, receiver, operation):
    svc = service()
    job, other = failed_webhooks(svc, receiver, 2) if operation == "retry" else ("", "")
    path, body, other_path, other_body = OTHER_POSTS[operation]
    key = new_key()
    first = svc.client.post(path.format(job=job), json=body, headers=AUTH | {HEADER: key})
    assert first.status_code in (200, 201, 202), first.get_json()

    conflict = svc.client.post(other_path.format(other=other), json=other_body, headers=AUTH | {HEADER: key})
    elsewhere = svc.client.post("/v1/webhooks", json=WEBHOOK, headers=AUTH | {HEADER: key})

    for answer in (conflict, elsewhere):
        assert answer.status_code == 409, answer.get_json()
        assert answer.get_json()["error"]["code"] == "idempotency_conflict"
        assert answer.get_json()["error"]["details"] == [{"field": HEADER, "problem": ANY_PROBLEM}]
    if operation == "retry":
        assert svc.client.get(f"/v1/jobs/{other}", headers=AUTH).get_json()["status"] == "failed"
    if operation == "template":
        assert len(svc.client.get("/v1/templates", headers=AUTH).get_json()["templates"]) == 1
    if operation == "suppression":
        assert svc.client.get("/v1/suppressions/b@example.com", headers=AUTH).status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/jobs/wh_nope/retry", None, 404),
        ("/v1/jobs/replay", {"limit": 0}, 422),
        ("/v1/templates", {"subject": "{% if %}", "text": "x"}, 422),
        ("/v1/suppressions", {"address": "not an address"}, 422),
    ],
    ids=["retry", "replay", "template", "suppression"],
)
def test_a_refused_request_of_any_post_leaves_the_key_free(service, redis_conn, path, body, status):
    svc = service()
    key = new_key()

    refused = svc.client.post(path, json=body, headers=AUTH | {HEADER: key})
    after = svc.client.post("/v1/templates", json={"subject": "s", "text": "t"}, headers=AUTH | {HEADER: key})

    assert refused.status_code == status, refused.get_json()
    assert after.status_code == 201, after.get_json()


@pytest.mark.parametrize("value", ["", "has space", "a,b", "é", "x" * (MAX_KEY_LENGTH + 1)])
@pytest.mark.parametrize("path", ["/v1/jobs/wh_x/retry", "/v1/jobs/replay", "/v1/templates", "/v1/suppressions"])
def test_a_key_that_is_no_key_is_422_on_every_post(service, path, value):
    svc = service()
    body = None if path.endswith("retry") else {}

    response = svc.client.post(path, json=body, headers=AUTH | {HEADER: value})

    assert response.status_code == 422, response.get_json()
    assert [d["field"] for d in response.get_json()["error"]["details"]] == [HEADER]
    assert svc.client.get("/v1/templates", headers=AUTH).get_json()["templates"] == []


def test_a_request_while_another_with_its_key_runs_is_409_in_progress_and_the_hold_expires(service, redis_conn):
    """The hold a running request sets, as the server sets it, met by its twin."""
    svc = service()
    key = new_key()
    body = {"subject": "s", "text": "t"}
    claim = idempotency.claim(key, API_KEY, "POST", "/v1/templates", body, Keys(svc.settings.queue_name))
    assert claim is not None
    claim.hold(redis_conn)

    twin = svc.client.post("/v1/templates", json=body, headers=AUTH | {HEADER: key})

    assert twin.status_code == 409, twin.get_json()
    assert twin.get_json()["error"]["code"] == "idempotency_in_progress"
    assert 0 < redis_conn.ttl(claim.record_key) <= idempotency.HOLD_TTL
    assert svc.client.get("/v1/templates", headers=AUTH).get_json()["templates"] == []
    claim.release(redis_conn)  # as the running request does if it is refused
    assert svc.client.post("/v1/templates", json=body, headers=AUTH | {HEADER: key}).status_code == 201


# --- Over real HTTP, against `dispatcher web` with two worker processes ----------------------


@dataclass
class Web:
    url: str
    port: int
    settings: Settings


@pytest.fixture(scope="module")
def web(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    """`dispatcher web` (gunicorn, WEB_CONCURRENCY=2) on a free port and a queue of its own that no worker serves."""
    port = free_port()
    env = service_env | {"DISPATCHER_QUEUE": f"idem-{uuid.uuid4().hex[:10]}"}
    log = tmp_path_factory.mktemp("idempotency") / "web.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dispatcher.cli", "web"],
            cwd=ROOT,
            env=process_env(env | {"PORT": str(port), "WEB_CONCURRENCY": "2"}),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(f"{url}/healthz", timeout=1).status_code == 200
        except requests.RequestException:  # (refused, or a slow first answer on a loaded machine)
            return process.poll() is not None

    try:
        wait_until(up, 30, "dispatcher web did not start")
        assert process.poll() is None, log.read_text(errors="replace")
        yield Web(url, port, Settings.from_env(env))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def parallel(count: int, send: Callable[[], requests.Response]) -> list[requests.Response]:
    """`count` calls of `send` on as many threads, released together."""
    barrier = threading.Barrier(count)
    answers: list[requests.Response] = []

    def run() -> None:
        barrier.wait()
        answer = send()
        answers.append(answer)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return answers


@pytest.mark.parametrize("path", ["/v1/emails", "/v1/webhooks/batch"])
def test_twenty_parallel_identical_idempotent_posts_make_one_job(web: Web, redis_conn, path):
    """The issue's acceptance test: 20 parallel identical POSTs with one key, each on its own
    connection to the real server, make exactly one job (or one batch's jobs)."""
    key = new_key()
    keys = Keys(web.settings.queue_name)
    before = redis_conn.zcard(keys.index)

    answers = parallel(
        20, lambda: requests.post(f"{web.url}{path}", json=POSTS[path], headers=AUTH | {HEADER: key}, timeout=30)
    )

    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [200] * 19 + [202], [answer.text for answer in answers]
    assert len({answer.text for answer in answers}) == 1  # every answer is the first one's, to the byte
    made = ids_of(answers[0].json())
    assert redis_conn.zcard(keys.index) - before == len(made)
    queued = {job_id for queue in make_queues(redis_conn, web.settings) for job_id in queue.get_job_ids()}
    assert set(made) <= queued


def test_a_key_given_twice_is_422_over_http(web: Web):
    """Servers join a header given twice with a comma, which no key holds: two keys are refused,
    never read as one."""
    body = json.dumps(EMAIL).encode()
    head = (
        f"POST /v1/emails HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        f"{HEADER}: first\r\n{HEADER}: second\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk

    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 422 " in status_line, answer
    details = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["details"]
    assert [detail["field"] for detail in details] == [HEADER]


def test_twenty_parallel_identical_template_posts_store_one_template(web: Web):
    """A POST that holds its key: one of 20 twins stores the template; every other answers its
    answer (200) or, while it runs, 409 `idempotency_in_progress`."""
    key = new_key()
    body = {"subject": f"parallel {key}", "text": "t"}

    answers = parallel(20, lambda: requests.post(f"{web.url}/v1/templates", json=body, headers=AUTH | {HEADER: key},
                                                 timeout=30))

    created = [answer for answer in answers if answer.status_code == 201]
    assert len(created) == 1, [answer.text for answer in answers]
    for answer in answers:
        if answer.status_code == 200:
            assert answer.content == created[0].content
        elif answer.status_code == 409:
            assert answer.json()["error"]["code"] == "idempotency_in_progress"
        else:
            assert answer is created[0], answer.text
    stored = requests.get(f"{web.url}/v1/templates", headers=AUTH, timeout=30).json()["templates"]
    assert [t["id"] for t in stored if t["subject"] == body["subject"]] == [created[0].json()["id"]]
