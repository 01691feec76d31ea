"""The attempt history and outcome totals, kept beside RQ's job hash.

RQ's `job.meta` is one blob and the last writer wins, so attempts live in their
own hash, one field per attempt number: a writer only ever sets its own field,
and no entry can be lost to a concurrent save. The attempt number comes from the
hash's counter, read and raised inside one Lua script, so even an attempt cut short
by a crash keeps its entry, and beginning an attempt is one command that can ride
in a pipeline.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, cast

import redis
from pydantic import ConfigDict, Field
from redis.client import Pipeline

from dispatcher.keys import Keys, Kind

Outcome = Literal["succeeded", "retryable", "permanent"]
#: A moment as the API writes it (isoformat): `date-time` in the OpenAPI document.
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
#: How many recent failures, and recent successes, GET /v1/stats lists.
RECENT = 10
#: The fields of the attempts hash that are not attempt numbers: the counter, the attempt that
#: settled the job, and how many attempts came before the current series (see _BEGIN).
_BOOKKEEPING = frozenset({b"n", b"settled", b"base"})

# KEYS: attempts hash, totals hash, the queue's FailedJobRegistry, the job's hash.
# ARGV: max attempts, the new attempt's JSON (without its number), TTL, job id, the job's
# `<kind>:failed` totals field.
# Returns {number, series start} for a new attempt; {0, JSON, number, series start} of the attempt
# that settled the job when it is settled (delivered, failed for good, or out of attempts: the
# `settled` field names that attempt, even when a later one was begun) and must not be delivered
# again; or {-1, why} when the history cannot be read (garbage in it must fail that job, not the
# script: a script error would fail every command of the worker's pipeline).
# A job settled as failed that is no longer in the FailedJobRegistry was taken out and queued again
# by RQ's requeue (`rq requeue`, rq-dashboard's Requeue): it starts a new series of attempts, with
# its own max attempts, appended to the same history; the totals stop counting it as failed, and
# its hash loses the expiry its failure gave it (RQ's requeue keeps it: the job could vanish while
# it waits for a retry). No other job's hash has one while it runs.
_BEGIN = """
local fields = redis.pcall('HMGET', KEYS[1], 'n', 'settled', 'base')
if fields['err'] then  -- WRONGTYPE: name what it is (the common case costs no TYPE call)
  return {-1, 'the attempt history is a ' .. redis.call('TYPE', KEYS[1])['ok'] .. ', not a hash'}
end
for i, name in ipairs({'attempt counter', 'settled attempt number', 'series start'}) do
  if fields[i] and (not string.match(fields[i], '^%d+$') or #fields[i] > 15) then
    return {-1, 'the ' .. name .. ' is not a number'}
  end
end
local n = tonumber(fields[1] or '0')
local settled = fields[2]
local base = tonumber(fields[3] or '0')
local function attempt_at(number)
  local raw = redis.call('HGET', KEYS[1], tostring(number))
  if not raw then return nil, nil end
  local ok, attempt = pcall(cjson.decode, raw)
  if not ok or type(attempt) ~= 'table' or type(attempt['started_at']) ~= 'string' then
    return raw, false
  end
  return raw, attempt
end
local renewed = false
if settled then
  local raw, attempt = attempt_at(settled)
  if attempt == false then return {-1, 'attempt record ' .. settled .. ' is not an attempt record'} end
  local failed = not attempt or attempt['outcome'] ~= 'succeeded'
  if failed and not redis.call('ZSCORE', KEYS[3], ARGV[4]) then
    redis.call('HDEL', KEYS[1], 'settled')
    redis.call('HINCRBY', KEYS[2], ARGV[5], -1)
    base = n
    redis.call('HSET', KEYS[1], 'base', base)
    redis.call('PERSIST', KEYS[4])
    renewed = true
  elseif raw then
    return {0, raw, tonumber(settled), base}
  end
end
if n > base and not renewed then
  local last, attempt = attempt_at(n)
  if attempt == false then return {-1, 'attempt record ' .. n .. ' is not an attempt record'} end
  if attempt then
    local outcome = attempt['outcome']
    if outcome == 'succeeded' or outcome == 'permanent' or n - base >= tonumber(ARGV[1]) then
      return {0, last, n, base}
    end
    if outcome ~= nil and outcome ~= cjson.null and outcome ~= 'retryable' then
      return {-1, 'attempt record ' .. n .. ' has an unknown outcome'}
    end
  end
end
n = n + 1  -- (the script runs alone: read, add and write is as atomic as HINCRBY)
redis.call('HSET', KEYS[1], 'n', n, tostring(n), ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {n, base}
"""
# KEYS: attempts hash, totals hash, the recent failures or successes list (as the outcome).
# ARGV: attempt number ('' for none), its JSON, totals field, the list's new entry (JSON),
# how many recent entries to keep, TTL ('' for none).
# Settles a job once: the first final outcome marks the history `settled` and is counted; a later
# one (the same job run twice, say after a worker was wrongly taken for dead) is stored, not counted.
# The list is trimmed once it holds twice what is kept: one command per job, not two.
_SETTLE = """
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
if redis.call('HSETNX', KEYS[1], 'settled', ARGV[1] == '' and '0' or ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  if redis.call('LPUSH', KEYS[3], ARGV[4]) > 2 * tonumber(ARGV[5]) then
    redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[5]) - 1)
  end
end
if ARGV[6] ~= '' then redis.call('EXPIRE', KEYS[1], ARGV[6]) end
return 0
"""
# KEYS: attempts hash. ARGV: the number of an attempt begun and not made.
# Takes the attempt back (the receiver refused to take the message for sending too fast, before
# anything was sent): its record goes and the counter steps back, unless another attempt began since.
_UNBEGIN = """
if redis.call('HGET', KEYS[1], 'n') == ARGV[1] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HSET', KEYS[1], 'n', tonumber(ARGV[1]) - 1)
end
return 0
"""
#: What the worker's failure Result says when a job could not be read; the status view shows it.
UNREADABLE = "the worker could not read the job"
#: The types each attempt record field may have (None: absent or null).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "started_at": (str,),
    "finished_at": (str, type(None)),
    "duration_ms": (int, type(None)),
    "outcome": (str, type(None)),
    "status_code": (int, type(None)),
    "error": (str, type(None)),
    "response_excerpt": (str, type(None)),
    "suppressed": (list, type(None)),
}
_OUTCOMES = frozenset({"succeeded", "retryable", "permanent", None})


class UnreadableHistory(ValueError):
    """A job's attempt history (the hash, its counter or a record) holds something else than we write."""


def isoformat(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a `Z`, the one time format of the API."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Attempt:
    #: For the OpenAPI document (dispatcher.views): the API shows an attempt's fields and no others.
    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(
        extra="forbid", json_schema_serialization_defaults_required=True
    )

    number: Annotated[int, Field(ge=1)]
    started_at: Timestamp
    finished_at: Timestamp | None = None
    duration_ms: int | None = None
    outcome: Outcome | None = None
    status_code: int | None = None
    error: str | None = None
    response_excerpt: str | None = None
    #: Email recipients this attempt left out, being on the suppression list (null: none, or a
    #: record written before there was a suppression list).
    suppressed: list[str] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_record(cls, number: int, raw: bytes | str) -> Attempt:
        """Parse one stored record; UnreadableHistory unless it has the shape `to_json` writes."""
        try:
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise UnreadableHistory(f"attempt record {number} is not JSON") from None
        if not isinstance(record, dict):
            raise UnreadableHistory(f"attempt record {number} is not a JSON object")
        for name, types in _FIELD_TYPES.items():
            value = record.get(name)
            # (bool is an int to isinstance; a record never holds one)
            if not isinstance(value, types) or isinstance(value, bool):
                raise UnreadableHistory(f"attempt record {number} has an invalid {name}")
        if record.get("outcome") not in _OUTCOMES:
            raise UnreadableHistory(f"attempt record {number} has an unknown outcome")
        if not all(isinstance(address, str) for address in record.get("suppressed") or ()):
            raise UnreadableHistory(f"attempt record {number} has an invalid suppressed")
        fields: dict[str, Any] = {name: record.get(name) for name in _FIELD_TYPES}  # types checked above
        return cls(number=number, **fields)


class Began(NamedTuple):
    """What `History.begin` came to."""

    attempt: Attempt
    #: True: make `attempt`. False: the job is settled, and `attempt` is the one that settled it.
    fresh: bool
    #: How many attempts came before the current series (a job requeued by RQ's tools starts one).
    series_start: int


class History:
    """Writes and reads attempt records and outcome totals."""

    def __init__(self, connection: redis.Redis, keys: Keys) -> None:
        self.connection = connection
        self.keys = keys
        self._begin = connection.register_script(_BEGIN)
        self._settle = connection.register_script(_SETTLE)
        self._unbegin = connection.register_script(_UNBEGIN)

    def begin(
        self,
        pipe: Pipeline,
        kind: Kind,
        job_id: str,
        max_attempts: int,
        keep_for: int,
        failed_registry: str,
        job_key: str,
    ) -> datetime:
        """Queue the start of a new attempt in `pipe`; read its reply with `began()`.

        `keep_for` bounds the history's life until the job ends (then `finish` sets the
        job's own TTL), so a job deleted behind our back does not leave it forever.
        `failed_registry` is the key of the job's queue's FailedJobRegistry: a job settled as
        failed and no longer in it was requeued by RQ's tools, and starts a new series (and its
        hash, `job_key`, loses the expiry its failure gave it).
        """
        started = datetime.now(UTC)
        record = json.dumps({"started_at": isoformat(started)}, separators=(",", ":"))
        self._begin(
            keys=[self.keys.attempts(job_id), self.keys.totals, failed_registry, job_key],
            args=[max_attempts, record, keep_for, job_id, f"{kind}:failed"],
            client=pipe,
        )
        return started

    @staticmethod
    def began(reply: list, started: datetime) -> Began:
        """The attempt to make, or the attempt that settled the job (`fresh` False).

        Raises UnreadableHistory when the job's history holds garbage.
        """
        if int(reply[0]) < 0:
            why = reply[1].decode(errors="replace") if isinstance(reply[1], bytes) else str(reply[1])
            raise UnreadableHistory(why)
        if int(reply[0]) == 0:
            return Began(Attempt.from_record(int(reply[2]), reply[1]), False, int(reply[3]))
        return Began(Attempt(number=int(reply[0]), started_at=isoformat(started)), True, int(reply[1]))

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
        if not final:
            pipe.hset(self.keys.attempts(job_id), str(attempt.number), attempt.to_json())
            return
        self.count(
            pipe,
            kind,
            job_id,
            succeeded=attempt.outcome == "succeeded",
            at=attempt.finished_at,
            attempt=attempt,
            error=attempt.error,
            target=target,
            ttl=ttl,
        )

    def count(
        self,
        pipe: Pipeline,
        kind: Kind,
        job_id: str,
        *,
        succeeded: bool,
        at: datetime | str | None,
        attempt: Attempt | None,
        error: str | None,
        target: dict | None = None,
        ttl: int | None = None,
    ) -> None:
        """Queue in `pipe`: settle the job with `attempt` (None: it never got one) and count its
        outcome, unless it was settled already; the job also joins the recent failures or successes."""
        moment = isoformat(at) if isinstance(at, datetime) else at
        made = attempt.number if attempt else 0
        entry: dict[str, Any] = (
            {"id": job_id, "kind": kind, "succeeded_at": moment, "attempts": made, "target": target}
            if succeeded
            else {"id": job_id, "kind": kind, "failed_at": moment, "attempts": made, "error": error, "target": target}
        )
        self._settle(
            keys=[
                self.keys.attempts(job_id),
                self.keys.totals,
                self.keys.recent_successes if succeeded else self.keys.recent_failures,
            ],
            args=[
                str(attempt.number) if attempt else "",
                attempt.to_json() if attempt else "",
                f"{kind}:{'succeeded' if succeeded else 'failed'}",
                json.dumps(entry, separators=(",", ":")),
                RECENT,
                "" if ttl is None else ttl,
            ],
            client=pipe,
        )

    def unbegin(self, pipe: Pipeline, job_id: str, number: int) -> None:
        """Queue in `pipe`: take back attempt `number`, begun but not made (the receiver asked us to
        slow down before taking the message): it does not count, and the next one gets its number."""
        self._unbegin(keys=[self.keys.attempts(job_id)], args=[number], client=pipe)

    def attempts(self, job_id: str) -> list[dict]:
        """Every attempt of a job, oldest first."""
        # The connection does not decode responses: redis-py's stubs say bytes | str.
        return parse_attempts(cast(dict[bytes, bytes], self.connection.hgetall(self.keys.attempts(job_id))))

    def totals(self) -> dict[str, int]:
        raw = cast(dict[bytes, bytes], self.connection.hgetall(self.keys.totals))  # responses are not decoded
        return {k.decode(): int(v) for k, v in raw.items()}

    def recent_failures(self) -> list[dict]:
        return [json.loads(item) for item in self.connection.lrange(self.keys.recent_failures, 0, RECENT - 1)]

    def recent_successes(self) -> list[dict]:
        return [json.loads(item) for item in self.connection.lrange(self.keys.recent_successes, 0, RECENT - 1)]


def parse_attempts(raw: dict[bytes, bytes]) -> list[dict]:
    """The records of an attempts hash in API form, oldest first; UnreadableHistory on garbage."""
    attempts, problems = read_attempts(raw)
    if problems:
        raise UnreadableHistory("; ".join(problems))
    return attempts


def read_attempts(raw: dict[bytes, bytes]) -> tuple[list[dict], list[str]]:
    """The readable records of an attempts hash in API form, oldest first, and what could not be read.

    The field name is the attempt number; `n` is the counter.
    """
    attempts, problems = [], []
    for field, value in raw.items():
        if field in _BOOKKEEPING:
            continue
        if not (field.isdigit() and len(field) <= 15):
            problems.append(f"the attempt history has a field {field[:40]!r}")
            continue
        try:
            attempts.append(asdict(Attempt.from_record(int(field), value)))
        except UnreadableHistory as exc:
            problems.append(str(exc))
    return sorted(attempts, key=lambda record: record["number"]), sorted(problems)
