"""What to send: the request models, validated with pydantic.

The API validates with `context={"guard": NetworkGuard, "email_from": str | None}`
so that the webhook destination and the default sender are checked in the same
pass and every bad field is reported at once.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dispatcher.addresses import AddressError, parse_mailbox, validate_address
from dispatcher.config import MAX_ATTEMPTS_LIMIT, MAX_BACKOFF_SECONDS
from dispatcher.errors import DestinationRefused, FieldProblem

MAX_RECIPIENTS = 50
MAX_ATTACHMENT_BYTES = 10 * 1024 * 1024
MAX_HEADERS = 50
MAX_METADATA_KEYS = 50
#: HTTP token characters (RFC 9110), which is also safe for email header names.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}")
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*")
#: Header names the webhook delivery sets itself; a request may not override them.
RESERVED_WEBHOOK_HEADERS = frozenset({"content-type", "content-length", "host", "transfer-encoding"})
#: Header names the email builder sets itself, from the request's own fields.
RESERVED_EMAIL_HEADERS = frozenset(
    {
        "from", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id", "mime-version",
        "content-type", "content-transfer-encoding", "content-disposition", "sender",
    }
)


def _no_line_breaks(value: str) -> str:
    if any(c in value for c in "\r\n\0"):
        raise ValueError("must not contain CR, LF or NUL (header injection)")
    return value


def _address(value: str) -> str:
    try:
        return validate_address(value)
    except AddressError as exc:
        raise ValueError(f"invalid address: {exc}") from None


def _mailbox(value: str) -> str:
    try:
        return str(parse_mailbox(value))
    except AddressError as exc:
        raise ValueError(f"invalid address: {exc}") from None


SafeStr = Annotated[str, AfterValidator(_no_line_breaks)]
EmailAddress = Annotated[str, StringConstraints(max_length=320), AfterValidator(_address)]
Mailbox = Annotated[str, StringConstraints(max_length=400), AfterValidator(_mailbox)]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=1024)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_KEYS)]


def _check_headers(headers: dict[str, str], reserved: frozenset[str], reserved_prefix: str | None) -> None:
    if len(headers) > MAX_HEADERS:
        raise FieldProblem("headers", f"at most {MAX_HEADERS} headers")
    for name, value in headers.items():
        field = f"headers.{name}"
        if not _HEADER_NAME.fullmatch(name):
            raise FieldProblem(field, "is not a valid header name")
        lowered = name.lower()
        if lowered in reserved or (reserved_prefix and lowered.startswith(reserved_prefix)):
            raise FieldProblem(field, "is set by Dispatcher itself and cannot be given")
        if any(c in value for c in "\r\n\0"):
            raise FieldProblem(field, "must not contain CR, LF or NUL (header injection)")
        if len(value) > 4096:
            raise FieldProblem(field, "is longer than 4096 characters")


class RequestModel(BaseModel):
    # Above the 15 MB body limit: a 10 MB attachment is ~14 million base64 characters, and
    # the body limit and the decoded-attachment total are the caps that matter.
    model_config = ConfigDict(extra="forbid", str_max_length=16 * 1024 * 1024)


class RetryPolicy(RequestModel):
    """`max_attempts` in all (first try included); `backoff[i]` seconds before attempt i+2."""

    max_attempts: int | None = Field(default=None, ge=1, le=MAX_ATTEMPTS_LIMIT)
    backoff: list[Annotated[float, Field(ge=0, le=MAX_BACKOFF_SECONDS)]] | None = Field(
        default=None, min_length=1, max_length=MAX_ATTEMPTS_LIMIT - 1
    )


class Attachment(RequestModel):
    filename: Annotated[SafeStr, StringConstraints(min_length=1, max_length=255)]
    content_type: Annotated[str, StringConstraints(max_length=255, pattern=_CONTENT_TYPE.pattern)] = (
        "application/octet-stream"
    )
    content: str = Field(description="base64")

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


class EmailRequest(RequestModel):
    to: list[EmailAddress] = Field(min_length=1)
    cc: list[EmailAddress] = []
    bcc: list[EmailAddress] = []
    from_: Mailbox | None = Field(default=None, alias="from")
    reply_to: Mailbox | None = None
    subject: Annotated[SafeStr, StringConstraints(min_length=1, max_length=998)]
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = Field(default=[], max_length=100)
    headers: dict[str, str] = {}
    metadata: Metadata = {}
    retry: RetryPolicy | None = None

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        _check_headers(value, RESERVED_EMAIL_HEADERS, None)
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


class WebhookRequest(RequestModel):
    url: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    event_type: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]
    payload: dict[str, Any]
    headers: dict[str, str] = {}
    metadata: Metadata = {}
    retry: RetryPolicy | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        host, port = parse_webhook_url(value)
        guard = (info.context or {}).get("guard")
        if guard is not None:
            try:
                guard.check_host(host, port)
            except DestinationRefused as exc:
                raise ValueError(f"destination refused: {exc}") from None
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        _check_headers(value, RESERVED_WEBHOOK_HEADERS, "webhook-")
        return value


def parse_webhook_url(value: str) -> tuple[str, int]:
    """Check a webhook URL's form and return its (ASCII host, port); raise ValueError when unfit."""
    if any(ord(c) <= 0x20 or c == "\x7f" for c in value):
        raise ValueError("must not contain spaces or control characters")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise ValueError("must not contain credentials (user:password@); send them in headers instead")
    host = parts.hostname
    if not host:
        raise ValueError("must have a host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port (must be 1-65535)") from None
    if port == 0:
        raise ValueError("has an invalid port (must be 1-65535)")
    if parts.fragment:
        raise ValueError("must not contain a #fragment")
    if not host.startswith("[") and ":" not in host:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"host {parts.hostname!r} is not a valid domain name") from None
    return host, port or (443 if parts.scheme == "https" else 80)
