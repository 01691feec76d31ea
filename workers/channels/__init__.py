"""Channels, the how-to-deliver side: one module per channel, and the registry of them.

Each module gives a `Deliverer`: how to make one attempt of a job of its channel, and which host
the per-host share of delivery slots counts it against. Generic code (the attempt, the worker)
asks the registry and names no channel. The what-to-send side is `dispatcher.channels`, under
the same names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dispatcher.channels import JOB_FUNCTION, LEGACY_JOB_FUNCTIONS, PAYLOAD_VERSION
from workers.decision import Decision


@dataclass(frozen=True)
class Delivered:
    """One attempt's success: the receiver's status code, and what to keep of its answer."""

    status_code: int
    #: The first 1 KB of the receiver's response body (webhooks).
    response_excerpt: str | None = None
    #: Something the sender should know of a success (some recipients refused, say).
    note: str | None = None
    #: Recipients left out because they are on the suppression list (email).
    suppressed: tuple[str, ...] = ()


def _no_host(data: dict) -> str | None:
    return None


def _nothing(job_id: str, data: dict, decision: Decision) -> None:
    return None


@dataclass(frozen=True)
class Deliverer:
    name: str
    #: (job id, payload) -> Delivered; raises a workers.errors.DeliveryError when the attempt fails.
    deliver: Callable[[str, dict], Delivered]
    #: The host (`host:port`) the per-host share of delivery slots counts the job against; None: none.
    host: Callable[[dict], str | None] = _no_host
    #: The host an attempt's log line names (dispatcher.logs), if not `host`: never an address or a secret.
    log_host: Callable[[dict], str | None] | None = None
    #: (job id, payload, decision) -> None: what follows an attempt once it is decided (an endpoint's
    #: health, the next delivery in order...), in the delivery thread, before the attempt is recorded.
    settle: Callable[[str, dict, Decision], None] = _nothing

    def target_host(self, payload: dict) -> str | None:
        return (self.log_host or self.host)(payload)


def _registry() -> dict[str, Deliverer]:
    from workers.channels import email, webhook

    return {deliverer.name: deliverer for deliverer in (email.DELIVERER, webhook.DELIVERER)}


DELIVERERS: dict[str, Deliverer] = _registry()


class UnknownPayload(ValueError):
    """A job whose function and payload name no channel this worker delivers; the message says why."""


def channel_of(function: str | None, payload: dict) -> str:
    """The channel of a job, from its payload (version 2) or, for version 1, its function."""
    if function == JOB_FUNCTION:
        version = payload.get("v")
        if version != PAYLOAD_VERSION:
            # A later version comes from a newer Dispatcher: this worker must not guess at it.
            raise UnknownPayload(f"its payload version {repr(version)[:40]} is not one this worker reads")
        channel = payload.get("channel")
    else:
        channel = LEGACY_JOB_FUNCTIONS.get(function or "")
        if channel is None:
            raise UnknownPayload(f"{str(function)[:80]!r} is not a Dispatcher job function")
    if not isinstance(channel, str) or channel not in DELIVERERS:
        raise UnknownPayload(f"its channel {str(channel)[:40]!r} is not one this worker delivers")
    return channel
