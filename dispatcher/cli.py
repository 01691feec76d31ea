"""The `dispatcher` command: `dev` (everything in one), `web` (the API) and `worker`."""

from __future__ import annotations

import argparse
import base64
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dispatcher.config import Settings
from dispatcher.errors import ConfigError
from dispatcher.priorities import PRIORITIES, Priority, parse

#: Where `dispatcher dev` keeps its Redis data, outbox and generated credentials.
DEV_VAR_DIR = Path("var")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Seconds `dispatcher dev` waits for the API to listen before it gives up.
DEV_START_TIMEOUT = 30.0
#: Seconds the API gets to stop (gunicorn lets requests in hand finish in GRACEFUL_TIMEOUT).
DEV_WEB_STOP_TIMEOUT = 20.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dispatcher", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("dev", help="run Redis (embedded unless REDIS_URL is set), the API and a worker")
    web = commands.add_parser("web", help="serve the API with gunicorn (gevent workers) on $PORT")
    web.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="the web server's log level")
    worker = commands.add_parser("worker", help="run a worker (with the scheduler) on $REDIS_URL")
    add_worker_options(worker)
    args = parser.parse_args(argv)
    try:
        if args.command == "web":
            return run_web(log_level=args.log_level)
        if args.command == "worker":
            return run_worker(worker_argv(args))
        return run_dev()
    except ConfigError as exc:
        print(f"dispatcher {args.command}: {exc}", file=sys.stderr)
        return 2


def run_web(host: str | None = None, log_level: str = "info") -> int:
    """Serve the API (dispatcher.server: gunicorn, gevent workers) on `host`, settings.web_host or 0.0.0.0."""
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
        warn_about_server(connection, logging.getLogger("dispatcher.web"))
    finally:
        connection.close()  # the workers build their own, after gevent patched them
    server.run()
    return 0


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """The worker's options: `dispatcher worker` passes them on to `python -m workers`, which reads them."""
    parser.description = (
        "Run one worker: deliver the jobs of the Dispatcher queue's priorities (high, then default, then low), "
        "with RQ's scheduler."
    )
    parser.epilog = (
        "`rq suspend -u $REDIS_URL` makes every worker take no new jobs (deliveries in flight finish; "
        "its state is `suspended`) until `rq resume -u $REDIS_URL`; a --burst worker exits instead."
    )
    parser.add_argument(
        "--queues",
        type=_priorities,
        default=PRIORITIES,
        metavar="PRIORITIES",
        help=(
            "serve only these priorities, comma-separated (for example high, or high,default); always in "
            "priority order. Default: high,default,low"
        ),
    )
    parser.add_argument(
        "--burst",
        action="store_true",
        help="deliver what is queued, then exit once nothing is in flight (retries due later stay scheduled)",
    )
    parser.add_argument(
        "--max-jobs",
        type=_positive_int,
        metavar="N",
        help="exit after finishing N jobs; each attempt counts, as with `rq worker --max-jobs`",
    )
    parser.add_argument(
        "--max-idle-time",
        type=_positive_int,
        metavar="SECONDS",
        help="exit after SECONDS with nothing to deliver (time suspended by `rq suspend` does not count)",
    )


def _priorities(value: str) -> tuple[Priority, ...]:
    try:
        return parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {value!r}")
    return int(value)


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The worker's options in `args`, as `python -m workers` takes them."""
    argv = ["--queues", ",".join(args.queues)]
    argv += ["--burst"] if args.burst else []
    if args.max_jobs is not None:
        argv += ["--max-jobs", str(args.max_jobs)]
    if args.max_idle_time is not None:
        argv += ["--max-idle-time", str(args.max_idle_time)]
    return argv


def run_worker(argv: list[str] | None = None) -> int:
    """Run `python -m workers` with `argv` (the options of add_worker_options) in place of this process."""
    Settings.from_env().require_webhook_secret()
    # The worker is its own package (`python -m workers`): the web side never imports delivery code.
    os.execv(sys.executable, [sys.executable, "-m", "workers", *(argv or [])])
    return 0  # not reached


def run_dev() -> int:
    """Run the whole service locally: embedded Redis unless REDIS_URL is set, the API and one worker.

    Each child runs in a session of its own, so a terminal's Ctrl+C (SIGINT to the foreground group)
    reaches only this process, which then stops them in order: the API, the worker (it finishes the
    deliveries in flight and stops RQ's scheduler, releasing its lock) and last the embedded Redis.
    """
    from dispatcher.config import DEV_WEB_HOST
    from dispatcher.server import check_address_free

    env = dict(os.environ)
    DEV_VAR_DIR.mkdir(exist_ok=True)
    env.setdefault("DISPATCHER_API_KEYS", _dev_secret("dev-api-key", lambda: "dev_" + secrets.token_urlsafe(24)))
    env.setdefault(
        "DISPATCHER_WEBHOOK_SECRET",
        _dev_secret("dev-webhook-secret", lambda: "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()),
    )
    env.setdefault("DISPATCHER_OUTBOX_DIR", str(DEV_VAR_DIR / "outbox"))
    env.setdefault("DISPATCHER_LOG_FORMAT", "text")  # lines for a person at a terminal
    settings = Settings.from_env(env)  # one clear line if anything is wrong, before anything starts
    settings.require_api_keys()
    settings.require_webhook_secret()
    host = settings.web_host or DEV_WEB_HOST
    env["DISPATCHER_HOST"] = host
    check_address_free(host, settings.port)
    stop = _StopRequest()
    server = None
    if not env.get("REDIS_URL", "").strip():
        from dispatcher.embedded import start_embedded_redis

        server = start_embedded_redis(DEV_VAR_DIR / "redis")
        env["REDIS_URL"] = server.connection_url
        settings = Settings.from_env(env)
    web = worker = None
    failed = False
    try:
        web = _spawn([sys.executable, "-m", "dispatcher.cli", "web", "--log-level", "warning"], env)
        worker = _spawn([sys.executable, "-m", "workers"], env)
        if not _wait_listening(host, settings.port, [web, worker], stop):
            failed = not stop.requested
        else:
            print(
                "\nDispatcher is running:\n"
                f"  API        http://{host}:{settings.port}  (try GET /readyz)\n"
                f"  API key    {settings.api_keys[0]}   (also in {DEV_VAR_DIR / 'dev-api-key'})\n"
                f"  Redis      {settings.redis_url}{' (embedded, data in var/redis)' if server else ''}\n"
                f"  Outbox     {settings.outbox_dir if settings.smtp is None else 'off: sending through SMTP'}\n"
                "Press Ctrl+C to stop.\n",
                flush=True,
            )
            failed = not _wait(stop, [web, worker])
    finally:
        for name, child, timeout in (
            ("the API", web, DEV_WEB_STOP_TIMEOUT),
            ("the worker", worker, _worker_stop_timeout(settings)),
        ):
            if child is not None:
                _stop_child(name, child, timeout, stop)
        if server is not None:
            _say("stopping the embedded Redis")
            server.stop()
        _say("stopped")
    return 1 if failed else 0


def _say(message: str) -> None:
    print(f"dispatcher dev: {message}", file=sys.stderr, flush=True)


class _StopRequest:
    """SIGINT/SIGTERM to `dispatcher dev`: the first asks for a stop, a later one for a faster one."""

    def __init__(self) -> None:
        self.count = 0
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.count += 1

    @property
    def requested(self) -> bool:
        return self.count > 0


def _spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start a child in its own session (out of the terminal's reach); on Linux it gets SIGTERM if we die."""
    return subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_parent_death_signal())


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when `dispatcher dev` dies (say, SIGKILL), else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    return lambda: libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _wait_listening(host: str, port: int, children: list[subprocess.Popen], stop: _StopRequest) -> bool:
    """Wait until the API accepts connections; False if a child exits, a stop comes or time runs out."""
    import socket

    deadline = time.monotonic() + DEV_START_TIMEOUT
    while not stop.requested and all(child.poll() is None for child in children):
        try:
            with socket.create_connection(("127.0.0.1" if host == "0.0.0.0" else host, port), timeout=0.5):
                return True
        except OSError:
            if time.monotonic() > deadline:
                _say(f"the API did not listen on {host}:{port} within {DEV_START_TIMEOUT:.0f}s")
                return False
            time.sleep(0.1)
    return False


def _wait(stop: _StopRequest, children: list[subprocess.Popen]) -> bool:
    """Return when asked to stop (True) or when a child exits by itself (False, said in one line)."""
    names = ("the API", "the worker")
    while not stop.requested:
        for name, child in zip(names, children, strict=True):
            if child.poll() is not None:
                _say(f"{name} exited with code {child.returncode}; stopping the rest")
                return False
        time.sleep(0.2)
    return True


def _stop_child(name: str, child: subprocess.Popen, timeout: float, stop: _StopRequest) -> None:
    """SIGTERM `child` and wait; another Ctrl+C passes SIGTERM on again (the worker then puts its jobs
    back); past `timeout`, SIGKILL."""
    if child.poll() is not None:
        return
    _say(f"stopping {name}")
    child.terminate()
    signals_seen = stop.count
    deadline = time.monotonic() + timeout
    while child.poll() is None:
        if stop.count > signals_seen:
            signals_seen = stop.count
            child.terminate()
        if time.monotonic() > deadline:
            _say(f"{name} did not stop within {timeout:.0f}s; killing it")
            child.kill()
            child.wait()
            return
        time.sleep(0.05)


def _worker_stop_timeout(settings: Settings) -> float:
    """Long enough for the deliveries in flight to end by their own deadlines."""
    return max(settings.webhook_timeout, settings.smtp_timeout) + 10


def _dev_secret(name: str, make: Callable[[], str]) -> str:
    """A generated dev credential, kept in var/ so it stays the same across restarts."""
    path = DEV_VAR_DIR / name
    if path.exists():
        return path.read_text().strip()
    value = make()
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value


if __name__ == "__main__":
    sys.exit(main())
