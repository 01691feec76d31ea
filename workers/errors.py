"""Delivery errors: whether a failed attempt may be retried is a type, not a flag.

    DeliveryHeld                 not an attempt: the delivery may not go yet (an endpoint's rate
                                 limit, open circuit breaker or order); it waits as scheduled
    DeliveryError
    ├── RetryableDeliveryError   connection errors, timeouts, HTTP 408/425/429/5xx, SMTP 4xx
    │   └── ThrottledDeliveryError   SMTP 421, 454 or a 4xx naming a rate: the server asks us to slow down
    └── PermanentDeliveryError   other HTTP 3xx/4xx, SMTP 5xx, a destination the network guard refuses
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis.client import Pipeline


class DeliveryHeld(Exception):
    """Raised before anything is sent: the delivery waits `delay` seconds as a scheduled job, and no
    attempt is counted (the attempt begun for it is taken back). `reason` is shown on the job.

    `then`, if given, is queued in the pipeline that schedules the job, after it: to start the job
    at once should what held it have ended meanwhile (an ordered delivery whose turn came while it
    was being held), which nothing could otherwise tell a job not yet scheduled."""

    def __init__(self, delay: float, reason: str, then: Callable[[Pipeline], object] | None = None) -> None:
        super().__init__(reason)
        self.delay = delay
        self.reason = reason
        self.then = then


class DeliveryError(Exception):
    def __init__(self, message: str, status_code: int | None = None, response_excerpt: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.response_excerpt = response_excerpt
        #: Recipients the attempt left out because they are on the suppression list (email).
        self.suppressed: tuple[str, ...] = ()


class RetryableDeliveryError(DeliveryError):
    """Worth another attempt; `retry_after` (seconds) is the receiver's own floor, if it gave one."""

    def __init__(
        self,
        message: str,
        status_code: int | None = None,
        response_excerpt: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code, response_excerpt)
        self.retry_after = retry_after


class ThrottledDeliveryError(RetryableDeliveryError):
    """The receiver refused the message because we send too fast. With a sending rate set, the worker
    lowers the rate and tries again without counting an attempt; otherwise it is an ordinary retry."""


class PermanentDeliveryError(DeliveryError):
    """Another attempt would fail the same way."""


class DeliveryFailed(Exception):
    """Raised to RQ when a job has failed for good, so that RQ moves it to its failed registry."""
