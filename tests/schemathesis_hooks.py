"""What the OpenAPI document cannot spell out, told to `schemathesis run` (tests/test_openapi_contract.py).

Every other value comes from the document alone.

- `mailbox` (`from`, `reply_to` and each of `to`, `cc`, `bcc`): the document's own format, `addr`
  or `Display Name <addr>`;
  JSON Schema has no format for it, so schemathesis would draw any string containing an `@`.
- `iri` (a webhook's `url`): valid only if its host resolves to addresses the network guard
  allows, which depends on the deployment. The test service allows loopback (conftest's
  service_env) and has no DNS to the internet: its valid destinations are loopback addresses.
  No worker serves the test's queue, so nothing is sent to them.
- `date-time` (`send_at`): valid only from a minute ago to 30 days ahead of the moment the request
  arrives, which JSON Schema cannot say; the run draws times from 5 minutes to 29 days ahead (a case
  drawn early may be sent a minute or more later on a loaded machine).
- An email's `to`, `cc` and `bcc` hold at most MAX_RECIPIENTS addresses together: JSON Schema
  cannot add up the lengths of three arrays, so the document says it in words and the run leaves
  out the requests that break it (tests/test_api.py checks that rule). In a template batch each
  recipient's `to` and `cc` count with the batch's `bcc`.
- A template batch's `template` parts are Jinja2: JSON Schema has no grammar for it, so the run
  leaves out templates with `{` or `}` (tests/test_templates.py tries templates of every kind), and
  a `template_id` must name a stored template, which the document cannot know: the run leaves out
  emails, batches and batch items that give one.
- An email's `application` must name an existing application, which the document cannot know
  either: the run leaves out emails, batches and batch items that give one (tests/test_email_events.py
  checks both answers).
"""

from __future__ import annotations

import re
import string
import uuid
from datetime import UTC, datetime, timedelta, timezone

import schemathesis
from hypothesis import strategies as st

from dispatcher.channels.email import MAX_RECIPIENTS
from dispatcher.idempotency import HEADER, KEY_PATTERN

_atom = st.text(string.ascii_lowercase + string.digits + "!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=8)
_label = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=8)
addresses = st.builds("{}@{}.{}".format, _atom, _label, st.sampled_from(["com", "org", "example", "test"]))
#: A display name: any text but line breaks, controls and the characters that delimit an address.
display_names = st.text(
    st.characters(exclude_categories=("Cs", "Cc", "Zl", "Zp"), exclude_characters='<>"\x85'), min_size=1, max_size=20
)
mailboxes = addresses | st.builds("{} <{}>".format, display_names, addresses)

_path = st.text(string.ascii_letters + string.digits + "-._~/%", max_size=20).map(lambda path: path.replace("%", "%25"))
loopback_urls = st.builds(
    "{}://{}:{}/{}".format,
    st.sampled_from(["http", "https", "HTTP"]),
    st.sampled_from(["127.0.0.1", "127.1.2.3", "[::1]"]),
    st.integers(1, 65535),
    _path,
)

#: Times to send at: 5 minutes to 29 days ahead, with an offset (a time zone east or west of UTC).
send_times = st.builds(
    lambda ahead, offset: (datetime.now(UTC) + timedelta(seconds=ahead)).astimezone(offset).isoformat(),
    st.integers(300, 29 * 24 * 3600),
    st.sampled_from([UTC, timezone(timedelta(hours=-8)), timezone(timedelta(hours=5, minutes=30))]),
)

schemathesis.openapi.format("mailbox", mailboxes)
schemathesis.openapi.format("iri", loopback_urls)
schemathesis.openapi.format("date-time", send_times)


def _recipients(message: object) -> int:
    if not isinstance(message, dict):
        return 0
    return sum(len(message[field]) for field in ("to", "cc", "bcc") if isinstance(message.get(field), list))


def _past_send_at(body: object) -> bool:
    value = body.get("send_at") if isinstance(body, dict) else None
    if not isinstance(value, str):
        return False
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return False  # not a time at all: the document says so, and the API must refuse it
    return moment.tzinfo is not None and moment < datetime.now(UTC) + timedelta(minutes=5)


@schemathesis.hook
def filter_case(context: schemathesis.HookContext, case: schemathesis.Case) -> bool:
    """Leave out an email, or a batch item, with more recipients than the document can describe;
    and any request whose `send_at` is a time already past or about to be (the stateful phase
    carries times from answers, `created_at` say, into later requests)."""
    if _past_send_at(case.body):
        return False
    if case.operation.path.startswith("/v1/templates"):
        parts = case.body.values() if isinstance(case.body, dict) else ()
        return not any(isinstance(part, str) and ("{" in part or "}" in part) for part in parts)
    if not case.operation.path.startswith("/v1/emails"):
        return True
    body = case.body if isinstance(case.body, dict) else {}
    items = body.get("items") if case.operation.path.endswith("/batch") else [body]
    messages = [body, *(items if isinstance(items, list) else [])]
    # (Fields that must name something stored: a template, an application.)
    if any(isinstance(message, dict) and message.keys() & {"template_id", "application"} for message in messages):
        return False
    if isinstance(body.get("recipients"), list) and case.operation.path.endswith("/batch"):
        bcc = body.get("bcc") if isinstance(body.get("bcc"), list) else []
        items = [r | {"bcc": bcc} for r in body["recipients"] if isinstance(r, dict)]
        template = body.get("template")
        parts = template.values() if isinstance(template, dict) else ()
        if any(isinstance(part, str) and ("{" in part or "}" in part) for part in parts):
            return False
    return all(_recipients(item) <= MAX_RECIPIENTS for item in (items if isinstance(items, list) else []))


@schemathesis.hook
def map_headers(context: schemathesis.HookContext, headers: dict | None) -> dict | None:
    """Every valid Idempotency-Key made unique to its case: the run draws few distinct keys (`0`,
    `A`...), and one used for another request is a 409 for 24 h, so every POST after the first few
    would meet a conflict and never reach the operation itself (tests/test_idempotency.py tries keys
    used twice)."""
    if headers and isinstance(headers.get(HEADER), str) and re.fullmatch(KEY_PATTERN, headers[HEADER]):
        headers[HEADER] = f"{headers[HEADER][:200]}-{uuid.uuid4().hex}"
    return headers
