"""What to send: the request models, validated with pydantic.

The API validates with `context={"guard": NetworkGuard, "email_from": str | None}`
so that the webhook destination and the default sender are checked in the same
pass and every bad field is reported at once.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
from collections.abc import Iterator
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
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from dispatcher.addresses import LINE_BREAKS, AddressError, format_mailbox, parse_mailbox, validate_address
from dispatcher.config import MAX_ATTEMPTS_LIMIT, MAX_BACKOFF_SECONDS
from dispatcher.errors import DestinationRefused, FieldProblem, ResolutionFailed, ResolutionTimedOut

MAX_RECIPIENTS = 50
MAX_ATTACHMENT_BYTES = 10 * 1024 * 1024
MAX_HEADERS = 50
#: Longer mail header names cannot be folded onto a 78-character line (the email package fails on them).
MAX_EMAIL_HEADER_NAME = 76
MAX_METADATA_KEYS = 50
#: Objects and arrays nested in a webhook payload, the payload itself included.
MAX_PAYLOAD_DEPTH = 100
#: HTTP token characters (RFC 9110), which is also safe for email header names.
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}")
_CONTENT_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*/[A-Za-z0-9][A-Za-z0-9_.+-]*$")
#: Lone surrogates: JSON can escape them (\ud800), UTF-8 cannot encode them.
_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN_JSON = frozenset({int, bool, type(None)})
#: Compact JSON, as the webhook body carries it; one encoder, not one per json.dumps call.
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
#: What an HTTP/1.1 header value may hold: visible ASCII, spaces and tabs.
_HTTP_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")
#: Header names the webhook delivery sets itself; a request may not override them.
RESERVED_WEBHOOK_HEADERS = frozenset({"content-type", "content-length", "host", "transfer-encoding"})
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


def _no_line_breaks(value: str) -> str:
    if any(c in value for c in LINE_BREAKS):
        raise ValueError("must not contain CR, LF, NUL or another line break (header injection)")
    return value


def _address(value: str) -> str:
    try:
        return validate_address(value)
    except AddressError as exc:
        raise ValueError(f"invalid address: {exc}") from None


def _mailbox(value: str) -> str:
    try:
        address = parse_mailbox(value)
    except AddressError as exc:
        raise ValueError(f"invalid address: {exc}") from None
    return format_mailbox(address.display_name, address.addr_spec)


SafeStr = Annotated[str, AfterValidator(_no_line_breaks)]
EmailAddress = Annotated[str, StringConstraints(max_length=320), AfterValidator(_address)]
Mailbox = Annotated[str, StringConstraints(max_length=400), AfterValidator(_mailbox)]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=1024)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_KEYS)]


def _check_headers(
    headers: dict[str, str], reserved: frozenset[str], reserved_prefix: str | None, http: bool = False
) -> None:
    if len(headers) > MAX_HEADERS:
        raise FieldProblem("headers", f"at most {MAX_HEADERS} headers")
    for name, value in headers.items():
        field = f"headers.{name}"
        if not HEADER_NAME.fullmatch(name):
            raise FieldProblem(field, "is not a valid header name")
        lowered = name.lower()
        if lowered in reserved or (reserved_prefix and lowered.startswith(reserved_prefix)):
            raise FieldProblem(field, "is set by Dispatcher itself and cannot be given")
        if not http and lowered.startswith("resent-"):
            # The email package parses these as address lists and fails on a malformed one.
            raise FieldProblem(field, "Resent-* headers belong to a re-sent message and cannot be given")
        if not http and len(name) > MAX_EMAIL_HEADER_NAME:
            raise FieldProblem(field, f"is longer than {MAX_EMAIL_HEADER_NAME} characters (a mail header line)")
        if any(c in value for c in LINE_BREAKS):
            raise FieldProblem(field, "must not contain CR, LF, NUL or another line break (header injection)")
        if http and not _HTTP_HEADER_VALUE.fullmatch(value):
            raise FieldProblem(field, "may hold only visible ASCII characters, spaces and tabs (an HTTP header)")
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


class Attachment(RequestModel):
    filename: Annotated[SafeStr, StringConstraints(min_length=1, max_length=255)]
    content_type: Annotated[
        str,
        StringConstraints(max_length=255, pattern=_CONTENT_TYPE.pattern),
        AfterValidator(_attachment_type),
    ] = "application/octet-stream"
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
    cc: list[EmailAddress] = Field(default_factory=list)
    bcc: list[EmailAddress] = Field(default_factory=list)
    from_: Mailbox | None = Field(default=None, alias="from")
    reply_to: Mailbox | None = None
    subject: Annotated[SafeStr, StringConstraints(min_length=1, max_length=998)]
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = Field(default=[], max_length=100)
    headers: dict[str, str] = Field(default_factory=dict)
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


class WebhookRequest(RequestModel):
    url: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    event_type: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]
    payload: dict[str, Any]
    headers: dict[str, str] = Field(default_factory=dict)
    metadata: Metadata = Field(default_factory=dict)
    retry: RetryPolicy | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        host, port = parse_webhook_url(value)
        # A NetworkGuard, or the request's HostLookups (its lookups started together, one time bound).
        guard = (info.context or {}).get("guard")
        if guard is not None:
            try:
                guard.check_host(host, port)
            except ResolutionTimedOut as exc:
                raise ValueError(str(exc)) from None  # unknown yet, not refused: the client may try again
            except (DestinationRefused, ResolutionFailed) as exc:
                raise ValueError(f"destination refused: {exc}") from None
        return value

    @field_validator("payload", mode="before")
    @classmethod
    def _payload_keys(cls, value: Any) -> Any:
        if isinstance(value, dict) and not all(type(key) is str and not _SURROGATE.search(key) for key in value):
            raise FieldProblem("payload", "has a key that is not a valid Unicode string")
        return value

    @field_validator("payload")
    @classmethod
    def _payload(cls, value: dict[str, Any]) -> JsonObject:
        return JsonObject(value, json_text(value, "payload"))

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        _check_headers(value, RESERVED_WEBHOOK_HEADERS, "webhook-", http=True)
        return value


class JsonObject(dict):
    """A validated JSON object that keeps its compact JSON text: the webhook body embeds it as is."""

    __slots__ = ("text",)

    def __init__(self, value: dict[str, Any] | None = None, text: str = "") -> None:
        super().__init__(value or {})
        self.text = text


def json_text(value: dict | list, field: str) -> str:
    """`value` as compact JSON text; FieldProblem unless it encodes as UTF-8, at most MAX_PAYLOAD_DEPTH deep.

    C's encoder does the checking (NaN, infinities, types); a lone surrogate fails UTF-8, and a text
    with few brackets cannot be deep. Only when that is not enough does `_explain` walk the value,
    to check its depth or name the member at fault.
    """
    try:
        text = _JSON.encode(value)
        text.encode()  # a lone surrogate raises UnicodeEncodeError, a ValueError
    except (ValueError, TypeError, RecursionError):
        _explain(value, field)
        raise FieldProblem(field, "cannot be written as JSON") from None
    if text.count("{") + text.count("[") > MAX_PAYLOAD_DEPTH:
        _explain(value, field)
    return text


def _explain(value: dict | list, field: str) -> None:
    """Raise FieldProblem naming the first member that is not JSON, or where it is nested too deep.

    Depth-first with one iterator per open container, so memory follows the depth, not the size, and
    no depth reaches Python's recursion limit; the bound keeps json.dumps and receivers clear of theirs.
    Keys may be what json.dumps turns into strings (numbers, booleans, null) but no other type.
    """
    stack: list[tuple[Any, Iterator[tuple[Any, Any]]]] = [(field, _members(value))]

    def path(*keys: Any) -> str:
        return ".".join(str(key) for key in (*(key for key, _ in stack), *keys))

    while stack:
        for key, item in stack[-1][1]:
            if type(item) in _PLAIN_JSON:
                continue
            if isinstance(item, dict | list | tuple):
                if len(stack) >= MAX_PAYLOAD_DEPTH:
                    raise FieldProblem(field, f"is nested more than {MAX_PAYLOAD_DEPTH} levels deep")
                if item:
                    if isinstance(item, dict) and not all(_json_key(k) for k in item):
                        raise FieldProblem(path(key), "has a key that is not a valid Unicode string")
                    stack.append((key, _members(item)))
                    break
            elif isinstance(item, str):
                if _SURROGATE.search(item):
                    raise FieldProblem(path(key), "is not valid Unicode (a lone surrogate)")
            elif isinstance(item, float):
                if not math.isfinite(item):
                    raise FieldProblem(path(key), "must be a finite number (JSON has no NaN or Infinity)")
            else:
                raise FieldProblem(path(key), f"is not a JSON value ({type(item).__name__})")
        else:
            stack.pop()


def _json_key(key: Any) -> bool:
    if isinstance(key, str):
        return not _SURROGATE.search(key)
    return isinstance(key, int | float) or key is None


def _members(container: dict | list | tuple) -> Iterator[tuple[Any, Any]]:
    return iter(container.items()) if isinstance(container, dict) else enumerate(container)


@functools.lru_cache(maxsize=4096)  # a batch often holds one partner's URL many times
def parse_webhook_url(value: str) -> tuple[str, int]:
    """Check a webhook URL's form and return its (ASCII host, port); raise ValueError when unfit."""
    if any(ord(c) <= 0x20 or c == "\x7f" for c in value):
        raise ValueError("must not contain spaces or control characters")
    if "\\" in value:
        # Parsers disagree on it (urllib3 ends the host there, urlsplit does not): percent-encode it.
        raise ValueError("must not contain a backslash (write it as %5C)")
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
    if ":" not in host:
        try:
            if host.isascii():
                host.encode("idna")  # empty or overlong labels
            # The host as the worker's HTTP client (urllib3) will send it: IDNA 2008 for a non-ASCII name.
            host = (parse_url(value).host or "").lower()
        except (UnicodeError, LocationParseError):
            raise ValueError(f"host {parts.hostname!r} is not a valid domain name") from None
        if not host:
            raise ValueError("must have a host")
    else:
        try:
            parse_url(value)
        except LocationParseError:
            raise ValueError(f"host {parts.hostname!r} is not a valid IPv6 address") from None
    return host, port or (443 if parts.scheme == "https" else 80)


MAX_BATCH = 10_000


class WebhookBatch(RequestModel):
    """Webhooks accepted together: all of them or, if any item is invalid, none."""

    items: list[WebhookRequest] = Field(min_length=1, max_length=MAX_BATCH)


class EmailBatch(RequestModel):
    """Emails accepted together: all of them or, if any item is invalid, none."""

    items: list[EmailRequest] = Field(min_length=1, max_length=MAX_BATCH)
