"""A sending rate shared by every worker through Redis: one schedule of slots per channel.

The schedule is a GCRA (generic cell rate algorithm) kept in one hash per channel (`Keys.rate`)
and changed only by one Lua script, on Redis's clock, so workers on any number of machines keep
one rate together. A worker with messages waiting reserves the next free slots of the schedule,
up to HORIZON ahead, in one call, and starts each message when its slot opens (workers.pacer):
one call per batch of slots, never one per message per poll. After a quiet spell up to `burst`
slots are open at once, so at most `rate + burst` slots open in any second; a worker that wakes
late may use a few together, but a slot lapses `burst` slots after it opens (workers.pacer).

When the receiver answers that we send too fast (SMTP 421, 454...), the worker slows the rate
down: it halves (at most once per SLOW_HOLD, since the messages in flight meet the same refusal
together), never below MIN_SHARE of the configured rate, and doubles back for each RECOVERY
seconds without another such answer.

RQ's own `RateLimit` (rq 3.0) caps how many jobs of a key are queued or running at once, not how
many start per second, so it cannot keep a provider's quota of messages per second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis
from redis.client import Pipeline

from dispatcher.channels import CHANNELS
from dispatcher.config import Settings
from dispatcher.keys import Keys, Kind

#: After a quiet spell this many seconds' worth of slots (at least one) are open at once.
BURST_SECONDS = 0.1
#: How far ahead a worker may reserve slots: it calls Redis at most about once per HORIZON.
HORIZON = 0.25
#: A throttling answer halves the rate at most once per SLOW_HOLD seconds.
SLOW_HOLD = 1.0
#: A slowed rate doubles back for each RECOVERY seconds without a throttling answer.
RECOVERY = 10.0
#: The lowest share of the configured rate that throttling answers bring it down to.
MIN_SHARE = 1 / 64
#: A rate left alone this long is forgotten: the next message finds the full rate and burst.
STATE_TTL = 3600

# KEYS: the rate's hash (fields: tat, the schedule's next free slot; share, of the configured rate
# in force after the last slow-down; slowed, when that was).
# ARGV: mode ('reserve' or 'slow'), rate, burst, want, horizon, recovery, hold, min share, TTL.
# 'reserve': reserve up to `want` slots opening within `horizon` seconds; returns {count, seconds
# from now to the first (negative: open already), seconds between them, seconds until another could
# be reserved, the rate in force}. `want` 0 only reads the rate. 'slow': halve the share unless it
# was halved less than `hold` seconds ago; returns {1 if halved else 0, the rate in force}.
# Numbers go back as strings (Redis would truncate a Lua number to an integer).
_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local rate, burst = tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tat', 'share', 'slowed')
local tat = tonumber(state[1]) or 0
local share = tonumber(state[2]) or 1
local slowed = tonumber(state[3]) or 0
if share < 1 then
  share = math.min(1, share * 2 ^ math.floor(math.max(0, now - slowed) / tonumber(ARGV[6])))
end
if ARGV[1] == 'slow' then
  if now - slowed < tonumber(ARGV[7]) then return {'0', tostring(rate * share)} end
  share = math.max(tonumber(ARGV[8]), share / 2)
  tat = math.max(tat, now) + 1 / (rate * share)
  redis.call('HSET', KEYS[1], 'tat', tat, 'share', share, 'slowed', now)
  redis.call('EXPIRE', KEYS[1], ARGV[9])
  return {'1', tostring(rate * share)}
end
local interval = 1 / (rate * share)
local want, horizon = tonumber(ARGV[4]), tonumber(ARGV[5])
tat = math.max(tat, now - (burst - 1) * interval)
local count = 0
if want > 0 and tat <= now + horizon then
  count = math.min(want, math.floor((now + horizon - tat) / interval) + 1)
end
local first = tat
if count > 0 then
  tat = tat + count * interval
  redis.call('HSET', KEYS[1], 'tat', tat)
  redis.call('EXPIRE', KEYS[1], ARGV[9])
end
return {tostring(count), tostring(first - now), tostring(interval), tostring(math.max(0, tat - horizon - now)),
        tostring(rate * share)}
"""


@dataclass(frozen=True)
class Grant:
    """Slots reserved in one call: `count` slots, the first `first` seconds from now, `interval` apart."""

    count: int
    first: float
    interval: float
    #: Seconds until another slot could be reserved.
    wait: float
    #: Messages per second in force now: the configured rate, lowered while the receiver throttles.
    rate: float


class SharedRate:
    """One channel's rate, shared through Redis by every worker that sends with the same `key`."""

    def __init__(
        self,
        connection: redis.Redis,
        key: str,
        rate: float,
        *,
        recovery: float = RECOVERY,
        hold: float = SLOW_HOLD,
    ) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number of messages per second, got {rate!r}")
        self.key = key
        self.rate = rate
        self.burst = max(1, math.floor(rate * BURST_SECONDS))
        self.recovery = recovery
        self.hold = hold
        self._script = connection.register_script(_SCRIPT)

    def reserve(self, want: int) -> Grant:
        """Reserve up to `want` of the next slots that open within HORIZON (fewer, or none, when other
        workers hold them)."""
        reply = self._script(keys=[self.key], args=self._args("reserve", want))
        count, first, interval, wait, rate = (float(value) for value in reply)
        return Grant(int(count), first, interval, wait, rate)

    def current(self) -> float:
        """The rate in force now, in messages per second (reserving nothing)."""
        return self.reserve(0).rate

    def slow_down(self, pipe: Pipeline) -> None:
        """Queue in `pipe` a halving of the rate (a throttling answer); read its reply with `slowed`."""
        self._script(keys=[self.key], args=self._args("slow", 0), client=pipe)

    @staticmethod
    def slowed(reply: list) -> tuple[bool, float]:
        """Whether `slow_down` halved the rate (not if it had just been halved), and the rate now."""
        return reply[0] == b"1", float(reply[1])

    def _args(self, mode: str, want: int) -> list[str | int | float]:
        return [mode, self.rate, self.burst, want, HORIZON, self.recovery, self.hold, MIN_SHARE, STATE_TTL]


def configured(settings: Settings) -> dict[Kind, float]:
    """The channels whose deliveries keep to a shared rate, and that rate (messages per second)."""
    return {name: rate for name, channel in CHANNELS.items() if (rate := channel.rate(settings)) is not None}


def shared_rates(connection: redis.Redis, keys: Keys, rates: dict[Kind, float]) -> dict[Kind, SharedRate]:
    return {kind: SharedRate(connection, keys.rate(kind), rate) for kind, rate in rates.items()}
