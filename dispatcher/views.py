"""What the API answers, and the query parameters it reads, as types.

The OpenAPI document (dispatcher.openapi) is generated from these and from the request models. The
answers are TypedDicts, the shapes of the plain dicts the API and its status code build
(dispatcher.api, dispatcher.status, dispatcher.history); tests/test_openapi_contract.py checks every
answer of a running service against the document.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator, with_config
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

from dispatcher.batches import MAX_FAILED_PAGE
from dispatcher.channels import CHANNELS, KINDS
from dispatcher.control import MAX_REPLAY, recovery_window
from dispatcher.endpoints import Application, Endpoint
from dispatcher.health import EndpointHealth
from dispatcher.history import Attempt, Timestamp
from dispatcher.models import JSON_NUMBER, EmailAddress, RequestModel
from dispatcher.priorities import Priority
from dispatcher.status import MAX_LIST_LIMIT, Status
from dispatcher.suppressions import MAX_ADDRESS, Suppression

if TYPE_CHECKING:
    Kind = str
    Target = dict[str, Any]
else:
    #: A channel's name; the registry decides which exist.
    Kind = Literal[KINDS]
    #: One of the channels' targets (`Channel.target`).
    Target = Union[tuple(channel.target for channel in CHANNELS.values())]  # noqa: UP007 - built from a tuple

_FORBID = ConfigDict(extra="forbid")
Count = Annotated[int, Field(ge=0)]


@with_config(_FORBID)
class ErrorDetail(TypedDict):
    field: str
    problem: str


@with_config(_FORBID)
class ErrorInfo(TypedDict):
    code: str
    message: str
    details: list[ErrorDetail]


@with_config(_FORBID)
class ErrorBody(TypedDict):
    """Every error answer: one entry in `details` per bad field or parameter."""

    error: ErrorInfo


@with_config(_FORBID)
class Accepted(TypedDict):
    id: str
    #: `scheduled` when the request has a `send_at`.
    status: Literal["queued", "scheduled"]
    status_url: str


@with_config(_FORBID)
class AcceptedBatch(TypedDict):
    """A batch accepted: its id, how many jobs, where to follow it, and each item's job."""

    batch_id: str
    count: Count
    status_url: str
    items: list[Accepted]


@with_config(_FORBID)
class Health(TypedDict):
    status: Literal["ok"]


@with_config(_FORBID)
class QueueReadiness(TypedDict):
    queue: str
    queued: Count
    workers: Count


@with_config(_FORBID)
class ReadinessQueues(TypedDict):
    """One entry per priority (dispatcher.priorities.PRIORITIES)."""

    high: QueueReadiness
    default: QueueReadiness
    low: QueueReadiness


@with_config(_FORBID)
class Readiness(TypedDict):
    status: Literal["ok"]
    queues: ReadinessQueues
    warnings: list[str]


@with_config(_FORBID)
class JobView(TypedDict):
    """GET /v1/jobs/<id>: a job's state and every attempt (dispatcher.status)."""

    id: str
    kind: Kind | None
    status: Status
    priority: Priority | None
    created_at: Timestamp | None
    updated_at: Timestamp | None
    next_attempt_at: Timestamp | None
    attempts: list[Attempt]
    error: str | None
    metadata: dict[str, str]
    target: Target | None
    #: Why a scheduled job waits without its attempt counting (an endpoint's rate limit, say).
    held: str | None


@with_config(_FORBID)
class JobList(TypedDict):
    jobs: list[JobView]


@with_config(_FORBID)
class Counts(TypedDict):
    queued: Count
    scheduled: Count
    running: Count
    succeeded: Count
    failed: Count


@with_config(_FORBID)
class Failure(TypedDict):
    """One of the recent failures (dispatcher.history writes them)."""

    id: str
    kind: Kind
    failed_at: Timestamp | None
    attempts: Count
    error: str | None
    target: Target | None


@with_config(_FORBID)
class Success(TypedDict):
    """One of the recent successes (dispatcher.history writes them)."""

    id: str
    kind: Kind
    succeeded_at: Timestamp | None
    attempts: Count
    target: Target | None


if TYPE_CHECKING:
    Stats = dict[str, Any]
else:
    #: GET /v1/stats: the counts of every channel, by its name, and the recent failures and successes.
    Stats = with_config(_FORBID)(
        TypedDict(
            "Stats",
            {**dict.fromkeys(KINDS, Counts), "recent_failures": list[Failure], "recent_successes": list[Success]},
        )
    )


@with_config(_FORBID)
class BatchCounts(TypedDict):
    """A batch's jobs by status; `gone`: no longer in Redis (expired after they ended, or deleted)."""

    queued: Count
    scheduled: Count
    running: Count
    succeeded: Count
    failed: Count
    canceled: Count
    gone: Count


@with_config(_FORBID)
class FailedPage(TypedDict):
    count: Count
    ids: list[str]
    next_offset: Count | None


@with_config(_FORBID)
class BatchView(TypedDict):
    """GET /v1/batches/<id>: a batch's progress, read from its jobs (dispatcher.batches)."""

    id: str
    kind: Kind
    priority: Priority
    count: Count
    by_status: BatchCounts
    percent_done: Annotated[float, Field(ge=0, le=100)]
    created_at: Timestamp
    finished_at: Timestamp | None
    failed: FailedPage


class BatchQuery(BaseModel):
    """GET /v1/batches/<id>?failed_offset=&failed_limit=: which page of the failed job ids."""

    model_config = ConfigDict(extra="ignore")

    failed_offset: int = Field(default=0, ge=0, description="skip this many failed job ids")
    failed_limit: int = Field(
        default=100, ge=1, le=MAX_FAILED_PAGE, description="list at most this many failed job ids"
    )

    @field_validator("failed_offset", "failed_limit", mode="before")
    @classmethod
    def _digits(cls, value: Any) -> Any:
        if isinstance(value, str) and not (value.isascii() and value.isdigit()):
            raise ValueError("must be a whole number")
        return value


@with_config(_FORBID)
class StoredTemplate(TypedDict):
    """A stored email template (POST /v1/templates): its parts and when it was stored and changed."""

    id: str
    subject: str
    text: str | None
    html: str | None
    created_at: Timestamp
    updated_at: Timestamp


@with_config(_FORBID)
class TemplateList(TypedDict):
    """GET /v1/templates: every stored template, newest first."""

    templates: list[StoredTemplate]


class JobsQuery(BaseModel):
    """GET /v1/jobs?kind=&status=&limit=; an empty or unknown value is refused, naming the parameter."""

    model_config = ConfigDict(extra="ignore")

    kind: Kind | None = Field(default=None, description="only jobs of this kind")
    status: Status | None = Field(default=None, description="only jobs in this status")
    limit: int = Field(default=50, ge=1, le=MAX_LIST_LIMIT, description="at most this many jobs, newest first")

    @field_validator("limit", mode="before")
    @classmethod
    def _digits(cls, value: Any) -> Any:
        return _ascii_digits(value)


@with_config(_FORBID)
class Replayed(TypedDict):
    """POST /v1/jobs/replay: how many failed jobs were requeued, and which."""

    requeued: Count
    ids: list[str]


#: RFC 3339 (the document's `date-time`): a date, `T`, a time, and an offset or `Z`, nothing looser.
_RFC3339 = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt]([0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]+))?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def _moment(value: Any) -> Any:
    """A date-time with its offset, in RFC 3339 only: not a number, and not the looser forms that
    pydantic or `datetime.fromisoformat` also take."""
    match = _RFC3339.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError("must be an RFC 3339 date-time with an offset, like 2026-12-04T18:00:00Z")
    day, time, fraction, offset = match.groups()
    offset = "+00:00" if offset in "Zz" else offset
    try:
        return datetime.fromisoformat(f"{day}T{time}.{(fraction or '0')[:6].ljust(6, '0')}{offset}")
    except ValueError as exc:
        raise ValueError(f"is not a valid date-time: {exc}") from None


#: A moment given by a client: an RFC 3339 date-time with its offset.
Moment = Annotated[datetime, BeforeValidator(_moment), Field(json_schema_extra={"format": "date-time"})]


class ReplayRequest(RequestModel):
    """POST /v1/jobs/replay: which failed jobs to deliver again."""

    kind: Kind | None = Field(default=None, description="only jobs of this kind (default: every kind)")
    status: Literal["failed"] = Field(
        default="failed", description="the status of the jobs to replay: only failed jobs are delivered again"
    )
    since: Moment | None = Field(default=None, description="only jobs that failed at or after this moment")
    until: Moment | None = Field(default=None, description="only jobs that failed before this moment")
    limit: Annotated[int, Field(ge=1, le=MAX_REPLAY), JSON_NUMBER] = Field(
        default=1000, description=f"at most this many jobs (1 to {MAX_REPLAY:,})"
    )


class RecoverRequest(RequestModel):
    """POST /v1/applications/<app>/endpoints/<id>/recover: deliver again, to one endpoint, the events
    of a window whose delivery failed."""

    since: Moment = Field(description="only events accepted at or after this moment")
    until: Moment | None = Field(default=None, description="only events accepted before this moment (default: now)")
    limit: Annotated[int, Field(ge=1, le=MAX_REPLAY), JSON_NUMBER] = Field(
        default=1000, description=f"at most this many deliveries (1 to {MAX_REPLAY:,}), oldest event first"
    )

    @model_validator(mode="after")
    def _window(self) -> Self:
        self.until = recovery_window(self.since, self.until)
        return self


@with_config(_FORBID)
class Recovered(TypedDict):
    """POST /v1/applications/<app>/endpoints/<id>/recover: the deliveries requeued, and how many
    more matched beyond the limit (a second call with the same window takes them)."""

    requeued: Count
    ids: list[str]
    remaining: Count



def _ascii_digits(value: Any) -> Any:
    """ASCII digits only: pydantic's int() would also take ' 5', '+5' and '5_0'."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError(f"must be an integer from 1 to {MAX_LIST_LIMIT}")
    return value


@with_config(_FORBID)
class SuppressionPage(TypedDict):
    """GET /v1/suppressions: a page of the suppression list, in address order."""

    suppressions: list[Suppression]
    #: The `after` of the next page; null on the last.
    next: str | None


class SuppressionsQuery(BaseModel):
    """GET /v1/suppressions?limit=&after=; an empty or unknown value is refused, naming the parameter."""

    model_config = ConfigDict(extra="ignore")

    limit: int = Field(default=100, ge=1, le=MAX_LIST_LIMIT, description="at most this many addresses")
    after: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_ADDRESS,
        description="only addresses after this one: the `next` of the page before",
    )

    @field_validator("limit", mode="before")
    @classmethod
    def _digits(cls, value: Any) -> Any:
        return _ascii_digits(value)


class SuppressionRequest(RequestModel):
    """POST /v1/suppressions: an address to add by hand, checked as a recipient's is."""

    address: EmailAddress


# --- applications, endpoints and events (dispatcher.endpoints, dispatcher.events) ----------------


@with_config(_FORBID)
class ApplicationList(TypedDict):
    """GET /v1/applications, oldest first."""

    applications: list[Application]


@with_config(_FORBID)
class EndpointView(Endpoint):
    """An endpoint as the API shows it (never its secret): its registration and its health."""

    health: EndpointHealth


@with_config(_FORBID)
class EndpointList(TypedDict):
    """GET /v1/applications/<app>/endpoints, oldest first."""

    endpoints: list[EndpointView]


@with_config(_FORBID)
class EndpointCreated(EndpointView):
    """POST /v1/applications/<app>/endpoints: the endpoint and its signing secret, shown this once."""

    secret: str


@with_config(_FORBID)
class Delivery(TypedDict):
    """One delivery of an event: its webhook job and the endpoint it goes to."""

    id: str
    endpoint: str
    status_url: str


@with_config(_FORBID)
class EventAccepted(TypedDict):
    """POST /v1/applications/<app>/events: the event and one delivery per subscribed, enabled endpoint."""

    id: str
    count: Count
    deliveries: list[Delivery]
    status_url: str


@with_config(_FORBID)
class DeliveryStatus(TypedDict):
    id: str
    endpoint: str
    status: Literal["queued", "scheduled", "running", "succeeded", "failed", "canceled", "gone"]
    status_url: str


@with_config(_FORBID)
class EventView(TypedDict):
    """GET /v1/events/<id>: the event, its progress and each delivery's status."""

    id: str
    application: str
    event_type: str
    ordering_key: str | None
    priority: Priority
    created_at: Timestamp
    count: Count
    by_status: BatchCounts
    percent_done: Annotated[float, Field(ge=0, le=100)]
    finished_at: Timestamp | None
    deliveries: list[DeliveryStatus]
