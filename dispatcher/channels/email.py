"""The email channel, what to send: the request, the payload a job carries, its description.

The worker's side (building the MIME message, SMTP or the outbox) is `workers.channels.email`.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from typing import Annotated

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
    with_config,
)
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

from dispatcher.addresses import AddressError, split_mailbox, wire_address
from dispatcher.channels import PAYLOAD_VERSION, Channel, JobParts
from dispatcher.config import Settings
from dispatcher.errors import FieldProblem
from dispatcher.models import (
    MAX_BATCH,
    MAX_EMAIL_HEADER_NAME,
    NO_LINE_BREAKS,
    EmailAddress,
    Mailbox,
    Metadata,
    RequestModel,
    RetryPolicy,
    SafeStr,
    SendBatch,
    SendRequest,
    _check_headers,
    case_insensitive,
    header_name_pattern,
    headers_schema,
    resolve_retry,
)

NAME = "email"

MAX_RECIPIENTS = 50
MAX_ATTACHMENT_BYTES = 10 * 1024 * 1024
_CONTENT_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*/[A-Za-z0-9][A-Za-z0-9_.+-]*$")

#: Header names the email builder sets itself, from the request's own fields.
RESERVED_EMAIL_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "sender",
    }
)



def attachment_type_problem(value: str) -> str | None:
    """What is wrong with an attachment's content type, or None; the worker checks job data with it too."""
    if len(value) > 255 or not _CONTENT_TYPE.fullmatch(value):
        return "must be a MIME type, type/subtype"
    if value.partition("/")[0].lower() in ("multipart", "message"):
        # A multipart attachment would need a boundary and a message/* one 7bit or 8bit content
        # (RFC 2046); attachments go as base64. Send such content as application/octet-stream.
        return "must not be multipart/* or message/* (send it as application/octet-stream)"
    return None


def _attachment_type(value: str) -> str:
    problem = attachment_type_problem(value)
    if problem:
        raise ValueError(problem)
    return value


#: The document's pattern for a content type: _CONTENT_TYPE, and neither multipart/* nor message/*.
_CONTENT_TYPE_SCHEMA = (
    f"^(?!{case_insensitive('multipart/')}|{case_insensitive('message/')}){_CONTENT_TYPE.pattern.removeprefix('^')}"
)
#: Standard base64 with its padding, what b64decode(validate=True) accepts.
_BASE64 = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


class Attachment(RequestModel):
    filename: Annotated[SafeStr, StringConstraints(min_length=1, max_length=255)]
    content_type: Annotated[
        str,
        StringConstraints(max_length=255, pattern=_CONTENT_TYPE.pattern),
        AfterValidator(_attachment_type),
        Field(json_schema_extra={"pattern": _CONTENT_TYPE_SCHEMA}),
    ] = "application/octet-stream"
    content: str = Field(description="base64", json_schema_extra={"format": "byte", "pattern": _BASE64})

    @field_validator("content")
    @classmethod
    def _base64(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("must be valid base64") from None
        return value

    def decoded_size(self) -> int:
        return len(base64.b64decode(self.content))


_RECIPIENTS = f"to, cc and bcc together hold at most {MAX_RECIPIENTS} addresses"
_EMAIL_HEADER_NAME = header_name_pattern(RESERVED_EMAIL_HEADERS, ("content-", "resent-"), MAX_EMAIL_HEADER_NAME)


class EmailRequest(SendRequest):
    # text, html or both: the document says so with its anyOf.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [{"required": [name], "properties": {name: {"type": "string"}}} for name in ("text", "html")]
        }
    )

    to: list[EmailAddress] = Field(min_length=1, max_length=MAX_RECIPIENTS, description=_RECIPIENTS)
    cc: list[EmailAddress] = Field(default_factory=list, max_length=MAX_RECIPIENTS, description=_RECIPIENTS)
    bcc: list[EmailAddress] = Field(default_factory=list, max_length=MAX_RECIPIENTS, description=_RECIPIENTS)
    from_: Mailbox | None = Field(default=None, alias="from")
    reply_to: Mailbox | None = None
    subject: Annotated[SafeStr, StringConstraints(min_length=1, max_length=998)]
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = Field(
        default=[], max_length=100, description=f"at most {MAX_ATTACHMENT_BYTES} bytes in total once decoded"
    )
    headers: dict[str, str] = Field(
        default_factory=dict, json_schema_extra=headers_schema(_EMAIL_HEADER_NAME, NO_LINE_BREAKS)
    )
    metadata: Metadata = Field(default_factory=dict)
    retry: RetryPolicy | None = None

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        _check_headers(value, RESERVED_EMAIL_HEADERS, "content-")
        return value

    @model_validator(mode="after")
    def _whole_message(self, info: ValidationInfo) -> EmailRequest:
        if self.text is None and self.html is None:
            raise FieldProblem("text", "give text, html or both")
        if len(self.to) + len(self.cc) + len(self.bcc) > MAX_RECIPIENTS:
            raise FieldProblem("to", f"to, cc and bcc together may hold at most {MAX_RECIPIENTS} addresses")
        if sum(a.decoded_size() for a in self.attachments) > MAX_ATTACHMENT_BYTES:
            raise FieldProblem(
                "attachments", f"attachments may total at most {MAX_ATTACHMENT_BYTES} bytes once decoded"
            )
        if self.from_ is None:
            default = (info.context or {}).get("email_from")
            if not default:
                raise FieldProblem("from", "required: no default sender (DISPATCHER_EMAIL_FROM) is configured")
            self.from_ = default
        return self


class EmailBatch(SendBatch):
    """Emails accepted together: all of them or, if any item is invalid, none."""

    items: list[EmailRequest] = Field(min_length=1, max_length=MAX_BATCH)


#: An email job's payload (version 2): the request as the API normalized it (`from` a mailbox,
#: `Name <address>`), and what acceptance fixed: `message_id` (`<job id@sender's domain>`) and
#: `date` (Unix time), the same on every retry. The worker checks every field again
#: (workers.mail): Redis is writable by others.
EmailPayload = TypedDict(
    "EmailPayload",
    {
        "v": int,
        "channel": str,
        "from": str,
        "to": list[str],
        "cc": list[str],
        "bcc": list[str],
        "reply_to": str,
        "subject": str,
        "text": str,
        "html": str,
        "attachments": list[dict[str, str]],
        "headers": dict[str, str],
        "message_id": str,
        "date": float,
        "retry": dict,
    },
    total=False,
)


#: Emails: SMTP connect, TLS, login and a 10 MB DATA take longer than one webhook POST.
EMAIL_JOB_TIMEOUT = 300


def job(request: EmailRequest, job_id: str, accepted_at: datetime, settings: Settings) -> JobParts:
    """Message-ID and Date are fixed at acceptance, so every retry sends the same message."""
    sender = request.from_
    assert sender is not None  # the model fills the default sender or rejects the request
    payload = request.model_dump(by_alias=True, exclude={"metadata", "retry"}, exclude_none=True) | {
        "v": PAYLOAD_VERSION,
        "channel": NAME,
        "message_id": f"<{job_id}@{_ascii_domain(sender)}>",
        "date": accepted_at.timestamp(),
        "retry": resolve_retry(request.retry, settings.email_retry),
    }
    recipients = len(request.to) + len(request.cc) + len(request.bcc)
    return JobParts(
        payload=payload,
        target=dict(EmailTarget(to=request.to, cc=request.cc, bcc=request.bcc, subject=request.subject)),
        description=f"email {request.subject!r} to {recipients} recipient(s)",
    )


def _ascii_domain(sender: str) -> str:
    """The sender's domain for the Message-ID, which must be ASCII: as its A-label, as the worker
    writes it in From (IDNA 2008, via email_validator)."""
    try:
        return wire_address(split_mailbox(sender)[1]).rpartition("@")[2]
    except AddressError:
        return "dispatcher.invalid"


@with_config(ConfigDict(extra="forbid"))
class EmailTarget(TypedDict):
    """What GET /v1/jobs/<id> shows as an email's target."""

    to: list[str]
    cc: list[str]
    bcc: list[str]
    subject: str


CHANNEL = Channel(
    name=NAME,
    id_prefix="em_",
    path="emails",
    summary="Send an email",
    request=EmailRequest,
    batch=EmailBatch,
    target=EmailTarget,
    job=job,
    job_timeout=lambda settings: EMAIL_JOB_TIMEOUT,
    rate=lambda settings: settings.smtp_rate,
)
