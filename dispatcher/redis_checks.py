"""Start-up checks of the Redis server: settings that could drop accepted jobs."""

from __future__ import annotations

import logging

import redis


def warn_about_server(connection: redis.Redis, log: logging.Logger, min_replicas: int = 0) -> list[str]:
    """Log (and return) a warning for each server setting that can lose jobs, and when the master has
    fewer replicas than DISPATCHER_MIN_REPLICAS wants; never raises."""
    warnings: list[str] = []
    try:
        replicas = connection.info("replication").get("connected_slaves", 0)
    except redis.RedisError:
        replicas = None
    if replicas is not None and replicas < min_replicas:
        warnings.append(
            f"Redis has {replicas} connected replicas and DISPATCHER_MIN_REPLICAS is {min_replicas}: "
            "the API answers every write 503 not_replicated until enough replicas connect"
        )
    try:
        policy = connection.config_get("maxmemory-policy").get("maxmemory-policy")
        persistence = connection.config_get("appendonly").get("appendonly")
        snapshots = connection.config_get("save").get("save")
    except redis.ResponseError:
        policy = persistence = snapshots = None  # CONFIG is disabled on some managed servers: nothing to check
    except redis.RedisError as exc:
        log.warning("Redis is not reachable yet (%s); the API answers 503 until it is", exc)
        return warnings
    if policy is not None and policy != "noeviction":
        warnings.append(
            f"Redis maxmemory-policy is {policy!r}: under memory pressure Redis may evict queued jobs; "
            "set it to 'noeviction'"
        )
    if persistence == "no" and snapshots == "":
        warnings.append("Redis persistence is off: a Redis restart loses every queued job; set appendonly yes")
    for warning in warnings:
        log.warning(warning)
    return warnings
