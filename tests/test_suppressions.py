"""The suppression list: a hard bounce suppresses its recipient, later messages skip it, the API
lists, adds and removes addresses.

The test SMTP server refuses `reject550-*` recipients at RCPT with `550 5.1.1` (tests/conftest.py).
"""

from __future__ import annotations

import json
import logging
import uuid
from urllib.parse import quote

import pytest
from werkzeug.test import Client as WsgiClient

from dispatcher import cli, suppressions
from dispatcher.app import create_app
from dispatcher.client import Client, NotFound
from dispatcher.history import Attempt, UnreadableHistory
from dispatcher.logs import RequestLog
from tests.conftest import API_KEY, AUTH, wait_for
from tests.test_emails import post_email
from workers.smtp import hard_bounces


def address(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


def test_a_hard_bounce_suppresses_the_next_send_until_deleted(api, smtp_server):
    """The issue's acceptance test, through the API and a real worker process."""
    bounced, other, again = address("reject550"), address("other"), address("again")
    first = wait_for(api, post_email(api, to=[bounced]))
    assert first["status"] == "failed" and first["attempts"][0]["status_code"] == 550, first

    listed = api.get(f"/v1/suppressions/{bounced}", headers=AUTH)
    assert listed.status_code == 200, listed.get_json()
    record = listed.get_json()
    assert (record["address"], record["reason"], record["smtp_code"]) == (bounced, "bounce", 550)
    assert record["smtp_message"] == "5.1.1 mailbox unavailable" and record["job_id"] == first["id"]
    assert record["added_at"]

    # The next message goes to the other recipient only, and its attempt says whom it skipped; the
    # list ignores case (and a server asked for REJECT550-... would accept it).
    shouting = bounced.split("@")[0].upper() + "@example.com"
    second = wait_for(api, post_email(api, to=[shouting, other]))
    assert second["status"] == "succeeded", second
    (attempt,) = second["attempts"]
    assert attempt["suppressed"] == [shouting] and attempt["error"] is None
    (mail,) = smtp_server.handler.messages_to(other)
    assert mail.rcpt_tos == [other]

    # A message to suppressed addresses only fails at once, with the reason, and is never sent.
    third = wait_for(api, post_email(api, to=[bounced], retry={"max_attempts": 3, "backoff": [1]}))
    assert third["status"] == "failed", third
    (attempt,) = third["attempts"]
    assert (attempt["outcome"], attempt["status_code"], attempt["suppressed"]) == ("permanent", None, [bounced])
    assert "suppression list" in third["error"] and bounced in third["error"] and "550" in third["error"]
    assert smtp_server.handler.seen[bounced] == 1  # RCPT TO named it once, for the first message only

    # DELETE lifts it: the server is asked for it again.
    assert api.delete(f"/v1/suppressions/{bounced}", headers=AUTH).status_code == 204
    assert api.get(f"/v1/suppressions/{bounced}", headers=AUTH).status_code == 404
    fourth = wait_for(api, post_email(api, to=[bounced, again]))
    assert fourth["status"] == "succeeded" and fourth["attempts"][0]["suppressed"] is None, fourth
    assert smtp_server.handler.seen[bounced] == 2
    # ... and, refused again, it is back on the list.
    assert api.get(f"/v1/suppressions/{bounced}", headers=AUTH).get_json()["job_id"] == fourth["id"]


def test_an_address_added_by_hand_is_skipped_until_removed(burst_worker, smtp_server):
    """Under a plain RQ worker too, on the list of the job's own queue."""
    worker = burst_worker()
    client = create_app(worker.settings).test_client()
    listed, other = address("listed"), address("other")
    added = client.post("/v1/suppressions", json={"address": listed}, headers=AUTH)
    assert added.status_code == 201, added.get_json()
    partly = post_email(client, to=[other], bcc=[listed])
    only = post_email(client, to=[listed])

    worker.run()

    assert worker.job(partly)["status"] == "succeeded"
    assert worker.job(partly)["attempts"][0]["suppressed"] == [listed]
    assert smtp_server.handler.messages_to(other)[0].rcpt_tos == [other]
    failed = worker.job(only)
    assert failed["status"] == "failed" and f"{listed} (manual)" in failed["error"], failed
    assert listed not in smtp_server.handler.seen

    assert client.delete(f"/v1/suppressions/{listed}", headers=AUTH).status_code == 204
    lifted = post_email(client, to=[listed])
    worker.run()
    assert worker.job(lifted)["status"] == "succeeded"
    assert smtp_server.handler.messages_to(listed)[0].rcpt_tos == [listed]


def test_add_look_up_page_through_and_remove(service):
    client = service().client  # a queue of its own: an empty list
    added = client.post("/v1/suppressions", json={"address": "Ada@Example.COM"}, headers=AUTH)
    assert added.status_code == 201
    assert added.headers["Location"] == "/v1/suppressions/ada@example.com"
    record = added.get_json()
    assert record | {"added_at": None} == {
        "address": "ada@example.com",
        "reason": "manual",
        "added_at": None,
        "smtp_code": None,
        "smtp_message": None,
        "job_id": None,
    }
    again = client.post("/v1/suppressions", json={"address": "ADA@example.com"}, headers=AUTH)
    assert (again.status_code, again.get_json()) == (200, record)
    assert client.get("/v1/suppressions/aDa@EXAMPLE.com", headers=AUTH).get_json() == record

    odd = ["o'neil@example.com", "a/b@example.com", "/x//y@example.com", "ü@bücher.example", "z+tag?#%@example.org"]
    for item in odd:
        assert client.post("/v1/suppressions", json={"address": item}, headers=AUTH).status_code == 201
    every = sorted(["ada@example.com", *odd])
    seen, after = [], None
    while True:
        page = client.get(
            "/v1/suppressions", query_string={"limit": 2} | ({"after": after} if after else {}), headers=AUTH
        ).get_json()
        assert len(page["suppressions"]) <= 2
        seen += [entry["address"] for entry in page["suppressions"]]
        after = page["next"]
        if after is None:
            break
    assert seen == every
    for item in odd:
        path = f"/v1/suppressions/{quote(item, safe='@')}"
        assert client.get(path, headers=AUTH).get_json()["address"] == item
        assert client.delete(path, headers=AUTH).status_code == 204
    removed = client.delete("/v1/suppressions/Ada@example.com", headers=AUTH)
    assert (removed.status_code, removed.data, removed.headers.get("Content-Type")) == (204, b"", None)
    assert client.delete("/v1/suppressions/ada@example.com", headers=AUTH).status_code == 404
    assert client.get("/v1/suppressions", headers=AUTH).get_json() == {"suppressions": [], "next": None}


def test_the_python_client_reads_and_changes_the_list(service, serve):
    client = Client(serve(service().settings), api_key=API_KEY)

    added = client.suppress("Ada+news@Example.com")
    assert (added["address"], added["reason"]) == ("ada+news@example.com", "manual")
    assert client.suppression("ada+news@example.com") == added
    assert client.suppressions(limit=1) == {"suppressions": [added], "next": None}
    client.unsuppress("ada+news@example.com")
    with pytest.raises(NotFound):
        client.unsuppress("ada+news@example.com")


def test_the_command_line_adds_lists_and_removes(service, monkeypatch, capsys):
    """`dispatcher suppressions ...`, run in this process (each a real process would cost a second)."""
    for name, value in service().env.items():  # it reads and writes Redis itself, as `dispatcher retry` does
        monkeypatch.setenv(name, value)

    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exited:
            cli.main(["suppressions", *args])
        out, err = capsys.readouterr()
        return int(exited.value.code or 0), out, err

    assert run("add", "Ada@Example.COM") == (0, "ada@example.com added\n", "")
    code, out, _ = run("list", "--json")
    assert (code, [(e["address"], e["reason"]) for e in json.loads(out)]) == (0, [("ada@example.com", "manual")])
    assert run("remove", "ada@example.com")[0] == 0
    assert run("remove", "ada@example.com") == (
        1,
        "",
        "dispatcher suppressions: ada@example.com is not on the suppression list\n",
    )
    assert run("add", "Ada <ada@example.com>")[0] == 2


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/v1/suppressions", {"address": "not an address"}, "address"),
        ("POST", "/v1/suppressions", {"address": "Ada <ada@example.com>"}, "address"),
        ("POST", "/v1/suppressions", {"address": "ada@example.com\r\nBcc: x@example.com"}, "address"),
        ("POST", "/v1/suppressions", {"address": "a@b.local"}, "address"),
        ("POST", "/v1/suppressions", {}, "address"),
        ("POST", "/v1/suppressions", {"address": "a@example.com", "reason": "bounce"}, "reason"),
        ("GET", "/v1/suppressions/not-an-address", None, "address"),
        ("DELETE", "/v1/suppressions/a%0Db@example.com", None, "address"),
        ("DELETE", "/v1/suppressions/a%0Ab@example.com", None, "address"),
        ("DELETE", "/v1/suppressions/a%E2%80%A8b@example.com", None, "address"),
        ("GET", "/v1/suppressions?limit=0", None, "limit"),
        ("GET", "/v1/suppressions?limit=+5", None, "limit"),
        ("GET", "/v1/suppressions?after=", None, "after"),
        ("GET", "/v1/suppressions?limit=1&limit=2", None, "limit"),
    ],
)
def test_a_bad_request_is_a_422_naming_the_field(client, method, path, body, field):
    response = client.open(path, method=method, json=body, headers=AUTH)

    assert response.status_code == 422, response.get_json()
    assert [detail["field"] for detail in response.get_json()["error"]["details"]] == [field]


def test_every_route_wants_the_key(client):
    for method, path in [
        ("GET", "/v1/suppressions"),
        ("POST", "/v1/suppressions"),
        ("GET", "/v1/suppressions/a@example.com"),
        ("DELETE", "/v1/suppressions/a@example.com"),
    ]:
        assert client.open(path, method=method, json={"address": "a@example.com"}).status_code == 401, path


def test_the_request_log_never_shows_the_address(settings, caplog):
    secret = address("private")
    client = WsgiClient(RequestLog(create_app(settings)))
    caplog.set_level(logging.INFO, logger="dispatcher.request")

    client.delete(f"/v1/suppressions/{secret}", headers=AUTH)  # 404
    client.get(f"/v1/suppressions/{secret}")  # 401
    client.post(f"/v1/suppressions/{secret}", headers=AUTH)  # 405

    lines = [record for record in caplog.records if record.name == "dispatcher.request"]
    assert [line.path for line in lines] == ["/v1/suppressions/<address>"] * 3  # type: ignore[attr-defined]
    assert all(secret not in str(vars(line)) for line in lines)


@pytest.mark.parametrize(
    ("code", "text", "suppressed"),
    [
        (550, "5.1.1 mailbox unavailable", True),
        (553, "mailbox name not allowed", True),
        (554, "5.2.1 mailbox disabled", True),
        (451, "4.3.0 try again later", False),
        (421, "closing", False),
        (530, "5.7.0 authentication required", False),
        (535, "authentication failed", False),
        (550, "5.7.1 relaying denied", False),
        (554, " 5.7.1 message refused as spam", False),
    ],
)
def test_only_a_refusal_of_the_mailbox_is_a_hard_bounce(code, text, suppressed):
    assert bool(hard_bounces({"a@example.com": (code, text)})) is suppressed


def test_a_bounce_keeps_only_printable_text_of_the_server_reply():
    reply = "5.1.1 no such user\r\n\x1b[31mhere\x00" + "x" * 300
    record = suppressions.bounce("A@Example.com", 550, reply, "em_1")
    assert record["address"] == "a@example.com"
    assert record["smtp_message"] == ("5.1.1 no such user   [31mhere " + "x" * 300)[:200]


def test_attempt_records_from_before_the_list_still_read():
    old = Attempt.from_record(1, '{"started_at": "2026-12-01T00:00:00.000Z", "outcome": "succeeded"}')
    assert old.suppressed is None
    with pytest.raises(UnreadableHistory):
        Attempt.from_record(1, '{"started_at": "2026-12-01T00:00:00.000Z", "suppressed": [1]}')
