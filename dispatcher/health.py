"""Endpoint health: a circuit breaker per endpoint, shared by every worker through Redis, and the
record of every change of an endpoint's health, told to its owner by email and to its application
as an event.

The state lives apart from the endpoint's record (dispatcher.endpoints), which stays the
registration: one hash per endpoint (Keys.endpoint_health) holds the breaker and the failures, so a
PATCH and a worker's update never overwrite each other. Only disabling touches the record (its
`disabled` becomes true), in one WATCH/MULTI transaction with the change.

- Every attempt that reached (or tried to reach) the endpoint counts: a success clears the
  failures; a failure, retryable or permanent, adds one. BREAKER_FAILURES (DISPATCHER_BREAKER_FAILURES)
  in a row open the breaker: deliveries are held as scheduled (workers.endpoints.admit), no
  attempt counted, until the cooldown (DISPATCHER_BREAKER_COOLDOWN) has passed. Then the breaker
  is half-open: exactly one delivery goes as the probe (SET NX with a TTL, so one worker only, and
  another may probe should that worker die); the others are held a little longer. The probe's
  success (or any success) closes the breaker; its failure keeps it open for twice the cooldown
  (up to BREAKER_MAX_COOLDOWN), which is not a new change.
- 410 Gone disables the endpoint at once (it is not counted toward the breaker).
- An endpoint that has failed since `failing_since` (its first failure after its last success)
  for DISPATCHER_ENDPOINT_DISABLE_AFTER seconds is disabled at its next failure.
- PATCH `disabled` disables an endpoint or enables it again; enabling resets its breaker.

Each change (open, closed, disabled, enabled) gets the endpoint's next sequence number and goes,
in the same atomic step as the state, into the endpoint's capped list of changes and into the
queue's outbox. Whoever made it then empties the outbox (`notify`): per change an email to the
endpoint's owner and an event to its application, each enqueued with an idempotency claim whose
key is the endpoint's id and the change's number, then the change leaves the outbox. A crash in
between leaves it there, for the next worker to settle a delivery that is not a plain success to a
healthy endpoint (those, most deliveries, read one hash and stop), or for the next change, to
enqueue; the claim makes that a no-op for whatever was enqueued already: each change is mailed and
published once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import redis
from pydantic import ConfigDict, ValidationError, with_config
from redis.client import Pipeline
from redis.commands.core import Script
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

from dispatcher.config import BREAKER_MAX_COOLDOWN, Settings
from dispatcher.endpoints import Endpoint, Registry
from dispatcher.errors import AlreadyAccepted
from dispatcher.history import Timestamp, isoformat
from dispatcher.idempotency import Claim
from dispatcher.keys import Keys

log = logging.getLogger(__name__)

#: Changes kept per endpoint, newest first.
CHANGES_KEPT = 20
#: Seconds a probe may stay out beyond the webhook timeout before another delivery may probe.
PROBE_MARGIN = 5.0
#: Seconds a delivery is held while the probe is out.
PROBE_RECHECK = 2.0
#: Changes one call of `notify` sends.
OUTBOX_BATCH = 100
#: The idempotency "client" of the emails and events of changes (an API client's is a hex hash).
CLAIM_CLIENT = "health"

State = Literal["healthy", "open", "half_open", "disabled"]
#: A change's state: what the endpoint became.
ChangeState = Literal["open", "closed", "disabled", "enabled"]


@with_config(ConfigDict(extra="forbid"))
class HealthChange(TypedDict):
    """One change of an endpoint's health, as the API shows it."""

    sequence: int
    at: Timestamp | None
    state: ChangeState
    reason: str


@with_config(ConfigDict(extra="forbid"))
class EndpointHealth(TypedDict):
    """An endpoint's `health`: its circuit breaker and failures, and its changes, newest first."""

    state: State
    reason: str | None
    consecutive_failures: int
    failing_since: Timestamp | None
    next_probe_at: Timestamp | None
    changes: list[HealthChange]

EVENT_TYPES: dict[str, str] = {
    "open": "endpoint.circuit_opened",
    "closed": "endpoint.circuit_closed",
    "disabled": "endpoint.disabled",
    "enabled": "endpoint.enabled",
}


def cooldown_cap(settings: Settings) -> float:
    return max(settings.breaker_cooldown, BREAKER_MAX_COOLDOWN)


# --- the worker's side: before and after a delivery ------------------------------------------


def probe_or_wait(connection: redis.Redis, keys: Keys, endpoint_id: str, job_id: str, settings: Settings) -> float:
    """For a delivery to an endpoint whose breaker is open: 0 if it may go now (as the probe, or
    because the breaker closed meanwhile), else the seconds it should wait."""
    ttl_ms = int((settings.webhook_timeout + PROBE_MARGIN) * 1000)
    go, wait = _PROBE(
        keys=[keys.endpoint_health(endpoint_id), keys.endpoint_probe(endpoint_id)],
        args=[job_id, ttl_ms, PROBE_RECHECK],
        client=connection,
    )
    return 0.0 if int(go) else float(wait)


def record_attempt(
    connection: redis.Redis, keys: Keys, endpoint_id: str, job_id: str, failed: bool, error: str, settings: Settings
) -> tuple[float, float | None, int]:
    """Count a decided attempt to the endpoint, opening or closing its breaker if it should:
    (Redis's time now, when the endpoint began failing or None, changes waiting in the outbox);
    (0, None, 0) for a success to a healthy endpoint, which changes nothing."""
    now, since, waiting = _SETTLE(
        keys=[
            keys.endpoint_health(endpoint_id),
            keys.endpoint_probe(endpoint_id),
            keys.endpoint_changes(endpoint_id),
            keys.health_outbox,
            keys.endpoints,
        ],
        args=[
            endpoint_id,
            job_id,
            int(failed),
            settings.breaker_failures,
            settings.breaker_cooldown,
            cooldown_cap(settings),
            error[:300],
            CHANGES_KEPT,
        ],
        client=connection,
    )
    return float(now), float(since) if since else None, int(waiting)


def disable(connection: redis.Redis, keys: Keys, endpoint_id: str, reason: str) -> bool:
    """Disable the endpoint and record the change, in one transaction; False if it is gone or was
    disabled already."""

    def change(record: Endpoint, health: dict[bytes, bytes]) -> tuple[dict[str, Any], ChangeState | None, str] | None:
        if record["disabled"]:
            return None
        return {"disabled": True}, "disabled", reason

    return _transition(connection, keys, endpoint_id, change) is not None


# --- the API's side: PATCH ---------------------------------------------------------------------


def change_endpoint(registry: Registry, application_id: str, endpoint_id: str, fields: dict[str, Any]) -> tuple[
    Endpoint | None, bool
]:
    """PATCH with `disabled` in `fields`: the changed endpoint (None if there is none) and whether a
    change of health was recorded. Disabling records one; enabling does if the endpoint was
    disabled or its breaker not closed, and resets its breaker and failures."""

    def change(record: Endpoint, health: dict[bytes, bytes]) -> tuple[dict[str, Any], ChangeState | None, str] | None:
        if record["application"] != application_id:
            return None
        if fields["disabled"]:
            return (fields, "disabled", "disabled through the API") if not record["disabled"] else (fields, None, "")
        if record["disabled"]:
            return fields, "enabled", "enabled through the API"
        if health.get(b"state") == b"open" or health.get(b"failures"):
            return fields, "enabled", "its circuit breaker and failures were reset through the API"
        return fields, None, ""

    result = _transition(registry.connection, registry.keys, endpoint_id, change)
    if result is None:
        return None, False
    return result


# --- one endpoint's transition -----------------------------------------------------------------


def _transition(
    connection: redis.Redis,
    keys: Keys,
    endpoint_id: str,
    change: Callable[[Endpoint, dict[bytes, bytes]], tuple[dict[str, Any], ChangeState | None, str] | None],
) -> tuple[Endpoint, bool] | None:
    """Apply `change(record, health)` to the endpoint, with WATCH on its record and its health:
    the fields it returns replace the record's; a state records that change (disabling or enabling
    resets the breaker). None if there is no such endpoint or `change` returned None."""
    health_key = keys.endpoint_health(endpoint_id)
    with connection.pipeline() as pipe:
        while True:
            try:
                pipe.watch(keys.endpoints, health_key)
                raw = pipe.hget(keys.endpoints, endpoint_id)
                if raw is None:
                    return None
                record: Endpoint = json.loads(raw)  # type: ignore[arg-type]
                health: dict[bytes, bytes] = pipe.hgetall(health_key)  # type: ignore[assignment]
                decided = change(record, health)
                if decided is None:
                    return None
                fields, state, reason = decided
                seconds, micros = pipe.time()  # type: ignore[misc]
                now = seconds + micros / 1_000_000
                record = record | fields  # type: ignore[assignment]
                record["updated_at"] = isoformat(datetime.fromtimestamp(now, UTC))
                pipe.multi()
                pipe.hset(keys.endpoints, endpoint_id, json.dumps(record))
                if state is not None:
                    sequence = int(health.get(b"seq", 0)) + 1
                    entry = json.dumps({"sequence": sequence, "at": now, "state": state, "reason": reason})
                    # Disabled or enabled, the breaker starts afresh; failures stay shown until enabled.
                    pipe.hdel(health_key, "state", "retry_at", "cooldown", "reason")
                    pipe.hset(health_key, "seq", sequence)
                    if state == "disabled":
                        pipe.hset(health_key, "disabled_reason", reason)
                    else:
                        pipe.hdel(health_key, "disabled_reason", "failures", "failing_since")
                    pipe.delete(keys.endpoint_probe(endpoint_id))
                    _log_change(pipe, keys, endpoint_id, entry, json.dumps(record))
                pipe.execute()
                return record, state is not None
            except redis.WatchError:
                continue


def _log_change(pipe: Pipeline, keys: Keys, endpoint_id: str, entry: str, record: str) -> None:
    changes = keys.endpoint_changes(endpoint_id)
    pipe.lpush(changes, entry)
    pipe.ltrim(changes, 0, CHANGES_KEPT - 1)
    pipe.rpush(keys.health_outbox, f'{{"endpoint":{record},"change":{entry}}}')


# --- telling the owner and the application ---------------------------------------------------


def notify(connection: redis.Redis, settings: Settings) -> int:
    """Enqueue the email and the event of each change waiting in the queue's outbox (`settings`
    are those of the endpoints' Dispatcher queue); return how many changes were done."""
    keys = Keys(settings.queue_name)
    done = 0
    for raw in connection.lrange(keys.health_outbox, 0, OUTBOX_BATCH - 1):  # type: ignore[union-attr]
        try:
            notice = json.loads(raw)
            endpoint, change = notice["endpoint"], notice["change"]
            _email(connection, settings, keys, endpoint, change)
            _event(connection, settings, keys, endpoint, change)
        except (ValueError, KeyError, TypeError):  # not one of ours: it can never be sent
            log.exception("dropped an unreadable endpoint health change: %r", raw[:200])
        connection.lrem(keys.health_outbox, 1, raw)  # type: ignore[arg-type]  # bytes, as read
        done += 1
    return done


def _claim(keys: Keys, endpoint: Endpoint, change: dict, what: str) -> Claim:
    name = f"{endpoint['id']}:{change['sequence']}:{what}"
    return Claim(keys.idempotency(CLAIM_CLIENT, name), fingerprint=name)


def _email(connection: redis.Redis, settings: Settings, keys: Keys, endpoint: Endpoint, change: dict) -> None:
    from dispatcher.channels.email import EmailRequest
    from dispatcher.enqueue import enqueue

    if not endpoint.get("owner_email"):
        return
    application = Registry(connection, keys).application(endpoint["application"])
    subject, text = describe(endpoint, application["name"] if application else None, change)
    try:
        request = EmailRequest.model_validate(
            {
                "to": [endpoint["owner_email"]],
                "subject": subject,
                "text": text,
                "metadata": {"endpoint": endpoint["id"], "health_change": str(change["sequence"])},
            },
            context={"email_from": settings.email_from},
        )
    except ValidationError as exc:  # no DISPATCHER_EMAIL_FROM, say: the change stays recorded
        log.warning("cannot mail the owner of endpoint %s about its health: %s", endpoint["id"], exc)
        return
    with contextlib.suppress(AlreadyAccepted):  # enqueued before a crash: once is enough
        enqueue(connection, settings, "email", request, claim=_claim(keys, endpoint, change, "email"))


def _event(connection: redis.Redis, settings: Settings, keys: Keys, endpoint: Endpoint, change: dict) -> None:
    from dispatcher.events import EventRequest, NoSuchApplication, publish

    payload = {
        "endpoint": endpoint["id"],
        "application": endpoint["application"],
        "url": public_url(endpoint["url"]),
        "state": change["state"],
        "reason": change["reason"],
        "sequence": change["sequence"],
        "at": isoformat(datetime.fromtimestamp(change["at"], UTC)),
    }
    event = EventRequest.model_validate({"event_type": EVENT_TYPES[change["state"]], "payload": payload})
    # Not to the endpoint itself: it is disabled or held (open), or its owner is mailed (closed, enabled).
    with contextlib.suppress(AlreadyAccepted, NoSuchApplication):
        claim = _claim(keys, endpoint, change, "event")
        publish(connection, settings, endpoint["application"], event, claim, exclude={endpoint["id"]})


def public_url(url: str) -> str:
    """The URL without its query, fragment or credentials: fit for an email."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


_HEADLINES = {
    "open": ("deliveries paused (circuit breaker open)", "Dispatcher holds new deliveries to it and tries one "
             "again after a cooldown; they go out once it succeeds."),
    "closed": ("deliveries resumed (circuit breaker closed)", "A delivery succeeded: the deliveries held for it "
               "go out now."),
    "disabled": ("disabled", "Dispatcher sends it nothing more until it is enabled again "
                 '(PATCH the endpoint with {"disabled": false}).'),
    "enabled": ("enabled", "Dispatcher delivers to it again."),
}


def describe(endpoint: Endpoint, application_name: str | None, change: dict) -> tuple[str, str]:
    """The subject and text of the email telling an endpoint's owner of a change."""
    headline, advice = _HEADLINES[change["state"]]
    url = public_url(endpoint["url"])
    subject = f"Webhook endpoint {endpoint['id']} {headline}"
    application = endpoint["application"]
    if application_name is not None:
        application = f"{application_name} ({application})"
    at = isoformat(datetime.fromtimestamp(change["at"], UTC))
    text = (
        f"Your webhook endpoint {url} was {headline}.\n\n"
        f"Endpoint:    {endpoint['id']}\n"
        f"URL:         {url}\n"
        f"Application: {application}\n"
        f"Change:      {change['state']} (change #{change['sequence']})\n"
        f"Why:         {change['reason']}\n"
        f"When:        {at}\n\n"
        f"{advice}\n"
    )
    return subject, text


# --- the API's view ----------------------------------------------------------------------------


def views(connection: redis.Redis, keys: Keys, endpoints: Iterable[Endpoint]) -> list[EndpointHealth]:
    """Each endpoint's `health` object, in one round trip."""
    endpoints = list(endpoints)
    if not endpoints:
        return []
    with connection.pipeline(transaction=False) as pipe:
        for endpoint in endpoints:
            pipe.hgetall(keys.endpoint_health(endpoint["id"]))
            pipe.lrange(keys.endpoint_changes(endpoint["id"]), 0, CHANGES_KEPT - 1)
        replies = pipe.execute()
    now = time.time()
    return [
        _view(endpoint, replies[2 * i], replies[2 * i + 1], now) for i, endpoint in enumerate(endpoints)
    ]


def _view(endpoint: Endpoint, fields: dict[bytes, bytes], raw_changes: list[bytes], now: float) -> EndpointHealth:
    def text(name: str) -> str | None:
        value = fields.get(name.encode())
        return None if value is None else value.decode()

    def moment(value: str | float | None) -> str | None:
        return None if value is None else isoformat(datetime.fromtimestamp(float(value), UTC))

    retry_at = text("retry_at")
    state: State = "healthy"
    reason = None
    if endpoint["disabled"]:
        state, reason = "disabled", text("disabled_reason") or "disabled"
    elif text("state") == "open":
        state = "half_open" if retry_at is not None and now >= float(retry_at) else "open"
        reason = text("reason")
    changes = []
    for raw in raw_changes:
        change = json.loads(raw)
        changes.append(change | {"at": moment(change["at"])})
    return {
        "state": state,
        "reason": reason,
        "consecutive_failures": int(text("failures") or 0),
        "failing_since": moment(text("failing_since")),
        "next_probe_at": moment(retry_at) if state in ("open", "half_open") else None,
        "changes": changes,
    }


def with_health(connection: redis.Redis, keys: Keys, endpoints: list[Endpoint]) -> list[dict[str, Any]]:
    """The endpoints as the API shows them: each with its `health`."""
    return [
        dict(endpoint) | {"health": view}
        for endpoint, view in zip(endpoints, views(connection, keys, endpoints), strict=True)
    ]


#: KEYS: the endpoint's health hash, its probe key. ARGV: the job's id, the probe's TTL (ms), how
#: long to hold others while the probe is out. A delivery to an endpoint whose breaker is open:
#: {1, 0} if it may go (the breaker closed meanwhile, or it is the probe: the first to come after
#: the cooldown, or the same job again); else {0, seconds to wait}.
_PROBE = Script(
    None,  # type: ignore[arg-type]  # called with an explicit client
    b"""
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then return {1, '0'} end
local retry_at = tonumber(redis.call('HGET', KEYS[1], 'retry_at')) or 0
if now < retry_at then return {0, tostring(retry_at - now)} end
local probe = redis.call('GET', KEYS[2])
if probe == ARGV[1] then return {1, '0'} end
if probe then return {0, ARGV[3]} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {1, '0'}
""",
)

#: KEYS: the endpoint's health hash, probe key, changes list; the queue's outbox; the endpoints
#: hash. ARGV: endpoint id, job id, 1 if the attempt failed else 0, failures that open the
#: breaker, cooldown, longest cooldown, the attempt's error, changes kept.
#: Counts the attempt (not for a deleted or disabled endpoint) and opens or closes the breaker,
#: recording that change; returns {Redis's time, failing since or '', changes in the outbox}, or
#: {0, '', 0} at once for a success to an endpoint with no failure and a closed breaker.
#: (Numbers go back as strings: Redis would truncate a Lua number.)
_SETTLE = Script(
    None,  # type: ignore[arg-type]  # called with an explicit client
    b"""
local h = KEYS[1]
local fields = redis.call('HMGET', h, 'state', 'failures', 'failing_since', 'cooldown')
local state, failures, since = fields[1], tonumber(fields[2]) or 0, fields[3]
if ARGV[3] == '0' and failures == 0 and state ~= 'open' then
  -- A success to a healthy endpoint, most deliveries: nothing changes, nothing more to read.
  return {'0', '', 0}
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local probing = redis.call('GET', KEYS[2]) == ARGV[2]
if probing then redis.call('DEL', KEYS[2]) end
local raw = redis.call('HGET', KEYS[5], ARGV[1])
if not raw or cjson.decode(raw).disabled == true then
  return {tostring(now), '', redis.call('LLEN', KEYS[4])}
end
local change, reason = nil, nil
if ARGV[3] == '0' then
  redis.call('HDEL', h, 'failures', 'failing_since')
  since = false
  if state == 'open' then
    redis.call('HDEL', h, 'state', 'retry_at', 'cooldown', 'reason')
    change = 'closed'
    reason = probing and 'the probe delivery succeeded' or 'a delivery succeeded'
  end
else
  failures = failures + 1
  if not since then since = tostring(now) end
  redis.call('HSET', h, 'failures', failures, 'failing_since', since)
  if state == 'open' then
    if probing then
      local cooldown = math.min((tonumber(fields[4]) or tonumber(ARGV[5])) * 2, tonumber(ARGV[6]))
      redis.call('HSET', h, 'cooldown', tostring(cooldown), 'retry_at', tostring(now + cooldown))
    end
  elseif failures >= tonumber(ARGV[4]) then
    change = 'open'
    reason = failures .. ' failed attempts in a row, the last: ' .. ARGV[7]
    redis.call('HSET', h, 'state', 'open', 'cooldown', ARGV[5], 'retry_at', tostring(now + tonumber(ARGV[5])),
               'reason', reason)
  end
end
if change then
  local sequence = redis.call('HINCRBY', h, 'seq', 1)
  local entry = cjson.encode({sequence = sequence, at = now, state = change, reason = reason})
  redis.call('LPUSH', KEYS[3], entry)
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[8]) - 1)
  redis.call('RPUSH', KEYS[4], '{"endpoint":' .. raw .. ',"change":' .. entry .. '}')
end
return {tostring(now), since or '', redis.call('LLEN', KEYS[4])}
""",
)
