"""The worker entry point: a DispatcherWorker on the Dispatcher queue's priorities, with the scheduler on."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import uuid

import click
import redis
from rq.serializers import JSONSerializer

from dispatcher import logs, ratelimit
from dispatcher.cli import WORKER_EPILOG, WORKER_HELP, WorkerOptions, worker_options
from dispatcher.config import Settings
from dispatcher.connection import connect
from dispatcher.enqueue import make_queues
from dispatcher.errors import ConfigError
from dispatcher.redis_checks import warn_about_server
from workers import context
from workers.worker import MAX_CONNECTION_WAIT, DispatcherWorker

log = logging.getLogger("dispatcher.worker")

#: The first wait before trying Redis again; it doubles up to MAX_CONNECTION_WAIT.
FIRST_CONNECTION_WAIT = 0.5


class _Stop:
    """SIGTERM/SIGINT while no RQ worker is running (it installs handlers of its own): exit cleanly."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.event.set()


def wait_for_redis(connection: redis.Redis, stop: _Stop) -> bool:
    """Block until Redis answers PING, logging one line per failed try; False if a stop came first."""
    delay = FIRST_CONNECTION_WAIT
    while not stop.event.is_set():
        try:
            connection.ping()
            return True
        except redis.RedisError as exc:
            log.warning("Redis is unreachable (%s); trying again in %.1fs", exc, delay)
        if stop.event.wait(delay):
            break
        delay = min(delay * 2, MAX_CONNECTION_WAIT)
    return False


@click.command(help=WORKER_HELP, epilog=WORKER_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@worker_options
def command(**options: object) -> None:
    sys.exit(run(WorkerOptions(**options)))  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    """`python -m workers [options]`: the options `dispatcher worker` passes on."""
    command.main(args=argv, prog_name="python -m workers")
    return 0  # not reached: click exits


def run(args: WorkerOptions) -> int:
    """Run workers until a stop signal, or until `--burst`, `--max-jobs` or `--max-idle-time` ends one."""
    jobs_left = args.max_jobs
    try:
        settings = Settings.from_env()
        logs.configure(settings.log_format)
        context.configure(settings)
    except ConfigError as exc:
        print(f"dispatcher worker: {exc}", file=sys.stderr)
        return 2
    connection = connect(settings.redis_url, socket_connect_timeout=5, health_check_interval=30)
    queues = make_queues(connection, settings, args.queues)
    stop = _Stop()
    checked = False
    # One scheduler name for every worker this process starts. The scheduler lock outlives a worker
    # that lost Redis (it is on the replicas, or in the AOF): under a new name its successor's
    # scheduler would wait for it to expire, a minute without retries or scheduled sends. (The old
    # worker's scheduler process has stopped by then: its teardown joins it.)
    scheduler_name = uuid.uuid4().hex
    while True:
        stop.install()
        if not wait_for_redis(connection, stop):
            log.info("stopped while waiting for Redis")
            return 0
        if not checked:
            warn_about_server(connection, log, settings.min_replicas)
            checked = True
        worker = None
        try:
            # The constructor talks to Redis already (CLIENT SETNAME): inside the try, so Redis going
            # away now means another wait, not a traceback.
            worker = DispatcherWorker(
                queues,
                connection=connection,
                serializer=JSONSerializer,
                concurrency=settings.concurrency,
                max_per_host=settings.max_per_host,
                rates=ratelimit.configured(settings),
                replicas=settings.replicas,
                index_ttl=max(settings.result_ttl, settings.failure_ttl),
                scheduler_name=scheduler_name,
            )
            worker.work(
                with_scheduler=True,
                logging_level="INFO",
                burst=args.burst,
                max_jobs=jobs_left,
                max_idle_time=args.max_idle_time,
            )
            return 0  # it ended as asked: a stop, or the end of its burst, jobs or idle time
        except redis.RedisError as exc:
            log.warning("Redis unavailable (%s)", exc)
            pause = FIRST_CONNECTION_WAIT  # wait_for_redis backs off from there while Redis stays away
        except Exception:
            log.exception("the worker failed")
            pause = MAX_CONNECTION_WAIT  # a bug: no hot loop
        if worker is None:
            continue  # Redis went away before the worker existed: wait for it again
        if worker.stop_requested_by_signal:
            return 0
        if jobs_left is not None:  # the next worker does what is left of --max-jobs
            jobs_left -= worker.jobs_done
            if jobs_left < 1:
                return 0
        # The loop gave up (Redis went away, or a bug): a new worker takes over instead of the
        # process exiting. The old one's jobs in flight are requeued by the reaper.
        # After a failover the new master answers within seconds: a short pause, not a long one.
        log.warning("worker %s stopped; starting a new one in %.1fs", worker.name, pause)
        stop.install()
        if stop.event.wait(pause):
            return 0
