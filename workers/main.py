"""The worker entry point: a DispatcherWorker on the Dispatcher queue, with the scheduler on."""

from __future__ import annotations

import logging
import sys
import time

import redis
from rq.serializers import JSONSerializer

from dispatcher.config import Settings
from dispatcher.enqueue import make_queue
from dispatcher.errors import ConfigError
from dispatcher.redis_checks import warn_about_server
from workers import context
from workers.worker import MAX_CONNECTION_WAIT, DispatcherWorker

log = logging.getLogger("dispatcher.worker")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        settings = Settings.from_env()
        context.configure(settings)
    except ConfigError as exc:
        print(f"dispatcher worker: {exc}", file=sys.stderr)
        return 2
    connection = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, health_check_interval=30)
    warn_about_server(connection, log)
    queue = make_queue(connection, settings)
    while True:
        worker = DispatcherWorker(
            [queue],
            connection=connection,
            serializer=JSONSerializer,
            concurrency=settings.concurrency,
            index_ttl=max(settings.result_ttl, settings.failure_ttl),
        )
        try:
            worker.work(with_scheduler=True, logging_level="INFO")
        except redis.RedisError as exc:
            log.warning("Redis unavailable (%s)", exc)
        except Exception:
            log.exception("worker %s failed", worker.name)
        if worker.stop_requested_by_signal:
            return 0
        # The loop gave up (Redis went away, or a bug): a new worker takes over instead of the
        # process exiting. The old one's jobs in flight are requeued by the reaper.
        log.warning("worker %s stopped; starting a new one in %.0fs", worker.name, MAX_CONNECTION_WAIT)
        time.sleep(MAX_CONNECTION_WAIT)
