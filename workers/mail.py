"""Build the MIME message for an email job. Bcc recipients never appear in it.

Job data sits in Redis, where anybody with access to Redis can write it: everything is
checked again here, and a job that does not hold what the API writes fails for good
(PermanentDeliveryError naming the field). Every header value from the job is encoded by
`workers.headers`; bodies go in 7-bit-clean transfer encodings (7bit, quoted-printable or
base64), so no server needs 8BITMIME for them.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import math
import re
from collections.abc import Callable
from email.message import EmailMessage, MIMEPart
from email.utils import formatdate
from typing import Any, cast

from dispatcher.addresses import AddressError, split_mailbox, validate_address, wire_address
from dispatcher.channels.email import RESERVED_EMAIL_HEADERS, attachment_type_problem
from dispatcher.models import HEADER_NAME, MAX_EMAIL_HEADER_NAME
from workers import headers
from workers.errors import PermanentDeliveryError

#: The Message-ID Dispatcher writes (dispatcher.enqueue.email_job): the job id at an ASCII domain.
MESSAGE_ID = re.compile(r"<(?P<job_id>em_[0-9a-f]{32})@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?>")
#: Dates from 1970 to 9999: what formatdate and every mail program can show.
_LATEST_DATE = 253402300799
#: Bodies are never 8bit: with cte_type "7bit" the email package picks 7bit, quoted-printable or base64.
POLICY = email.policy.default.clone(cte_type="7bit")
#: An internationalized address in a header: the message can only go with SMTPUTF8 (RFC 6532).
UTF8_POLICY = POLICY.clone(utf8=True)
#: Control characters a 7bit body must not carry as they are (line breaks aside).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def job_id_of(message_id: object) -> str:
    """The job id in a Message-ID of Dispatcher's form; PermanentDeliveryError for anything else."""
    match = MESSAGE_ID.fullmatch(message_id) if isinstance(message_id, str) else None
    if match is None:
        raise PermanentDeliveryError(f"invalid job data: message_id {str(message_id)[:100]!r} is invalid")
    return match["job_id"]


def build_message(data: dict) -> EmailMessage:
    """The message as sent: stable Message-ID and Date, multipart/alternative for text+html, attachments."""
    message_id = data.get("message_id")
    job_id_of(message_id)
    sender = _mailbox(data, "from")
    reply_to = _mailbox(data, "reply_to") if data.get("reply_to") is not None else None
    to = _mailboxes(data, "to", required=True)
    cc = _mailboxes(data, "cc")
    fields = [
        _address_field("From", [sender]),
        _address_field("To", to),
        *([_address_field("Cc", cc)] if cc else []),
        *([_address_field("Reply-To", [reply_to])] if reply_to else []),
        _text_field("Subject", _string(data, "subject")),
        headers.Field("Date", [f"Date: {formatdate(_date(data), usegmt=True)}"]),
        headers.Field("Message-ID", [f"Message-ID: {message_id}"]),
    ]
    for name, value in _extra_headers(data).items():
        fields.append(_text_field(name, value))
    msg = EmailMessage(policy=UTF8_POLICY if any(f.needs_utf8 for f in fields) else POLICY)
    for field in fields:
        msg[field.name] = field
    # msg.policy is POLICY or UTF8_POLICY, both EmailPolicy; the stubs only know it as a Policy.
    policy = cast(email.policy.EmailPolicy, msg.policy)
    body = _body(data, policy)
    attachments = [_attachment(data, index, policy) for index in range(len(_list(data, "attachments")))]
    if not attachments:
        _adopt(msg, body)
        return msg
    msg.make_mixed()
    msg.attach(body)  # type: ignore[arg-type]  # typeshed: EmailMessage.attach takes any MIMEPart at runtime
    for part in attachments:
        msg.attach(part)  # type: ignore[arg-type]  # as above
    msg["MIME-Version"] = "1.0"
    return msg


def envelope(data: dict) -> tuple[str, list[str]]:
    """The SMTP envelope: the sender's bare address and every recipient's, Bcc included, as the API
    normalized them, never a display name (the SMTP transport writes their domains as A-labels)."""
    sender = _address(split_mailbox(_string(data, "from"))[1], "from", validate_address)
    recipients = [_mailboxes(data, field, field == "to", validate_address) for field in ("to", "cc", "bcc")]
    return sender, [address for boxes in recipients for _, address in boxes]


def utf8_addresses(message: EmailMessage, sender: str, recipients: list[str]) -> list[str]:
    """The addresses of the envelope and the headers that only SMTPUTF8 can carry."""
    named = [a for field in message.values() if isinstance(field, headers.Field) for a in field.addresses]
    return list(dict.fromkeys(a for a in (sender, *recipients, *named) if not a.isascii()))


# --- Job data, checked ------------------------------------------------------------------------


def _invalid(field: str, problem: str) -> PermanentDeliveryError:
    return PermanentDeliveryError(f"invalid job data: {field} {problem}")


def _string(data: dict, field: str) -> str:
    value = data.get(field)
    if not isinstance(value, str):
        raise _invalid(field, "must be a string")
    return value


def _list(data: dict, field: str) -> list:
    value = data.get(field, [])
    if not isinstance(value, list):
        raise _invalid(field, "must be a list")
    return value


def _address(value: Any, field: str, form: Callable[[str], str] = wire_address) -> str:
    """`value` checked as an address, in `form`: `wire_address` (A-label domain) or `validate_address`."""
    if not isinstance(value, str):
        raise _invalid(field, "must be a string")
    try:
        return form(value)
    except AddressError as exc:
        raise _invalid(field, f"is not a valid address: {exc}") from None


def _mailboxes(
    data: dict, field: str, required: bool = False, form: Callable[[str], str] = wire_address
) -> list[tuple[str, str]]:
    """A list of `addr` or `Name <addr>` as (display name, address in `form`) pairs."""
    values = _list(data, field)
    if required and not values:
        raise _invalid(field, "must hold at least one address")
    boxes = []
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise _invalid(f"{field}.{index}", "must be a string")
        name, addr = split_mailbox(value)
        boxes.append((name, _address(addr, f"{field}.{index}", form)))
    return boxes


def _mailbox(data: dict, field: str) -> tuple[str, str]:
    name, addr = split_mailbox(_string(data, field))
    return name, _address(addr, field)


def _address_field(name: str, boxes: list[tuple[str, str]]) -> headers.Field:
    try:
        return headers.mailboxes(name, boxes)
    except headers.HeaderEncodingError as exc:  # a display name with a lone surrogate, written to Redis
        raise _invalid(name, str(exc)) from None


def _date(data: dict) -> float:
    value: Any = data.get("date")  # an int or float once the check below passes
    if type(value) not in (int, float) or not math.isfinite(value) or not 0 <= value <= _LATEST_DATE:
        raise _invalid("date", "must be a Unix time in seconds")
    return value


def _text_field(name: str, value: str) -> headers.Field:
    try:
        return headers.unstructured(name, value)
    except headers.HeaderEncodingError as exc:
        raise _invalid(name, str(exc)) from None


def _extra_headers(data: dict) -> dict[str, str]:
    value = data.get("headers", {})
    if not isinstance(value, dict):
        raise _invalid("headers", "must be an object")
    for name, text in value.items():
        lowered = name.lower()
        if (
            not HEADER_NAME.fullmatch(name)
            or len(name) > MAX_EMAIL_HEADER_NAME
            or lowered in RESERVED_EMAIL_HEADERS
            or lowered.startswith(("content-", "resent-"))
        ):
            raise _invalid(f"headers.{name[:100]}", "is not a header name the API accepts")
        if not isinstance(text, str):
            raise _invalid(f"headers.{name}", "must be a string")
    return value


# --- The MIME tree ----------------------------------------------------------------------------


def _body(data: dict, policy: email.policy.EmailPolicy) -> MIMEPart:
    text, html = data.get("text"), data.get("html")
    for field, value in (("text", text), ("html", html)):
        if value is not None and not isinstance(value, str):
            raise _invalid(field, "must be a string")
    if text is None and html is None:
        raise _invalid("text", "or html must be given")
    parts = [
        _text_part(body, subtype, policy) for body, subtype in ((text, "plain"), (html, "html")) if body is not None
    ]
    if len(parts) == 1:
        return parts[0]
    alternative = MIMEPart(policy=policy)
    alternative.make_alternative()
    for part in parts:
        alternative.attach(part)
    return alternative


def _text_part(body: str, subtype: str, policy: email.policy.EmailPolicy) -> MIMEPart:
    part = MIMEPart(policy=policy)
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid("html" if subtype == "html" else "text", "is not valid Unicode (a lone surrogate)") from None
    # Heuristics pick 7bit for short ASCII lines; control characters are not for a 7bit body.
    part.set_content(body, subtype=subtype, cte="quoted-printable" if _CONTROL.search(body) else None)
    return part


def _attachment(data: dict, index: int, policy: email.policy.EmailPolicy) -> MIMEPart:
    item = data["attachments"][index]
    field = f"attachments.{index}"
    if not isinstance(item, dict):
        raise _invalid(field, "must be an object")
    filename, content_type, content = item.get("filename"), item.get("content_type"), item.get("content")
    if not isinstance(filename, str) or not 1 <= len(filename) <= 255:
        raise _invalid(f"{field}.filename", "must be a string of 1-255 characters")
    problem = attachment_type_problem(content_type) if isinstance(content_type, str) else "must be a string"
    if problem:
        raise _invalid(f"{field}.content_type", problem)
    try:
        raw = base64.b64decode(content, validate=True) if isinstance(content, str) else None
    except (binascii.Error, ValueError):
        raw = None
    if raw is None:
        raise _invalid(f"{field}.content", "must be base64")
    try:
        disposition = headers.attachment_disposition(filename)
    except headers.HeaderEncodingError as exc:
        raise _invalid(f"{field}.filename", str(exc)) from None
    maintype, _, subtype = cast(str, content_type).partition("/")  # a str, or `problem` was set above
    part = MIMEPart(policy=policy)
    part.set_content(raw, maintype=maintype, subtype=subtype)
    part["Content-Disposition"] = disposition
    return part


def _adopt(msg: EmailMessage, part: MIMEPart) -> None:
    """Make `part`'s content the whole message's, after the message's own headers."""
    for name, value in part.raw_items():
        msg[name] = value
    msg.set_payload(part.get_payload())
    if "MIME-Version" not in msg:
        msg["MIME-Version"] = "1.0"
