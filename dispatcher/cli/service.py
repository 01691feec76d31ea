"""`dispatcher dev`, `web` and `worker`: running the service."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import click

from dispatcher.cli.base import (
    F,
    cli,
    configuration,
    exit_with,
)
from dispatcher.config import Settings
from dispatcher.priorities import PRIORITIES, Priority, parse


@cli.command()
def dev() -> None:
    """Run everything locally: Redis (embedded unless REDIS_URL is set), the API and one worker.

    Generates an API key and a signing secret on first run and keeps them in ./var/, with the Redis
    and API URLs, so that the other commands find this service. Logs are text unless
    DISPATCHER_LOG_FORMAT says otherwise. Ctrl+C stops the API, then the worker (deliveries in
    flight finish), then Redis.
    """
    from dispatcher.dev import run_dev

    with configuration():
        exit_with(run_dev())


LOG_LEVELS = ("debug", "info", "warning", "error")


@cli.command()
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(LOG_LEVELS), help="the web server's log level"
)
def web(log_level: str) -> None:
    """Serve the API with gunicorn (gevent workers) on $DISPATCHER_HOST:$PORT (default 0.0.0.0:8000).

    Needs REDIS_URL and DISPATCHER_API_KEYS; WEB_CONCURRENCY sets the number of processes.
    """
    with configuration():
        exit_with(run_web(log_level=log_level))


def run_web(host: str | None = None, log_level: str = "info") -> int:
    """Serve the API (dispatcher.server: gunicorn, gevent workers) on `host`, settings.web_host or 0.0.0.0."""
    import logging

    from dispatcher import logs
    from dispatcher.redis_checks import warn_about_server
    from dispatcher.runtime import api_connection
    from dispatcher.server import WebServer, check_address_free

    settings = Settings.from_env()
    logs.configure(settings.log_format, log_level)
    settings.require_api_keys()  # every check create_app makes, before gunicorn forks
    server = WebServer(settings, host, log_level)
    check_address_free(server.host, settings.port)
    connection = api_connection(settings.redis_url)
    try:
        warn_about_server(connection, logging.getLogger("dispatcher.web"), settings.min_replicas)
    finally:
        connection.close()  # the workers build their own, after gevent patched them
    server.run()
    return 0


WORKER_HELP = (
    "Run a worker: deliver the jobs of the Dispatcher queue's priorities (high, then default, then low), "
    "with RQ's scheduler. Needs REDIS_URL and DISPATCHER_WEBHOOK_SECRET."
)
WORKER_EPILOG = (
    "`rq suspend -u $REDIS_URL` makes every worker take no new jobs (deliveries in flight finish; "
    "its state is `suspended`) until `rq resume -u $REDIS_URL`; a --burst worker exits instead."
)


def _priorities(ctx: click.Context | None, param: click.Parameter | None, value: str) -> tuple[Priority, ...]:
    try:
        return parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def worker_options(command: F) -> F:
    """The options of one worker process: `dispatcher worker` passes them on to `python -m workers`."""
    options = [
        click.option(
            "--queues",
            default=",".join(PRIORITIES),
            callback=_priorities,
            metavar="PRIORITIES",
            help=(
                "serve only these priorities, comma-separated (for example high, or high,default); always in "
                "priority order. Default: high,default,low"
            ),
        ),
        click.option(
            "--burst",
            is_flag=True,
            help="deliver what is queued, then exit once nothing is in flight (retries due later stay scheduled)",
        ),
        click.option(
            "--max-jobs",
            type=click.IntRange(min=1),
            metavar="N",
            help="exit after finishing N jobs; each attempt counts, as with `rq worker --max-jobs`",
        ),
        click.option(
            "--max-idle-time",
            type=click.IntRange(min=1),
            metavar="SECONDS",
            help="exit after SECONDS with nothing to deliver (time suspended by `rq suspend` does not count)",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@dataclass(frozen=True)
class WorkerOptions:
    queues: tuple[Priority, ...] = PRIORITIES
    burst: bool = False
    max_jobs: int | None = None
    max_idle_time: int | None = None

    def argv(self) -> list[str]:
        """As `python -m workers` takes them."""
        argv = ["--queues", ",".join(self.queues)]
        argv += ["--burst"] if self.burst else []
        if self.max_jobs is not None:
            argv += ["--max-jobs", str(self.max_jobs)]
        if self.max_idle_time is not None:
            argv += ["--max-idle-time", str(self.max_idle_time)]
        return argv


@cli.command(help=WORKER_HELP, epilog=WORKER_EPILOG)
@worker_options
@click.option(
    "--processes",
    type=click.IntRange(min=1, max=256),
    default=1,
    show_default=True,
    metavar="N",
    help=(
        "run N worker processes (each with DISPATCHER_CONCURRENCY deliveries in flight) and stop them together; "
        "--max-jobs then counts per process. One that exits with an error stops the others"
    ),
)
def worker(processes: int, **options: Any) -> None:
    with configuration():
        Settings.from_env().require_webhook_secret()
    argv = [sys.executable, "-m", "workers", *WorkerOptions(**options).argv()]
    if processes == 1:
        # The worker is its own package (`python -m workers`): the web side never imports delivery code.
        os.execv(sys.executable, argv)
    exit_with(_run_workers(argv, processes))


def _run_workers(argv: list[str], count: int) -> int:
    """Run `count` worker processes until a stop signal (passed on to each), an error exit of one
    (the others are stopped; its code is ours) or the normal end of all (--burst and the like)."""
    from dispatcher import processes
    from dispatcher.dev import worker_stop_timeout

    stop = processes.StopRequest()
    env = dict(os.environ)
    children = {f"worker {n}": processes.spawn(argv, env) for n in range(1, count + 1)}
    code = 0
    try:
        while children and not stop.requested:
            exited = processes.first_exit(stop, children)
            if exited is None:
                break
            name, returncode = exited
            del children[name]
            if returncode != 0:
                processes.say("worker", f"{name} exited with code {returncode}; stopping the others")
                code = returncode if returncode > 0 else 1
                break
    finally:
        timeout = worker_stop_timeout(Settings.from_env())
        for name, child in children.items():
            processes.stop_child("worker", name, child, timeout, stop)
    return code
