"""Email delivery through the API and a real worker process to a real SMTP server (and to the outbox)."""

from __future__ import annotations

import base64
import email
import email.policy
import uuid
from datetime import datetime
from email.message import EmailMessage
from email.utils import parsedate_to_datetime

import pytest

from dispatcher.channels.email import EmailRequest
from tests.conftest import AUTH, wait_for

DEFAULT_FROM = "Dispatcher Tests <tests@example.com>"


def address(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


def post_email(client, **fields) -> str:
    body = {"to": [address()], "subject": f"Hello {uuid.uuid4().hex[:8]}", "text": "Hello there."} | fields
    response = client.post("/v1/emails", json=body, headers=AUTH)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def parse(content: bytes) -> EmailMessage:
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def text_of(part) -> str:
    """A text part's content without the wire format's line endings."""
    return part.get_content().replace("\r\n", "\n").rstrip("\n")


def received_one(smtp_server, recipient: str) -> tuple[list[str], EmailMessage, bytes]:
    (mail,) = smtp_server.handler.messages_to(recipient)
    return mail.rcpt_tos, parse(mail.content), mail.content


def test_text_and_html_make_multipart_alternative_with_the_right_headers(api, smtp_server):
    to, cc = address("to"), address("cc")
    subject = f"Your order {uuid.uuid4().hex[:8]} bestätigt"
    text = "Thanks for your order.\nIt ships tomorrow."
    html = "<p>Thanks for your <b>order</b>.</p>"
    job_id = post_email(api, to=[to], cc=[cc], subject=subject, text=text, html=html)

    job = wait_for(api, job_id)

    assert job["status"] == "succeeded", job
    (attempt,) = job["attempts"]
    assert (attempt["outcome"], attempt["status_code"]) == ("succeeded", 250)
    rcpt_tos, message, _ = received_one(smtp_server, to)
    assert sorted(rcpt_tos) == sorted([to, cc])
    assert message.get_content_type() == "multipart/alternative"
    plain, rich = message.iter_parts()
    assert plain.get_content_type() == "text/plain"
    assert text_of(plain) == text
    assert rich.get_content_type() == "text/html"
    assert text_of(rich) == html
    assert message["Subject"] == subject
    assert message["From"] == DEFAULT_FROM
    assert message["To"] == to
    assert message["Cc"] == cc
    assert message["Message-ID"] == f"<{job_id}@example.com>"
    sent = parsedate_to_datetime(message["Date"])
    assert abs((sent - datetime.fromisoformat(job["created_at"])).total_seconds()) < 2


@pytest.mark.parametrize("with_html", [False, True])
def test_attachment_makes_multipart_mixed(api, smtp_server, with_html):
    to = address()
    pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\n" + bytes(range(256)) + b"\n%%EOF\n"
    filename = f"invoice-{uuid.uuid4().hex[:6]}.pdf"
    attachment = {"filename": filename, "content_type": "application/pdf", "content": base64.b64encode(pdf).decode()}
    fields = {"html": "<p>See the invoice.</p>"} if with_html else {}
    job_id = post_email(api, to=[to], text="See the invoice.", attachments=[attachment], **fields)

    job = wait_for(api, job_id)

    assert job["status"] == "succeeded", job
    _, message, _ = received_one(smtp_server, to)
    assert message.get_content_type() == "multipart/mixed"
    body, attached = message.iter_parts()
    assert body.get_content_type() == ("multipart/alternative" if with_html else "text/plain")
    assert text_of(message.get_body(("plain",))) == "See the invoice."
    if with_html:
        assert text_of(message.get_body(("html",))) == "<p>See the invoice.</p>"
    assert attached.get_content_disposition() == "attachment"
    assert attached.get_filename() == filename
    assert attached.get_content_type() == "application/pdf"
    assert attached.get_payload(decode=True) == pdf


def test_bcc_is_in_the_envelope_only(api, smtp_server):
    to, cc, bcc = address("to"), address("cc"), address("hidden")
    job_id = post_email(api, to=[to], cc=[cc], bcc=[bcc])

    job = wait_for(api, job_id)

    assert job["status"] == "succeeded", job
    rcpt_tos, message, content = received_one(smtp_server, bcc)
    assert sorted(rcpt_tos) == sorted([to, cc, bcc])
    assert "Bcc" not in message
    assert bcc.encode() not in content
    assert bcc.split("@")[0].encode() not in content
    for name, value in message.items():
        assert bcc not in str(value), name


def test_smtp_550_fails_at_once(api, smtp_server):
    to = address("reject550")
    job_id = post_email(api, to=[to], retry={"max_attempts": 3, "backoff": [1]})

    job = wait_for(api, job_id)

    assert job["status"] == "failed", job
    (attempt,) = job["attempts"]
    assert (attempt["outcome"], attempt["status_code"]) == ("permanent", 550)
    assert to in job["error"]
    assert smtp_server.handler.seen[to] == 1
    assert smtp_server.handler.messages_to(to) == []


def test_smtp_451_is_retried_with_the_same_message(api, smtp_server):
    to = address("temp451")
    job_id = post_email(api, to=[to], retry={"max_attempts": 3, "backoff": [1]})

    job = wait_for(api, job_id)

    assert job["status"] == "succeeded", job
    first, second = job["attempts"]
    assert (first["outcome"], first["status_code"]) == ("retryable", 451)
    assert (second["outcome"], second["status_code"]) == ("succeeded", 250)
    _, message, _ = received_one(smtp_server, to)
    # Message-ID and Date were fixed at acceptance, not made up again by the attempt that delivered.
    assert message["Message-ID"] == f"<{job_id}@example.com>"
    sent = parsedate_to_datetime(message["Date"])
    created = datetime.fromisoformat(job["created_at"])
    assert abs((sent - created).total_seconds()) < 1.5
    # Date has whole seconds (acceptance, rounded down); the retry is due at least 1.8 s after the first
    # attempt, in whole seconds rounded down, so it starts in a later second than the one accepted in.
    # A Date made at the second attempt would lie in the second it started in.
    assert (datetime.fromisoformat(second["started_at"]) - sent).total_seconds() >= 1.0


def test_partly_refused_recipients_still_succeed_with_a_note(api, smtp_server):
    ok, refused = address("ok"), address("reject550")
    job_id = post_email(api, to=[ok, refused], retry={"max_attempts": 3, "backoff": [1]})

    job = wait_for(api, job_id)

    assert job["status"] == "succeeded", job
    (attempt,) = job["attempts"]
    assert (attempt["outcome"], attempt["status_code"]) == ("succeeded", 250)
    assert refused in attempt["error"]
    assert "550" in attempt["error"]
    rcpt_tos, message, _ = received_one(smtp_server, ok)
    assert rcpt_tos == [ok]
    assert message["To"] == f"{ok}, {refused}"


def test_outbox_transport_writes_an_eml_without_bcc(burst_worker, tmp_path):
    worker = burst_worker(smtp=None, outbox_dir=tmp_path)
    to, bcc = address("to"), address("hidden")
    subject = f"Outbox {uuid.uuid4().hex[:8]}"
    request = EmailRequest.model_validate(
        {"to": [to], "bcc": [bcc], "subject": subject, "text": "Written to disk."},
        context={"email_from": "a@example.com"},
    )
    job_id = worker.enqueue("email", request)

    worker.run()

    job = worker.job(job_id)
    assert job["status"] == "succeeded", job
    assert [p.name for p in tmp_path.iterdir()] == [f"{job_id}.eml"]
    content = (tmp_path / f"{job_id}.eml").read_bytes()
    message = parse(content)
    assert message["Subject"] == subject
    assert message["From"] == "a@example.com"
    assert message["To"] == to
    assert message["Message-ID"] == f"<{job_id}@example.com>"
    assert text_of(message) == "Written to disk."
    assert "Bcc" not in message
    assert bcc.encode() not in content
