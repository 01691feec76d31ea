"""Endpoint health (issue #12, item 4): 410 Gone disables an endpoint; a circuit breaker per
endpoint, shared by every worker through Redis, holds deliveries while open and lets one probe
through after its cooldown; an endpoint failing too long is disabled; every change is recorded,
shown by the API, mailed to the owner once (through Dispatcher's own email channel and a real SMTP
server) and published to the application as an event. Real workers, receivers and SMTP server."""

from __future__ import annotations

import email
import email.policy
import json
import time
import uuid

import pytest

from dispatcher import health
from dispatcher.config import Settings
from dispatcher.errors import ConfigError
from dispatcher.keys import Keys
from tests.conftest import AUTH, Service, wait_until
from tests.test_endpoints import event, new_application, new_endpoint, publish, settled

ONCE = {"max_attempts": 1}


def endpoint_view(svc: Service, app: str, endpoint_id: str) -> dict:
    response = svc.client.get(f"/v1/applications/{app}/endpoints/{endpoint_id}", headers=AUTH)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def health_of(svc: Service, app: str, endpoint_id: str) -> dict:
    return endpoint_view(svc, app, endpoint_id)["health"]


def delivery(svc: Service, event_id: str) -> dict:
    (item,) = event(svc, event_id)["deliveries"]
    return svc.client.get(item["status_url"], headers=AUTH).get_json()


def owner() -> str:
    return f"owner-{uuid.uuid4().hex[:10]}@example.com"


def mails(smtp_server, address: str) -> list[email.message.EmailMessage]:
    return [
        email.message_from_bytes(m.content, policy=email.policy.default)  # type: ignore[misc]
        for m in smtp_server.handler.messages_to(address)
    ]


def bodies(receiver, url: str) -> list[dict]:
    return [json.loads(request.body) for request in receiver.received(url)]


# --- 410 Gone ----------------------------------------------------------------------------------


def test_a_410_disables_the_endpoint_and_its_owner_is_mailed_through_a_real_smtp_server(
    service, receiver, smtp_server
):
    """The issue's acceptance test."""
    svc = service()
    app = new_application(svc, "Acme Shop")
    address = owner()
    url = receiver.url("status/410") + "?token=s3cret"
    endpoint = new_endpoint(svc, app, url, owner_email=address)
    assert endpoint["health"] == {
        "state": "healthy", "reason": None, "consecutive_failures": 0, "failing_since": None,
        "next_probe_at": None, "changes": [],
    }
    event_id = publish(svc, app).get_json()["id"]
    svc.start_worker()

    settled(svc, event_id)
    job = delivery(svc, event_id)
    assert (job["status"], job["attempts"][0]["status_code"]) == ("failed", 410)
    view = endpoint_view(svc, app, endpoint["id"])
    assert view["disabled"] is True
    assert (view["health"]["state"], view["health"]["reason"]) == ("disabled", "it answered 410 Gone")
    (change,) = view["health"]["changes"]
    assert (change["sequence"], change["state"], change["reason"]) == (1, "disabled", "it answered 410 Gone")
    listed = svc.client.get(f"/v1/applications/{app}/endpoints", headers=AUTH).get_json()["endpoints"]
    assert listed[0]["health"] == view["health"]

    wait_until(lambda: mails(smtp_server, address), 30, "the owner got no email")
    (mail,) = mails(smtp_server, address)
    text = mail.get_body(("plain",)).get_content()
    assert endpoint["id"] in mail["subject"] and "disabled" in mail["subject"]
    assert "tests@example.com" in mail["from"]
    public = url.split("?")[0]
    for part in (endpoint["id"], public, app, "Acme Shop", "410 Gone"):
        assert part in text, (part, text)
    assert "s3cret" not in mail.as_string()  # the URL without its query
    # Disabled: a later event is not delivered to it at all.
    assert publish(svc, app).get_json()["count"] == 0
    time.sleep(1)
    assert len(mails(smtp_server, address)) == 1


# --- the circuit breaker -----------------------------------------------------------------------


def test_the_breaker_opens_holds_deliveries_lets_one_probe_at_a_time_and_closes(service, receiver):
    """The issue's acceptance test: two failures open it (cooldown 3 s); deliveries meanwhile are
    held as scheduled, not attempts; the first probe fails (open again, cooldown doubled), the
    second succeeds and closes it; then the held ones go."""
    svc = service(DISPATCHER_BREAKER_FAILURES="2", DISPATCHER_BREAKER_COOLDOWN="3")
    app = new_application(svc)
    url = receiver.url("fail/3/500")
    endpoint = new_endpoint(svc, app, url, retry=ONCE)
    first = [publish(svc, app, payload={"n": n}).get_json()["id"] for n in range(2)]
    svc.start_worker()
    for event_id in first:
        settled(svc, event_id)
    state = health_of(svc, app, endpoint["id"])
    assert (state["state"], state["consecutive_failures"]) == ("open", 2)
    assert state["reason"].startswith("2 failed attempts in a row, the last: HTTP 500")
    assert state["failing_since"] is not None and state["next_probe_at"] is not None

    held = [publish(svc, app, payload={"n": n}).get_json()["id"] for n in range(2, 5)]

    def held_jobs() -> list[dict]:
        return [job for job in map(lambda e: delivery(svc, e), held) if job["status"] == "scheduled" and job["held"]]

    wait_until(lambda: len(held_jobs()) == 3, 20, "the deliveries were not held")
    for job in held_jobs():
        assert job["held"] == "the endpoint's circuit breaker is open"
        assert job["attempts"] == [] and job["next_attempt_at"] is not None
    assert len(receiver.received(url)) == 2

    # The first probe (the third request: a 500) goes alone, and opens it again for 6 s.
    wait_until(lambda: len(receiver.received(url)) >= 3, 20, "no probe went")
    probed_at = time.monotonic()
    wait_until(lambda: health_of(svc, app, endpoint["id"])["consecutive_failures"] == 3, 10, "probe not counted")
    assert health_of(svc, app, endpoint["id"])["state"] == "open"
    time.sleep(max(0.0, probed_at + 4 - time.monotonic()))
    assert len(receiver.received(url)) == 3  # nothing else went while it was open again

    # The second probe succeeds: closed, and the held deliveries follow.
    for event_id in held:
        settled(svc, event_id)
    requests = receiver.received(url)
    assert [r.status for r in requests] == [500, 500, 500, 200, 200]
    assert requests[3].received_at - requests[2].received_at >= 6 * 0.8  # the doubled cooldown
    assert requests[4].received_at >= requests[3].received_at
    jobs = [delivery(svc, e) for e in held]
    assert sorted(job["status"] for job in jobs) == ["failed", "succeeded", "succeeded"]  # the first probe failed
    assert all(len(job["attempts"]) == 1 and job["held"] is None for job in jobs)  # holding was no attempt
    state = health_of(svc, app, endpoint["id"])
    assert (state["state"], state["consecutive_failures"], state["failing_since"]) == ("healthy", 0, None)
    assert [(c["sequence"], c["state"]) for c in state["changes"]] == [(2, "closed"), (1, "open")]
    assert state["changes"][0]["reason"] == "the probe delivery succeeded"


def test_only_one_worker_probes_a_half_open_breaker(service, receiver):
    """Three worker processes, many held deliveries: at the end of each cooldown exactly one goes."""
    svc = service(DISPATCHER_BREAKER_FAILURES="1", DISPATCHER_BREAKER_COOLDOWN="1.5")
    app = new_application(svc)
    url = receiver.url("fail/2/500")
    endpoint = new_endpoint(svc, app, url, retry=ONCE)
    settle_first = publish(svc, app).get_json()["id"]
    svc.start_worker()
    settled(svc, settle_first)
    assert health_of(svc, app, endpoint["id"])["state"] == "open"
    events = [publish(svc, app, payload={"n": n}).get_json()["id"] for n in range(12)]
    svc.start_worker()
    svc.start_worker()

    for event_id in events:
        settled(svc, event_id)
    requests = receiver.received(url)
    assert [r.status for r in requests][:3] == [500, 500, 200]
    # Each probe alone: the next request came only once the breaker had closed after the second.
    assert requests[2].received_at - requests[1].received_at >= 3 * 0.8
    assert len(requests) == 13
    assert [c["state"] for c in health_of(svc, app, endpoint["id"])["changes"]] == ["closed", "open"]


# --- failing too long --------------------------------------------------------------------------


def test_an_endpoint_failing_longer_than_the_setting_is_disabled(service, receiver, smtp_server):
    svc = service(DISPATCHER_ENDPOINT_DISABLE_AFTER="2", DISPATCHER_BREAKER_FAILURES="100")
    app = new_application(svc)
    address = owner()
    url = receiver.url("status/503")
    endpoint = new_endpoint(svc, app, url, owner_email=address, retry={"max_attempts": 6, "backoff": [1]})
    event_id = publish(svc, app).get_json()["id"]
    svc.start_worker()

    settled(svc, event_id)
    view = endpoint_view(svc, app, endpoint["id"])
    assert view["disabled"] is True
    assert view["health"]["state"] == "disabled"
    assert view["health"]["reason"].startswith("it has failed since ")
    assert view["health"]["consecutive_failures"] >= 2
    assert [c["state"] for c in view["health"]["changes"]] == ["disabled"]
    job = delivery(svc, event_id)
    # Attempts about 2 s apart (a 1 s backoff, in RQ's whole seconds): disabled at the first one 2 s
    # or more after the first failure (the 2nd or 3rd); the next is refused before anything is sent.
    assert job["status"] == "failed" and 2 <= len(receiver.received(url)) <= 3
    assert job["attempts"][-1]["error"] == f"endpoint {endpoint['id']} is disabled"
    wait_until(lambda: mails(smtp_server, address), 30, "the owner got no email")
    assert "without a success" in mails(smtp_server, address)[0].get_body(("plain",)).get_content()


# --- PATCH -------------------------------------------------------------------------------------


def test_enabling_with_patch_resets_the_breaker_and_records_the_change(service, receiver):
    svc = service(DISPATCHER_BREAKER_FAILURES="1", DISPATCHER_BREAKER_COOLDOWN="600")
    app = new_application(svc)
    url = receiver.url("fail/1/500")
    endpoint = new_endpoint(svc, app, url, retry=ONCE)
    path = f"/v1/applications/{app}/endpoints/{endpoint['id']}"
    svc.start_worker()
    settled(svc, publish(svc, app).get_json()["id"])
    assert health_of(svc, app, endpoint["id"])["state"] == "open"
    held = publish(svc, app).get_json()["id"]
    wait_until(lambda: delivery(svc, held)["held"] is not None, 20, "the delivery was not held")

    patched = svc.client.patch(path, json={"disabled": False}, headers=AUTH)

    assert patched.status_code == 200, patched.get_json()
    state = patched.get_json()["health"]
    assert (state["state"], state["consecutive_failures"], state["failing_since"]) == ("healthy", 0, None)
    assert [(c["sequence"], c["state"]) for c in state["changes"]] == [(2, "enabled"), (1, "open")]
    assert "reset" in state["changes"][0]["reason"]
    # Reset: the next delivery goes now, not after the 10-minute cooldown.
    settled(svc, publish(svc, app).get_json()["id"])
    assert receiver.received(url)[-1].status == 200
    # PATCH on a healthy enabled endpoint changes nothing of its health.
    again = svc.client.patch(path, json={"disabled": False, "description": "x"}, headers=AUTH).get_json()
    assert len(again["health"]["changes"]) == 2 and again["description"] == "x"


def test_disabling_and_enabling_with_patch_are_recorded_newest_first_and_capped(service, receiver):
    svc = service()
    app = new_application(svc)
    endpoint = new_endpoint(svc, app, receiver.url())
    path = f"/v1/applications/{app}/endpoints/{endpoint['id']}"

    for n in range(health.CHANGES_KEPT + 4):  # disable, enable, ..., enable
        view = svc.client.patch(path, json={"disabled": n % 2 == 0}, headers=AUTH).get_json()
    both = svc.client.patch(path, json={"disabled": True, "rate_limit": 3}, headers=AUTH).get_json()

    changes = both["health"]["changes"]
    assert len(changes) == health.CHANGES_KEPT
    total = health.CHANGES_KEPT + 4 + 1
    assert [c["sequence"] for c in changes] == list(range(total, total - health.CHANGES_KEPT, -1))
    assert changes[0]["state"] == "disabled" and changes[0]["reason"] == "disabled through the API"
    assert changes[1]["state"] == "enabled" and changes[1]["reason"] == "enabled through the API"
    assert view["health"]["state"] == "healthy" and both["health"]["state"] == "disabled"
    assert both["disabled"] is True and both["rate_limit"] == 3
    assert all(c["at"].endswith("Z") for c in changes)


def test_a_deleted_endpoint_leaves_no_health_behind(service, receiver, redis_conn):
    svc = service()
    app = new_application(svc)
    endpoint = new_endpoint(svc, app, receiver.url())
    path = f"/v1/applications/{app}/endpoints/{endpoint['id']}"
    svc.client.patch(path, json={"disabled": True}, headers=AUTH)
    keys = Keys(svc.settings.queue_name)
    assert redis_conn.exists(keys.endpoint_health(endpoint["id"]), keys.endpoint_changes(endpoint["id"])) == 2

    assert svc.client.delete(path, headers=AUTH).status_code == 204

    assert redis_conn.exists(keys.endpoint_health(endpoint["id"]), keys.endpoint_changes(endpoint["id"])) == 0


# --- telling the owner and the application -----------------------------------------------------


def test_each_change_is_mailed_once_even_when_its_outbox_entry_is_sent_again(
    service, receiver, smtp_server, redis_conn
):
    """A crash between enqueuing a change's email and taking the change off the outbox leaves it
    there: sending it again enqueues nothing (its idempotency claim), so each change mails once."""
    svc = service()
    app = new_application(svc)
    address = owner()
    endpoint = new_endpoint(svc, app, receiver.url(), owner_email=address)
    path = f"/v1/applications/{app}/endpoints/{endpoint['id']}"
    keys = Keys(svc.settings.queue_name)
    svc.client.patch(path, json={"disabled": True}, headers=AUTH)
    svc.client.patch(path, json={"disabled": False}, headers=AUTH)
    assert redis_conn.llen(keys.health_outbox) == 0
    record = redis_conn.hget(keys.endpoints, endpoint["id"]).decode()
    for change in reversed(redis_conn.lrange(keys.endpoint_changes(endpoint["id"]), 0, -1)):
        redis_conn.rpush(keys.health_outbox, f'{{"endpoint":{record},"change":{change.decode()}}}')

    assert health.notify(redis_conn, svc.settings) == 2
    svc.start_worker()

    wait_until(lambda: len(mails(smtp_server, address)) == 2, 30, "the owner did not get both emails")
    time.sleep(2)
    subjects = [mail["subject"] for mail in mails(smtp_server, address)]
    assert len(subjects) == 2
    # (a worker sends both at once: either may arrive first)
    assert sorted(subject.rsplit(" ", 1)[1] for subject in subjects) == ["disabled", "enabled"]
    assert redis_conn.llen(keys.health_outbox) == 0


def test_a_change_is_published_to_the_other_subscribed_endpoints_of_the_application(
    service, receiver, smtp_server
):
    svc = service(DISPATCHER_BREAKER_FAILURES="1", DISPATCHER_BREAKER_COOLDOWN="600")
    app = new_application(svc)
    failing_url, watcher_url, other_url = receiver.url("status/500"), receiver.url(), receiver.url()
    failing = new_endpoint(svc, app, failing_url, retry=ONCE)  # every event type, its own health's too
    watcher = new_endpoint(svc, app, watcher_url, event_types=["endpoint.circuit_opened", "endpoint.disabled"])
    new_endpoint(svc, app, other_url, event_types=["order.paid"])
    svc.start_worker()

    settled(svc, publish(svc, app).get_json()["id"])

    wait_until(lambda: receiver.received(watcher_url), 30, "the watcher was not told")
    (told,) = bodies(receiver, watcher_url)
    assert told["type"] == "endpoint.circuit_opened"
    data = told["data"]
    assert (data["endpoint"], data["application"], data["url"], data["state"], data["sequence"]) == (
        failing["id"], app, failing_url, "open", 1
    )
    assert data["reason"].startswith("1 failed attempts in a row")
    # Not told of its own health: the event has one delivery, the watcher's.
    (request,) = receiver.received(watcher_url)
    job = svc.client.get(f"/v1/jobs/{request.headers['webhook-id']}", headers=AUTH).get_json()
    told_event = event(svc, job["target"]["event"])
    assert told_event["event_type"] == "endpoint.circuit_opened"
    assert [d["endpoint"] for d in told_event["deliveries"]] == [watcher["id"]]
    assert len(receiver.received(failing_url)) == 1
    assert [b["type"] for b in bodies(receiver, other_url)] == ["order.paid"]  # not subscribed


def test_a_410_is_published_as_endpoint_disabled(service, receiver):
    svc = service()
    app = new_application(svc)
    gone_url, watcher_url = receiver.url("status/410"), receiver.url()
    gone = new_endpoint(svc, app, gone_url, event_types=["order.paid"])
    new_endpoint(svc, app, watcher_url, event_types=["endpoint.disabled"])
    svc.start_worker()

    settled(svc, publish(svc, app).get_json()["id"])

    wait_until(lambda: receiver.received(watcher_url), 30, "the watcher was not told")
    (told,) = bodies(receiver, watcher_url)
    assert told["type"] == "endpoint.disabled"
    assert (told["data"]["endpoint"], told["data"]["reason"]) == (gone["id"], "it answered 410 Gone")


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DISPATCHER_BREAKER_FAILURES", "0"),
        ("DISPATCHER_BREAKER_FAILURES", "five"),
        ("DISPATCHER_BREAKER_FAILURES", "1001"),
        ("DISPATCHER_BREAKER_COOLDOWN", "0"),
        ("DISPATCHER_BREAKER_COOLDOWN", "nan"),
        ("DISPATCHER_BREAKER_COOLDOWN", "86401"),
        ("DISPATCHER_BREAKER_COOLDOWN", "1m"),
        ("DISPATCHER_ENDPOINT_DISABLE_AFTER", "0"),
        ("DISPATCHER_ENDPOINT_DISABLE_AFTER", "1.5"),
        ("DISPATCHER_ENDPOINT_DISABLE_AFTER", "5d"),
    ],
)
def test_a_bad_health_setting_is_a_config_error_naming_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_health_settings_default_and_parse():
    defaults = Settings.from_env({})
    assert (defaults.breaker_failures, defaults.breaker_cooldown, defaults.endpoint_disable_after) == (
        5, 60.0, 5 * 24 * 3600
    )
    settings = Settings.from_env(
        {"DISPATCHER_BREAKER_FAILURES": "3", "DISPATCHER_BREAKER_COOLDOWN": "0.5",
         "DISPATCHER_ENDPOINT_DISABLE_AFTER": "3600"}
    )
    assert (settings.breaker_failures, settings.breaker_cooldown, settings.endpoint_disable_after) == (3, 0.5, 3600)


def test_the_url_in_an_email_has_no_query():
    assert health.public_url("https://hooks.example.com:8443/in/x?token=1") == "https://hooks.example.com:8443/in/x"
    assert health.public_url("http://[::1]/a?b") == "http://[::1]/a"
