"""Running tallies of delivery attempts in Redis: what the workers add per batch and /metrics reads.

Every worker process, on whatever machine, adds its finished attempts to one hash per Dispatcher
queue (`Keys.tallies`), so the web process reads the whole deployment's figures at scrape time,
whichever of its processes answers. A `count:` field counts the attempts of one channel, priority
and outcome whose duration fell in one bucket (not cumulative: the reader adds the buckets up), so
one HINCRBY counts an attempt both as an attempt and in the duration histogram; an `ms:` field per
channel and outcome sums the durations (the `duration_ms` the API shows). A worker adds up a batch
first: each distinct field costs one HINCRBY per batch, not one per attempt.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import cast, get_args

from redis.client import Pipeline

from dispatcher.history import Attempt, Outcome
from dispatcher.keys import Keys, Kind
from dispatcher.priorities import PRIORITIES, Priority, split

#: Upper bounds, in seconds, of the attempt duration histogram's buckets (+Inf follows): from a
#: nearby receiver's few milliseconds to the longest deadlines (DISPATCHER_WEBHOOK_TIMEOUT is at
#: most 300 s). Fixed, because a histogram's buckets must stay the same from scrape to scrape.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
#: The buckets in whole milliseconds, the unit of an attempt's duration (a field names +Inf `inf`).
_BOUNDS_MS = tuple(round(bound * 1000) for bound in DURATION_BUCKETS)
_INF = "inf"


def _bucket(ms: int) -> str:
    """The field part naming the smallest bucket that holds `ms` milliseconds."""
    index = bisect.bisect_left(_BOUNDS_MS, ms)
    return str(_BOUNDS_MS[index]) if index < len(_BOUNDS_MS) else _INF


class Tally:
    """The finished attempts of one batch, added up so that each field costs one command."""

    def __init__(self) -> None:
        self._fields: Counter[str] = Counter()

    def add(self, kind: Kind, queue_name: str, attempt: Attempt) -> Tally:
        """Count a finished attempt (one with an outcome) of a job from the RQ queue `queue_name`."""
        if attempt.outcome is not None:
            ms = max(attempt.duration_ms or 0, 0)
            self._fields[f"count:{kind}:{split(queue_name)[1]}:{attempt.outcome}:{_bucket(ms)}"] += 1
            self._fields[f"ms:{kind}:{attempt.outcome}"] += ms
        return self

    def write(self, pipe: Pipeline, keys: Keys) -> None:
        """Queue the batch's increments in `pipe`: one HINCRBY per field."""
        for name, amount in self._fields.items():
            if amount:
                pipe.hincrby(keys.tallies, name, amount)


@dataclass
class Durations:
    """One channel's and outcome's attempt durations as a histogram."""

    #: Cumulative counts: attempts that took at most DURATION_BUCKETS[i] seconds; the last, +Inf, all.
    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    seconds: float = 0.0

    @property
    def count(self) -> int:
        return self.buckets[-1]


@dataclass
class Tallies:
    """Every attempt counted so far, each combination of channel, priority and outcome present (at 0
    until counted: a series that appears only with its first attempts would hide them from rate())."""

    attempts: dict[tuple[Kind, Priority, Outcome], int]
    durations: dict[tuple[Kind, Outcome], Durations]

    @classmethod
    def parse(cls, raw: dict[bytes, bytes], kinds: tuple[Kind, ...]) -> Tallies:
        """From the tallies hash (an HGETALL reply). A field or value that is not ours is skipped:
        garbage must not take /metrics down."""
        attempts = {(k, p, o): 0 for k in kinds for p in PRIORITIES for o in OUTCOMES}
        durations = {(k, o): Durations() for k in kinds for o in OUTCOMES}
        # Per bucket first, then cumulated: a bound this release does not have (an earlier
        # release's) goes to the smallest bucket above it, where its attempts still belong.
        per_bucket: Counter[tuple[Kind, Outcome, int]] = Counter()
        for raw_name, raw_value in raw.items():
            try:
                name, value = raw_name.decode(), int(raw_value)
            except (UnicodeDecodeError, ValueError):
                continue
            match name.split(":"):
                case ["count", kind, priority, outcome, bound] if (kind, priority, outcome) in attempts:
                    ms = _parse_bound(bound)
                    if ms is None:
                        continue
                    attempts[kind, cast(Priority, priority), cast(Outcome, outcome)] += value
                    per_bucket[kind, cast(Outcome, outcome), bisect.bisect_left(_BOUNDS_MS, ms)] += value
                case ["ms", kind, outcome] if (kind, outcome) in durations:
                    durations[kind, cast(Outcome, outcome)].seconds += value / 1000
        for (kind, outcome, index), value in per_bucket.items():
            buckets = durations[kind, outcome].buckets
            for i in range(index, len(buckets)):
                buckets[i] += value
        return cls(attempts, durations)


def _parse_bound(text: str) -> int | float | None:
    """A bucket's bound in milliseconds from its field part (`inf` for +Inf); None if it is neither."""
    if text == _INF:
        return float("inf")
    return int(text) if text.isascii() and text.isdigit() else None
