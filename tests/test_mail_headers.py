"""Headers that cannot be forged: what a client sends reaches the recipient as literal text.

Every payload goes the whole way: through the API where it accepts it (raw line breaks it
refuses, so those are written straight into the job data, as anybody with Redis access could),
then a worker, then the bytes the SMTP server received or the outbox file, parsed again.
Each message must have exactly the headers and MIME parts asked for, and each value must read
back as the characters sent.
"""

from __future__ import annotations

import base64
import email
import email.header
import email.policy
import email.utils
import json
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from rq.job import Job

from dispatcher.addresses import LINE_BREAKS
from dispatcher.app import create_app
from dispatcher.channels.email import EmailRequest
from tests.conftest import AUTH
from workers import headers

SENDER = "tests@example.com"
#: The Cc recipient of the messages that test a Cc display name.
COPY = "copy@example.com"


def b64(text: str, charset: str = "utf-8") -> str:
    return base64.b64encode(text.encode(charset)).decode()


#: Encoded words a decoding mail library would turn into line breaks, headers, bodies or MIME parts.
ENCODED = [
    "=?utf-8?q?a=0D=0AX-Evil:_1?=",
    "=?UTF-8?Q?a=0D=0AX-Evil:_1?=",
    "=?Utf-8?q?a=0d=0aX-Evil:_1?=",
    f"=?utf-8?b?{b64('a' + chr(13) + chr(10) + 'X-Evil: 1')}?=",
    f"=?UTF-8?B?{b64('a' + chr(13) + chr(10) + 'Reply-To: evil@example.com')}?=",
    "=?utf-8?q?=0A=0ABcc:_evil@example.com?=",
    "=?utf-8?q?=0D?=X-Evil: 1",
    "=?utf-8?q?=00?=",
    "=?iso-8859-1?q?caf=E9=0D=0AX-Evil:_1?=",
    f"=?ISO-8859-1?B?{b64('café' + chr(10) + 'X-Evil: 1', 'iso-8859-1')}?=",
    f"=?koi8-r?b?{b64('привет' + chr(13) + chr(10) + 'X-Evil: 1', 'koi8-r')}?=",
    "=?windows-1252?q?=80=0D=0ABcc:_evil@example.com?=",
    "=?utf-8*en?q?a=0D=0AX-Evil:_1?=",
    "=?utf-8?q?a?= =?utf-8?q?=0D=0A?= =?utf-8?q?X-Evil:_1?=",
    "=?utf-8?q?=0D=0A=0D=0A<b>a_new_body</b>?=",
    "=?utf-8?q?=0D=0AContent-Type:_multipart/mixed;_boundary=3Dx=0D=0A=0D=0A--x=0D=0AContent-Type:"
    "_text/html=0D=0A=0D=0A<b>evil</b>=0D=0A--x--?=",
    "=?utf-8?q?=0D=0A--===============1234567890==?=",
    "a =?utf-8?b?w6k=?= b =?utf-8?q?=E2=80=A8?=",
    "=?utf-8?q?=C2=85X-Evil:_1?=",
    "=?utf-8?q?=E2=80=A8X-Evil:_1?=",
    "=?",
    "?=",
    "=?utf-8?q?unterminated",
    "plain words only",
    "Grüße, ☃ 日本語 🎉",
    " leading and trailing spaces ",
    "two  spaces\tand a tab",
    "w" * 300,
    ("word " * 150).strip(),
    "--===============0000000000==",
    "Content-Type: text/html",
]
#: Raw line breaks and NUL, which the API refuses with 422: only job data written to Redis has them.
RAW = [
    "a\r\nX-Evil: 1",
    "a\nX-Evil: 1",
    "a\rX-Evil: 1",
    "a\r\n\r\n<b>a new body</b>",
    "\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n",
    "=?utf-8?q?a?=\r\n =?utf-8?q?=0D=0A?=",
    "=?utf-8?q?a?=\n\tX-Evil: 1",
    "a\x00b",
    "a\u2028X-Evil: 1",
    "a\u2029b\x85c\x0bd\x0ce\x1cf",
    "\r\n",
]


@dataclass
class Case:
    """One payload in one field: the request and what its message must show."""

    field: str
    value: str
    recipient: str

    def request(self) -> dict:
        body: dict = {"to": [self.recipient], "subject": "Hello", "text": "Hi there."}
        if self.field == "subject":
            body["subject"] = self.value
        elif self.field == "from":
            body["from"] = f"{_quoted(self.value)} <{SENDER}>"
        elif self.field == "reply_to":
            body["reply_to"] = f"{_quoted(self.value)} <reply@example.com>"
        elif self.field == "to":
            body["to"] = [f"{_quoted(self.value)} <{self.recipient}>"]
        elif self.field == "cc":
            body["cc"] = [f"{_quoted(self.value)} <{COPY}>"]
        elif self.field == "header":
            body["headers"] = {"X-Tag": self.value}
        elif self.field == "filename":
            body["attachments"] = [{"filename": self.value, "content_type": "application/pdf", "content": "JVBERg=="}]
        return body

    @property
    def envelope(self) -> list[str]:
        """The addresses RCPT TO names: never a display name."""
        return [self.recipient, COPY] if self.field == "cc" else [self.recipient]

    @property
    def api_field(self) -> str:
        """The field a 422 names when the API refuses the value."""
        names = {"to": "to.0", "cc": "cc.0", "header": "headers.X-Tag", "filename": "attachments.0.filename"}
        return names.get(self.field, self.field)


def _quoted(name: str) -> str:
    """A display name as a client would write it: quoted, with backslash escapes."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


FIELDS = ["subject", "from", "reply_to", "to", "cc", "header", "filename"]
#: The fields that carry a display name, and the header each one is.
NAMES = {"from": "From", "reply_to": "Reply-To", "to": "To", "cc": "Cc"}
#: What the API refuses in a display name (besides line breaks): these go through job data only.
NAME_SPECIALS = set('<>"')


def api_accepts(field: str, value: str) -> bool:
    if field in NAMES and NAME_SPECIALS & set(value):
        return False
    return fits(field, value) and not any(c in value for c in "\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def fits(field: str, value: str) -> bool:
    """Within the length limits, which the worker applies to job data too."""
    if field == "filename":
        return len(value) <= 255
    return field not in NAMES or len(value) <= 350  # a mailbox has at most 400 characters


def parse(content: bytes) -> EmailMessage:
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def check_message(case: Case, content: bytes, linesep: bytes = b"\r\n") -> None:
    """Exactly the headers and parts asked for, and the value reads back as sent."""
    where = f"{case.field}={case.value!r}"
    assert all(byte < 0x80 for byte in content), where
    head = content.split(linesep + linesep, 1)[0]
    assert all(len(line) <= 998 for line in head.split(linesep)), where
    message = parse(content)
    expected = ["From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type"]
    if case.field == "reply_to":
        expected.append("Reply-To")
    if case.field == "cc":
        expected.append("Cc")
    if case.field == "header":
        expected.append("X-Tag")
    if case.field != "filename":
        expected.append("Content-Transfer-Encoding")
    assert Counter(message.keys()) == Counter(expected), (where, message.keys())
    # A second, older parser must see the same header set.
    legacy = email.message_from_bytes(content, policy=email.policy.compat32)
    assert Counter(legacy.keys()) == Counter(expected), (where, legacy.keys())
    assert not message.defects, (where, message.defects)

    parts = [part.get_content_type() for part in message.walk()]
    if case.field == "filename":
        assert parts == ["multipart/mixed", "text/plain", "application/pdf"], (where, parts)
        attachment = list(message.walk())[2]
        assert Counter(attachment.keys()) == Counter(
            ["Content-Type", "Content-Transfer-Encoding", "Content-Disposition"]
        ), where
        assert attachment.get_content_disposition() == "attachment", where
        assert attachment["Content-Disposition"].params["filename"] == case.value, where
        # The older API strips the name's surrounding whitespace itself.
        assert list(legacy.walk())[2].get_filename() == case.value.strip(), where
        assert attachment.get_payload(decode=True) == b"%PDF", where
    else:
        assert parts == ["text/plain"], (where, parts)
    assert message.get_body(("plain",)).get_content().replace("\r\n", "\n").rstrip("\n") == "Hi there.", where

    if case.field == "subject":
        assert message["Subject"] == case.value, where
        assert decode_legacy(legacy["Subject"]) == case.value, where
    elif case.field == "header":
        assert message["X-Tag"] == case.value, where
        assert decode_legacy(legacy["X-Tag"]) == case.value, where
    elif case.field in NAMES:
        name = NAMES[case.field]
        address = {"from": SENDER, "reply_to": "reply@example.com", "to": case.recipient, "cc": COPY}[case.field]
        ((display_name, addr_spec),) = email.utils.getaddresses([legacy[name]])
        assert (decode_legacy(display_name), addr_spec) == (case.value, address), where
        # The newer API refuses to build an Address with a line break in it, collapses runs of
        # whitespace in a display name, and keeps the space between two of its encoded words, which
        # RFC 2047 (6.2) says to drop: it can only check plainer names.
        plainer = " ".join(case.value.split()) == case.value and display_name.count("=?utf-8?b?") <= 1
        if plainer and not any(c in case.value for c in LINE_BREAKS):
            (mailbox,) = message[name].addresses
            assert (mailbox.display_name, mailbox.addr_spec) == (case.value, address), where
    if case.field != "subject":
        assert message["Subject"] == "Hello", where
    if case.field != "to":
        assert message["To"] == case.recipient, where


def decode_legacy(value: str) -> str:
    """RFC 2047 decoding by the email package's older API (encoded words, whitespace between them dropped)."""
    unfolded = value.replace("\r\n", "").replace("\n", "")
    return str(email.header.make_header(email.header.decode_header(unfolded)))


def recipient(field: str) -> str:
    return f"hdr-{field}-{uuid.uuid4().hex[:12]}@example.com"


def rewrite_job_data(redis_conn, job_id: str, change: Callable[[dict], None]) -> None:
    """Change a queued job's data the way anybody with Redis access could: `data` is zlib-compressed
    JSON `[function, null, [data], {}]`."""
    key = Job.key_for(job_id)
    function, instance, args, kwargs = json.loads(zlib.decompress(redis_conn.hget(key, "data")))
    change(args[0])
    redis_conn.hset(key, "data", zlib.compress(json.dumps([function, instance, args, kwargs]).encode()))


def set_field(case: Case) -> Callable[[dict], None]:
    """Put `case.value` raw into the job data, where the API would have put its validated form."""

    def change(data: dict) -> None:
        if case.field == "subject":
            data["subject"] = case.value
        elif case.field == "from":
            data["from"] = f"{_quoted(case.value)} <{SENDER}>"
        elif case.field == "reply_to":
            data["reply_to"] = f"{_quoted(case.value)} <reply@example.com>"
        elif case.field == "to":
            data["to"] = [f"{_quoted(case.value)} <{case.recipient}>"]
        elif case.field == "cc":
            data["cc"] = [f"{_quoted(case.value)} <{COPY}>"]
        elif case.field == "header":
            data["headers"] = {"X-Tag": case.value}
        elif case.field == "filename":
            data["attachments"][0]["filename"] = case.value

    return change


@pytest.fixture
def mailer(burst_worker):
    """An API and an in-process worker on a fresh queue, sending to the suite's SMTP server."""
    worker = burst_worker()
    return worker, create_app(worker.settings).test_client()


@pytest.mark.parametrize("field", FIELDS)
def test_encoded_words_and_odd_text_reach_the_recipient_literally_over_smtp(mailer, smtp_server, field):
    worker, client = mailer
    cases = [Case(field, value, recipient(field)) for value in ENCODED if api_accepts(field, value)]
    assert len(cases) >= 25
    for case in cases:
        response = client.post("/v1/emails", json=case.request(), headers=AUTH)
        assert response.status_code == 202, (case, response.get_json())

    worker.run()

    for case in cases:
        (mail,) = smtp_server.handler.messages_to(case.recipient)
        assert mail.rcpt_tos == case.envelope
        check_message(case, mail.content)


@pytest.mark.parametrize("field", FIELDS)
def test_raw_line_breaks_in_job_data_stay_inside_the_value(mailer, smtp_server, redis_conn, field):
    """The API refuses these (422); job data written straight to Redis carries them to the worker."""
    worker, client = mailer
    values = RAW + [value for value in ENCODED if not api_accepts(field, value) and fits(field, value)]
    cases = [Case(field, value, recipient(field)) for value in values]
    for case in cases:
        body = Case(field, "placeholder", case.recipient).request()
        response = client.post("/v1/emails", json=body, headers=AUTH)
        assert response.status_code == 202, response.get_json()
        rewrite_job_data(redis_conn, response.get_json()["id"], set_field(case))

    worker.run()

    for case in cases:
        (mail,) = smtp_server.handler.messages_to(case.recipient)
        assert mail.rcpt_tos == case.envelope
        check_message(case, mail.content)


def test_the_api_still_refuses_raw_line_breaks(client):
    """And `<`, `>` or `"` in a display name; each refusal names the field (`to.0` for a recipient)."""
    for field in FIELDS:
        refused = [*RAW, *(value for value in ENCODED if fits(field, value) and not api_accepts(field, value))]
        for value in refused:
            case = Case(field, value, recipient(field))
            response = client.post("/v1/emails", json=case.request(), headers=AUTH)
            assert response.status_code == 422, (field, value, response.get_json())
            assert [d["field"] for d in response.get_json()["error"]["details"]] == [case.api_field], (field, value)


@pytest.mark.parametrize("field", FIELDS)
def test_outbox_files_hold_the_same_literal_values(burst_worker, tmp_path, redis_conn, field):
    outbox = tmp_path / "outbox"
    worker = burst_worker(smtp=None, outbox_dir=outbox)
    client = create_app(worker.settings).test_client()
    jobs: dict[str, Case] = {}
    for value in [value for value in ENCODED + RAW if fits(field, value)]:
        case = Case(field, value, recipient(field))
        if api_accepts(field, value):
            response = client.post("/v1/emails", json=case.request(), headers=AUTH)
            assert response.status_code == 202, response.get_json()
        else:
            response = client.post("/v1/emails", json=Case(field, "x", case.recipient).request(), headers=AUTH)
            rewrite_job_data(redis_conn, response.get_json()["id"], set_field(case))
        jobs[response.get_json()["id"]] = case

    worker.run()

    assert sorted(p.name for p in outbox.iterdir()) == sorted(f"{job_id}.eml" for job_id in jobs)
    for job_id, case in jobs.items():
        check_message(case, (outbox / f"{job_id}.eml").read_bytes(), linesep=b"\n")


def test_bcc_and_every_header_stay_as_asked_when_all_fields_are_hostile_at_once(mailer, smtp_server):
    worker, client = mailer
    to, bcc = recipient("all"), recipient("hidden")
    evil = "=?utf-8?q?=0D=0ABcc:_evil@example.com=0D=0AX-Evil:_1?="
    body = {
        "to": [to],
        "bcc": [bcc],
        "from": f'"{evil}" <{SENDER}>',
        "reply_to": f"{evil} <reply@example.com>",
        "subject": evil,
        "text": "t",
        "html": "<p>h</p>",
        "headers": {"X-A": evil, "X-B": evil},
        "attachments": [{"filename": evil, "content": "aGk="}, {"filename": evil + ".txt", "content": ""}],
    }
    response = client.post("/v1/emails", json=body, headers=AUTH)
    assert response.status_code == 202, response.get_json()

    worker.run()

    (mail,) = smtp_server.handler.messages_to(bcc)
    assert sorted(mail.rcpt_tos) == sorted([to, bcc])
    message = parse(mail.content)
    assert Counter(message.keys()) == Counter(
        ["From", "To", "Reply-To", "Subject", "Date", "Message-ID", "X-A", "X-B", "MIME-Version", "Content-Type"]
    )
    assert [p.get_content_type() for p in message.walk()] == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "application/octet-stream",
        "application/octet-stream",
    ]
    assert [p.get_filename() for p in message.iter_attachments()] == [evil, evil + ".txt"]
    assert message["Subject"] == message["X-A"] == message["X-B"] == evil
    legacy = email.message_from_bytes(mail.content, policy=email.policy.compat32)
    for name in ("From", "Reply-To"):
        ((display_name, _),) = email.utils.getaddresses([legacy[name]])
        assert decode_legacy(display_name) == evil, name
    assert b"evil@example.com" not in mail.content and bcc.encode() not in mail.content


# --- The encoder on its own ------------------------------------------------------------------


def wire(field: headers.Field) -> bytes:
    return field.fold(policy=email.policy.SMTP).encode("ascii")


@hypothesis_settings(max_examples=300, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs",)), max_size=400), st.sampled_from(["Subject", "X-" + "n" * 70]))
def test_any_text_encodes_to_short_ascii_lines_that_decode_to_itself(text, name):
    raw = wire(headers.unstructured(name, text))
    lines = raw.split(b"\r\n")
    assert lines[-1] == b"" and all(b"\r" not in line and b"\n" not in line for line in lines)
    assert all(len(line) <= 998 for line in lines)
    assert all(len(line) <= 78 for line in lines[1:])
    assert all(line.startswith(b" ") for line in lines[1:-1])
    parsed = parse(raw + b"\r\n")
    assert list(parsed.keys()) == [name]
    assert parsed[name] == text


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=255))
def test_any_filename_encodes_to_short_ascii_lines_that_decode_to_itself(filename):
    raw = wire(headers.attachment_disposition(filename))
    lines = raw.split(b"\r\n")
    assert all(len(line) <= 78 for line in lines)
    part = parse(raw + b"\r\n")
    assert part["Content-Disposition"].params["filename"] == filename
    # The older API strips the name's surrounding whitespace itself.
    legacy = email.message_from_bytes(raw + b"\r\n", policy=email.policy.compat32)
    assert legacy.get_filename() == filename.strip()


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.lists(st.text(st.characters(exclude_categories=("Cs",)), max_size=80), min_size=1, max_size=4))
def test_any_display_names_encode_to_mailboxes_that_decode_to_themselves(names):
    addresses = [f"user{i}@example.com" for i in range(len(names))]
    raw = wire(headers.mailboxes("To", list(zip(names, addresses, strict=True))))
    assert all(len(line) <= 78 for line in raw.split(b"\r\n"))
    legacy = email.message_from_bytes(raw + b"\r\n", policy=email.policy.compat32)["To"]
    decoded = [(decode_legacy(name), addr) for name, addr in email.utils.getaddresses([legacy])]
    assert decoded == list(zip(names, addresses, strict=True))


def test_an_api_request_still_makes_the_same_model():
    """The mailbox form the API stores (str(Address)) splits back into the same name (backslashes too)."""
    from dispatcher.addresses import split_mailbox

    for name in ["a\\b", "Shop, Inc.", "=?utf-8?q?x?=", "Ünï", "a (b) c"]:
        request = EmailRequest.model_validate(
            {"to": ["a@example.com"], "subject": "s", "text": "t", "from": f"{_quoted(name)} <s@example.com>"}
        )
        assert split_mailbox(request.from_ or "") == (name, "s@example.com")


def test_encoder_output_has_no_encoded_word_the_input_did_not_need():
    """Plain ASCII goes as is (a reader of the raw source sees it); anything else as base64 words only."""
    assert wire(headers.unstructured("Subject", "Your order 1042")) == b"Subject: Your order 1042\r\n"
    for text in ["=?utf-8?q?x?=", "é", "a  b", " a", "a\tb"]:
        raw = wire(headers.unstructured("Subject", text)).decode()
        words = raw.removeprefix("Subject: ").split()
        assert all(w.startswith("=?utf-8?b?") and w.endswith("?=") and len(w) <= 75 for w in words), raw
