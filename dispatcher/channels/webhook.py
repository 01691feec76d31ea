"""The webhook channel, what to send: the request, the payload a job carries, its description.

The worker's side (signing and the guarded POST) is `workers.channels.webhook`.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationInfo, with_config
from typing_extensions import NotRequired, TypedDict  # noqa: UP035  # pydantic needs TypedDict from here on Python < 3.12
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from dispatcher.channels import PAYLOAD_VERSION, Channel, JobParts
from dispatcher.config import Settings
from dispatcher.errors import DestinationRefused, FieldProblem, ResolutionFailed, ResolutionTimedOut
from dispatcher.history import isoformat
from dispatcher.models import (
    _SURROGATE,
    HTTP_HEADER_VALUE,
    MAX_BATCH,
    MAX_HEADER_NAME,
    MAX_PAYLOAD_DEPTH,
    JsonObject,
    Metadata,
    RetryPolicy,
    SendBatch,
    SendRequest,
    _check_headers,
    header_name_pattern,
    headers_schema,
    json_text,
    resolve_retry,
)

NAME = "webhook"
#: Margin the job timeout leaves beyond a delivery's own deadline; it is only a safety net.
_JOB_TIMEOUT_MARGIN = 60

#: Header names the webhook delivery sets itself; a request may not override them.
RESERVED_WEBHOOK_HEADERS = frozenset({"content-type", "content-length", "host", "transfer-encoding"})


def _guarded_url(value: str, info: ValidationInfo) -> str:
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


def _webhook_headers(value: dict[str, str]) -> dict[str, str]:
    _check_headers(value, RESERVED_WEBHOOK_HEADERS, "webhook-", http=True)
    return value


#: A webhook's URL, checked against the network guard (a registered endpoint's too).
WebhookUrl = Annotated[
    str,
    StringConstraints(min_length=1, max_length=2048),
    AfterValidator(_guarded_url),
    Field(
        description="http:// or https://, whose host resolves to addresses the network guard allows",
        json_schema_extra={"format": "iri"},
    ),
]
EventType = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]
#: Headers a webhook (or every delivery to an endpoint) carries besides its own.
WebhookHeaders = Annotated[
    dict[str, str],
    AfterValidator(_webhook_headers),
    Field(
        json_schema_extra=headers_schema(
            header_name_pattern(RESERVED_WEBHOOK_HEADERS, ("webhook-",), MAX_HEADER_NAME), HTTP_HEADER_VALUE
        ),
    ),
]


def _payload_keys(value: Any) -> Any:
    if isinstance(value, dict) and not all(type(key) is str and not _SURROGATE.search(key) for key in value):
        raise FieldProblem("payload", "has a key that is not a valid Unicode string")
    return value


def _json_object(value: dict[str, Any]) -> JsonObject:
    return JsonObject(value, json_text(value, "payload"))


#: A webhook's (or an event's) payload: kept with its compact JSON text, which the body embeds.
Payload = Annotated[
    dict[str, Any],
    BeforeValidator(_payload_keys),
    AfterValidator(_json_object),
    Field(description=f"any JSON object, at most {MAX_PAYLOAD_DEPTH} levels deep, without lone surrogates"),
]


class WebhookRequest(SendRequest):
    url: WebhookUrl
    event_type: EventType
    payload: Payload
    headers: WebhookHeaders = Field(default_factory=dict)
    metadata: Metadata = Field(default_factory=dict)
    retry: RetryPolicy | None = None


class EventDelivery(WebhookRequest):
    """One delivery of an event to a registered endpoint (dispatcher.events), made from the endpoint's
    record, never from a request: a webhook signed with the endpoint's secrets, read at delivery."""

    endpoint: str
    application: str
    event: str
    ordering_key: str | None = None
    #: The endpoint was ordered when the event was published: the delivery waits for its turn.
    ordered: bool = False


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


class WebhookBatch(SendBatch):
    """Webhooks accepted together: all of them or, if any item is invalid, none."""

    items: list[WebhookRequest] = Field(min_length=1, max_length=MAX_BATCH)


@with_config(ConfigDict(extra="forbid"))
class WebhookTarget(TypedDict):
    """What GET /v1/jobs/<id> shows as a webhook's target."""

    url: str
    event_type: str
    #: An event's delivery: the endpoint, its application and the event.
    endpoint: NotRequired[str]
    application: NotRequired[str]
    event: NotRequired[str]


class WebhookPayload(TypedDict):
    """A webhook job's payload (version 2). The body is fixed, and so signed the same way, at acceptance."""

    v: int
    channel: str
    url: str
    headers: dict[str, str]
    #: The Standard Webhooks envelope: {"type", "timestamp", "data"}, compact JSON.
    body: str
    retry: dict
    #: An event's delivery (EventDelivery): the endpoint whose secrets sign it, and so on.
    endpoint: NotRequired[str]
    application: NotRequired[str]
    event: NotRequired[str]
    ordering_key: NotRequired[str]
    #: True: a delivery to an ordered endpoint, which waits for its turn (workers.endpoints).
    ordered: NotRequired[bool]


def job(request: WebhookRequest, job_id: str, accepted_at: datetime, settings: Settings) -> JobParts:
    # The envelope as json.dumps(separators=(",", ":"), ensure_ascii=False) writes it, with the
    # payload's text from validation (models.JsonObject) rather than encoding it a second time.
    data = request.payload.text if isinstance(request.payload, JsonObject) else json_text(request.payload, "payload")
    body = (
        f'{{"type":{json.dumps(request.event_type, ensure_ascii=False)},'
        f'"timestamp":"{_timestamp(accepted_at)}","data":{data}}}'
    )
    payload: WebhookPayload = {
        "v": PAYLOAD_VERSION,
        "channel": NAME,
        "url": request.url,
        "headers": request.headers,
        "body": body,
        "retry": resolve_retry(request.retry, settings.webhook_retry),
    }
    target = WebhookTarget(url=request.url, event_type=request.event_type)
    if isinstance(request, EventDelivery):
        target["endpoint"] = payload["endpoint"] = request.endpoint
        target["application"] = payload["application"] = request.application
        target["event"] = payload["event"] = request.event
        if request.ordering_key is not None:
            payload["ordering_key"] = request.ordering_key
        if request.ordered:
            payload["ordered"] = True
    return JobParts(
        payload=dict(payload),
        target=dict(target),
        # No query: it often carries a token, and rq-dashboard and `rq info` show the description.
        description=f"webhook {request.event_type} to {request.url.partition('?')[0]}",
    )


@functools.lru_cache(maxsize=1)  # the jobs of a batch share their acceptance time
def _timestamp(accepted_at: datetime) -> str:
    return isoformat(accepted_at)


def _hosts(item: Any) -> Iterator[str]:
    """The host of a raw request's `url`, if it has one that parses; validation judges the rest."""
    url = item.get("url") if isinstance(item, dict) else None
    if isinstance(url, str):
        with contextlib.suppress(ValueError):
            yield parse_webhook_url(url)[0]


CHANNEL = Channel(
    name=NAME,
    id_prefix="wh_",
    path="webhooks",
    summary="Call a webhook",
    request=WebhookRequest,
    batch=WebhookBatch,
    target=WebhookTarget,
    job=job,
    job_timeout=lambda settings: int(settings.webhook_timeout * 2) + _JOB_TIMEOUT_MARGIN,
    hosts=_hosts,
)
