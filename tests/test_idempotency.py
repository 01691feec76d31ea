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


def test_every_sending_post_operation_documents_the_header_and_its_answers():
    """The four POSTs that enqueue new jobs (retry, replay and the suppression list take no key)."""
    document = openapi_document()
    operations = [document["paths"][path]["post"] for path in POSTS]

    assert len(operations) == 4
    for operation in operations:
        assert [p["name"] for p in operation["parameters"] if p["in"] == "header"] == [HEADER]
        assert {"200", "202", "409", "422"} <= set(operation["responses"])
        assert operation["responses"]["200"]["content"] == operation["responses"]["202"]["content"]


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
        except requests.ConnectionError:
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
