"""Bad input never breaks anything.

Property tests (hypothesis) feed every request model arbitrary and mutated input: each value is either
refused with a pydantic ValidationError or becomes a job that the workers can decode and send; the API
answers any JSON or bytes with exactly one job (202) or none and a clear 4xx. (schemathesis drives the
running service from its OpenAPI document in tests/test_openapi_contract.py; here it checks the views of
jobs a worker really ran against the document.) Then the cases the issue names: huge and deeply nested
bodies, invalid UTF-8, header injection, URLs with credentials, odd ports, IPv6 literals and IDN hosts,
each answered with a clear 4xx.

Everything the API accepts here goes to a fresh queue that no worker serves.
"""

from __future__ import annotations

import base64
import dataclasses
import email
import email.policy
import http.client
import io
import ipaddress
import json
import uuid
from datetime import UTC, datetime

import pytest
import schemathesis
import urllib3
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError
from rq.job import Job
from rq.serializers import JSONSerializer
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from standardwebhooks import Webhook
from urllib3.util import parse_url

from dispatcher.addresses import split_mailbox
from dispatcher.app import create_app
from dispatcher.channels import CHANNELS, JOB_FUNCTION
from dispatcher.channels.email import EmailRequest
from dispatcher.channels.webhook import WebhookRequest, parse_webhook_url
from dispatcher.config import Settings
from dispatcher.enqueue import build_job, make_queue
from dispatcher.keys import Keys
from dispatcher.models import MAX_PAYLOAD_DEPTH, RetryPolicy
from dispatcher.netguard import NetworkGuard
from tests.conftest import AUTH, WEBHOOK_SECRET
from workers.mail import build_message, envelope

ALLOWED = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
#: What the API passes to the models.
GUARDED = {"guard": NetworkGuard(ALLOWED), "email_from": "a@example.com"}
#: Without a guard (the models allow it) a hostname need not resolve, so IDN hosts and the like get as far
#: as a job, which the worker must still be able to use.
UNGUARDED = {"email_from": "a@example.com"}
JOB_SETTINGS = Settings()
MB = 1024 * 1024
#: Headers a built message may carry besides the request's own `headers`.
MESSAGE_HEADERS = {
    "from", "to", "cc", "reply-to", "subject", "date", "message-id", "mime-version",
    "content-type", "content-transfer-encoding",
}

FUZZ = hypothesis_settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# --- Strategies ------------------------------------------------------------------------------
#
# Requests are built from a valid example, varied with values that should pass, then 0-2 fields are
# swapped for hostile ones; arbitrary dicts and arbitrary JSON come on top.

#: Everything Python's str.splitlines() (and so the email package) takes for a line break, and NUL.
LINE_BREAKS = ["\r", "\n", "\r\n", "\0", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
SURROGATES = ["\ud800", "\udfff"]
ODD = [
    "\t", " ", "\x01", "\x1b", "\x7f", "é", "ü", "€", "日本", "\ufeff", "\u200b", "\U0001f600", "<", ">", '"',
    "\\", ",", ";", ":", "@", "(", ")", "=?utf-8?q?x?=", "%0d%0a", "Bcc: evil@example.com", "x" * 80,
]
#: Text that header fields may hold: anything but line breaks and lone surrogates.
safe_text = st.lists(
    st.one_of(
        st.text(st.characters(exclude_categories=("Cs",), exclude_characters="".join(LINE_BREAKS)), max_size=8),
        st.sampled_from(ODD),
    ),
    max_size=5,
).map("".join)
#: Header text with line breaks in it: header injection, in every form the email package knows.
broken_text = st.lists(st.one_of(safe_text, st.sampled_from(LINE_BREAKS)), min_size=1, max_size=4).map("".join)
#: Anything at all, line breaks and lone surrogates included.
text = st.one_of(
    broken_text,
    st.lists(st.one_of(st.text(max_size=8), st.sampled_from(LINE_BREAKS + SURROGATES + ODD)), max_size=5).map(
        "".join
    ),
)
long_text = st.integers(0, 1100).map(lambda n: "a" * n)


def json_of(strings: st.SearchStrategy) -> st.SearchStrategy:
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), strings
    )
    return st.recursive(
        scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(strings, kids, max_size=4), max_leaves=12
    )


json_values = json_of(text)
safe_json = json_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=10) | safe_text)


def nest(depth: int, container: str = "dict") -> dict:
    """A payload `depth` levels deep: {"a": {"a": ... 1}} or {"a": [[... 1]]}."""
    value: object = 1
    for _ in range(depth - 1):
        value = {"a": value} if container == "dict" else [value]
    return {"a": value}


@st.composite
def mutated(draw, valid: dict, good: dict[str, st.SearchStrategy], hostile: dict[str, st.SearchStrategy]) -> dict:
    """`valid`, some fields varied with `good` values, then up to two replaced with `hostile` ones or dropped."""
    data = dict(valid)
    for name, strategy in good.items():
        if draw(st.booleans()):
            data[name] = draw(strategy)
    for name in draw(st.lists(st.sampled_from(sorted(hostile)), max_size=2, unique=True)):
        value = draw(st.one_of(hostile[name], hostile[name], hostile[name], json_values, st.just(None), st.just(...)))
        if value is ...:
            data.pop(name, None)
        else:
            data[name] = value
    return data


VALID_ADDRESSES = [
    "alice@example.com", "bob@sub.example.org", "carol+tag@example.net", "ü@bücher.example", "日本@example.jp",
    "dave@xn--bcher-kva.example", "eve@[127.0.0.1]", "bcc@example.com", "O'Neil@example.com",
]
good_addresses = st.one_of(
    st.sampled_from(VALID_ADDRESSES),
    st.builds(
        lambda local, domain: f"{local}@{domain}",
        st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,20}(\.[A-Za-z0-9_+-]{1,10})?", fullmatch=True),
        st.sampled_from(["example.com", "bücher.example", "sub.example.org", "Example.COM"]),
    ),
)
local_parts = st.sampled_from(["alice", "a.b+tag", '"quoted"', "a..b", "", "x" * 65, ".a"]) | text
domains = st.sampled_from(
    ["example.com", "☃.example", "[IPv6:::1]", "localhost", "-bad.example", "a..example", "x" * 64 + ".example",
     "example", "[300.0.0.1]"]
) | text
bad_addresses = st.one_of(st.builds(lambda local, domain: f"{local}@{domain}", local_parts, domains), text)
good_mailboxes = st.one_of(
    good_addresses,
    st.builds(lambda name, addr: f"{name} <{addr}>", safe_text, good_addresses),
    st.builds(lambda name, addr: f'"{name}" <{addr}>', safe_text, good_addresses),
)
bad_mailboxes = st.one_of(
    bad_addresses,
    st.builds(lambda name, addr: f"{name} <{addr}>", broken_text, good_addresses),
    st.builds(lambda name, addr: f'"{name}" <{addr}>', broken_text, good_addresses),
    st.builds(lambda name, addr: f"{name} <{addr}>", text, good_addresses | bad_addresses),
    st.builds(lambda addr: f"<{addr}> <{addr}>", good_addresses),
)
bad_address_lists = st.one_of(
    st.lists(good_mailboxes | bad_mailboxes, min_size=1, max_size=3),
    st.just([]),
    st.just([f"user{i}@example.com" for i in range(51)]),
)
TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,20}"
GOOD_HEADER_NAMES = [
    "X-Tag", "X-Priority", "Comments", "Keywords", "Received", "List-Unsubscribe", "Authorization", "User-Agent",
    "Connection", "Expect", "Cookie", "In-Reply-To", "References", "Importance", "Orig-Date", "x" * 76,
]
#: Refused for emails, webhooks or both.
BAD_HEADER_NAMES = [
    "Content-ID", "content-language", "Bcc", "BCC", "subject", "Message-Id", "X Tag", "X-Tag:", "", "ü", "x" * 101,
    "webhook-id", "Webhook-Signature", "Host", "Content-Length", "Transfer-Encoding", "X-A\r\nB", "Resent-Bcc",
    "Resent-From", "resent-to", "Resent-Sender", "Resent-Date", "x" * 77, "x" * 100,
]
good_header_names = st.sampled_from(GOOD_HEADER_NAMES) | st.from_regex(TOKEN, fullmatch=True)
ascii_values = st.from_regex(r"[\t\x20-\x7e]{0,40}", fullmatch=True)
bad_header_values = st.one_of(
    st.sampled_from(["€", "é", "x" * 4097, "a\x0bb", "a\r\nBcc: evil@example.com"]),
    st.lists(st.sampled_from([*ODD, "", " "]), max_size=2).map("".join),
    text,
)
bad_headers = st.one_of(
    st.dictionaries(st.sampled_from(BAD_HEADER_NAMES) | good_header_names | text, bad_header_values, max_size=3),
    st.just({f"X-H{i}": "v" for i in range(51)}),
)
good_metadata = st.dictionaries(safe_text.filter(lambda key: 0 < len(key) <= 64), safe_text, max_size=4)
bad_metadata = st.one_of(
    st.dictionaries(text, text | json_values, max_size=3), st.just({f"k{i}": "v" for i in range(51)})
)
good_retry = st.fixed_dictionaries(
    {},
    optional={
        "max_attempts": st.integers(1, 20) | st.none(),
        "backoff": st.lists(st.integers(0, 7 * 24 * 3600) | st.floats(0, 7 * 24 * 3600), min_size=1, max_size=19),
    },
)
bad_retry = st.fixed_dictionaries(
    {},
    optional={
        "max_attempts": st.sampled_from([0, -1, 21, 1.5, "3", "x", 10**20]) | json_values,
        "backoff": st.one_of(st.just([]), st.lists(st.integers(-10, 10**7) | text, max_size=25), json_values),
        "jitter": json_values,
    },
)
CONTENT_TYPES = [
    "text/plain", "image/png", "application/pdf", "text/html", "application/vnd.ms-excel", "TEXT/PLAIN",
    "multipart/mixed", "message/rfc822", "application/x.y+z", "a/b",
]
BAD_CONTENT_TYPES = [
    "text plain", "text/plain; charset=utf-8", "text/plain\r\nBcc: evil@example.com", "text/plain\n", "a/b/c",
    "text/ü", "/", "text/", "x" * 300, "x/y z", "x text/plain",
]
base64_content = st.binary(max_size=64).map(lambda raw: base64.b64encode(raw).decode())
good_attachment = st.fixed_dictionaries(
    {"filename": safe_text.filter(lambda name: 0 < len(name) <= 255), "content": base64_content},
    optional={"content_type": st.sampled_from(CONTENT_TYPES)},
)
bad_attachment = st.fixed_dictionaries(
    {
        "filename": st.sampled_from(["x" * 256, ""]) | broken_text | text | safe_text,
        "content": st.sampled_from(["not base64!", "QQ=", "QQ==\n", "=="]) | base64_content | text,
    },
    optional={"content_type": st.sampled_from(BAD_CONTENT_TYPES + CONTENT_TYPES) | text, "size": json_values},
)
good_bodies = st.text(st.characters(exclude_categories=("Cs",)), max_size=40) | safe_text
bad_bodies = st.sampled_from(["\ud800", "a\udfff"]) | text

email_requests = st.one_of(
    mutated(
        {"to": ["alice@example.com"], "subject": "Hello", "text": "Hi"},
        good={
            "to": st.lists(good_mailboxes, min_size=1, max_size=3),
            "cc": st.lists(good_mailboxes, max_size=2),
            "bcc": st.lists(good_mailboxes, max_size=2),
            "from": good_mailboxes,
            "reply_to": good_mailboxes,
            "subject": safe_text.filter(bool) | st.just("x" * 998),
            "text": good_bodies,
            "html": good_bodies,
            "attachments": st.lists(good_attachment, max_size=2),
            "headers": st.dictionaries(good_header_names, safe_text, max_size=3),
            "metadata": good_metadata,
            "retry": good_retry,
        },
        hostile={
            "to": bad_address_lists, "cc": bad_address_lists, "bcc": bad_address_lists, "from": bad_mailboxes,
            "reply_to": bad_mailboxes, "subject": st.sampled_from(["", "x" * 999]) | text | long_text,
            "text": bad_bodies, "html": bad_bodies, "attachments": st.lists(bad_attachment, max_size=2),
            "headers": bad_headers, "metadata": bad_metadata, "retry": bad_retry, "priority": json_values,
        },
    ),
    st.fixed_dictionaries(
        {"to": bad_address_lists, "subject": text},
        optional={"from": bad_mailboxes, "text": bad_bodies, "attachments": st.lists(bad_attachment, max_size=2),
                  "headers": bad_headers},
    ),
)

GOOD_HOSTS = ["127.0.0.1", "127.1", "localhost", "LOCALHOST", "[::1]", "[::ffff:127.0.0.1]", "[0:0:0:0:0:0:0:1]"]
#: Fine as URLs, refused by the guard here (nothing resolves, or not public): they reach a job only unguarded.
NAMED_HOSTS = ["bücher.example", "xn--bcher-kva.example", "faß.example", "EXAMPLE.com", "a_b.example", "a-b.example"]
BAD_HOSTS = [
    "0x7f.0.0.1", "[2001:db8::1]", "[fe80::1%25eth0]", "[::]", "[::1", "[zz]", "::1", "[::1]]", "xn--zz.example",
    "☃.example", "a..b", "x" * 64 + ".example", "10.0.0.1", "169.254.169.254", "a%0a.example", "", "user@h",
    "\\127.0.0.1", "127.0.0.1\\.x", "a\\b",
]
GOOD_PORTS = ["", ":1", ":80", ":8080", ":65535"]
BAD_PORTS = [":0", ":65536", ":99999", ":-1", ":abc", ":", ":٨٠", ":+80", ": 80"]
GOOD_PATHS = ["/", "/hook", "", "/?q=1", "/ü", "/%zz", "/a;b", "/a?b=c&d=e%20", "/日本?x=€", "/x" * 100]
BAD_PATHS = ["/a b", "/#frag", "/a\tb", "/" + "x" * 2100, "/\x7f", "/a\\b"]
good_urls = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
    st.sampled_from(["http", "https", "HTTP"]),
    st.sampled_from(GOOD_HOSTS + NAMED_HOSTS),
    st.sampled_from(GOOD_PORTS),
    st.sampled_from(GOOD_PATHS) | st.from_regex(r"/[A-Za-z0-9._~!$&'()*+,;=:@/%?-]{0,30}", fullmatch=True),
)
bad_urls = st.one_of(
    st.builds(
        lambda scheme, userinfo, host, port, path: f"{scheme}://{userinfo}{host}{port}{path}",
        st.sampled_from(["http", "https", "ftp", "javascript", "", "http:"]),
        st.sampled_from(["", "", "user@", "user:pass@", ":@", "a%40b@"]),
        st.sampled_from(GOOD_HOSTS + BAD_HOSTS) | text,
        st.sampled_from(GOOD_PORTS + BAD_PORTS),
        st.sampled_from(GOOD_PATHS + BAD_PATHS) | text,
    ),
    text,
)
good_payloads = st.one_of(
    st.dictionaries(st.text(max_size=10).filter(lambda key: key < "\ud800" or key > "\udfff"), safe_json, max_size=4),
    st.integers(1, MAX_PAYLOAD_DEPTH).map(nest),
    st.integers(1, MAX_PAYLOAD_DEPTH).map(lambda depth: nest(depth, "list")),
    st.sampled_from([{}, {"n": 10**30}, {"f": 1e308}, {"f": -0.0}, {"a": [{}] * 100}, {"": None}]),
)
bad_payloads = st.one_of(
    st.dictionaries(text, json_values, max_size=4),
    st.integers(MAX_PAYLOAD_DEPTH + 1, MAX_PAYLOAD_DEPTH + 3).map(nest),
    st.integers(MAX_PAYLOAD_DEPTH + 1, MAX_PAYLOAD_DEPTH + 3).map(lambda depth: nest(depth, "list")),
    st.sampled_from([{"s": "\ud800"}, {"\udfff": 1}, {"a": [1, "x\ud800"]}, [], "x", 1]),
)
webhook_requests = st.one_of(
    mutated(
        {"url": "http://127.0.0.1/hook", "event_type": "order.created", "payload": {"order": 42}},
        good={
            "url": good_urls,
            "event_type": st.from_regex(r"[A-Za-z0-9_.:\-]{1,128}", fullmatch=True),
            "payload": good_payloads,
            "headers": st.dictionaries(
                good_header_names.filter(lambda name: not name.lower().startswith("webhook-")), ascii_values,
                max_size=3,
            ),
            "metadata": good_metadata,
            "retry": good_retry,
        },
        hostile={
            "url": bad_urls, "event_type": st.sampled_from(["", "a b", "x" * 129, "a\n"]) | text,
            "payload": bad_payloads, "headers": bad_headers, "metadata": bad_metadata, "retry": bad_retry,
            "secret": json_values,
        },
    ),
    st.fixed_dictionaries({"url": bad_urls, "event_type": text, "payload": bad_payloads | json_values}),
)
#: Dicts with the models' own field names and anything at all in them.
FIELD_NAMES = ["to", "cc", "bcc", "from", "reply_to", "subject", "text", "html", "attachments", "headers",
               "metadata", "retry", "url", "event_type", "payload", "max_attempts", "backoff", "filename",
               "content", "content_type"]
arbitrary_dicts = st.dictionaries(st.sampled_from(FIELD_NAMES) | text, json_values, max_size=6)


# --- What a worker needs of a job ------------------------------------------------------------


def round_trip(value: dict) -> dict:
    """Through RQ's JSON serializer, as the job is stored in Redis and read by the worker."""
    decoded = JSONSerializer.loads(JSONSerializer.dumps(value))
    assert decoded == value
    return decoded


def assert_email_job_deliverable(job_id: str, data: dict, meta: dict) -> None:
    """The worker can build, serialize and address the message; Bcc is in the envelope only."""
    assert meta["kind"] == "email"
    assert meta["target"] == {"to": data["to"], "cc": data["cc"], "bcc": data["bcc"], "subject": data["subject"]}
    message = build_message(data)
    raw = message.as_bytes()
    # smtplib generates with utf8=True when an address is internationalized (SMTPUTF8).
    raw_utf8 = message.as_bytes(policy=message.policy.clone(utf8=True))
    sender, recipients = envelope(data)
    assert sender and not any(c in sender for c in "\r\n<> ") and sender in data["from"]
    # Only the bare addresses, never a display name.
    assert recipients == [split_mailbox(box)[1] for box in (*data["to"], *data["cc"], *data["bcc"])]
    parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
    names = {name.lower() for name in parsed}
    assert names <= MESSAGE_HEADERS | {name.lower() for name in data.get("headers", {})}, names
    assert "bcc" not in names
    assert parsed["Message-ID"] == data["message_id"]
    elsewhere = json.dumps({k: v for k, v in data.items() if k != "bcc"}, ensure_ascii=False).lower()
    for address in (split_mailbox(box)[1] for box in data["bcc"]):
        if address.lower() not in elsewhere:
            for generated in (raw, raw_utf8):
                assert address.lower().encode() not in generated.lower(), (address, generated[:2000])


def assert_webhook_job_deliverable(job_id: str, data: dict, meta: dict) -> None:
    """The body is the Standard Webhooks envelope; it signs and verifies; urllib3 can send the request."""
    assert meta["kind"] == "webhook"
    assert meta["target"]["url"] == data["url"]
    body = json.loads(data["body"])
    assert set(body) == {"type", "timestamp", "data"}
    assert body["type"] == meta["target"]["event_type"]
    assert isinstance(body["data"], dict)
    now = datetime.now(UTC)
    signature = Webhook(WEBHOOK_SECRET).sign(job_id, now, data["body"])
    signed = {"webhook-id": job_id, "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": signature}
    assert Webhook(WEBHOOK_SECRET).verify(data["body"], signed) == body
    # What the worker's urllib3 pool does with the URL and the headers before a byte is sent.
    url = parse_url(data["url"])
    assert url.scheme in ("http", "https") and url.host and url.auth is None
    connection = urllib3.connection.HTTPConnection(url.host.strip("[]"), url.port or 80)
    try:
        connection.putrequest("POST", url.request_uri)
        for name, value in {**data["headers"], "content-type": "application/json", **signed}.items():
            connection.putheader(name, value)
    finally:
        connection.close()
    data["body"].encode("utf-8")


def check_email(data: object, context: dict) -> EmailRequest | None:
    """Validate as the API does; an accepted request must make a deliverable job."""
    try:
        request = EmailRequest.model_validate(data, context=context)
    except ValidationError:
        return None
    job_id, job_data, meta, _ = build_job(CHANNELS["email"], request, datetime.now(UTC), JOB_SETTINGS)
    assert_email_job_deliverable(job_id, round_trip(job_data), round_trip(meta))
    return request


def check_webhook(data: object, context: dict) -> WebhookRequest | None:
    try:
        request = WebhookRequest.model_validate(data, context=context)
    except ValidationError:
        return None
    job_id, job_data, meta, _ = build_job(CHANNELS["webhook"], request, datetime.now(UTC), JOB_SETTINGS)
    job_data, meta = round_trip(job_data), round_trip(meta)
    assert_webhook_job_deliverable(job_id, job_data, meta)
    assert json.loads(job_data["body"])["data"] == request.payload
    return request


def assert_job_deliverable(redis_conn, job_id: str) -> None:
    """The job, as stored, decodes with RQ's JSON serializer and passes the worker-side checks."""
    job = Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer)
    (data,) = job.args
    assert job.func_name == JOB_FUNCTION
    if job.meta["kind"] == "email":
        assert_email_job_deliverable(job_id, data, job.meta)
    else:
        assert_webhook_job_deliverable(job_id, data, job.meta)


def assert_queue_deliverable(redis_conn, queue_settings: Settings) -> int:
    """Every job on the queue is deliverable; return how many there are."""
    job_ids = make_queue(redis_conn, queue_settings).get_job_ids()
    for job_id in job_ids:
        assert_job_deliverable(redis_conn, job_id)
    return len(job_ids)


# --- Property tests over the request models --------------------------------------------------


@FUZZ
@given(data=st.one_of(email_requests, arbitrary_dicts, json_values))
def test_email_model_refuses_or_makes_a_deliverable_job(data):
    check_email(data, GUARDED)


@FUZZ
@given(data=st.one_of(webhook_requests, arbitrary_dicts, json_values), guarded=st.booleans())
def test_webhook_model_refuses_or_makes_a_deliverable_job(data, guarded):
    check_webhook(data, GUARDED if guarded else UNGUARDED)


@FUZZ
@given(data=st.one_of(good_retry, bad_retry, json_values))
def test_retry_policy_refuses_or_gives_a_usable_schedule(data):
    try:
        policy = RetryPolicy.model_validate(data)
    except ValidationError:
        return
    assert policy.max_attempts is None or 1 <= policy.max_attempts <= 20
    assert policy.backoff is None or all(0 <= delay <= 7 * 24 * 3600 for delay in policy.backoff)


@FUZZ
@given(
    attachment=st.one_of(
        mutated(
            {"filename": "a.txt", "content": "aGk="},
            good={"filename": safe_text.filter(bool), "content": base64_content,
                  "content_type": st.sampled_from(CONTENT_TYPES)},
            hostile={
                "filename": broken_text | text,
                "content": text,
                "content_type": st.one_of(
                    st.sampled_from(BAD_CONTENT_TYPES),
                    st.builds(lambda ct, brk, more: ct + brk + more, st.sampled_from(CONTENT_TYPES),
                              st.sampled_from(LINE_BREAKS), st.sampled_from(["", "X-Evil: 1", " x"])),
                    text,
                ),
            },
        ),
        good_attachment,
        bad_attachment,
    ),
    html=st.booleans(),
)
def test_any_accepted_attachment_builds(attachment, html):
    """One attachment mutated on its own, on an otherwise valid email."""
    body = {"to": ["alice@example.com"], "subject": "s", "text": "t", "attachments": [attachment]}
    check_email(body | ({"html": "<p>t</p>"} if html else {}), GUARDED)


@FUZZ
@given(
    content_type=st.one_of(
        st.sampled_from(CONTENT_TYPES + BAD_CONTENT_TYPES),
        st.builds(lambda ct, brk, more: ct + brk + more, st.sampled_from(CONTENT_TYPES), st.sampled_from(LINE_BREAKS),
                  st.sampled_from(["", "X-Evil: 1", " x"])),
        text,
    ),
    filename=st.sampled_from(["a.txt", "ü.pdf", "x" * 255]) | safe_text.filter(bool) | broken_text,
)
def test_any_accepted_content_type_and_filename_build(content_type, filename):
    attachment = {"filename": filename, "content": "aGk=", "content_type": content_type}
    check_email({"to": ["alice@example.com"], "subject": "s", "text": "t", "attachments": [attachment]}, GUARDED)


@FUZZ
@given(payload=good_payloads | bad_payloads | json_values)
def test_any_accepted_payload_makes_a_signed_body(payload):
    check_webhook({"url": "http://127.0.0.1/", "event_type": "e", "payload": payload}, GUARDED)


@FUZZ
@given(
    name=st.sampled_from(BAD_HEADER_NAMES) | good_header_names | text,
    value=safe_text | ascii_values | bad_header_values,
)
def test_any_accepted_custom_header_builds(name, value):
    check_email({"to": ["alice@example.com"], "subject": "s", "text": "t", "headers": {name: value}}, GUARDED)
    check_webhook({"url": "http://127.0.0.1/", "event_type": "e", "payload": {}, "headers": {name: value}}, GUARDED)


@FUZZ
@given(subject=safe_text | text)
def test_any_accepted_subject_builds(subject):
    check_email({"to": ["alice@example.com"], "subject": subject or "s", "text": "t"}, GUARDED)


@FUZZ
@given(sender=good_mailboxes | bad_mailboxes, reply_to=good_mailboxes | bad_mailboxes)
def test_any_accepted_sender_and_reply_to_build(sender, reply_to):
    check_email({"to": ["alice@example.com"], "subject": "s", "text": "t", "from": sender}, GUARDED)
    check_email({"to": ["alice@example.com"], "subject": "s", "text": "t", "reply_to": reply_to}, GUARDED)


@FUZZ
@given(url=good_urls | bad_urls)
def test_any_accepted_url_can_be_sent_to(url):
    for context in (GUARDED, UNGUARDED):
        check_webhook({"url": url, "event_type": "e", "payload": {}}, context)


@pytest.mark.parametrize(
    "url",
    [f"http://{host}/hook" for host in GOOD_HOSTS + NAMED_HOSTS + BAD_HOSTS]
    + [f"https://127.0.0.1{port}{path}" for port in GOOD_PORTS + BAD_PORTS for path in ("/", "")]
    + [f"http://[::1]{port}/{path}" for port in GOOD_PORTS + BAD_PORTS for path in GOOD_PATHS + BAD_PATHS],
)
def test_every_listed_url_part_is_refused_or_can_be_sent_to(url):
    """Each host, port and path the property tests draw from, once, guarded and not."""
    for context in (GUARDED, UNGUARDED):
        check_webhook({"url": url, "event_type": "e", "payload": {}}, context)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"to": ["alice@example.com"], "subject": "s", "text": "t"}, id="minimal"),
        pytest.param(
            {
                "to": ["alice@example.com", "ü@bücher.example"], "cc": ["bob@example.org"],
                "bcc": ["hidden@example.net"], "from": '"Shop, Inc." <shop@example.com>',
                "reply_to": "Ünïcode Name <reply@example.com>", "subject": "Ihre Bestellung \u2013 日本",
                "text": "Danke", "html": "<p>Danke</p>", "headers": {"X-Tag": "é", "Keywords": "a, b"},
                "attachments": [{"filename": "räkning.pdf", "content": base64.b64encode(b"%PDF").decode(),
                                 "content_type": "application/pdf"}],
            },
            id="everything",
        ),
    ],
)
def test_valid_emails_are_accepted_by_the_same_checks(data):
    """The property checks are not vacuous: valid requests get through them."""
    assert check_email(data, GUARDED) is not None


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1/", "https://127.0.0.1:8443/hook?x=1", "http://[::1]/", "http://[::1]:8080/ü"]
)
def test_valid_webhooks_are_accepted_by_the_same_checks(url):
    payload = {"order": 42, "nested": nest(MAX_PAYLOAD_DEPTH - 1), "text": "日本 \u2028", "n": -0.0}
    assert check_webhook({"url": url, "event_type": "order.created", "payload": payload}, GUARDED) is not None


# --- The API, fuzzed -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_settings(settings: Settings) -> Settings:
    """The suite's settings (loopback allowed) on a fresh queue that no worker serves."""
    return dataclasses.replace(settings, queue_name="fuzz-" + uuid.uuid4().hex)


@pytest.fixture(scope="module")
def fuzz_app(fuzz_settings: Settings):
    return create_app(fuzz_settings)


@pytest.fixture(scope="module")
def fuzz_client(fuzz_app):
    return fuzz_app.test_client()


@pytest.fixture(scope="module")
def unguarded_fuzz_client(fuzz_settings: Settings):
    """No allowed networks: only public destinations pass (and nothing resolves here)."""
    return create_app(dataclasses.replace(fuzz_settings, allowed_networks=())).test_client()


class Enqueued:
    """What one request added to the queue and to the job index."""

    def __init__(self, redis_conn, queue_settings: Settings) -> None:
        self.redis = redis_conn
        self.queue = make_queue(redis_conn, queue_settings)
        self.index = Keys(queue_settings.queue_name).index
        self.before = self._ids()

    def _ids(self) -> tuple[set[str], set[str]]:
        indexed = {i.decode() for i in self.redis.zrange(self.index, 0, -1)}
        return set(self.queue.get_job_ids()), indexed

    def added(self) -> tuple[set[str], set[str]]:
        queued, indexed = self._ids()
        return queued - self.before[0], indexed - self.before[1]


def assert_error_shape(response, status: int | None = None) -> dict:
    if status is not None:
        assert response.status_code == status, (response.status_code, response.get_data()[:300])
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] and body["error"]["message"]
    for detail in body["error"]["details"]:
        assert set(detail) == {"field", "problem"} and detail["problem"]
    return body["error"]


def post_and_check(client, redis_conn, queue_settings: Settings, path: str, **kwargs) -> object:
    """POST; assert a 202 that enqueued exactly its own job, or a clear 4xx that enqueued nothing."""
    enqueued = Enqueued(redis_conn, queue_settings)
    response = client.post(path, headers=AUTH, **kwargs)
    queued, indexed = enqueued.added()
    if response.status_code == 202:
        job_id = response.get_json()["id"]
        assert queued == indexed == {job_id}
    else:
        assert response.status_code in (400, 413, 415, 422), (response.status_code, response.get_data()[:500])
        assert_error_shape(response)
        assert queued == indexed == set()
    return response


@FUZZ
@given(
    target=st.one_of(
        st.tuples(st.just("/v1/emails"), st.one_of(email_requests, arbitrary_dicts, json_values)),
        st.tuples(st.just("/v1/webhooks"), st.one_of(webhook_requests, arbitrary_dicts, json_values)),
    )
)
def test_api_answers_any_json_with_one_job_or_a_clear_4xx(fuzz_client, redis_conn, fuzz_settings, target):
    path, body = target
    # json.dumps escapes lone surrogates, so the body is valid UTF-8 that decodes back to them.
    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, path, data=json.dumps(body),
                              content_type="application/json")
    if response.status_code == 202:
        assert_job_deliverable(redis_conn, response.get_json()["id"])


@FUZZ
@given(
    path=st.sampled_from(["/v1/emails", "/v1/webhooks"]),
    raw=st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda prefix, junk, suffix: prefix + junk + suffix,
            st.sampled_from([b'{"to": ["a@example.com"], "subject": "', b'{"url": "http://127.0.0.1/', b"{", b"["]),
            st.binary(max_size=30),
            st.sampled_from([b'", "text": "t"}', b'", "event_type": "e", "payload": {}}', b"", b"}"]),
        ),
    ),
    content_type=st.sampled_from(["application/json", "application/json; charset=latin-1", "text/plain"]),
)
def test_api_answers_any_bytes_with_one_job_or_a_clear_4xx(fuzz_client, redis_conn, fuzz_settings, path, raw,
                                                             content_type):
    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, path, data=raw, content_type=content_type)
    if response.status_code == 202:
        assert_job_deliverable(redis_conn, response.get_json()["id"])


SCHEMATHESIS_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
SEED_EMAIL = {"to": ["alice@example.com"], "bcc": ["hidden@example.com"], "subject": "Hello", "text": "Hi",
              "metadata": {"order": "42"}}
SEED_WEBHOOK = {"url": "http://127.0.0.1:1/hook", "event_type": "order.created", "payload": {"order": 42}}


def operations_of(app) -> dict:
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    return {op.label: op for op in (result.ok() for result in schema.get_all_operations())}


def test_job_views_after_delivery_match_the_openapi_document(burst_worker, receiver):
    """Attempts, errors, targets and recent failures as documented, from jobs a worker really ran."""
    worker = burst_worker()
    app = create_app(worker.settings)
    operations = operations_of(app)
    client = app.test_client()
    ids = [
        client.post("/v1/webhooks", json=SEED_WEBHOOK | {"url": receiver.url()}, headers=AUTH),
        client.post("/v1/webhooks", json=SEED_WEBHOOK | {"url": receiver.url("status/410")}, headers=AUTH),
        client.post("/v1/emails", json=SEED_EMAIL, headers=AUTH),
    ]
    ids = [response.get_json()["id"] for response in ids]
    worker.run()

    views = [
        operations["GET /v1/jobs/{id}"].Case(path_parameters={"id": job_id}).call_and_validate(
            headers=AUTH, checks=SCHEMATHESIS_CHECKS
        ).json()
        for job_id in ids
    ]
    listed = operations["GET /v1/jobs"].Case().call_and_validate(headers=AUTH, checks=SCHEMATHESIS_CHECKS).json()
    stats = operations["GET /v1/stats"].Case().call_and_validate(headers=AUTH, checks=SCHEMATHESIS_CHECKS).json()

    assert [view["status"] for view in views] == ["succeeded", "failed", "succeeded"]
    assert all(len(view["attempts"]) == 1 for view in views)
    assert {job["id"] for job in listed["jobs"]} == set(ids)
    assert [failure["id"] for failure in stats["recent_failures"]] == [ids[1]]


def test_openapi_document_needs_no_key_and_describes_the_models(client):
    response = client.get("/openapi.json")

    assert response.status_code == 200
    document = response.get_json()
    assert document["openapi"].startswith("3.")
    schemas = document["components"]["schemas"]
    assert schemas["EmailRequest"]["properties"]["from"]
    assert set(schemas["WebhookRequest"]["required"]) == {"url", "event_type", "payload"}
    assert document["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    assert document["paths"]["/healthz"]["get"]["security"] == []
    refs = json.dumps(document)
    assert "#/$defs/" not in refs


# --- Huge bodies -----------------------------------------------------------------------------


def test_huge_webhook_body_is_413(fuzz_client, redis_conn, fuzz_settings):
    body = json.dumps({"url": "http://127.0.0.1/", "event_type": "e", "payload": {"x": "a" * (15 * MB)}})

    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, "/v1/webhooks", data=body,
                              content_type="application/json")

    assert assert_error_shape(response, 413)["code"] == "body_too_large"


def test_huge_body_without_content_length_is_413(fuzz_client, redis_conn, fuzz_settings):
    """A chunked upload has no Content-Length to check up front; reading stops at the limit."""
    stream = io.BytesIO(b'{"x": "' + b"a" * (15 * MB + 1) + b'"}')

    response = post_and_check(
        fuzz_client, redis_conn, fuzz_settings, "/v1/emails", input_stream=stream, content_type="application/json",
        environ_overrides={"wsgi.input_terminated": True},
    )

    assert assert_error_shape(response, 413)["code"] == "body_too_large"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/emails", {"to": [f"u{i}@example.com" for i in range(100_000)], "subject": "s", "text": "t"}, "to"),
        ("/v1/emails", {"to": ["a@example.com"], "subject": "s" * 100_000, "text": "t"}, "subject"),
        ("/v1/emails", {"to": ["a@example.com"], "subject": "s", "text": "t", "metadata": {"k": "v" * 5000}},
         "metadata.k"),
        ("/v1/webhooks", {"url": "http://127.0.0.1/" + "x" * 100_000, "event_type": "e", "payload": {}}, "url"),
        ("/v1/webhooks", {"url": "http://127.0.0.1/", "event_type": "e", "payload": {},
                          "headers": {f"X-H{i}": "v" for i in range(10_000)}}, "headers"),
    ],
    ids=["100k-recipients", "100k-subject", "long-metadata", "100k-url", "10k-headers"],
)
def test_oversized_fields_are_422(fuzz_client, redis_conn, fuzz_settings, path, body, field):
    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, path, json=body)

    assert field in [d["field"] for d in assert_error_shape(response, 422)["details"]]


# --- Deeply nested JSON ----------------------------------------------------------------------


def nested_text(depth: int, container: str) -> str:
    opening, closing = ('{"a":', "}") if container == "dict" else ("[", "]")
    return opening * depth + "1" + closing * depth


@pytest.mark.parametrize("container", ["dict", "list"])
@pytest.mark.parametrize("depth", [100_000, 5000, 1000])
def test_deeply_nested_body_is_400(fuzz_client, redis_conn, fuzz_settings, container, depth):
    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, "/v1/webhooks",
                              data=nested_text(depth, container), content_type="application/json")

    assert assert_error_shape(response, 400)["code"] == "malformed_json"


def post_nested_payload(client, redis_conn, queue_settings: Settings, depth: int, container: str) -> tuple:
    body = '{"url": "http://127.0.0.1/", "event_type": "e", "payload": {"a": ' + nested_text(depth - 1, container)
    response = post_and_check(client, redis_conn, queue_settings, "/v1/webhooks", data=body + "}}",
                              content_type="application/json")
    error = assert_error_shape(response)
    return response.status_code, error["code"], [d["field"] for d in error["details"]]


@pytest.mark.parametrize("container", ["dict", "list"])
@pytest.mark.parametrize("depth", [MAX_PAYLOAD_DEPTH + 1, 500, 5000, 100_000])
def test_deeply_nested_payload_is_a_clear_4xx(fuzz_client, redis_conn, fuzz_settings, container, depth):
    """Past the payload depth limit: 422 on `payload`, or 400 where the JSON parser itself gives up."""
    answer = post_nested_payload(fuzz_client, redis_conn, fuzz_settings, depth, container)

    assert answer in ((422, "validation_error", ["payload"]), (400, "malformed_json", []))


@pytest.mark.parametrize("container", ["dict", "list"])
def test_no_nesting_depth_near_the_recursion_limit_is_a_500(fuzz_client, redis_conn, fuzz_settings, container):
    """Regression: at one depth just under the recursion limit (943 levels here) the body parsed, but
    json.dumps of the webhook body, a few frames deeper, hit the limit: 500. Every depth around it, once."""
    for depth in range(850, 1050):
        status, code, _ = post_nested_payload(fuzz_client, redis_conn, fuzz_settings, depth, container)

        assert (status, code) in ((422, "validation_error"), (400, "malformed_json")), depth


def test_payload_at_the_depth_limit_is_accepted_and_decodes(fuzz_client, redis_conn, fuzz_settings):
    body = {"url": "http://127.0.0.1/", "event_type": "e", "payload": nest(MAX_PAYLOAD_DEPTH)}

    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, "/v1/webhooks", json=body)

    assert response.status_code == 202
    job = Job.fetch(response.get_json()["id"], connection=redis_conn, serializer=JSONSerializer)
    assert json.loads(job.args[0]["body"])["data"] == nest(MAX_PAYLOAD_DEPTH)


@pytest.mark.parametrize("depth", [100, 5000])
def test_deeply_nested_values_in_flat_fields_are_422(fuzz_client, redis_conn, fuzz_settings, depth):
    body = '{"to": ["a@example.com"], "subject": "s", "text": "t", "metadata": {"k": ' + nested_text(depth, "list")
    body += "}}"

    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, "/v1/emails", data=body,
                              content_type="application/json")

    assert response.status_code in (400, 422)
    assert_error_shape(response)


# --- Not JSON, or JSON that JSON cannot carry ------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"to": ["a@example.com"], "subject": "\xc0\xafx", "text": "t"}',  # overlong encoding
        b'{"to": ["a@example.com"], "subject": "\xed\xa0\x80", "text": "t"}',  # an encoded surrogate
        b'{"to": ["a@example.com"], "subject": "caf\xe9", "text": "t"}',  # Latin-1
        b'{"to": ["a@example.com"], "subject": "\xe2\x82", "text": "t"}',  # truncated sequence
        '{"to": ["a@example.com"], "subject": "s", "text": "t"}'.encode("utf-16"),
    ],
    ids=["overlong", "surrogate", "latin-1", "truncated", "utf-16"],
)
def test_invalid_utf8_is_400(fuzz_client, redis_conn, fuzz_settings, raw):
    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, "/v1/emails", data=raw,
                              content_type="application/json; charset=latin-1")

    assert assert_error_shape(response, 400)["code"] == "malformed_json"


@pytest.mark.parametrize(
    "number", ["1" * 5000, "-" + "9" * 4301, "1e400", "NaN", "-Infinity"], ids=["5000-digits", "4301-digits",
                                                                             "1e400", "NaN", "-Infinity"]
)
def test_numbers_json_cannot_carry_are_a_clear_4xx(fuzz_client, redis_conn, fuzz_settings, number):
    """Regression: a 5000-digit integer made json.loads raise ValueError, answered 500; NaN and 1e400 (inf)
    were accepted into a webhook body that is not valid JSON."""
    body = '{"url": "http://127.0.0.1/", "event_type": "e", "payload": {"n": ' + number + "}}"

    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, "/v1/webhooks", data=body,
                              content_type="application/json")

    error = assert_error_shape(response)
    assert response.status_code in (400, 422)
    if response.status_code == 422:
        assert [d["field"] for d in error["details"]] == ["payload.n"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"url": "http://127.0.0.1/", "event_type": "e", "payload": {"s": "\\ud800"}}', "payload.s"),
        ('{"url": "http://127.0.0.1/", "event_type": "e", "payload": {"a": [1, "\\udfff"]}}', "payload.a.1"),
        ('{"url": "http://127.0.0.1/", "event_type": "e", "payload": {"\\ud800": 1}}', "payload"),
    ],
    ids=["value", "in-list", "key"],
)
def test_lone_surrogates_in_payload_are_422(fuzz_client, redis_conn, fuzz_settings, body, field):
    """Regression: valid JSON escapes for lone surrogates made a body the worker could neither sign nor send."""
    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, "/v1/webhooks", data=body,
                              content_type="application/json")

    assert [d["field"] for d in assert_error_shape(response, 422)["details"]] == [field]


def test_lone_surrogate_in_subject_is_422(fuzz_client, redis_conn, fuzz_settings):
    body = '{"to": ["a@example.com"], "subject": "\\ud800", "text": "t"}'

    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, "/v1/emails", data=body,
                              content_type="application/json")

    assert [d["field"] for d in assert_error_shape(response, 422)["details"]] == ["subject"]


# --- Header injection ------------------------------------------------------------------------

EMAIL = {"to": ["alice@example.com"], "subject": "Hello", "text": "Hi"}
WEBHOOK = {"url": "http://127.0.0.1:1/hook", "event_type": "order.created", "payload": {"order": 42}}
#: Line breaks to the email package (str.splitlines) that are not CR or LF.
UNICODE_BREAKS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("brk", UNICODE_BREAKS, ids=[f"U+{ord(c):04X}" for c in UNICODE_BREAKS])
@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda brk: EMAIL | {"subject": f"Hi{brk}Bcc: evil@example.com"}, "subject"),
        (lambda brk: EMAIL | {"from": f"Eve{brk}Bcc: x <eve@example.com>"}, "from"),
        (lambda brk: EMAIL | {"reply_to": f"Eve{brk} <eve@example.com>"}, "reply_to"),
        (lambda brk: EMAIL | {"headers": {"X-Tag": f"a{brk}Bcc: evil@example.com"}}, "headers.X-Tag"),
        (lambda brk: EMAIL | {"attachments": [{"filename": f"a{brk}.txt", "content": ""}]},
         "attachments.0.filename"),
        (lambda brk: WEBHOOK | {"headers": {"X-Tenant": f"a{brk}X-Evil: 1"}}, "headers.X-Tenant"),
    ],
    ids=["subject", "from-name", "reply-to-name", "email-header", "filename", "webhook-header"],
)
def test_unicode_line_breaks_are_header_injection_422(fuzz_client, redis_conn, fuzz_settings, make, field, brk):
    """Regression: the email package splits header values on every str.splitlines() break, so these
    were accepted and then failed in the worker ("Header values may not contain linefeed ...")."""
    body = make(brk)
    path = "/v1/webhooks" if "url" in body else "/v1/emails"

    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, path, json=body)

    assert [d["field"] for d in assert_error_shape(response, 422)["details"]] == [field]


@pytest.mark.parametrize(
    "content_type",
    ["text/plain\r\nBcc: evil@example.com", "text/plain; name=x", "x text/plain", "text/plain\n", "text/plaiñ"],
)
def test_attachment_content_type_must_be_exactly_type_slash_subtype(fuzz_client, redis_conn, fuzz_settings,
                                                                     content_type):
    """Regression: the pattern matched anywhere in the value, so CR/LF got through and crashed the worker."""
    body = EMAIL | {"attachments": [{"filename": "a.txt", "content": "", "content_type": content_type}]}

    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, "/v1/emails", json=body)

    assert [d["field"] for d in assert_error_shape(response, 422)["details"]] == ["attachments.0.content_type"]


@pytest.mark.parametrize("name", ["Content-ID", "content-language", "Content-Description"])
def test_email_content_headers_are_refused(fuzz_client, redis_conn, fuzz_settings, name):
    """README: `Content-*` headers are Dispatcher's own; the message builder would silently drop them."""
    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, "/v1/emails",
                              json=EMAIL | {"headers": {name: "x"}})

    assert [d["field"] for d in assert_error_shape(response, 422)["details"]] == [f"headers.{name}"]


@pytest.mark.parametrize("name", ["Resent-Bcc", "resent-from", "Resent-To", "Resent-Sender", "Resent-Date"])
def test_email_resent_headers_are_refused(fuzz_client, redis_conn, fuzz_settings, name):
    """Regression: the email package parses Resent-* as addresses; a value like `<` crashed the worker."""
    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, "/v1/emails",
                              json=EMAIL | {"headers": {name: "<"}})

    assert [d["field"] for d in assert_error_shape(response, 422)["details"]] == [f"headers.{name}"]


def test_email_header_names_fit_a_mail_header_line(fuzz_client, redis_conn, fuzz_settings):
    """Regression: a 78-character name with an empty value crashed the email package's folding."""
    too_long = post_and_check(fuzz_client, redis_conn, fuzz_settings, "/v1/emails",
                              json=EMAIL | {"headers": {"X" * 77: ""}})
    longest = post_and_check(fuzz_client, redis_conn, fuzz_settings, "/v1/emails",
                             json=EMAIL | {"headers": {"X" * 76: ""}})
    webhook = post_and_check(fuzz_client, redis_conn, fuzz_settings, "/v1/webhooks",
                             json=WEBHOOK | {"headers": {"X" * 100: ""}})

    assert [d["field"] for d in assert_error_shape(too_long, 422)["details"]] == ["headers." + "X" * 77]
    assert longest.status_code == 202
    assert webhook.status_code == 202
    assert_job_deliverable(redis_conn, longest.get_json()["id"])
    assert_job_deliverable(redis_conn, webhook.get_json()["id"])


def test_email_from_an_idn_domain_gets_an_ascii_message_id():
    """Regression: the Message-ID took the sender's domain as it was, and as_bytes() failed on `bücher`."""
    request = EmailRequest.model_validate({"to": ["a@example.com"], "from": "Shop <shop@bücher.example>",
                                           "subject": "s", "text": "t"}, context=GUARDED)

    job_id, data, _, _ = build_job(CHANNELS["email"], request, datetime.now(UTC), JOB_SETTINGS)

    assert data["message_id"] == f"<{job_id}@xn--bcher-kva.example>"
    assert f"Message-ID: <{job_id}@xn--bcher-kva.example>".encode() in build_message(data).as_bytes()


@pytest.mark.parametrize("value", ["€", "日本", "a\x01b", "a\x7fb", "\ud800"])
def test_webhook_header_values_must_be_sendable(fuzz_client, redis_conn, fuzz_settings, value):
    """Regression: HTTP/1.1 headers go out as Latin-1; a value like "€" was accepted and then failed in the worker."""
    body = json.dumps(WEBHOOK | {"headers": {"X-Tenant": value}})

    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, "/v1/webhooks", data=body,
                              content_type="application/json")

    assert [d["field"] for d in assert_error_shape(response, 422)["details"]] == ["headers.X-Tenant"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (EMAIL | {"to": ["alice@example.com\u2028Bcc: evil@example.com"]}, "to.0"),
        (EMAIL | {"cc": ["a@example.com>, evil@example.com"]}, "cc.0"),
        (EMAIL | {"bcc": ["a@example.com\x00"]}, "bcc.0"),
        (EMAIL | {"from": "Eve <eve@example.com>, evil@example.com"}, "from"),
        (EMAIL | {"from": "Eve <eve@example.com> <x@example.com>"}, "from"),
        (EMAIL | {"reply_to": '"Eve" <eve@example.com>\r\n'}, "reply_to"),
        (EMAIL | {"headers": {"X-Tag\r\nBcc": "evil@example.com"}}, "headers.X-Tag\r\nBcc"),
        (EMAIL | {"headers": {"Bcc": "evil@example.com"}}, "headers.Bcc"),
        (WEBHOOK | {"headers": {"X-A\nHost": "evil"}}, "headers.X-A\nHost"),
        (WEBHOOK | {"event_type": "order.created\r\nX-Evil: 1"}, "event_type"),
    ],
    ids=["to-u2028", "cc-list", "bcc-nul", "from-list", "from-two-addrs", "reply-to-crlf", "email-header-name",
         "bcc-header", "webhook-header-name", "event-type-crlf"],
)
def test_header_injection_in_addresses_and_names_is_422(fuzz_client, redis_conn, fuzz_settings, body, field):
    path = "/v1/webhooks" if "url" in body else "/v1/emails"

    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, path, json=body)

    assert field in [d["field"] for d in assert_error_shape(response, 422)["details"]]


# --- Odd URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://user@127.0.0.1/", "http://:@127.0.0.1/", "https://u:p@[::1]/", "http://a%40b@127.0.0.1/",
        "http://127.0.0.1:65536/", "http://127.0.0.1:-1/", "http://127.0.0.1:8o/", "http://127.0.0.1:٨٠/",
        "http://[::1/", "http://[zz]/", "http://::1/", "http://[::1]]/", "http://[::1]:0/",
        "http://☃.example/", "http://xn--zz.example/", "http://a..example/", "http://" + "x" * 64 + ".example/",
        "http://a%0a.example/", "http://127.0.0.1%00.example/", "http://\\127.0.0.1/", "http://127.0.0.1\\.x/",
        "http://127.0.0.1/a\\b",
    ],
)
def test_odd_webhook_urls_are_422_on_url(fuzz_client, redis_conn, fuzz_settings, url):
    """Credentials, out-of-range or non-ASCII ports, broken IPv6 literals and invalid IDN hosts; the test app
    allows loopback, so none of these is refused for its address."""
    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, "/v1/webhooks", json=WEBHOOK | {"url": url})

    assert [d["field"] for d in assert_error_shape(response, 422)["details"]] == ["url"]


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1]/", "http://[::1]:8080/hook", "http://[2001:db8::1]:8080/", "http://[::ffff:10.0.0.1]/",
        "http://[fe80::1%25eth0]/", "http://[::]/", "http://[fc00::1]/", "http://[2002:7f00:1::]/",
        "http://[ff02::1]/", "http://bücher.example/", "http://xn--bcher-kva.example/", "http://faß.example/",
        "http://127.1/", "http://2130706433/", "http://0x7f.0.0.1/",
    ],
)
def test_non_public_or_unresolvable_destinations_are_422_on_url(unguarded_fuzz_client, redis_conn, fuzz_settings,
                                                                 url):
    """With no allowed networks: IPv6 literals of loopback, documentation, mapped, link-local, unique-local,
    6to4 and multicast addresses, IDN hosts that do not resolve, and IPv4 shorthand for loopback."""
    response = post_and_check(unguarded_fuzz_client, redis_conn, fuzz_settings, "/v1/webhooks",
                              json=WEBHOOK | {"url": url})

    error = assert_error_shape(response, 422)
    assert [d["field"] for d in error["details"]] == ["url"]
    assert "destination refused" in error["details"][0]["problem"]


@pytest.mark.parametrize(
    ("url", "host"),
    [("http://bücher.example/x", "xn--bcher-kva.example"), ("http://faß.example/", "xn--fa-hia.example")],
)
def test_idn_host_is_checked_as_the_worker_will_send_it(url, host):
    """The guard must judge the host urllib3 connects to: IDNA 2008, where faß is not fass (IDNA 2003)."""
    assert parse_webhook_url(url) == (host, 80)
    assert parse_url(url).host == host


def test_allowed_ipv6_literal_is_accepted_and_decodes(fuzz_client, redis_conn, fuzz_settings):
    response = post_and_check(fuzz_client, redis_conn, fuzz_settings, "/v1/webhooks",
                              json=WEBHOOK | {"url": "http://[::1]:8080/hook"})

    assert response.status_code == 202
    assert_job_deliverable(redis_conn, response.get_json()["id"])


def test_request_line_of_any_accepted_path_is_sendable():
    """Non-ASCII in the path is percent-encoded by urllib3 before http.client sees it."""
    request = WebhookRequest.model_validate(
        {"url": "http://127.0.0.1/ü?q=é", "event_type": "e", "payload": {}}, context=GUARDED
    )
    request_uri = parse_url(request.url).request_uri
    connection = http.client.HTTPConnection("127.0.0.1", 9)

    connection.putrequest("POST", request_uri)  # raises on what http.client cannot send

    connection.close()
    assert request_uri == "/%C3%BC?q=%C3%A9"


def test_every_job_this_module_enqueued_is_deliverable(redis_conn, fuzz_settings):
    """Last: whatever the tests above got accepted on the module's queue, read back from Redis once more."""
    assert_queue_deliverable(redis_conn, fuzz_settings)
