"""Writes that survive a failover: with DISPATCHER_MIN_REPLICAS set, a write counts as done only once
Redis's WAIT says that many replicas have it.

WAIT answers for the writes made before it *on the same connection*, so it goes in the same
pipeline as the write it vouches for (a pipeline holds one connection from the pool throughout).
A write WAIT cannot vouch for is already on the master, whole (each is one script, or one pipeline
of jobs' own keys): it may survive a failover or not. The API then answers 503 and its client asks
again with the same Idempotency-Key, which finds the job if it survived and writes it anew if not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dispatcher.errors import NotReplicated

if TYPE_CHECKING:  # (redis-py is not imported with the settings: the CLI's start-up stays light)
    from redis.client import Pipeline


@dataclass(frozen=True)
class Replicas:
    """How many replicas a write must reach (0: none, no WAIT) and the milliseconds WAIT gives them."""

    wanted: int = 0
    timeout_ms: int = 500

    def wait(self, pipe: Pipeline) -> None:
        """Queue WAIT after the pipeline's writes, if replicas are wanted."""
        if self.wanted:
            pipe.execute_command("WAIT", self.wanted, self.timeout_ms)

    def check(self, replies: list[Any]) -> list[Any]:
        """The pipeline's replies without WAIT's; NotReplicated if fewer replicas than wanted had the
        writes. (A reply that is an error, in a pipeline run with raise_on_error=False, is not WAIT's
        failure to count: it is left to the caller, like the other replies.)"""
        if not self.wanted:
            return replies
        acknowledged = replies[-1]
        if isinstance(acknowledged, int) and acknowledged < self.wanted:
            raise NotReplicated(acknowledged, self.wanted, self.timeout_ms)
        return replies[:-1]


NONE = Replicas()
