"""Applications, endpoints and events (issue #12, items 1-3): registered receivers with their own
secrets and filters, one event fanned out to every subscriber atomically, secrets rotated with both
signatures during the grace period. Real Redis, real workers, real HTTP receivers, and the
`standardwebhooks` package verifying what they received."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid

import jsonschema_rs
import pytest
import requests
from standardwebhooks import Webhook, WebhookVerificationError

from dispatcher.endpoints import MAX_APPLICATIONS, MAX_ENDPOINTS, MAX_GRACE
from dispatcher.idempotency import HEADER
from dispatcher.openapi import openapi_document
from tests.conftest import API_KEY, AUTH, Service, wait_until


def new_application(svc: Service, name: str = "Acme") -> str:
    response = svc.client.post("/v1/applications", json={"name": name}, headers=AUTH)
    assert response.status_code == 201, response.get_json()
    return str(response.get_json()["id"])


def new_endpoint(svc: Service, app: str, url: str, **fields) -> dict:
    response = svc.client.post(f"/v1/applications/{app}/endpoints", json={"url": url, **fields}, headers=AUTH)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def publish(svc: Service, app: str, event_type: str = "order.paid", payload: dict | None = None, **fields):
    body = {"event_type": event_type, "payload": payload or {"order": 1042}, **fields}
    return svc.client.post(f"/v1/applications/{app}/events", json=body, headers=AUTH)


def event(svc: Service, event_id: str) -> dict:
    response = svc.client.get(f"/v1/events/{event_id}", headers=AUTH)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def settled(svc: Service, event_id: str) -> dict:
    wait_until(lambda: event(svc, event_id)["percent_done"] == 100, 30, f"event {event_id} did not settle")
    return event(svc, event_id)


def verify(secret: str, request) -> dict:
    return Webhook(secret).verify(request.body, request.headers)


# --- applications and endpoints ----------------------------------------------------------------


def test_applications_are_created_listed_read_renamed_and_deleted(service):
    svc = service()
    first, second = new_application(svc, "Acme"), new_application(svc, "Globex")

    listed = svc.client.get("/v1/applications", headers=AUTH).get_json()["applications"]
    renamed = svc.client.patch(f"/v1/applications/{first}", json={"name": "Acme Corp"}, headers=AUTH)
    deleted = svc.client.delete(f"/v1/applications/{second}", headers=AUTH)

    assert [(a["id"], a["name"]) for a in listed] == [(first, "Acme"), (second, "Globex")]
    assert renamed.status_code == 200 and renamed.get_json()["name"] == "Acme Corp"
    assert deleted.status_code == 204
    assert svc.client.get(f"/v1/applications/{second}", headers=AUTH).status_code == 404
    assert [a["id"] for a in svc.client.get("/v1/applications", headers=AUTH).get_json()["applications"]] == [first]


def test_an_endpoints_secret_is_answered_once_and_never_shown_again(service, receiver, redis_conn):
    svc = service()
    app = new_application(svc)
    url = receiver.url()

    created = new_endpoint(svc, app, url, description="orders", event_types=["order.paid"],
                           headers={"X-Tenant": "acme"}, owner_email="ops@example.com", rate_limit=5, ordered=True)

    secret = created.pop("secret")
    assert secret.startswith("whsec_") and len(secret) > 40
    assert created.pop("health")["state"] == "healthy"  # tests/test_endpoint_health.py
    endpoint_id = created["id"]
    assert created | {"created_at": None, "updated_at": None} == {
        "id": endpoint_id, "application": app, "url": url, "description": "orders",
        "event_types": ["order.paid"], "headers": {"X-Tenant": "acme"}, "owner_email": "ops@example.com",
        "retry": None, "rate_limit": 5.0, "ordered": True, "disabled": False, "created_at": None, "updated_at": None,
    }
    shown = [
        svc.client.get(f"/v1/applications/{app}/endpoints/{endpoint_id}", headers=AUTH).data,
        svc.client.get(f"/v1/applications/{app}/endpoints", headers=AUTH).data,
        svc.client.get(f"/v1/applications/{app}", headers=AUTH).data,
    ]
    assert all(secret.encode() not in answer and b"whsec_" not in answer for answer in shown)
    assert json.loads(shown[0]) | {"health": None} == created | {"health": None}


def test_an_endpoint_is_patched_field_by_field_and_deleted(service, receiver):
    svc = service()
    app = new_application(svc)
    url = receiver.url()
    endpoint = new_endpoint(svc, app, url, rate_limit=5, owner_email="ops@example.com")
    path = f"/v1/applications/{app}/endpoints/{endpoint['id']}"

    patched = svc.client.patch(path, json={"disabled": True, "rate_limit": None, "event_types": ["a.b"]}, headers=AUTH)

    assert patched.status_code == 200, patched.get_json()
    view = patched.get_json()
    assert (view["disabled"], view["rate_limit"], view["event_types"]) == (True, None, ["a.b"])
    assert (view["url"], view["owner_email"]) == (url, "ops@example.com")  # untouched
    for field in ("url", "description", "event_types", "headers", "ordered", "disabled"):  # not nullable
        refused = svc.client.patch(path, json={field: None}, headers=AUTH)
        assert refused.status_code == 422 and refused.get_json()["error"]["details"][0]["field"] == field
    assert svc.client.delete(path, headers=AUTH).status_code == 204
    assert svc.client.get(path, headers=AUTH).status_code == 404
    assert svc.client.get(f"/v1/applications/{app}/endpoints", headers=AUTH).get_json()["endpoints"] == []


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"url": "ftp://127.0.0.1/x"}, "url"),
        ({"url": "http://10.1.2.3/hook"}, "url"),  # the network guard, at registration
        ({"url": "http://169.254.169.254/latest/meta-data"}, "url"),
        ({"url": "http://user:pw@127.0.0.1/"}, "url"),
        ({"headers": {"webhook-signature": "forged"}}, "headers.webhook-signature"),
        ({"headers": {"X-A": "a\r\nX-B: b"}}, "headers.X-A"),
        ({"headers": {"Host": "evil.example"}}, "headers.Host"),
        ({"event_types": ["has space"]}, "event_types.0"),
        ({"owner_email": "not an address"}, "owner_email"),
        ({"owner_email": "ops@example.com\r\nBcc: eve@example.com"}, "owner_email"),
        ({"rate_limit": 0}, "rate_limit"),
        ({"rate_limit": True}, "rate_limit"),
        ({"retry": {"max_attempts": 0}}, "retry.max_attempts"),
        ({"description": "a\nb"}, "description"),
        ({"ordered": "yes"}, "ordered"),
        ({"secret": "whsec_mine"}, "secret"),
    ],
)
def test_a_bad_endpoint_is_a_422_naming_the_field(service, receiver, fields, field):
    svc = service()
    app = new_application(svc)

    response = svc.client.post(f"/v1/applications/{app}/endpoints", json={"url": receiver.url(), **fields},
                               headers=AUTH)

    assert response.status_code == 422, response.get_json()
    assert [d["field"] for d in response.get_json()["error"]["details"]] == [field]
    assert svc.client.get(f"/v1/applications/{app}/endpoints", headers=AUTH).get_json()["endpoints"] == []


def test_unknown_applications_and_endpoints_are_404(service, receiver):
    svc = service()
    app = new_application(svc)
    for method, path in [
        ("get", "/v1/applications/app_nope"),
        ("delete", "/v1/applications/app_nope"),
        ("get", "/v1/applications/app_nope/endpoints"),
        ("post", "/v1/applications/app_nope/endpoints"),
        ("post", "/v1/applications/app_nope/events"),
        ("get", f"/v1/applications/{app}/endpoints/ep_nope"),
        ("delete", f"/v1/applications/{app}/endpoints/ep_nope"),
        ("post", f"/v1/applications/{app}/endpoints/ep_nope/secret/rotate"),
        ("get", "/v1/events/ev_nope"),
    ]:
        body = {"url": receiver.url(), "event_type": "a", "payload": {}} if method == "post" else None
        response = getattr(svc.client, method)(path, json=body, headers=AUTH)
        assert response.status_code == 404, (method, path, response.get_json())


def test_an_endpoint_of_another_application_is_not_found_through_this_one(service, receiver):
    svc = service()
    mine, theirs = new_application(svc), new_application(svc)
    endpoint = new_endpoint(svc, theirs, receiver.url())

    for method in ("get", "patch", "delete"):
        response = getattr(svc.client, method)(f"/v1/applications/{mine}/endpoints/{endpoint['id']}",
                                               json={"disabled": True}, headers=AUTH)
        assert response.status_code == 404, method
    assert svc.client.get(f"/v1/applications/{theirs}/endpoints/{endpoint['id']}", headers=AUTH).status_code == 200


def test_deleting_an_application_deletes_its_endpoints_and_secrets(service, receiver, redis_conn):
    svc = service()
    app = new_application(svc)
    endpoint = new_endpoint(svc, app, receiver.url())
    keys = svc.client.application.extensions["dispatcher"].keys

    assert svc.client.delete(f"/v1/applications/{app}", headers=AUTH).status_code == 204

    assert redis_conn.hget(keys.endpoints, endpoint["id"]) is None
    assert redis_conn.hget(keys.endpoint_secrets, endpoint["id"]) is None
    assert not redis_conn.exists(keys.application_endpoints(app))


# --- events ------------------------------------------------------------------------------------


def test_an_event_fans_out_to_every_subscribed_enabled_endpoint_each_signed_with_its_own_secret(
    service, receiver, redis_conn
):
    svc = service()
    app = new_application(svc)
    urls = [receiver.url() for _ in range(4)]
    everything = new_endpoint(svc, app, urls[0], headers={"X-Tenant": "acme"})
    orders = new_endpoint(svc, app, urls[1], event_types=["order.paid", "order.refunded"])
    new_endpoint(svc, app, urls[2], event_types=["user.created"])  # not subscribed
    new_endpoint(svc, app, urls[3], disabled=True)  # not enabled
    svc.start_worker()

    response = publish(svc, app, "order.paid", {"order": 1042, "total": "9.90"})

    assert response.status_code == 202, response.get_json()
    answer = response.get_json()
    assert answer["count"] == 2 and answer["status_url"] == f"/v1/events/{answer['id']}"
    assert [d["endpoint"] for d in answer["deliveries"]] == [everything["id"], orders["id"]]
    view = settled(svc, answer["id"])
    assert view["by_status"]["succeeded"] == 2 and view["application"] == app and view["event_type"] == "order.paid"
    assert [(d["endpoint"], d["status"]) for d in view["deliveries"]] == [
        (everything["id"], "succeeded"), (orders["id"], "succeeded")
    ]
    for endpoint, url, delivery in zip((everything, orders), urls[:2], answer["deliveries"], strict=True):
        (request,) = receiver.received(url)
        verify(endpoint["secret"], request)
        body = json.loads(request.body)
        assert (body["type"], body["data"]) == ("order.paid", {"order": 1042, "total": "9.90"})
        assert request.headers["webhook-id"] == delivery["id"]
        other = orders if endpoint is everything else everything
        with pytest.raises(WebhookVerificationError):
            verify(other["secret"], request)
    assert receiver.received(urls[0])[0].headers["x-tenant"] == "acme"
    assert receiver.received(urls[2]) == [] and receiver.received(urls[3]) == []
    job = svc.client.get(answer["deliveries"][0]["status_url"], headers=AUTH).get_json()
    assert job["target"] == {"url": urls[0], "event_type": "order.paid", "endpoint": everything["id"],
                             "application": app, "event": answer["id"]}


def test_an_event_with_no_subscriber_is_accepted_with_no_deliveries(service, receiver):
    svc = service()
    app = new_application(svc)
    new_endpoint(svc, app, receiver.url(), event_types=["user.created"])

    response = publish(svc, app, "order.paid")

    assert response.status_code == 202
    assert (response.get_json()["count"], response.get_json()["deliveries"]) == (0, [])
    view = event(svc, response.get_json()["id"])
    assert (view["count"], view["percent_done"], view["deliveries"]) == (0, 100.0, [])


def test_secrets_never_reach_job_data_logs_or_the_dashboard(service, receiver, redis_conn):
    svc = service(DISPATCHER_LOG_FORMAT="json")
    app = new_application(svc)
    endpoint = new_endpoint(svc, app, receiver.url())
    secret = endpoint["secret"]
    svc.start_worker()

    answer = publish(svc, app).get_json()
    settled(svc, answer["id"])

    job_id = answer["deliveries"][0]["id"]
    raw = b"".join(value for value in redis_conn.hgetall(f"rq:job:{job_id}").values())
    assert secret.encode() not in raw and b"whsec_" not in raw
    assert secret not in svc.logs()
    login = {"Authorization": "Basic " + base64.b64encode(f"ops:{API_KEY}".encode()).decode()}
    dashboard = svc.client.get(f"/dashboard/0/data/job/{job_id}.json", headers=login)
    assert dashboard.status_code == 200 and secret.encode() not in dashboard.data
    assert secret.removeprefix("whsec_").encode() not in dashboard.data


def test_a_delivery_to_an_endpoint_deleted_since_fails_for_good_saying_so(service, receiver):
    svc = service()
    app = new_application(svc)
    endpoint = new_endpoint(svc, app, receiver.url())
    answer = publish(svc, app).get_json()
    assert svc.client.delete(f"/v1/applications/{app}/endpoints/{endpoint['id']}", headers=AUTH).status_code == 204
    svc.start_worker()

    view = settled(svc, answer["id"])

    assert view["by_status"]["failed"] == 1
    job = svc.client.get(answer["deliveries"][0]["status_url"], headers=AUTH).get_json()
    assert job["attempts"][-1]["outcome"] == "permanent"
    assert f"endpoint {endpoint['id']} no longer exists" in job["attempts"][-1]["error"]
    assert receiver.received(endpoint["url"]) == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"payload": {}}, "event_type"),
        ({"event_type": "a b", "payload": {}}, "event_type"),
        ({"event_type": "a"}, "payload"),
        ({"event_type": "a", "payload": []}, "payload"),
        ({"event_type": "a", "payload": {}, "ordering_key": ""}, "ordering_key"),
        ({"event_type": "a", "payload": {}, "ordering_key": "a\nb"}, "ordering_key"),
        ({"event_type": "a", "payload": {}, "priority": "urgent"}, "priority"),
        ({"event_type": "a", "payload": {}, "send_at": "2020-01-01T00:00:00Z"}, "send_at"),
        ({"event_type": "a", "payload": {}, "url": "http://127.0.0.1/"}, "url"),
    ],
)
def test_a_bad_event_is_a_422_naming_the_field_and_enqueues_nothing(service, receiver, body, field):
    svc = service()
    app = new_application(svc)
    new_endpoint(svc, app, receiver.url())

    response = svc.client.post(f"/v1/applications/{app}/events", json=body, headers=AUTH)

    assert response.status_code == 422, response.get_json()
    assert [d["field"] for d in response.get_json()["error"]["details"]] == [field]
    assert svc.client.get("/v1/jobs", headers=AUTH).get_json()["jobs"] == []


def test_an_event_honours_priority_and_send_at(service, receiver):
    svc = service()
    app = new_application(svc)
    new_endpoint(svc, app, receiver.url())
    at = time.time() + 2
    send_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + "Z"

    answer = publish(svc, app, priority="high", send_at=send_at).get_json()

    job = svc.client.get(answer["deliveries"][0]["status_url"], headers=AUTH).get_json()
    assert (job["status"], job["priority"]) == ("scheduled", "high")
    svc.start_worker()
    assert settled(svc, answer["id"])["by_status"]["succeeded"] == 1


def test_an_idempotent_event_is_published_once(service, receiver):
    svc = service()
    app = new_application(svc)
    new_endpoint(svc, app, receiver.url())
    new_endpoint(svc, app, receiver.url())
    key = uuid.uuid4().hex
    body = {"event_type": "order.paid", "payload": {"order": 7}}

    first = svc.client.post(f"/v1/applications/{app}/events", json=body, headers=AUTH | {HEADER: key})
    again = svc.client.post(f"/v1/applications/{app}/events", json=body, headers=AUTH | {HEADER: key})
    other = svc.client.post(f"/v1/applications/{app}/events", json=body | {"payload": {"order": 8}},
                            headers=AUTH | {HEADER: key})

    assert (first.status_code, again.status_code, other.status_code) == (202, 200, 409)
    assert again.data == first.data
    assert len(svc.client.get("/v1/jobs", headers=AUTH).get_json()["jobs"]) == 2


def test_an_idempotent_event_with_no_subscriber_answers_the_same_event(service):
    svc = service()
    app = new_application(svc)
    key = uuid.uuid4().hex

    first, again = (publish_with_key(svc, app, key) for _ in range(2))

    assert (first.status_code, again.status_code) == (202, 200)
    assert again.data == first.data


def publish_with_key(svc: Service, app: str, key: str):
    return svc.client.post(f"/v1/applications/{app}/events", json={"event_type": "a", "payload": {}},
                           headers=AUTH | {HEADER: key})


# --- secrets rotated -----------------------------------------------------------------------------


def test_during_a_rotation_both_secrets_verify_every_delivery_and_after_it_only_the_new(service, receiver):
    svc = service()
    app = new_application(svc)
    url = receiver.url()
    endpoint = new_endpoint(svc, app, url)
    path = f"/v1/applications/{app}/endpoints/{endpoint['id']}/secret/rotate"
    svc.start_worker()

    rotated = svc.client.post(path, json={"grace_period": 3600}, headers=AUTH)
    assert rotated.status_code == 200, rotated.get_json()
    new = rotated.get_json()["secret"]
    assert new.startswith("whsec_") and new != endpoint["secret"]
    assert rotated.get_json()["previous_expires_at"] is not None
    settled(svc, publish(svc, app).get_json()["id"])

    (during,) = receiver.received(url)
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    verify(endpoint["secret"], during)  # the old secret, alone, still verifies
    verify(new, during)  # and the new one, alone

    again = svc.client.post(path, json={"grace_period": 0}, headers=AUTH).get_json()
    assert again["previous_expires_at"] is None
    settled(svc, publish(svc, app).get_json()["id"])
    after = receiver.received(url)[1]
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    verify(again["secret"], after)
    for old in (endpoint["secret"], new):
        with pytest.raises(WebhookVerificationError):
            verify(old, after)


def test_a_secret_past_its_grace_period_signs_no_more(service, receiver):
    svc = service()
    app = new_application(svc)
    url = receiver.url()
    endpoint = new_endpoint(svc, app, url)
    path = f"/v1/applications/{app}/endpoints/{endpoint['id']}/secret/rotate"
    new = svc.client.post(path, json={"grace_period": 1}, headers=AUTH).get_json()["secret"]
    time.sleep(1.5)
    svc.start_worker()

    settled(svc, publish(svc, app).get_json()["id"])

    (request,) = receiver.received(url)
    assert len(request.headers["webhook-signature"].split(" ")) == 1
    verify(new, request)
    with pytest.raises(WebhookVerificationError):
        verify(endpoint["secret"], request)


def test_rotation_takes_a_default_grace_of_a_day_and_refuses_more_than_seven(service, receiver):
    svc = service()
    app = new_application(svc)
    endpoint = new_endpoint(svc, app, receiver.url())
    path = f"/v1/applications/{app}/endpoints/{endpoint['id']}/secret/rotate"

    default = svc.client.post(path, headers=AUTH)
    too_long = svc.client.post(path, json={"grace_period": MAX_GRACE + 1}, headers=AUTH)

    assert default.status_code == 200
    expires = default.get_json()["previous_expires_at"]
    assert abs(time.mktime(time.strptime(expires[:19], "%Y-%m-%dT%H:%M:%S")) - time.mktime(time.gmtime()) - 86400) < 60
    assert too_long.status_code == 422
    assert too_long.get_json()["error"]["details"][0]["field"] == "grace_period"


def test_twenty_parallel_identical_event_posts_publish_once(service, serve, receiver):
    svc = service()
    app = new_application(svc)
    new_endpoint(svc, app, receiver.url())
    base = serve(svc.settings)
    key = uuid.uuid4().hex
    barrier = threading.Barrier(20)
    answers: list[requests.Response] = []

    def post() -> None:
        barrier.wait()
        answers.append(requests.post(f"{base}/v1/applications/{app}/events", json={"event_type": "a", "payload": {}},
                                     headers=AUTH | {HEADER: key}, timeout=30))

    threads = [threading.Thread(target=post) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert sorted(answer.status_code for answer in answers) == [200] * 19 + [202]
    assert len({answer.content for answer in answers}) == 1
    assert len(svc.client.get("/v1/jobs", headers=AUTH).get_json()["jobs"]) == 1


def test_an_application_holds_at_most_500_endpoints_and_a_queue_10000_applications(service, receiver, redis_conn):
    svc = service()
    app = new_application(svc)
    url = receiver.url()
    for _ in range(MAX_ENDPOINTS):
        new_endpoint(svc, app, url)

    refused = svc.client.post(f"/v1/applications/{app}/endpoints", json={"url": url}, headers=AUTH)

    assert refused.status_code == 409 and "at most 500 endpoints" in refused.get_json()["error"]["message"]
    keys = svc.client.application.extensions["dispatcher"].keys
    redis_conn.hset(keys.applications, mapping={f"app_filler{n}": "{}" for n in range(MAX_APPLICATIONS - 1)})
    full = svc.client.post("/v1/applications", json={"name": "one too many"}, headers=AUTH)
    assert full.status_code == 409 and "at most 10,000 applications" in full.get_json()["error"]["message"]
    assert redis_conn.hlen(keys.applications) == MAX_APPLICATIONS


def test_every_answer_of_the_endpoints_api_is_valid_by_the_document(service, receiver):
    """The answers as the document describes them (their schemas forbid any field they do not name):
    an endpoint with a health change, its list, an event accepted and followed, a rotation."""
    document = openapi_document()
    svc = service()

    def check(path: str, method: str, response) -> dict:
        schema = document["paths"][path][method]["responses"][str(response.status_code)]["content"]
        validator = jsonschema_rs.validator_for(
            {**schema["application/json"]["schema"], "components": document["components"]}, validate_formats=True
        )
        body = response.get_json()
        assert validator.is_valid(body), (path, method, list(validator.iter_errors(body))[:3])
        return body

    app = check("/v1/applications", "post", svc.client.post("/v1/applications", json={"name": "A"}, headers=AUTH))["id"]
    created = check("/v1/applications/{app}/endpoints", "post", svc.client.post(
        f"/v1/applications/{app}/endpoints", json={"url": receiver.url(), "retry": {"max_attempts": 2}}, headers=AUTH))
    path = f"/v1/applications/{app}/endpoints/{created['id']}"
    check("/v1/applications/{app}/endpoints/{endpoint}", "patch",
          svc.client.patch(path, json={"disabled": True}, headers=AUTH))
    shown = check("/v1/applications/{app}/endpoints/{endpoint}", "patch",
                  svc.client.patch(path, json={"disabled": False}, headers=AUTH))
    assert [change["state"] for change in shown["health"]["changes"]] == ["enabled", "disabled"]
    check("/v1/applications/{app}/endpoints/{endpoint}", "get", svc.client.get(path, headers=AUTH))
    check("/v1/applications/{app}/endpoints", "get", svc.client.get(f"/v1/applications/{app}/endpoints", headers=AUTH))
    check("/v1/applications", "get", svc.client.get("/v1/applications", headers=AUTH))
    check("/v1/applications/{app}", "get", svc.client.get(f"/v1/applications/{app}", headers=AUTH))
    check("/v1/applications/{app}/endpoints/{endpoint}/secret/rotate", "post",
          svc.client.post(f"{path}/secret/rotate", json={"grace_period": 60}, headers=AUTH))
    accepted = check("/v1/applications/{app}/events", "post", publish(svc, app, ordering_key="k"))
    check("/v1/events/{id}", "get", svc.client.get(accepted["status_url"], headers=AUTH))
    check("/v1/applications/{app}/endpoints/{endpoint}/recover", "post",
          svc.client.post(f"{path}/recover", json={"since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(
              time.time() - 3600))}, headers=AUTH))
