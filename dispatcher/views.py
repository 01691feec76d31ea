"""What the API answers, and the query parameters it reads, as types.

The OpenAPI document (dispatcher.openapi) is generated from these and from the request models. The
answers are TypedDicts, the shapes of the plain dicts the API and its status code build
(dispatcher.api, dispatcher.status, dispatcher.history); tests/test_openapi_contract.py checks every
answer of a running service against the document.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, with_config
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

from dispatcher.channels import CHANNELS, KINDS
from dispatcher.history import Attempt, Timestamp
from dispatcher.priorities import Priority
from dispatcher.status import MAX_LIST_LIMIT, Status

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
    status: Literal["queued"]
    status_url: str


@with_config(_FORBID)
class AcceptedBatch(TypedDict):
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


class JobsQuery(BaseModel):
    """GET /v1/jobs?kind=&status=&limit=; an empty or unknown value is refused, naming the parameter."""

    model_config = ConfigDict(extra="ignore")

    kind: Kind | None = Field(default=None, description="only jobs of this kind")
    status: Status | None = Field(default=None, description="only jobs in this status")
    limit: int = Field(default=50, ge=1, le=MAX_LIST_LIMIT, description="at most this many jobs, newest first")

    @field_validator("limit", mode="before")
    @classmethod
    def _digits(cls, value: Any) -> Any:
        """ASCII digits only: pydantic's int() would also take ' 5', '+5' and '5_0'."""
        if isinstance(value, str) and not (value.isascii() and value.isdigit()):
            raise ValueError(f"must be an integer from 1 to {MAX_LIST_LIMIT}")
        return value
