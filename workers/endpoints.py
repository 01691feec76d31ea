"""Delivering to registered endpoints (dispatcher.endpoints): what an event's delivery must pass
before it is sent, and what follows once its attempt is decided.

Before: the endpoint must still exist and be enabled (else the delivery fails for good), its
circuit breaker must be closed (or this delivery its probe), and its rate limit must have a slot.
A delivery that may not go yet raises DeliveryHeld: nothing is sent, no attempt counts, and the
job waits as scheduled (workers.attempt.hold_back).

After: the attempt counts toward the endpoint's health (dispatcher.health): its breaker opens or
closes, a 410 Gone or failing too long disables it, and the owner and the application are told.

Ordered endpoints: an event's delivery to an endpoint that was `ordered` when the event was
published joined, in the script that wrote its job, the list of that endpoint's deliveries with
its ordering key (dispatcher.keys.Keys.ordered; the events without one share a list), so the list
is in acceptance order. Only the list's head may go: any other is held (WAITING_TURN) until it is
the head, one at a time per list. The head leaves the list when its attempt is decided for good
(succeeded, or failed: the next goes even then) or when it is canceled; a `retry` keeps it at the
head, so its backoff holds the ones behind it. Whoever moves the list on starts the new head at
once if it is waiting for its turn (dispatcher.rqstore.order_advance); a head that will never run
again (deleted, expired, canceled by RQ's tools) is dropped by the next look at the list, and a
held delivery looks again every ORDER_RECHECK seconds at least, should a wake-up be missed. A
delivery no longer in its list (requeued after it failed, or the list expired) goes unordered.

Rate limits are shared by every worker through Redis: one schedule of slots per endpoint, a GCRA
kept by one Lua script on Redis's clock. A delivery takes the next free slot if it opens within
SLOT_HORIZON (its thread waits for it), else it is held until about then; so at most `rate_limit`
deliveries start per second, plus the slots of one horizon after a quiet spell.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import redis
from redis.commands.core import Script

from dispatcher import health, rqstore
from dispatcher.config import Settings
from dispatcher.endpoints import WAITING_TURN, Endpoint, Registry, ordered_list
from dispatcher.history import isoformat
from workers.decision import Decision
from workers.errors import DeliveryHeld, PermanentDeliveryError

#: How far ahead a delivery may take its endpoint's next rate slot (and wait for it in its thread).
SLOT_HORIZON = 0.25
#: A rate schedule left alone this long is forgotten.
RATE_STATE_TTL = 3600
#: How often at least an ordered delivery held for its turn looks again whether it has come (it is
#: woken when it does; this is the safety net), and at most (far down a list).
ORDER_RECHECK = 30.0
ORDER_RECHECK_MAX = 300.0


#: What an attempt's error begins with when the attempt says nothing of the endpoint (a bug in
#: Dispatcher, job data it cannot read, a refusal before anything was sent): not counted.
NOT_THE_ENDPOINTS = ("unexpected error:", "endpoint ")
#: An answer that says the endpoint is gone for good: it is disabled at once.
GONE = 410


def admit(
    registry: Registry, endpoint_id: str, job_id: str, payload: dict, settings: Settings
) -> tuple[Endpoint, list[str]]:
    """The endpoint and the secrets to sign the delivery with, once it may go now.

    Raises PermanentDeliveryError if the endpoint was deleted or disabled since the event was
    published, DeliveryHeld if it may not go yet.
    """
    endpoint, secrets, breaker_open = registry.delivery_config(endpoint_id)
    if endpoint is None or not secrets:
        raise PermanentDeliveryError(f"endpoint {endpoint_id} no longer exists")
    if endpoint["disabled"]:
        raise PermanentDeliveryError(f"endpoint {endpoint_id} is disabled")
    if payload.get("ordered"):  # first: only the head of its list may probe or take a rate slot
        _wait_turn(registry, ordered_list(registry.keys, endpoint_id, payload), job_id)
    if breaker_open:
        wait = health.probe_or_wait(registry.connection, registry.keys, endpoint_id, job_id, settings)
        if wait > 0:
            raise DeliveryHeld(wait, "the endpoint's circuit breaker is open")
    if endpoint["rate_limit"] is not None:
        _take_slot(registry.connection, registry.keys.endpoint_rate(endpoint_id), endpoint["rate_limit"])
    return endpoint, secrets


def settle(
    registry: Registry, endpoint_id: str, job_id: str, payload: dict, decision: Decision, settings: Settings
) -> None:
    """What follows a decided attempt to an endpoint: an ordered delivery decided for good (not a
    retry) leaves its list, and the next one starts; the attempt counts toward the endpoint's health,
    and any change is told (`settings`: those of the job's Dispatcher queue)."""
    if payload.get("ordered") and decision.verdict != "retry":
        rqstore.order_advance(
            registry.connection, ordered_list(registry.keys, endpoint_id, payload), registry.keys.wake, WAITING_TURN,
            remove=job_id,
        )
    attempt = decision.attempt
    if attempt.outcome != "succeeded" and (attempt.error or "").startswith(NOT_THE_ENDPOINTS):
        return
    connection, keys = registry.connection, registry.keys
    if attempt.status_code == GONE:
        health.disable(connection, keys, endpoint_id, "it answered 410 Gone")
        waiting = 1
    else:
        failed = attempt.outcome != "succeeded"
        now, since, waiting = health.record_attempt(
            connection, keys, endpoint_id, job_id, failed, attempt.error or "", settings
        )
        if failed and since is not None and now - since >= settings.endpoint_disable_after:
            reason = f"it has failed since {isoformat(datetime.fromtimestamp(since, UTC))} without a success"
            waiting += health.disable(connection, keys, endpoint_id, reason)
    if waiting:
        health.notify(connection, settings)


def _take_slot(connection: redis.Redis, key: str, rate: float) -> None:
    """Wait for the endpoint's next rate slot if it opens within SLOT_HORIZON; else DeliveryHeld."""
    granted, seconds = _SLOT(keys=[key], args=[1 / rate, SLOT_HORIZON, RATE_STATE_TTL], client=connection)
    wait = float(seconds)
    if not int(granted):
        raise DeliveryHeld(wait, f"the endpoint's rate limit ({rate:g}/s)")
    if wait > 0:
        time.sleep(wait)


#: KEYS: the endpoint's rate hash (tat: when its next slot opens). ARGV: seconds between slots,
#: horizon, TTL. Takes the next slot if it opens within the horizon: {1, seconds until it opens};
#: else {0, seconds until it would be within the horizon}. (Numbers go back as strings: Redis
#: would truncate a Lua number.)
_SLOT = Script(
    None,  # type: ignore[arg-type]  # called with an explicit client
    b"""
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local interval, horizon = tonumber(ARGV[1]), tonumber(ARGV[2])
local slot = math.max(tonumber(redis.call('HGET', KEYS[1], 'tat')) or 0, now)
if slot - now > horizon then
  return {0, tostring(slot - now - horizon)}
end
redis.call('HSET', KEYS[1], 'tat', tostring(slot + interval))
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, tostring(slot - now)}
""",
)


def _wait_turn(registry: Registry, key: str, job_id: str) -> None:
    """Return if the delivery is the head of its ordered list (or not in it: unordered); else
    DeliveryHeld, which starts it at once should its turn come before it is scheduled."""
    answer = rqstore.order_advance(registry.connection, key, registry.keys.wake, WAITING_TURN, ask=job_id)
    assert answer is not None
    _, position = answer
    if position <= 0:
        return
    delay = min(ORDER_RECHECK + position / 10, ORDER_RECHECK_MAX)
    wake_key = registry.keys.wake
    raise DeliveryHeld(delay, WAITING_TURN, then=lambda pipe: rqstore.order_advance(pipe, key, wake_key, WAITING_TURN))
