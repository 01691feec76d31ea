"""What the web process holds while it runs: settings, its Redis connection, the guard, the readers."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue

from dispatcher.config import Settings
from dispatcher.connection import connect
from dispatcher.enqueue import make_queue, make_queues
from dispatcher.keys import Keys
from dispatcher.netguard import NetworkGuard
from dispatcher.status import StatusReader

#: The API must answer 503 within 2 s when Redis is down, never hang: short timeouts,
#: and one immediate retry so a pooled connection broken by a Redis restart heals itself.
API_CONNECT_TIMEOUT = 0.5
API_SOCKET_TIMEOUT = 1.0


def api_connection(url: str) -> redis.Redis:
    return connect(
        url,
        socket_connect_timeout=API_CONNECT_TIMEOUT,
        socket_timeout=API_SOCKET_TIMEOUT,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


@dataclass
class Runtime:
    settings: Settings
    connection: redis.Redis
    queue: Queue
    keys: Keys
    guard: NetworkGuard
    status: StatusReader

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        connection = api_connection(settings.redis_url)
        queue = make_queue(connection, settings)
        keys = Keys(settings.queue_name)
        return cls(
            settings=settings,
            connection=connection,
            queue=queue,
            keys=keys,
            guard=NetworkGuard(settings.allowed_networks, settings.dns_timeout),
            status=StatusReader(connection, make_queues(connection, settings), keys),
        )
