"""What every channel's request models share: field types, header and JSON checks, limits.

The API validates with `context={"guard": NetworkGuard, "email_from": str | None}`
so that the webhook destination and the default sender are checked in the same
pass and every bad field is reported at once.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from dispatcher.addresses import LINE_BREAKS, AddressError, format_mailbox, parse_mailbox, validate_address
from dispatcher.config import MAX_ATTEMPTS_LIMIT, MAX_BACKOFF_SECONDS, RetrySchedule
from dispatcher.errors import FieldProblem
from dispatcher.priorities import BATCH_PRIORITY, DEFAULT_PRIORITY, Priority

MAX_HEADERS = 50
MAX_HEADER_VALUE = 4096
#: Longer mail header names cannot be folded onto a 78-character line (the email package fails on them).
MAX_EMAIL_HEADER_NAME = 76
MAX_METADATA_KEYS = 50
#: Objects and arrays nested in a webhook payload, the payload itself included.
MAX_PAYLOAD_DEPTH = 100
#: HTTP token characters (RFC 9110), which is also safe for email header names.
_TOKEN_CHARACTER = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
MAX_HEADER_NAME = 100
HEADER_NAME = re.compile(f"{_TOKEN_CHARACTER}{{1,{MAX_HEADER_NAME}}}")
#: Lone surrogates: JSON can escape them (\ud800), UTF-8 cannot encode them.
_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN_JSON = frozenset({int, bool, type(None)})
#: Compact JSON, as the webhook body carries it; one encoder, not one per json.dumps call.
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
#: What an HTTP/1.1 header value may hold: visible ASCII, spaces and tabs.
_HTTP_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")


def _ascii_class(characters: str) -> str:
    """The characters as \\uXXXX escapes for a regex character class that JSON Schema (ECMA 262),
    Python's re and pydantic's engine all read alike."""
    return "".join(f"\\u{ord(c):04x}" for c in characters)


#: The OpenAPI document's patterns for what the validators below check in Python code.
NO_LINE_BREAKS = f"^[^{_ascii_class(LINE_BREAKS)}]*$"
HTTP_HEADER_VALUE = f"^{_HTTP_HEADER_VALUE.pattern}$"
#: No address is shorter than `a@b`; said beside the format, which some readers take as a mere annotation.
_ADDRESS_LENGTH = {"minLength": 3}


def case_insensitive(text: str) -> str:
    """A regex matching `text` in any case, for JSON Schema patterns, which have no flags."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in text)


def header_name_pattern(reserved: frozenset[str], prefixes: tuple[str, ...], max_length: int) -> str:
    """The document's pattern for a header name: an HTTP token, none of `reserved`, no `prefixes`."""
    refused = "|".join([*(f"{case_insensitive(name)}$" for name in sorted(reserved)), *map(case_insensitive, prefixes)])
    return f"^(?!{refused}){_TOKEN_CHARACTER}{{1,{max_length}}}$"


def headers_schema(name_pattern: str, value_pattern: str) -> dict[str, Any]:
    """The document's schema of a `headers` object, as _check_headers judges it."""
    return {
        "maxProperties": MAX_HEADERS,
        "propertyNames": {"pattern": name_pattern},
        "additionalProperties": {"type": "string", "maxLength": MAX_HEADER_VALUE, "pattern": value_pattern},
    }


def _json_number(value: Any) -> Any:
    """Only a JSON number is a number: pydantic alone would take true as 1 and "5" as 5."""
    if isinstance(value, bool | str):
        raise ValueError(f"must be a JSON number, not {'a boolean' if isinstance(value, bool) else 'a string'}")
    return value


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


SafeStr = Annotated[str, AfterValidator(_no_line_breaks), Field(json_schema_extra={"pattern": NO_LINE_BREAKS})]
EmailAddress = Annotated[
    str,
    StringConstraints(max_length=320),
    AfterValidator(_address),
    Field(json_schema_extra={"format": "idn-email", **_ADDRESS_LENGTH}),
]
#: `addr` or `Display Name <addr>`: a format of the document's own (JSON Schema has none for it).
Mailbox = Annotated[
    str,
    StringConstraints(max_length=400),
    AfterValidator(_mailbox),
    Field(
        json_schema_extra={"format": "mailbox", **_ADDRESS_LENGTH},
        description="an address, or `Display Name <address>`",
    ),
]
#: For every number a request holds, after its bounds (so that they reach the document): a JSON
#: number, never a boolean or a string.
JSON_NUMBER = BeforeValidator(_json_number)
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
        if len(value) > MAX_HEADER_VALUE:
            raise FieldProblem(field, f"is longer than {MAX_HEADER_VALUE} characters")


#: How far in the past a `send_at` may be (the client's clock may be behind), and how far ahead.
SEND_AT_SKEW = timedelta(seconds=60)
MAX_SEND_AHEAD = timedelta(days=30)
#: RFC 3339's date-time (the document's `date-time` format): seconds and an offset required.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")


def _rfc3339(value: Any) -> Any:
    """Only a date-time string with an offset: pydantic alone would take Unix seconds, or a time
    without an offset as UTC."""
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("must be a date and time with its UTC offset, e.g. 2026-12-24T09:00:00+01:00")
    return value


def _soon(value: datetime) -> datetime:
    now = datetime.now(UTC)
    if value < now - SEND_AT_SKEW:
        raise ValueError(f"is in the past (more than {SEND_AT_SKEW.seconds} s ago)")
    if value > now + MAX_SEND_AHEAD:
        raise ValueError(f"is more than {MAX_SEND_AHEAD.days} days ahead")
    return value


SendAt = Annotated[
    AwareDatetime,
    BeforeValidator(_rfc3339),
    AfterValidator(_soon),
    Field(
        description=f"when to send it, with its UTC offset: from {SEND_AT_SKEW.seconds} s ago to "
        f"{MAX_SEND_AHEAD.days} days ahead; the job waits as `scheduled` until then"
    ),
]


class RequestModel(BaseModel):
    # Above the 15 MB body limit: a 10 MB attachment is ~14 million base64 characters, and
    # the body limit and the decoded-attachment total are the caps that matter.
    model_config = ConfigDict(extra="forbid", str_max_length=16 * 1024 * 1024)


class SendRequest(RequestModel):
    """What every channel's request has besides its own fields."""

    #: The RQ queue the job goes to (dispatcher.priorities); workers serve `high` first.
    priority: Priority = Field(default=DEFAULT_PRIORITY, description="high, default or low: which queue the job joins")
    send_at: SendAt | None = None


#: What a batch says once for all its items, and its items may not say themselves.
_BATCH_WIDE = ("priority", "send_at")


def _items_without_priority(schema: dict[str, Any]) -> None:
    """The document's batch: its items may not carry a priority or send_at of their own (_one_priority)."""
    items = schema["properties"]["items"]
    items["items"] = {"allOf": [items["items"]], "not": {"anyOf": [{"required": [name]} for name in _BATCH_WIDE]}}


class SendBatch(RequestModel):
    """What every channel's batch has besides its items: one priority and send_at for all of them."""

    model_config = ConfigDict(json_schema_extra=_items_without_priority)

    priority: Priority = Field(default=BATCH_PRIORITY, description="high, default or low; a batch is low by default")
    send_at: SendAt | None = None

    @model_validator(mode="after")
    def _one_priority(self) -> SendBatch:
        for i, item in enumerate(getattr(self, "items", ())):
            for name in _BATCH_WIDE:
                if name in item.model_fields_set:
                    raise FieldProblem(f"items.{i}.{name}", f"give the {name} once, for the whole batch")
        return self


class RetryPolicy(RequestModel):
    """`max_attempts` in all (first try included); `backoff[i]` seconds before attempt i+2."""

    max_attempts: Annotated[int, Field(ge=1, le=MAX_ATTEMPTS_LIMIT), JSON_NUMBER] | None = None
    backoff: list[Annotated[float, Field(ge=0, le=MAX_BACKOFF_SECONDS), JSON_NUMBER]] | None = Field(
        default=None, min_length=1, max_length=MAX_ATTEMPTS_LIMIT - 1
    )


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


MAX_BATCH = 10_000


def resolve_retry(policy: RetryPolicy | None, default: RetrySchedule) -> dict:
    """The request's retry policy with the configured defaults filling what it leaves out."""
    max_attempts = default.max_attempts
    backoff = list(default.backoff)
    if policy is not None:
        max_attempts = policy.max_attempts or max_attempts
        backoff = policy.backoff if policy.backoff is not None else backoff
    return {"max_attempts": max_attempts, "backoff": backoff}
