"""Recipients with display names: `to`, `cc` and `bcc` take `addr` or `Name <addr>`, as `from` does.

Hostile names (encoded words, line breaks in job data, `<>"`) are tried over the whole class, for `to`
and `cc` as for `from`, in tests/test_mail_headers.py.
"""

from __future__ import annotations

import uuid

from tests.conftest import AUTH, wait_for
from tests.test_emails import parse, post_email


def address(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


def test_named_recipients_are_encoded_in_the_headers_and_only_addresses_reach_the_envelope(api, smtp_server):
    ada, lord, gruss, hidden = address("ada"), address("lord"), address("gruss"), address("hidden")
    to = [f"Ada Lovelace <{ada}>", f'"Byron, Lord" <{lord}>']
    job_id = post_email(api, to=to, cc=[f"Grüße Müller <{gruss}>"], bcc=[f"Secret Agent <{hidden}>"])

    job = wait_for(api, job_id)

    assert job["status"] == "succeeded", job
    assert job["target"]["to"] == [f'"Ada Lovelace" <{ada}>', f'"Byron, Lord" <{lord}>']
    (mail,) = smtp_server.handler.messages_to(ada)
    assert sorted(mail.rcpt_tos) == sorted([ada, lord, gruss, hidden])
    content = mail.content
    assert f'To: "Ada Lovelace" <{ada}>,'.encode() in content
    assert b'"Byron, Lord"' in content  # the comma inside the quotes: one mailbox, not two
    assert content.isascii() and "Grüße".encode() not in content  # the name as RFC 2047 encoded words
    message = parse(content)
    mailboxes = [(a.display_name, a.addr_spec) for a in message["To"].addresses]
    assert mailboxes == [("Ada Lovelace", ada), ("Byron, Lord", lord)]
    assert [(a.display_name, a.addr_spec) for a in message["Cc"].addresses] == [("Grüße Müller", gruss)]
    assert "Bcc" not in message and b"Secret Agent" not in content and hidden.encode() not in content


def test_named_recipients_count_toward_the_50(client):
    named = [f"Reader {i} <reader{i}@example.com>" for i in range(30)]
    body = {"to": named[:20], "cc": named[20:], "subject": "s", "text": "t"}

    assert client.post("/v1/emails", json=body | {"bcc": ["x@example.com"] * 20}, headers=AUTH).status_code == 202
    refused = client.post("/v1/emails", json=body | {"bcc": ["x@example.com"] * 21}, headers=AUTH)
    assert refused.status_code == 422
    assert [d["field"] for d in refused.get_json()["error"]["details"]] == ["to"]
