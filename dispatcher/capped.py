"""Hashes that hold at most so many fields (stored templates, applications): the count and the add
in one script, so two adds at once never pass the cap together."""

from __future__ import annotations

import redis
from redis.commands.core import Script


def add_capped(client: redis.Redis, key: str, field: str, value: str, limit: int) -> bool:
    """HSET `field` to `value` in hash `key` if it holds fewer than `limit` fields; whether it did."""
    return bool(_ADD(keys=[key], args=[field, value, limit], client=client))


#: HSET KEYS[1] ARGV[1] ARGV[2] if it holds fewer than ARGV[3] fields: 1, else 0.
_ADD = Script(
    None,  # type: ignore[arg-type]  # called with an explicit client
    b"""
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
""",
)
