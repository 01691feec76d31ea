"""Channels, the what-to-send side: one module per kind of message, and the registry of them.

A channel module owns what its jobs are: the request the API accepts and its batch, the payload a
job carries to the worker (a typed dict with a version), the job's description and target, its
default retry policy (applied in the payload) and its job timeout. Generic code (the API,
enqueueing, status, the OpenAPI document) asks the registry and names no channel. The
how-to-deliver side of each channel is in `workers.channels`, under the same name.

Adding a channel is one module here, one in `workers/channels/`, and one line in each registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from dispatcher.config import Settings

#: The version of the payload this code writes; the worker reads this one and the one before.
#: Version 1 (before channels) had no `v` and no `channel`: its job function named the channel.
PAYLOAD_VERSION = 2
#: The one RQ job function of every job, a stable name stored in Redis for as long as a job lives:
#: the payload names the channel. Never rename it (workers.jobs keeps the version-1 names too).
JOB_FUNCTION = "workers.jobs.deliver"
#: Version-1 jobs named their channel by their function.
LEGACY_JOB_FUNCTIONS = {"workers.jobs.send_email": "email", "workers.jobs.deliver_webhook": "webhook"}


@dataclass(frozen=True)
class JobParts:
    """What a channel makes of one accepted request."""

    #: The wire format to the worker: `{"v": PAYLOAD_VERSION, "channel": name, ...}`.
    payload: dict[str, Any]
    #: What the API shows as the job's target (rq-dashboard shows it too, in the job's meta).
    target: dict[str, Any]
    #: One line for rq-dashboard and `rq info`.
    description: str


@dataclass(frozen=True)
class Channel:
    """A channel's what-to-send parts. Built once per channel module, as its CHANNEL."""

    #: Stable: stored with every job, the key of both registries, the `kind` the API shows.
    name: str
    #: Job ids start with it, so a registry can be counted by channel without reading jobs.
    id_prefix: str
    #: The API's collection: POST /v1/<path> and /v1/<path>/batch.
    path: str
    summary: str
    request: type[BaseModel]
    batch: type[BaseModel]
    #: The job's target (JobParts.target) as a TypedDict: the OpenAPI document's schema of it.
    target: type
    #: (validated request, job id, accepted at, settings) -> the job's parts.
    job: Callable[[Any, str, datetime, Settings], JobParts]
    #: RQ's job timeout: a safety net beyond the delivery's own deadlines.
    job_timeout: Callable[[Settings], int]
    #: The host names one raw request item names, which the API starts looking up before it
    #: validates (the request model judges them); None for a channel that names none.
    hosts: Callable[[Any], Iterator[str]] | None = None
    #: Deliveries per second every worker together may make (dispatcher.ratelimit); None: no limit.
    rate: Callable[[Settings], float | None] = lambda settings: None


def _registry() -> dict[str, Channel]:
    from dispatcher.channels import email, webhook

    return {channel.name: channel for channel in (email.CHANNEL, webhook.CHANNEL)}


CHANNELS: dict[str, Channel] = _registry()
#: The channel names, in the order the API lists them.
KINDS: tuple[str, ...] = tuple(CHANNELS)


def channel_of(job_id: str) -> Channel | None:
    """The channel a job id belongs to, by its prefix; None for an id Dispatcher did not make."""
    for channel in CHANNELS.values():
        if job_id.startswith(channel.id_prefix):
            return channel
    return None


def kind_of(job_id: str) -> str | None:
    channel = channel_of(job_id)
    return channel.name if channel else None
