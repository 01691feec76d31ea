"""The attempt history and outcome totals, kept beside RQ's job hash.

RQ's `job.meta` is one blob and the last writer wins, so attempts live in their
own hash, one field per attempt number: a writer only ever sets its own field,
and no entry can be lost to a concurrent save. The attempt number comes from
HINCRBY, so even an attempt cut short by a crash keeps its entry.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Literal

import redis

from dispatcher.keys import Keys, Kind

Outcome = Literal["succeeded", "retryable", "permanent"]
RECENT_FAILURES = 10
#: The counter's field in the attempts hash; every other field is an attempt number.
_COUNTER = "n"


def isoformat(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a `Z`, the one time format of the API."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Attempt:
    number: int
    started_at: str
    finished_at: str | None = None
    duration_ms: int | None = None
    outcome: Outcome | None = None
    status_code: int | None = None
    error: str | None = None
    response_excerpt: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


class History:
    """Writes and reads attempt records and outcome totals."""

    def __init__(self, connection: redis.Redis, keys: Keys) -> None:
        self.connection = connection
        self.keys = keys

    def start_attempt(self, job_id: str, keep_for: int) -> Attempt:
        """Number and record a new attempt as begun; it shows while running and if it is cut short.

        `keep_for` bounds the history's life until the job ends (then `finish_attempt` sets
        the job's own TTL), so a job deleted behind our back does not leave it forever.
        """
        key = self.keys.attempts(job_id)
        number = int(self.connection.hincrby(key, _COUNTER, 1))
        attempt = Attempt(number=number, started_at=isoformat(datetime.now(UTC)))
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hset(key, str(number), attempt.to_json())
            pipe.expire(key, keep_for)
            pipe.execute()
        return attempt

    def finish_attempt(
        self,
        kind: Kind,
        job_id: str,
        attempt: Attempt,
        *,
        final: bool,
        ttl: int | None = None,
        target: dict | None = None,
        mirror: tuple[str, bytes] | None = None,
    ) -> None:
        """Store the finished attempt; when `final`, count the job's outcome and let its history expire.

        `mirror` is (RQ job key, serialized job meta): a summary for rq-dashboard, written in the same round trip.
        """
        key = self.keys.attempts(job_id)
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.hset(key, str(attempt.number), attempt.to_json())
            if mirror is not None:
                pipe.hset(mirror[0], "meta", mirror[1])
            if final:
                succeeded = attempt.outcome == "succeeded"
                pipe.hincrby(self.keys.totals, f"{kind}:{'succeeded' if succeeded else 'failed'}", 1)
                if not succeeded:
                    failure = {
                        "id": job_id,
                        "kind": kind,
                        "failed_at": attempt.finished_at,
                        "attempts": attempt.number,
                        "error": attempt.error,
                        "target": target,
                    }
                    pipe.lpush(self.keys.recent_failures, json.dumps(failure, separators=(",", ":")))
                    pipe.ltrim(self.keys.recent_failures, 0, RECENT_FAILURES - 1)
                if ttl is not None:
                    pipe.expire(key, ttl)
            pipe.execute()

    def last_attempt(self, job_id: str) -> Attempt | None:
        """The most recent attempt, finished or not, or None before the first."""
        key = self.keys.attempts(job_id)
        number = self.connection.hget(key, _COUNTER)
        raw = self.connection.hget(key, number) if number is not None else None
        return Attempt(**json.loads(raw)) if raw is not None else None

    def attempts(self, job_id: str) -> list[dict]:
        """Every attempt of a job, oldest first."""
        return parse_attempts(self.connection.hgetall(self.keys.attempts(job_id)))

    def totals(self) -> dict[str, int]:
        raw = self.connection.hgetall(self.keys.totals)
        return {k.decode(): int(v) for k, v in raw.items()}

    def recent_failures(self) -> list[dict]:
        return [json.loads(item) for item in self.connection.lrange(self.keys.recent_failures, 0, -1)]


def parse_attempts(raw: dict[bytes, bytes]) -> list[dict]:
    records = [json.loads(value) for field, value in raw.items() if field != _COUNTER.encode()]
    return sorted(records, key=lambda record: record["number"])
