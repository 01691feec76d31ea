"""What an attempt leads to (workers.attempt decides it): a type of its own, so that a channel's
follow-up of a decided attempt (workers.channels.Deliverer.settle) can name it without the attempt's
machinery."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dispatcher.history import Attempt


@dataclass
class Decision:
    """What an attempt leads to: done, another try after `delay` seconds, or failed for good."""

    verdict: Literal["succeeded", "retry", "failed"]
    attempt: Attempt
    delay: float = 0.0
    #: Attempts made before this series (see dispatcher.history.Began).
    series_start: int = 0

    @property
    def error(self) -> str:
        if self.attempt.outcome == "retryable" and self.verdict == "failed":
            made = self.attempt.number - self.series_start
            return f"gave up after {made} attempt(s): {self.attempt.error}"
        return self.attempt.error or "permanent failure"

    @property
    def rq_delay(self) -> float:
        """The retry delay to hand RQ: it keeps the due time in whole seconds, rounded down,
        so one second more and the attempt is never early (0 still means "requeue now")."""
        return self.delay + 1 if self.delay > 0 else 0

    @property
    def result(self) -> dict:
        return {"status_code": self.attempt.status_code, "attempts": self.attempt.number}
