"""Webhook delivery through the API and a real worker process to a real HTTP receiver."""

from __future__ import annotations

import json
from datetime import datetime

from standardwebhooks import Webhook

from tests.conftest import AUTH, WEBHOOK_SECRET, wait_for


def post_webhook(client, url: str, **fields) -> str:
    body = {"url": url, "event_type": "order.created", "payload": {"order": 42}} | fields
    response = client.post("/v1/webhooks", json=body, headers=AUTH)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def test_delivered_webhook_verifies_with_standardwebhooks(api, receiver):
    url = receiver.url("ok")
    job_id = post_webhook(api, url, payload={"order": 42, "total": "9.99"}, headers={"X-Tenant": "acme"})

    job = wait_for(api, job_id)

    assert job["status"] == "succeeded"
    (request,) = receiver.received(url)
    payload = Webhook(WEBHOOK_SECRET).verify(request.body, request.headers)
    assert payload["type"] == "order.created"
    assert payload["data"] == {"order": 42, "total": "9.99"}
    accepted = datetime.fromisoformat(payload["timestamp"])
    assert accepted.tzinfo is not None
    assert abs((accepted - datetime.fromisoformat(job["created_at"])).total_seconds()) < 1
    assert request.headers["webhook-id"] == job_id
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-tenant"] == "acme"
    assert job["attempts"][0]["status_code"] == 200
    assert json.loads(job["attempts"][0]["response_excerpt"]) == {"seen": 1}
