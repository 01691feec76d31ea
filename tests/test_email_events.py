"""Email events as webhooks (issue #12, item 8): an email that names an application publishes
`email.delivered`, `email.failed` and `email.suppressed` to that application's endpoints once its
attempt is decided. Real workers, a real SMTP server (its `reject550-*` recipients bounce, its
`temp451-*` ones are refused once: tests/conftest.py), real HTTP receivers, and the
`standardwebhooks` package verifying what they received with each endpoint's own secret."""

from __future__ import annotations

import base64
import dataclasses
import json
import uuid
import zlib
from datetime import UTC, datetime

import pytest

from dispatcher.app import create_app
from dispatcher.history import Attempt, isoformat
from dispatcher.priorities import queue_name
from tests.conftest import AUTH, BurstWorker, Service, wait_for, wait_until
from tests.test_endpoints import new_application, new_endpoint, verify
from workers import attempt as attempts
from workers.decision import Decision


def address(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


def send(client, **fields) -> str:
    body = {"to": [address()], "subject": f"Hello {uuid.uuid4().hex[:8]}", "text": "Hello there."} | fields
    response = client.post("/v1/emails", json=body, headers=AUTH)
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["id"])


def event_jobs(client) -> list[dict]:
    """The webhook jobs of the client's queue, each an event's delivery: oldest first."""
    response = client.get("/v1/jobs?kind=webhook&limit=1000", headers=AUTH)
    assert response.status_code == 200, response.get_json()
    return list(reversed(response.get_json()["jobs"]))


def received(receiver, endpoint: dict, count: int, timeout: float = 30) -> list[dict]:
    """The `count` webhooks the endpoint received, each verified with its secret, by their type."""
    wait_until(lambda: len(receiver.received(endpoint["url"])) >= count, timeout,
               f"{endpoint['url']} did not receive {count} webhook(s)")
    bodies = [verify(endpoint["secret"], request) for request in receiver.received(endpoint["url"])]
    return sorted(bodies, key=lambda body: body["type"])


def deliveries(svc: Service, email_id: str) -> list[tuple[str, str, str]]:
    """(event type, application, endpoint) of each delivery enqueued for the email's events: all of
    them are enqueued before the email's attempt is recorded, so once its job has ended."""
    found = []
    for job in event_jobs(svc.client):
        target = job["target"]
        view = svc.client.get(f"/v1/events/{target['event']}", headers=AUTH).get_json()
        raw = svc.client.application.extensions["dispatcher"].connection.hget(f"rq:job:{job['id']}", "data")
        if email_id.encode() in zlib.decompress(raw or zlib.compress(b"")):
            found.append((target["event_type"], view["application"], target["endpoint"]))
    return sorted(found)


@pytest.fixture
def svc(service) -> Service:
    svc = service()
    svc.start_worker()
    return svc


# --- the events --------------------------------------------------------------------------------


def test_a_bounced_email_produces_an_email_failed_webhook(svc, receiver, smtp_server):
    """The issue's acceptance test."""
    app = new_application(svc)
    endpoint = new_endpoint(svc, app, receiver.url())
    bounced = address("reject550")

    email_id = send(svc.client, to=[bounced], subject="Your invoice", text="the body stays private",
                    metadata={"customer": "c-42"}, application=app)

    job = wait_for(svc.client, email_id)
    assert job["status"] == "failed" and job["target"]["application"] == app, job
    assert deliveries(svc, email_id) == [("email.failed", app, endpoint["id"])]
    (body,) = received(receiver, endpoint, 1)
    assert body["type"] == "email.failed"
    data = body["data"]
    assert data.pop("finished_at") == job["attempts"][0]["finished_at"]
    assert "550" in data.pop("error") and bounced in job["error"]
    assert data == {
        "email_id": email_id, "status": "failed", "to": [bounced], "cc": [], "subject": "Your invoice",
        "metadata": {"customer": "c-42"}, "attempt": 1, "smtp_code": 550, "suppressed": [],
    }
    (request,) = receiver.received(endpoint["url"])
    assert b"the body stays private" not in request.body


def test_a_delivered_email_produces_email_delivered_without_its_body_or_attachments(svc, receiver, smtp_server):
    app = new_application(svc)
    endpoint = new_endpoint(svc, app, receiver.url())
    to, cc, hidden = address("to"), address("cc"), address("bcc")
    attachment = base64.b64encode(b"attached secret").decode()

    email_id = send(svc.client, to=[f"Ann Example <{to}>"], cc=[cc], bcc=[hidden], subject="Welcome",
                    html="<p>private html</p>", attachments=[{"filename": "a.txt", "content": attachment}],
                    metadata={"user": "u-1"}, application=app)

    job = wait_for(svc.client, email_id)
    assert job["status"] == "succeeded", job
    assert deliveries(svc, email_id) == [("email.delivered", app, endpoint["id"])]
    (body,) = received(receiver, endpoint, 1)
    assert body["type"] == "email.delivered"
    assert body["data"] == {
        "email_id": email_id, "status": "succeeded", "to": [to], "cc": [cc], "subject": "Welcome",
        "metadata": {"user": "u-1"}, "attempt": 1, "smtp_code": 250, "error": None, "suppressed": [],
        "finished_at": job["attempts"][0]["finished_at"],
    }
    (request,) = receiver.received(endpoint["url"])
    assert b"private html" not in request.body and attachment.encode() not in request.body
    assert hidden.encode() not in request.body  # to and cc only: bcc stays blind
    assert smtp_server.handler.messages_to(hidden)  # it was sent to them all the same


def test_suppressed_recipients_produce_email_suppressed(svc, receiver, smtp_server):
    """Beside email.delivered when others got it; beside email.failed when nobody could."""
    app = new_application(svc)
    endpoint = new_endpoint(svc, app, receiver.url())
    listed, other = address("listed"), address("other")
    added = svc.client.post("/v1/suppressions", json={"address": listed}, headers=AUTH)
    assert added.status_code == 201, added.get_json()

    partly = send(svc.client, to=[other], cc=[listed], application=app)
    assert wait_for(svc.client, partly)["status"] == "succeeded"
    assert [event for event, _, _ in deliveries(svc, partly)] == ["email.delivered", "email.suppressed"]
    delivered, suppressed = received(receiver, endpoint, 2)
    assert (delivered["type"], delivered["data"]["suppressed"]) == ("email.delivered", [listed])
    assert suppressed["type"] == "email.suppressed"
    assert suppressed["data"] | {"finished_at": None} == delivered["data"] | {"finished_at": None}
    assert suppressed["data"]["status"] == "succeeded"

    nobody = send(svc.client, to=[listed], application=app)
    job = wait_for(svc.client, nobody)
    assert job["status"] == "failed", job
    assert [event for event, _, _ in deliveries(svc, nobody)] == ["email.failed", "email.suppressed"]
    bodies = [body for body in received(receiver, endpoint, 4) if body["data"]["email_id"] == nobody]
    failed, suppressed = bodies
    assert (failed["type"], suppressed["type"]) == ("email.failed", "email.suppressed")
    for body in bodies:
        data = body["data"]
        assert (data["status"], data["smtp_code"], data["suppressed"]) == ("failed", None, [listed])
        assert "suppression list" in data["error"]
    assert smtp_server.handler.messages_to(listed) == []


def test_an_endpoint_receives_only_the_email_events_it_subscribes_to(svc, receiver):
    app = new_application(svc)
    failures = new_endpoint(svc, app, receiver.url(), event_types=["email.failed"])
    successes = new_endpoint(svc, app, receiver.url(), event_types=["email.delivered", "order.paid"])
    orders = new_endpoint(svc, app, receiver.url(), event_types=["order.paid"])
    everything = new_endpoint(svc, app, receiver.url())

    ok = send(svc.client, application=app)
    bounced = send(svc.client, to=[address("reject550")], application=app)
    wait_for(svc.client, ok), wait_for(svc.client, bounced)

    assert deliveries(svc, ok) == sorted([("email.delivered", app, successes["id"]),
                                          ("email.delivered", app, everything["id"])])
    assert deliveries(svc, bounced) == sorted([("email.failed", app, failures["id"]),
                                               ("email.failed", app, everything["id"])])
    assert [(b["type"], b["data"]["email_id"]) for b in received(receiver, failures, 1)] == [("email.failed", bounced)]
    assert [(b["type"], b["data"]["email_id"]) for b in received(receiver, successes, 1)] == [
        ("email.delivered", ok)
    ]
    assert [b["type"] for b in received(receiver, everything, 2)] == ["email.delivered", "email.failed"]
    assert receiver.received(orders["url"]) == []


def test_an_email_without_an_application_publishes_no_event(svc, receiver, redis_conn):
    app = new_application(svc)
    endpoint = new_endpoint(svc, app, receiver.url())

    ok = send(svc.client)
    bounced = send(svc.client, to=[address("reject550")])

    assert wait_for(svc.client, ok)["status"] == "succeeded"
    job = wait_for(svc.client, bounced)
    assert job["status"] == "failed" and "application" not in job["target"], job
    assert event_jobs(svc.client) == []
    assert b"application" not in (redis_conn.hget(f"rq:job:{ok}", "data") or b"")
    assert receiver.received(endpoint["url"]) == []


def test_email_events_of_one_application_never_reach_anothers_endpoints(svc, receiver):
    mine, theirs = new_application(svc, "Mine"), new_application(svc, "Theirs")
    my_endpoint = new_endpoint(svc, mine, receiver.url())
    their_endpoint = new_endpoint(svc, theirs, receiver.url())

    email_id = send(svc.client, application=mine)

    wait_for(svc.client, email_id)
    assert deliveries(svc, email_id) == [("email.delivered", mine, my_endpoint["id"])]
    assert [b["data"]["email_id"] for b in received(receiver, my_endpoint, 1)] == [email_id]
    assert receiver.received(their_endpoint["url"]) == []


def test_a_retried_email_produces_one_email_delivered_and_no_email_failed(svc, receiver):
    app = new_application(svc)
    endpoint = new_endpoint(svc, app, receiver.url())

    email_id = send(svc.client, to=[address("temp451")], retry={"max_attempts": 3, "backoff": [1]}, application=app)

    job = wait_for(svc.client, email_id)
    assert job["status"] == "succeeded" and len(job["attempts"]) == 2, job
    assert deliveries(svc, email_id) == [("email.delivered", app, endpoint["id"])]
    (body,) = received(receiver, endpoint, 1)
    assert (body["type"], body["data"]["attempt"], body["data"]["smtp_code"]) == ("email.delivered", 2, 250)


def test_an_email_that_fails_after_its_retries_produces_one_email_failed(svc, receiver):
    """The last retryable attempt fails the email for good: one email.failed, saying so."""
    app = new_application(svc)
    endpoint = new_endpoint(svc, app, receiver.url())

    email_id = send(svc.client, to=[address("throttled")], retry={"max_attempts": 2, "backoff": [0.5]},
                    application=app)

    job = wait_for(svc.client, email_id)
    assert job["status"] == "failed" and len(job["attempts"]) == 2, job
    assert deliveries(svc, email_id) == [("email.failed", app, endpoint["id"])]
    (body,) = received(receiver, endpoint, 1)
    assert (body["data"]["attempt"], body["data"]["smtp_code"]) == (2, 421)
    assert body["data"]["error"].startswith("gave up after 2 attempt(s)")


def test_an_application_deleted_since_acceptance_gets_no_event_and_the_email_goes_all_the_same(
    service, receiver, smtp_server
):
    svc = service()
    app = new_application(svc)
    to = address("to")
    email_id = send(svc.client, to=[to], application=app)
    assert svc.client.delete(f"/v1/applications/{app}", headers=AUTH).status_code == 204
    svc.start_worker()

    job = wait_for(svc.client, email_id)

    assert job["status"] == "succeeded", job
    assert smtp_server.handler.messages_to(to)
    assert event_jobs(svc.client) == []


# --- acceptance ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/emails", {"to": ["a@example.com"], "subject": "s", "text": "t", "application": "app_nope"},
         "application"),
        ("/v1/emails", {"to": ["a@example.com"], "subject": "s", "text": "t", "application": ""}, "application"),
        ("/v1/emails/batch", {"items": [{"to": ["a@example.com"], "subject": "s", "text": "t", "application": "{app}"},
                                        {"to": ["b@example.com"], "subject": "s", "text": "t",
                                         "application": "app_nope"}]}, "items.1.application"),
        ("/v1/emails/batch", {"template": {"subject": "Hi {{ name }}", "text": "t"},
                              "recipients": [{"to": ["a@example.com"], "variables": {"name": "A"}}],
                              "application": "app_nope"}, "application"),
        # The items form shares nothing: an application goes in each item.
        ("/v1/emails/batch", {"items": [{"to": ["a@example.com"], "subject": "s", "text": "t"}],
                              "application": "{app}"}, "application"),
    ],
)
def test_an_unknown_application_is_a_422_naming_the_field(service, path, body, field):
    svc = service()
    app = new_application(svc)
    body = json.loads(json.dumps(body).replace("{app}", app))

    response = svc.client.post(path, json=body, headers=AUTH)

    assert response.status_code == 422, response.get_json()
    assert [d["field"] for d in response.get_json()["error"]["details"]] == [field]
    assert svc.client.get("/v1/jobs?kind=email", headers=AUTH).get_json()["jobs"] == []


def test_every_form_of_email_takes_a_known_application(service):
    svc = service()
    app = new_application(svc)
    single = send(svc.client, application=app)
    items = svc.client.post("/v1/emails/batch", headers=AUTH, json={"items": [
        {"to": ["a@example.com"], "subject": "s", "text": "t", "application": app},
        {"to": ["b@example.com"], "subject": "s", "text": "t"},
    ]})
    template = svc.client.post("/v1/emails/batch", headers=AUTH, json={
        "template": {"subject": "Hi {{ name }}", "text": "t"}, "application": app,
        "recipients": [{"to": ["a@example.com"], "variables": {"name": "A"}},
                       {"to": ["b@example.com"], "variables": {"name": "B"}}],
    })
    assert items.status_code == template.status_code == 202, (items.get_json(), template.get_json())

    def application(job_id: str) -> str | None:
        return svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()["target"].get("application")

    assert application(single) == app
    assert [application(item["id"]) for item in items.get_json()["items"]] == [app, None]
    assert [application(item["id"]) for item in template.get_json()["items"]] == [app, app]


# --- once per attempt --------------------------------------------------------------------------


def test_settling_one_attempt_twice_publishes_its_events_once_on_the_jobs_own_queue(
    burst_worker, redis_conn, receiver
):
    """The settle path as the worker runs it (workers.attempt.settle), twice for one attempt, as a
    job run twice would: one event per type. The events go to the Dispatcher queue of the job, not
    to the one the worker's own settings name."""
    worker = burst_worker()  # this process's delivery context, with the worker's settings and queue
    elsewhere = BurstWorker(redis_conn, dataclasses.replace(worker.settings, queue_name=f"ev-{uuid.uuid4().hex[:10]}"))
    client = create_app(elsewhere.settings).test_client()
    app = _application(client)
    endpoint = _endpoint(client, app, receiver.url())
    listed = address("listed")
    payload = {"application": app, "to": [address("to")], "cc": [], "bcc": [listed], "subject": "Twice",
               "metadata": {"n": "1"}, "text": "private"}
    now = isoformat(datetime.now(UTC))
    first = Attempt(number=1, started_at=now, finished_at=now, outcome="succeeded", status_code=250,
                    suppressed=[listed])
    email_id = "em_" + uuid.uuid4().hex
    rq_queue = queue_name(elsewhere.settings.queue_name, "default")

    for _ in range(2):
        attempts.settle("email", email_id, payload, Decision("succeeded", first), rq_queue)

    assert sorted(job["target"]["event_type"] for job in event_jobs(client)) == ["email.delivered", "email.suppressed"]
    assert event_jobs(create_app(worker.settings).test_client()) == []  # not the worker's own queue
    # Another attempt of the same email (a new series after a retry by hand, say) is another event.
    second = Attempt(number=2, started_at=now, finished_at=now, outcome="succeeded", status_code=250)
    attempts.settle("email", email_id, payload, Decision("succeeded", second), rq_queue)
    attempts.settle("email", email_id, payload, Decision("succeeded", second), rq_queue)
    assert sorted(job["target"]["event_type"] for job in event_jobs(client)) == [
        "email.delivered", "email.delivered", "email.suppressed"
    ]
    elsewhere.run()
    bodies = received(receiver, endpoint, 3)
    assert sorted((b["type"], b["data"]["attempt"]) for b in bodies) == [
        ("email.delivered", 1), ("email.delivered", 2), ("email.suppressed", 1)
    ]
    assert all(b["data"]["email_id"] == email_id and b"private" not in json.dumps(b).encode() for b in bodies)


def _application(client) -> str:
    response = client.post("/v1/applications", json={"name": "Twice"}, headers=AUTH)
    assert response.status_code == 201, response.get_json()
    return str(response.get_json()["id"])


def _endpoint(client, app: str, url: str) -> dict:
    response = client.post(f"/v1/applications/{app}/endpoints", json={"url": url}, headers=AUTH)
    assert response.status_code == 201, response.get_json()
    return dict(response.get_json())
