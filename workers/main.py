"""The worker entry point: an RQ worker on the Dispatcher queue, with the scheduler on."""

from __future__ import annotations

import logging
import sys

import redis
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from dispatcher.config import Settings
from dispatcher.enqueue import make_queue
from dispatcher.errors import ConfigError
from workers import context


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        settings = Settings.from_env()
        context.configure(settings)
    except ConfigError as exc:
        print(f"dispatcher worker: {exc}", file=sys.stderr)
        return 2
    connection = redis.Redis.from_url(settings.redis_url)
    queue = make_queue(connection, settings)
    # SimpleWorker runs jobs in this process, so the HTTP pools and the SMTP connection
    # survive from one job to the next (RQ's default forks a new process per job).
    # One queue only: then RQ dequeues with BLMOVE, which a crash cannot lose a job in.
    worker = SimpleWorker([queue], connection=connection, serializer=JSONSerializer)
    worker.work(with_scheduler=True, logging_level="INFO")
    return 0
