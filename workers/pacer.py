"""One worker's side of a shared sending rate (dispatcher.ratelimit): the slots it has reserved.

A worker holding messages of a rate-limited channel reserves slots for them in one call to Redis,
then starts each message as its slot opens, waiting on its own clock in between; it asks Redis again
only once it holds too few slots and the schedule has more to give.
"""

from __future__ import annotations

import time
from collections import deque

from dispatcher.ratelimit import HORIZON, SharedRate


class Pacer:
    def __init__(self, shared: SharedRate) -> None:
        self.shared = shared
        #: Reserved slots, oldest first: when each opens and when it lapses (monotonic seconds).
        self.slots: deque[tuple[float, float]] = deque()
        #: Not before this (monotonic) may asking Redis reserve another slot.
        self.ask_at = 0.0

    def ready(self, wanted: int) -> int:
        """How many of `wanted` waiting messages may start now; reserves slots first when it holds
        fewer than `wanted` and the schedule may have some (one Redis call)."""
        now = time.monotonic()
        self._lapse(now)
        held = len(self.slots)
        if held < wanted and now >= self.ask_at:
            grant = self.shared.reserve(wanted - held)
            # The grant's times count from Redis's clock while it ran the script: between our call and
            # its answer. Counting them from the answer, a slot never opens here before it did there.
            now = time.monotonic()
            # A slot used late goes out together with the next ones, above the rate: it lapses once
            # `burst` more have opened (about a tenth of a second; a loaded machine wakes late).
            lapse = self.shared.burst * grant.interval
            for i in range(grant.count):
                opens = now + grant.first + i * grant.interval
                self.slots.append((opens, opens + lapse))
            # Given fewer than it asked for, it holds slots for about HORIZON: asking again before half
            # of that has passed would cost a call per slot.
            self.ask_at = now + (grant.wait if grant.count == wanted - held else max(grant.wait, HORIZON / 2))
        return min(wanted, sum(1 for opens, _ in self.slots if opens <= now))

    def use(self, count: int) -> None:
        """`count` messages started: their slots (the first ones, which `ready` counted) are spent."""
        for _ in range(count):
            self.slots.popleft()

    def wake_in(self) -> float:
        """Seconds until a slot opens, or, holding none, until asking may reserve one."""
        now = time.monotonic()
        self._lapse(now)
        return max(0.0, (self.slots[0][0] if self.slots else self.ask_at) - now)

    def forget(self) -> None:
        """Drop the slots reserved at a rate now lowered: the next ones come at the new rate."""
        self.slots.clear()
        self.ask_at = 0.0

    def _lapse(self, now: float) -> None:
        while self.slots and self.slots[0][1] < now:
            self.slots.popleft()
