"""dispatcher.client against the real app over HTTP on loopback, with real Redis, workers, SMTP and
receivers; its retries against servers that fail in the ways it must handle."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from dispatcher import idempotency
from dispatcher.client import (
    Client,
    Conflict,
    DispatcherError,
    NotFound,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)
from dispatcher.keys import Keys
from tests.conftest import API_KEY, AUTH, free_port


@pytest.fixture
def client_of(service, serve):
    """A service (its own queues, workers on demand) and a Client of it over HTTP."""
    svc = service()
    return svc, Client(serve(svc.settings), API_KEY, backoff=0.01)


def test_sends_and_follows_a_webhook_and_an_email(client_of, receiver, smtp_server):
    svc, client = client_of
    svc.start_worker()
    url = receiver.url("ok")
    address = f"client-{uuid.uuid4().hex[:8]}@example.com"

    hook = client.send_webhook(url=url, event_type="order.created", payload={"id": 7}, priority="high")
    mail = client.send_email(
        to=[address], subject="Hi", text="hello", from_="Shop <shop@example.com>", metadata={"order": "7"}
    )

    job = client.wait(hook, timeout=30)
    assert (job["status"], job["kind"], job["priority"]) == ("succeeded", "webhook", "high")
    assert [r.headers["webhook-id"] for r in receiver.received(url)] == [hook]
    job = client.wait(mail, timeout=30)
    assert (job["status"], job["metadata"]) == ("succeeded", {"order": "7"})
    (message,) = smtp_server.handler.messages_to(address)
    assert b'From: "Shop" <shop@example.com>' in message.content
    assert {j["id"] for j in client.jobs(limit=10)} == {hook, mail}
    assert [j["id"] for j in client.jobs(kind="email")] == [mail]
    stats = client.stats()
    assert stats["webhook"]["succeeded"] == stats["email"]["succeeded"] == 1
    assert client.ready()


def test_sends_an_email_from_a_stored_template(client_of, smtp_server):
    svc, client = client_of
    template = {"subject": "Hi {{ name }}", "text": "Hello {{ name }}"}
    template_id = svc.client.post("/v1/templates", json=template, headers=AUTH).get_json()["id"]
    address = f"client-tpl-{uuid.uuid4().hex[:8]}@example.com"
    svc.start_worker()

    mail = client.send_email(to=[address], from_="shop@example.com", template_id=template_id, variables={"name": "Ada"})

    assert client.wait(mail, timeout=30)["status"] == "succeeded"
    (message,) = smtp_server.handler.messages_to(address)
    assert b"Subject: Hi Ada" in message.content and b"Hello Ada" in message.content


def test_batches_come_back_as_ids_in_order_on_their_priority(client_of, receiver):
    svc, client = client_of
    url = receiver.url("ok")
    items = [{"url": url, "event_type": "a.b", "payload": {"n": n}} for n in range(3)]

    ids = client.send_webhooks(items)
    urgent = client.send_webhooks(items[:1], priority="high")

    assert [client.job(i)["priority"] for i in [*ids, *urgent]] == ["low", "low", "low", "high"]
    svc.start_worker()
    assert [client.wait(i, timeout=30)["status"] for i in ids] == ["succeeded"] * 3


def test_cancels_retries_and_replays(client_of, receiver):
    svc, client = client_of
    waiting = client.send_webhook(url=receiver.url("ok"), event_type="a.b", payload={})
    assert client.cancel(waiting)["status"] == "canceled"
    with pytest.raises(Conflict) as again:
        client.cancel(waiting)
    assert again.value.status == 409 and again.value.code == "conflict"
    svc.start_worker()
    failed = [
        client.send_webhook(url=receiver.url("fail/1/500"), event_type="a.b", payload={}, retry={"max_attempts": 1})
        for _ in range(2)
    ]
    assert [client.wait(i, timeout=30)["status"] for i in failed] == ["failed", "failed"]

    client.retry(failed[0])
    assert client.replay(kind="webhook", since=datetime(2000, 1, 1, tzinfo=UTC), limit=10) == [failed[1]]

    assert [client.wait(i, timeout=30)["status"] for i in failed] == ["succeeded", "succeeded"]
    with pytest.raises(Conflict):
        client.retry(failed[0])


def test_error_answers_are_exceptions_with_the_apis_details(client_of, receiver):
    _, client = client_of
    with pytest.raises(ValidationFailed) as invalid:
        client.send_webhook(url="ftp://example.com/", event_type="bad type", payload={})
    assert invalid.value.status == 422 and invalid.value.code == "validation_error"
    assert {d["field"] for d in invalid.value.details} == {"url", "event_type"}
    assert "url:" in str(invalid.value)

    good = {"to": ["a@example.com"], "subject": "s", "text": "t"}
    with pytest.raises(ValidationFailed) as batch:
        client.send_emails([good, good | {"to": ["not an address"]}])
    assert [d["field"] for d in batch.value.details] == ["items.1.to.0"]

    with pytest.raises(NotFound) as missing:
        client.job("wh_" + "0" * 32)
    assert missing.value.code == "not_found"
    with pytest.raises(Unauthorized):
        Client(client.base_url, "not-a-key").stats()
    with pytest.raises(DispatcherError):  # any error answer is a DispatcherError
        client.jobs(limit=0)


def test_a_503_is_retried_then_raised(service, serve):
    """Redis unreachable: the API answers 503 (it wrote nothing), which the client tries again."""
    svc = service()
    down = replace(svc.settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    client = Client(serve(down), API_KEY, retries=2, backoff=0.01)
    answers: list[int] = []
    client.session.hooks["response"].append(lambda response, **_: answers.append(response.status_code))

    with pytest.raises(Unavailable) as unavailable:
        client.send_webhook(url="http://127.0.0.1:9/h", event_type="a.b", payload={})

    assert unavailable.value.status == 503
    assert answers == [503, 503, 503]
    assert not client.ready()


class SilentServer:
    """Accepts connections and reads requests, never answers: counts the requests that arrived."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.requests = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            if conn.recv(65536):
                with self.lock:
                    self.requests += 1
            time.sleep(5)


def test_a_post_that_may_have_arrived_is_never_sent_twice_but_a_get_is_retried():
    silent = SilentServer()
    client = Client(silent.url, API_KEY, timeout=0.3, retries=3, backoff=0.01)

    with pytest.raises(Unavailable):
        client.send_webhook(url="https://example.com/h", event_type="a.b", payload={})
    assert silent.requests == 1  # read timed out: it may have enqueued, so not sent again

    with pytest.raises(Unavailable):
        client.stats()
    assert silent.requests == 1 + 4  # a GET changes nothing: tried again, three times
    silent.sock.close()


def test_a_post_that_could_not_connect_is_sent_again():
    port = free_port()  # nothing listens there: every try is refused before anything is sent
    client = Client(f"http://127.0.0.1:{port}", API_KEY, retries=2, backoff=0.2)
    started = time.monotonic()
    with pytest.raises(Unavailable) as unreachable:
        client.send_webhook(url="https://example.com/h", event_type="a.b", payload={})
    assert unreachable.value.status == 0 and unreachable.value.code == "unreachable"
    assert time.monotonic() - started >= 0.2 + 0.4  # waited before each of its two retries


def test_an_idempotency_key_answers_the_first_id_and_a_conflict_raises(client_of):
    _, client = client_of
    key = uuid.uuid4().hex
    good = {"to": ["a@example.com"], "subject": "s", "text": "t"}

    first = client.send_email(to=["a@example.com"], subject="s", text="t", idempotency_key=key)
    again = client.send_email(to=["a@example.com"], subject="s", text="t", idempotency_key=key)
    batch = client.send_emails([good, good], idempotency_key=key + "-batch")

    assert again == first
    assert client.send_emails([good, good], idempotency_key=key + "-batch") == batch
    with pytest.raises(Conflict) as conflict:
        client.send_email(to=["a@example.com"], subject="another", text="t", idempotency_key=key)
    assert conflict.value.status == 409 and conflict.value.code == "idempotency_conflict"


def test_a_post_whose_key_is_held_by_a_running_request_is_asked_again_until_it_answers(service, serve, redis_conn):
    """A 409 idempotency_in_progress (the first try timed out here but runs on there) is waited out."""
    svc = service()
    client = Client(serve(svc.settings), API_KEY, retries=8, backoff=0.05)
    key = uuid.uuid4().hex
    keys = Keys(svc.settings.queue_name)
    claim = idempotency.claim(key, API_KEY, "POST", "/v1/jobs/replay", {"kind": "webhook"}, keys)
    assert claim is not None
    claim.hold(redis_conn)  # as the running request holds it
    threading.Timer(0.3, claim.release, (redis_conn,)).start()

    assert client.replay(kind="webhook", idempotency_key=key) == []
    assert client.replay(kind="webhook", idempotency_key=key) == []  # now the first answer, kept
    assert redis_conn.ttl(claim.record_key) > idempotency.HOLD_TTL


def test_a_post_with_an_idempotency_key_is_sent_again_after_a_read_timeout():
    silent = SilentServer()
    client = Client(silent.url, API_KEY, timeout=0.3, retries=2, backoff=0.01)

    with pytest.raises(Unavailable):
        client.send_webhook(url="https://example.com/h", event_type="a.b", payload={}, idempotency_key="k-1")
    assert silent.requests == 3  # a repeat enqueues nothing, so it is safe to send again


def test_registers_endpoints_publishes_events_and_follows_them(client_of, receiver):
    from standardwebhooks import Webhook

    svc, client = client_of
    svc.start_worker()
    app = client.create_application("Acme")
    url = receiver.url()
    endpoint = client.create_endpoint(app["id"], url, event_types=["order.paid"], rate_limit=50)
    assert endpoint["secret"].startswith("whsec_")
    assert [e["id"] for e in client.endpoints(app["id"])] == [endpoint["id"]]

    published = client.publish(app["id"], "order.paid", {"order": 7}, idempotency_key=uuid.uuid4().hex)
    (delivery,) = published["deliveries"]
    assert client.wait(delivery["id"], timeout=30)["status"] == "succeeded"
    assert client.event(published["id"])["percent_done"] == 100
    (request,) = receiver.received(url)
    Webhook(endpoint["secret"]).verify(request.body, request.headers)

    assert client.change_endpoint(app["id"], endpoint["id"], rate_limit=None)["rate_limit"] is None
    rotated = client.rotate_secret(app["id"], endpoint["id"], grace_period=0)
    assert rotated["secret"] != endpoint["secret"] and rotated["previous_expires_at"] is None
    client.delete_endpoint(app["id"], endpoint["id"])
    assert client.endpoints(app["id"]) == []
    client.delete_application(app["id"])
    assert client.applications() == []
    with pytest.raises(NotFound):
        client.event("ev_nope")
