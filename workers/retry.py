"""When the next attempt happens: the job's backoff, jitter, and the receiver's Retry-After."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

#: Every delay is spread by +/-20 % so that retries of a burst do not arrive together.
JITTER = 0.2
#: A Retry-After further out than this is capped: one day.
MAX_RETRY_AFTER = 24 * 3600


def next_delay(backoff: list[float], next_attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait before attempt `next_attempt` (2 or more).

    `backoff[i]` is the delay before attempt i+2; past its end the last value repeats.
    Retry-After is a floor: the attempt starts no earlier than that.
    """
    base = float(backoff[min(next_attempt - 2, len(backoff) - 1)]) if backoff else 0.0
    delay = base * random.uniform(1 - JITTER, 1 + JITTER)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return delay


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), or None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²" is isdigit() too, but float() raises on it
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
