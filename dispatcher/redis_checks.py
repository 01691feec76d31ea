"""Start-up checks of the Redis server: settings that could drop accepted jobs."""

from __future__ import annotations

import logging

import redis


def warn_about_server(connection: redis.Redis, log: logging.Logger) -> list[str]:
    """Log (and return) a warning for each server setting that can lose jobs; never raises."""
    warnings: list[str] = []
    try:
        policy = connection.config_get("maxmemory-policy").get("maxmemory-policy")
        persistence = connection.config_get("appendonly").get("appendonly")
        snapshots = connection.config_get("save").get("save")
    except redis.ResponseError:
        return warnings  # CONFIG is disabled on some managed servers: nothing to check
    except redis.RedisError as exc:
        log.warning("Redis is not reachable yet (%s); the API answers 503 until it is", exc)
        return warnings
    if policy is not None and policy != "noeviction":
        warnings.append(
            f"Redis maxmemory-policy is {policy!r}: under memory pressure Redis may evict queued jobs; "
            "set it to 'noeviction'"
        )
    if persistence == "no" and not snapshots:
        warnings.append("Redis persistence is off: a Redis restart loses every queued job; set appendonly yes")
    for warning in warnings:
        log.warning(warning)
    return warnings
