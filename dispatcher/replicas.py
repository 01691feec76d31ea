"""Writes that survive a failover: with DISPATCHER_MIN_REPLICAS set, a write counts as done only once
Redis's WAIT says that many replicas have it.

WAIT vouches for the writes made before it *on its own connection*. Replication is one ordered
stream, so a replica that has a later write has every earlier one too: a worker puts WAIT in the
pipeline that records its outcomes; the API, whose request may have written over several pooled
connections, writes a fence key and WAITs on that connection once the request's writes are done
(`confirm`), which vouches for all of them.

Each of the API's writes is whole (one script, or one pipeline of a job's own keys), so a write WAIT
cannot vouch for is on the master, whole, and may survive a failover or not: the API answers 503
and its client sends the request again with the same Idempotency-Key, which finds what survived.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dispatcher.errors import NotReplicated

if TYPE_CHECKING:  # (redis-py is not imported with the settings: the CLI's start-up stays light)
    import redis
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
        writes. (An error reply, from a pipeline run with raise_on_error=False, is left to the caller.)"""
        if not self.wanted:
            return replies
        acknowledged = replies[-1]
        if isinstance(acknowledged, int) and acknowledged < self.wanted:
            raise NotReplicated(acknowledged, self.wanted, self.timeout_ms)
        return replies[:-1]

    def confirm(self, connection: redis.Redis, fence_key: str) -> None:
        """Return once the wanted replicas have every write this process made before the call, on any
        connection; NotReplicated if they do not within the timeout."""
        if not self.wanted:
            return
        with connection.pipeline(transaction=False) as pipe:
            pipe.set(fence_key, b"", ex=3600)
            self.wait(pipe)
            self.check(pipe.execute())
