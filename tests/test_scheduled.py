"""Scheduled sends (issue #11, item 3): `send_at` on any email or webhook, single or batch. The job
waits as `scheduled` in RQ's ScheduledJobRegistry, with `next_attempt_at` = send_at, and RQ's
scheduler (which every worker runs) hands it to a worker when due; never before.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes
from email.utils import parsedate_to_datetime
from typing import Any

import pytest

from dispatcher.channels import KINDS
from dispatcher.idempotency import HEADER
from dispatcher.models import MAX_SEND_AHEAD, SEND_AT_SKEW
from tests.conftest import AUTH, wait_for, wait_until

EMAIL = {"to": ["ada@example.com"], "subject": "Your order", "text": "Thanks!"}
WEBHOOK = {"url": "http://127.0.0.1:1/hook", "event_type": "order.created", "payload": {"id": 1042}}
#: A generous bound on how late a scheduled job may start: the scheduler looks once a second, and
#: wakes the workers when it has queued jobs (the README's figure: within about a second).
LATE_BOUND = 5.0


def at(delta: timedelta, zone: timezone = UTC) -> str:
    return (datetime.now(UTC) + delta).astimezone(zone).isoformat(timespec="milliseconds")


def parse(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


#: What send_at may not be: each is a 422 naming the field.
REFUSED: dict[str, Callable[[], Any]] = {
    "past": lambda: at(-SEND_AT_SKEW - timedelta(seconds=30)),
    "too-far": lambda: at(MAX_SEND_AHEAD + timedelta(hours=1)),
    "no-offset": lambda: at(timedelta(hours=1)).removesuffix("+00:00"),
    "date-only": lambda: at(timedelta(days=1))[:10],
    "space": lambda: at(timedelta(hours=1)).replace("T", " "),
    "no-seconds": lambda: at(timedelta(hours=1))[:16] + "Z",
    "unix-seconds": lambda: int(time.time()) + 3600,
    "unix-string": lambda: str(int(time.time()) + 3600),
    "hour-25": lambda: at(timedelta(days=1))[:11] + "25:00:00Z",
    "empty": lambda: "",
    "boolean": lambda: True,
    "object": lambda: {},
}


@pytest.mark.parametrize("case", REFUSED)
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/emails", lambda v: EMAIL | {"send_at": v}, "send_at"),
        ("/v1/webhooks", lambda v: WEBHOOK | {"send_at": v}, "send_at"),
        ("/v1/webhooks/batch", lambda v: {"items": [WEBHOOK], "send_at": v}, "send_at"),
    ],
    ids=["email", "webhook", "batch"],
)
def test_a_send_at_that_is_no_time_soon_enough_is_422_naming_it(client, path, body, field, case):
    answer = client.post(path, json=body(REFUSED[case]()), headers=AUTH)

    assert answer.status_code == 422, answer.get_json()
    assert [detail["field"] for detail in answer.get_json()["error"]["details"]] == [field]


def test_a_batch_item_may_not_have_a_send_at_of_its_own(client):
    items = [EMAIL, EMAIL | {"send_at": at(timedelta(hours=1))}]

    answer = client.post("/v1/emails/batch", json={"items": items}, headers=AUTH)

    assert answer.status_code == 422
    assert [detail["field"] for detail in answer.get_json()["error"]["details"]] == ["items.1.send_at"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/emails", EMAIL),
        ("/v1/webhooks", WEBHOOK),
        ("/v1/emails/batch", {"items": [EMAIL, EMAIL]}),
        ("/v1/webhooks/batch", {"items": [WEBHOOK, WEBHOOK]}),
    ],
    ids=["email", "webhook", "email-batch", "webhook-batch"],
)
@pytest.mark.parametrize(
    "send_at",
    [
        lambda: at(-SEND_AT_SKEW + timedelta(seconds=20)),  # a slow client clock
        lambda: at(timedelta(hours=2), timezone(timedelta(hours=-8))),
        lambda: at(MAX_SEND_AHEAD - timedelta(minutes=5), timezone(timedelta(hours=5, minutes=30))),
    ],
    ids=["skewed", "two-hours-west", "29-days-east"],
)
def test_a_scheduled_job_shows_as_scheduled_until_its_send_at(service, path, body, send_at):
    svc = service()  # no worker: the jobs stay as accepted
    when = send_at()
    key = uuid.uuid4().hex

    answer = svc.client.post(path, json=body | {"send_at": when}, headers=AUTH | {HEADER: key})
    again = svc.client.post(path, json=body | {"send_at": when}, headers=AUTH | {HEADER: key})

    assert answer.status_code == 202, answer.get_json()
    accepted = answer.get_json().get("items", [answer.get_json()])
    assert {item["status"] for item in accepted} == {"scheduled"}
    assert again.status_code == 200 and again.get_json() == answer.get_json()
    for item in accepted:
        view = svc.client.get(item["status_url"], headers=AUTH).get_json()
        assert view["status"] == "scheduled" and view["attempts"] == []
        assert parse(view["next_attempt_at"]) == parse(when)
    stats = svc.client.get("/v1/stats", headers=AUTH).get_json()
    assert sum(stats[kind]["scheduled"] for kind in KINDS) == len(accepted)
    assert sum(stats[kind]["queued"] for kind in KINDS) == 0


def test_scheduled_webhooks_and_emails_go_out_on_time_and_not_before(service, receiver, smtp_server):
    svc = service()
    svc.start_worker()
    wait_until(
        lambda: svc.client.get("/readyz").get_json()["queues"]["low"]["workers"] == 1, 20, "the worker did not start"
    )
    url = receiver.url("ok")
    address = f"scheduled-{uuid.uuid4().hex[:8]}@example.com"
    # 2 to 3 s ahead, at any phase of the scheduler's once-a-second pass (started with the worker)
    send_at = datetime.now(UTC) + timedelta(seconds=2 + random.random())
    when = send_at.isoformat(timespec="milliseconds")

    hook = svc.post("/v1/webhooks", {"url": url, "event_type": "order.due", "payload": {}, "send_at": when})
    mail = svc.post("/v1/emails", {"to": [address], "subject": "Due", "text": "now", "send_at": when})
    batch = svc.client.post("/v1/emails/batch", json={"items": [EMAIL], "send_at": when}, headers=AUTH).get_json()

    jobs = [hook, mail, batch["items"][0]["id"]]
    views = [wait_for(svc.client, job_id, timeout=10 + LATE_BOUND) for job_id in jobs]
    assert [view["status"] for view in views] == ["succeeded"] * 3, views
    started = [parse(view["attempts"][0]["started_at"]) for view in views]
    (request,) = receiver.received(url)
    (message,) = smtp_server.handler.messages_to(address)
    date = message_from_bytes(message.content)["Date"]
    assert parsedate_to_datetime(date) == send_at.replace(microsecond=0)  # a scheduled email is dated send_at
    for moment in [*started, datetime.fromtimestamp(request.received_at, UTC)]:
        assert send_at <= moment <= send_at + timedelta(seconds=LATE_BOUND)
    print(f"\nscheduled sends started {', '.join(f'{(s - send_at).total_seconds():.3f}' for s in started)} s late")
