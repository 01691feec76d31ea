"""The attempt history and outcome totals, kept beside RQ's job hash.

RQ's `job.meta` is one blob and the last writer wins, so attempts live in their
own hash, one field per attempt number: a writer only ever sets its own field,
and no entry can be lost to a concurrent save. The attempt number comes from
HINCRBY inside a Lua script, so even an attempt cut short by a crash keeps its
entry, and beginning an attempt is one command that can ride in a pipeline.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Literal

import redis
from redis.client import Pipeline

from dispatcher.keys import Keys, Kind

Outcome = Literal["succeeded", "retryable", "permanent"]
RECENT_FAILURES = 10
#: The counter's field in the attempts hash; every other field is an attempt number.
_COUNTER = "n"

# KEYS: attempts hash. ARGV: max attempts, the new attempt's JSON (without its number), TTL.
# Returns {number} for a new attempt, or {0, last attempt JSON, its number} when the job is already
# settled (delivered, failed for good, or out of attempts) and must not be delivered again.
_BEGIN = """
local n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
if n > 0 then
  local last = redis.call('HGET', KEYS[1], tostring(n))
  if last then
    local outcome = cjson.decode(last)['outcome']
    if outcome == 'succeeded' or outcome == 'permanent' or n >= tonumber(ARGV[1]) then
      return {0, last, n}
    end
  end
end
n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSET', KEYS[1], tostring(n), ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {n}
"""


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

    @classmethod
    def from_record(cls, number: int, raw: bytes | str) -> Attempt:
        record = json.loads(raw)
        return cls(number=number, **{f.name: record.get(f.name) for f in fields(cls) if f.name != "number"})


class History:
    """Writes and reads attempt records and outcome totals."""

    def __init__(self, connection: redis.Redis, keys: Keys) -> None:
        self.connection = connection
        self.keys = keys
        self._begin = connection.register_script(_BEGIN)

    def begin(self, pipe: Pipeline, job_id: str, max_attempts: int, keep_for: int) -> datetime:
        """Queue the start of a new attempt in `pipe`; read its reply with `began()`.

        `keep_for` bounds the history's life until the job ends (then `finish` sets the
        job's own TTL), so a job deleted behind our back does not leave it forever.
        """
        started = datetime.now(UTC)
        record = json.dumps({"started_at": isoformat(started)}, separators=(",", ":"))
        self._begin(keys=[self.keys.attempts(job_id)], args=[max_attempts, record, keep_for], client=pipe)
        return started

    @staticmethod
    def began(reply: list, started: datetime) -> tuple[Attempt, bool]:
        """(the attempt to make, True) or (the job's last attempt, False) when it is already settled."""
        if int(reply[0]) == 0:
            return Attempt.from_record(int(reply[2]), reply[1]), False
        return Attempt(number=int(reply[0]), started_at=isoformat(started)), True

    def finish(
        self,
        pipe: Pipeline,
        kind: Kind,
        job_id: str,
        attempt: Attempt,
        *,
        final: bool,
        ttl: int | None = None,
        target: dict | None = None,
    ) -> None:
        """Queue in `pipe`: store the attempt; when `final`, count the outcome and let the history expire."""
        key = self.keys.attempts(job_id)
        pipe.hset(key, str(attempt.number), attempt.to_json())
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

    def attempts(self, job_id: str) -> list[dict]:
        """Every attempt of a job, oldest first."""
        return parse_attempts(self.connection.hgetall(self.keys.attempts(job_id)))

    def totals(self) -> dict[str, int]:
        raw = self.connection.hgetall(self.keys.totals)
        return {k.decode(): int(v) for k, v in raw.items()}

    def recent_failures(self) -> list[dict]:
        return [json.loads(item) for item in self.connection.lrange(self.keys.recent_failures, 0, -1)]


def parse_attempts(raw: dict[bytes, bytes]) -> list[dict]:
    """The records of an attempts hash in API form, oldest first (the field name is the number)."""
    attempts = [
        asdict(Attempt.from_record(int(field), value)) for field, value in raw.items() if field != _COUNTER.encode()
    ]
    return sorted(attempts, key=lambda record: record["number"])
