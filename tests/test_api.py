"""The REST API's rejection rules and error answers, in-process against the suite's real Redis.

Rejections go through the `client` fixture. Requests that are accepted go to an app on a
queue of their own (`quiet_client`), which no worker serves: the jobs stay queued, counts
and lists hold only what the test itself put there, and no delivery is attempted.
"""

from __future__ import annotations

import base64
import dataclasses
import time
import uuid

import pytest
from rq.job import Job
from rq.serializers import JSONSerializer

from dispatcher.app import create_app
from dispatcher.config import Settings
from tests.conftest import AUTH, free_port

EMAIL = {"to": ["alice@example.com"], "subject": "Hello", "text": "Hi Alice"}
WEBHOOK = {"url": "http://127.0.0.1:1/hook", "event_type": "order.created", "payload": {"order": 42}}
MB = 1024 * 1024


def b64(size: int) -> str:
    return base64.b64encode(b"\0" * size).decode()


def error_of(response, status: int) -> dict:
    """Assert `status` and the JSON error shape; return the `error` object."""
    assert response.status_code == status, (response.status_code, response.get_data()[:500])
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"code", "message", "details"}
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], list)
    for detail in error["details"]:
        assert set(detail) == {"field", "problem"}
        assert detail["problem"]
    return error


def fields_of(response, status: int = 422) -> list[str]:
    return [detail["field"] for detail in error_of(response, status)["details"]]


@pytest.fixture
def quiet_settings(settings: Settings) -> Settings:
    """The suite's settings on a fresh queue that no worker serves."""
    return dataclasses.replace(settings, queue_name="api-" + uuid.uuid4().hex)


@pytest.fixture
def quiet_client(quiet_settings: Settings):
    return create_app(quiet_settings).test_client()


@pytest.fixture(scope="module")
def unguarded_client(settings: Settings):
    """An app with no allowed networks: only public destinations pass."""
    return create_app(dataclasses.replace(settings, allowed_networks=())).test_client()


def accept(client, path: str, body: dict) -> dict:
    response = client.post(path, json=body, headers=AUTH)
    assert response.status_code == 202, response.get_json()
    return response.get_json()


# --- POST /v1/emails -------------------------------------------------------------------------


def _without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


EMAIL_REJECTIONS = [
    pytest.param(_without(EMAIL, "to"), "to", id="missing-to"),
    pytest.param(EMAIL | {"to": []}, "to", id="empty-to"),
    pytest.param(EMAIL | {"to": ["not-an-address"]}, "to.0", id="invalid-to"),
    pytest.param(EMAIL | {"to": ["alice@example.com", "bob@@example.com"]}, "to.1", id="invalid-second-to"),
    pytest.param(EMAIL | {"cc": ["no at sign"]}, "cc.0", id="invalid-cc"),
    pytest.param(EMAIL | {"bcc": ["x@"]}, "bcc.0", id="invalid-bcc"),
    pytest.param(EMAIL | {"to": ["a@example.com\r\nBcc: evil@example.com"]}, "to.0", id="crlf-in-to"),
    pytest.param(
        EMAIL
        | {
            "to": [f"to{i}@example.com" for i in range(20)],
            "cc": [f"cc{i}@example.com" for i in range(20)],
            "bcc": [f"bcc{i}@example.com" for i in range(11)],
        },
        "to",
        id="51-recipients",
    ),
    pytest.param(_without(EMAIL, "subject"), "subject", id="missing-subject"),
    pytest.param(EMAIL | {"subject": ""}, "subject", id="empty-subject"),
    pytest.param(EMAIL | {"subject": "Hi\r\nBcc: evil@example.com"}, "subject", id="crlf-subject"),
    pytest.param(EMAIL | {"subject": "Hi\nthere"}, "subject", id="lf-subject"),
    pytest.param(_without(EMAIL, "text"), "text", id="no-text-no-html"),
    pytest.param(EMAIL | {"from": "not an address"}, "from", id="invalid-from"),
    pytest.param(EMAIL | {"from": "Eve <eve@example.com>\r\nBcc: x@example.com"}, "from", id="crlf-from"),
    pytest.param(EMAIL | {"reply_to": "nobody"}, "reply_to", id="invalid-reply-to"),
    pytest.param(
        EMAIL | {"attachments": [{"filename": "a.txt", "content": "not base64!!"}]},
        "attachments.0.content",
        id="attachment-not-base64",
    ),
    pytest.param(
        EMAIL | {"attachments": [{"filename": "a.txt", "content": b64(3), "content_type": "text plain"}]},
        "attachments.0.content_type",
        id="attachment-bad-content-type",
    ),
    pytest.param(
        EMAIL | {"attachments": [{"filename": "a\r\n.txt", "content": b64(3)}]},
        "attachments.0.filename",
        id="attachment-crlf-filename",
    ),
    pytest.param(EMAIL | {"headers": {"Bcc": "evil@example.com"}}, "headers.Bcc", id="reserved-header-bcc"),
    pytest.param(EMAIL | {"headers": {"From": "evil@example.com"}}, "headers.From", id="reserved-header-from"),
    pytest.param(EMAIL | {"headers": {"subject": "other"}}, "headers.subject", id="reserved-header-lowercase"),
    pytest.param(EMAIL | {"headers": {"X-Tag": "a\r\nBcc: evil@example.com"}}, "headers.X-Tag", id="crlf-header-value"),
    pytest.param(EMAIL | {"headers": {"X Tag": "a"}}, "headers.X Tag", id="invalid-header-name"),
    pytest.param(EMAIL | {"headers": {"X-Tag:": "a"}}, "headers.X-Tag:", id="header-name-with-colon"),
    pytest.param(EMAIL | {"metadata": {"customer": 42}}, "metadata.customer", id="metadata-not-string"),
    pytest.param(EMAIL | {"retry": {"max_attempts": 0}}, "retry.max_attempts", id="max-attempts-0"),
    pytest.param(EMAIL | {"retry": {"max_attempts": 21}}, "retry.max_attempts", id="max-attempts-21"),
    pytest.param(EMAIL | {"retry": {"backoff": [10, -1]}}, "retry.backoff.1", id="negative-backoff"),
    pytest.param(EMAIL | {"importance": "high"}, "importance", id="unknown-field"),
]


@pytest.mark.parametrize(("body", "field"), EMAIL_REJECTIONS)
def test_email_field_rejected(client, body, field):
    response = client.post("/v1/emails", json=body, headers=AUTH)

    assert field in fields_of(response)
    assert error_of(response, 422)["code"] == "validation_error"


def test_email_attachments_over_10_mb_in_total_rejected(client):
    attachments = [{"filename": f"part{i}.bin", "content": b64(5 * MB + MB // 4)} for i in range(2)]

    response = client.post("/v1/emails", json=EMAIL | {"attachments": attachments}, headers=AUTH)

    assert fields_of(response) == ["attachments"]


def test_email_single_attachment_over_10_mb_rejected(client):
    attachments = [{"filename": "big.bin", "content": b64(10 * MB + 1)}]

    response = client.post("/v1/emails", json=EMAIL | {"attachments": attachments}, headers=AUTH)

    assert fields_of(response) == ["attachments"]


def test_email_single_attachment_under_10_mb_accepted(quiet_client):
    """A 9 MB file is within the 10 MB rule even though its base64 runs to 12.6 million characters."""
    attachments = [{"filename": "big.bin", "content": b64(9 * MB)}]

    accepted = accept(quiet_client, "/v1/emails", EMAIL | {"attachments": attachments})

    assert accepted["status"] == "queued"


def test_every_bad_field_is_reported_at_once(client):
    body = {"to": ["bad"], "subject": "a\nb", "text": "t", "retry": {"max_attempts": 0}}

    fields = fields_of(client.post("/v1/emails", json=body, headers=AUTH))

    assert {"to.0", "subject", "retry.max_attempts"} <= set(fields)


def test_valid_minimal_email_is_accepted(quiet_client):
    response = quiet_client.post("/v1/emails", json=EMAIL, headers=AUTH)

    assert response.status_code == 202
    body = response.get_json()
    assert body["id"]
    assert body["status"] == "queued"
    assert body["status_url"] == f"/v1/jobs/{body['id']}"
    assert response.headers["Location"] == body["status_url"]


def test_example_com_addresses_accepted(quiet_client):
    body = EMAIL | {
        "to": ["alice@example.com"],
        "cc": ["bob@sub.example.com"],
        "bcc": ["carol@example.org"],
        "from": "Sender <sender@example.com>",
        "reply_to": "replies@example.net",
    }

    accept(quiet_client, "/v1/emails", body)


def test_email_from_defaults_to_configured_sender(quiet_client, quiet_settings, redis_conn):
    job_id = accept(quiet_client, "/v1/emails", EMAIL)["id"]

    job = Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer)
    assert quiet_settings.email_from == "Dispatcher Tests <tests@example.com>"
    assert job.args[0]["from"] == quiet_settings.email_from


def test_email_without_from_rejected_when_no_default_sender(settings):
    client = create_app(dataclasses.replace(settings, email_from=None)).test_client()

    response = client.post("/v1/emails", json=EMAIL, headers=AUTH)

    assert fields_of(response) == ["from"]


def test_email_with_from_accepted_when_no_default_sender(quiet_settings, redis_conn):
    client = create_app(dataclasses.replace(quiet_settings, email_from=None)).test_client()

    job_id = accept(client, "/v1/emails", EMAIL | {"from": "me@example.com"})["id"]

    job = Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer)
    assert job.args[0]["from"] == "me@example.com"


# --- POST /v1/webhooks -----------------------------------------------------------------------


WEBHOOK_REJECTIONS = [
    pytest.param(_without(WEBHOOK, "url"), "url", id="missing-url"),
    pytest.param(WEBHOOK | {"url": ""}, "url", id="empty-url"),
    pytest.param(WEBHOOK | {"url": "ftp://127.0.0.1/x"}, "url", id="ftp-url"),
    pytest.param(WEBHOOK | {"url": "127.0.0.1/x"}, "url", id="no-scheme"),
    pytest.param(WEBHOOK | {"url": "http://u:p@127.0.0.1/x"}, "url", id="credentials"),
    pytest.param(WEBHOOK | {"url": "http://127.0.0.1:0/x"}, "url", id="port-0"),
    pytest.param(WEBHOOK | {"url": "http://127.0.0.1:99999/x"}, "url", id="port-99999"),
    pytest.param(WEBHOOK | {"url": "http:///x"}, "url", id="no-host"),
    pytest.param(WEBHOOK | {"url": "http://127.0.0.1/x#frag"}, "url", id="fragment"),
    pytest.param(WEBHOOK | {"url": "http://127.0.0.1/a b"}, "url", id="space-in-url"),
    pytest.param(_without(WEBHOOK, "event_type"), "event_type", id="missing-event-type"),
    pytest.param(WEBHOOK | {"event_type": "order created"}, "event_type", id="event-type-with-space"),
    pytest.param(_without(WEBHOOK, "payload"), "payload", id="missing-payload"),
    pytest.param(WEBHOOK | {"payload": [1, 2]}, "payload", id="payload-list"),
    pytest.param(WEBHOOK | {"payload": "text"}, "payload", id="payload-string"),
    pytest.param(WEBHOOK | {"headers": {"webhook-id": "x"}}, "headers.webhook-id", id="reserved-webhook-id"),
    pytest.param(
        WEBHOOK | {"headers": {"Webhook-Signature": "v1,x"}}, "headers.Webhook-Signature", id="reserved-signature"
    ),
    pytest.param(
        WEBHOOK | {"headers": {"content-type": "text/plain"}}, "headers.content-type", id="reserved-content-type"
    ),
    pytest.param(WEBHOOK | {"headers": {"content-length": "1"}}, "headers.content-length", id="reserved-length"),
    pytest.param(WEBHOOK | {"headers": {"host": "evil.example"}}, "headers.host", id="reserved-host"),
    pytest.param(WEBHOOK | {"headers": {"X-Tenant": "a\r\nX-Evil: 1"}}, "headers.X-Tenant", id="crlf-header"),
    pytest.param(WEBHOOK | {"metadata": {"k": ["list"]}}, "metadata.k", id="metadata-not-string"),
    pytest.param(WEBHOOK | {"retry": {"max_attempts": 21}}, "retry.max_attempts", id="max-attempts-21"),
    pytest.param(WEBHOOK | {"secret": "x"}, "secret", id="unknown-field"),
]


@pytest.mark.parametrize(("body", "field"), WEBHOOK_REJECTIONS)
def test_webhook_field_rejected(client, body, field):
    response = client.post("/v1/webhooks", json=body, headers=AUTH)

    assert field in fields_of(response)


GUARDED_URLS = [
    "http://localhost/",
    "http://127.0.0.1/",
    "http://[::1]/",
    "http://10.0.0.1/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/",
    "http://[::ffff:127.0.0.1]/",
    "http://[fd00::1]/",
    "http://0.0.0.0/",
    "http://224.0.0.1/",
]


@pytest.mark.parametrize("url", GUARDED_URLS)
def test_private_destination_refused_without_allowed_networks(unguarded_client, url):
    response = unguarded_client.post("/v1/webhooks", json=WEBHOOK | {"url": url}, headers=AUTH)

    assert fields_of(response) == ["url"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/x", "http://localhost:1/x"])
def test_allowed_network_destination_accepted(quiet_client, url):
    accept(quiet_client, "/v1/webhooks", WEBHOOK | {"url": url})


# --- Error answers ---------------------------------------------------------------------------


def test_malformed_json_is_400(client):
    response = client.post("/v1/webhooks", data=b'{"url": ', content_type="application/json", headers=AUTH)

    assert error_of(response, 400)["code"] == "malformed_json"


def test_invalid_utf8_is_400(client):
    body = b'{"url": "http://127.0.0.1/\xff", "event_type": "a", "payload": {}}'

    response = client.post("/v1/webhooks", data=body, content_type="application/json", headers=AUTH)

    assert error_of(response, 400)["code"] == "malformed_json"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_non_json_content_type_is_415(client, content_type):
    kwargs = {"content_type": content_type} if content_type else {}

    response = client.post("/v1/emails", data=b'{"to": []}', headers=AUTH, **kwargs)

    assert error_of(response, 415)["code"] == "unsupported_media_type"


def test_body_over_15_mb_is_413(client):
    body = b'{"x": "' + b"a" * (15 * MB) + b'"}'

    response = client.post("/v1/emails", data=body, content_type="application/json", headers=AUTH)

    assert error_of(response, 413)["code"] == "body_too_large"


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"42", b"null"])
def test_json_body_not_an_object_is_422(client, body):
    response = client.post("/v1/webhooks", data=body, content_type="application/json", headers=AUTH)

    assert fields_of(response) == ["body"]


UNAUTHORIZED = [
    pytest.param({}, id="no-header"),
    pytest.param({"Authorization": "Bearer wrong-key"}, id="wrong-key"),
    pytest.param({"Authorization": AUTH["Authorization"].replace("Bearer", "Basic")}, id="wrong-scheme"),
    pytest.param({"Authorization": "Bearer "}, id="empty-token"),
]


@pytest.mark.parametrize("headers", UNAUTHORIZED)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("post", "/v1/webhooks"),
        ("post", "/v1/emails"),
        ("get", "/v1/jobs"),
        ("get", "/v1/stats"),
        ("get", "/v1/jobs/wh_0"),
    ],
)
def test_missing_or_wrong_api_key_is_401(client, headers, method, path):
    kwargs = {"json": WEBHOOK} if method == "post" else {}

    response = getattr(client, method)(path, headers=headers, **kwargs)

    assert error_of(response, 401)["code"] == "unauthorized"


def test_unauthorized_request_enqueues_nothing(quiet_client):
    response = quiet_client.post("/v1/webhooks", json=WEBHOOK, headers={"Authorization": "Bearer nope"})

    assert response.status_code == 401
    assert quiet_client.get("/v1/jobs", headers=AUTH).get_json() == {"jobs": []}


def test_unknown_job_is_404(client):
    response = client.get(f"/v1/jobs/wh_{uuid.uuid4().hex}", headers=AUTH)

    assert error_of(response, 404)["code"] == "not_found"


@pytest.mark.parametrize("path", ["/v1/nothing-here", "/nothing-here", "/v2/emails"])
def test_unknown_route_is_404_json(client, path):
    response = client.get(path, headers=AUTH)

    assert error_of(response, 404)["code"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "/v1/emails"), ("put", "/v1/webhooks"), ("delete", "/v1/jobs"), ("post", "/v1/stats")],
)
def test_wrong_method_is_405_json(client, method, path):
    response = getattr(client, method)(path, headers=AUTH)

    assert error_of(response, 405)["code"] == "method_not_allowed"


def test_healthz_answers_without_auth(client):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_answers_200_with_redis(client):
    response = client.get("/readyz")

    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert set(body["queues"]) == {"high", "default", "low"}
    assert set(body) == {"status", "queues", "warnings"}


@pytest.fixture(scope="module")
def redisless_client(settings: Settings):
    return create_app(dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")).test_client()


def test_post_answers_503_quickly_when_redis_is_unreachable(redisless_client):
    started = time.monotonic()
    response = redisless_client.post("/v1/webhooks", json=WEBHOOK, headers=AUTH)
    elapsed = time.monotonic() - started

    assert error_of(response, 503)["code"] == "unavailable"
    assert elapsed < 2


@pytest.mark.parametrize("path", ["/readyz", "/v1/jobs", "/v1/stats", "/v1/jobs/wh_0"])
def test_reads_answer_503_when_redis_is_unreachable(redisless_client, path):
    response = redisless_client.get(path, headers=AUTH)

    assert error_of(response, 503)["code"] == "unavailable"


def test_healthz_answers_200_when_redis_is_unreachable(redisless_client):
    assert redisless_client.get("/healthz").status_code == 200


# --- GET /v1/jobs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("kind=sms", "kind"),
        ("status=done", "status"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=abc", "limit"),
        ("limit=-1", "limit"),
        pytest.param("limit=%C2%B2", "limit", id="limit=superscript-2"),  # isdigit() yet not int()
        pytest.param("limit=" + "9" * 5000, "limit", id="limit=5000-digits"),  # past int()'s digit limit
    ],
)
def test_job_list_query_rejected(client, query, field):
    response = client.get(f"/v1/jobs?{query}", headers=AUTH)

    assert fields_of(response) == [field]


def test_job_list_reports_every_bad_parameter(client):
    response = client.get("/v1/jobs?kind=sms&status=done&limit=0", headers=AUTH)

    assert sorted(fields_of(response)) == ["kind", "limit", "status"]


def test_job_list_is_newest_first_and_filters(quiet_client):
    first = accept(quiet_client, "/v1/webhooks", WEBHOOK)["id"]
    second = accept(quiet_client, "/v1/emails", EMAIL)["id"]
    third = accept(quiet_client, "/v1/webhooks", WEBHOOK | {"event_type": "order.paid"})["id"]

    every = quiet_client.get("/v1/jobs", headers=AUTH)
    emails = quiet_client.get("/v1/jobs?kind=email", headers=AUTH)
    webhooks = quiet_client.get("/v1/jobs?kind=webhook&status=queued", headers=AUTH)
    one = quiet_client.get("/v1/jobs?limit=1", headers=AUTH)
    none_failed = quiet_client.get("/v1/jobs?status=failed", headers=AUTH)

    assert [job["id"] for job in every.get_json()["jobs"]] == [third, second, first]
    assert [job["id"] for job in emails.get_json()["jobs"]] == [second]
    assert [job["id"] for job in webhooks.get_json()["jobs"]] == [third, first]
    assert [job["id"] for job in one.get_json()["jobs"]] == [third]
    assert none_failed.get_json() == {"jobs": []}


# --- GET /v1/stats and job views -------------------------------------------------------------


def test_stats_shape_and_queued_counts(quiet_client):
    accept(quiet_client, "/v1/webhooks", WEBHOOK)
    accept(quiet_client, "/v1/webhooks", WEBHOOK)

    response = quiet_client.get("/v1/stats", headers=AUTH)

    assert response.status_code == 200
    stats = response.get_json()
    assert set(stats) == {"email", "webhook", "recent_failures", "recent_successes"}
    for kind in ("email", "webhook"):
        assert set(stats[kind]) == {"queued", "scheduled", "running", "succeeded", "failed"}
        assert all(type(value) is int for value in stats[kind].values())
    assert stats["webhook"] == {"queued": 2, "scheduled": 0, "running": 0, "succeeded": 0, "failed": 0}
    assert stats["email"]["queued"] == 0
    assert stats["recent_failures"] == stats["recent_successes"] == []


def test_accepted_webhook_is_visible_at_its_status_url(quiet_client):
    body = WEBHOOK | {"metadata": {"customer": "c_1", "order": "42"}}
    accepted = accept(quiet_client, "/v1/webhooks", body)

    response = quiet_client.get(accepted["status_url"], headers=AUTH)

    assert response.status_code == 200
    job = response.get_json()
    assert job["id"] == accepted["id"]
    assert job["kind"] == "webhook"
    assert job["status"] == "queued"
    assert job["target"] == {"url": WEBHOOK["url"], "event_type": "order.created"}
    assert job["metadata"] == {"customer": "c_1", "order": "42"}
    assert job["attempts"] == []
    assert job["error"] is None
    assert job["next_attempt_at"] is None
    assert job["created_at"].endswith("Z")


def test_accepted_email_is_visible_at_its_status_url(quiet_client):
    body = EMAIL | {
        "to": ["alice@example.com", "bob@example.com"],
        "cc": ["carol@example.com"],
        "bcc": ["dave@example.com"],
        "subject": "Your order",
        "metadata": {"order": "42"},
    }
    accepted = accept(quiet_client, "/v1/emails", body)

    job = quiet_client.get(accepted["status_url"], headers=AUTH).get_json()

    assert job["kind"] == "email"
    assert job["status"] == "queued"
    assert job["target"] == {
        "to": ["alice@example.com", "bob@example.com"],
        "cc": ["carol@example.com"],
        "bcc": ["dave@example.com"],
        "subject": "Your order",
    }
    assert job["metadata"] == {"order": "42"}
    assert job["attempts"] == []
