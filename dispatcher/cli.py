"""The `dispatcher` command.

Running the service: `dev`, `web`, `worker`. Sending, through the API (as an application does):
`send-email`, `send-webhook`. Looking and acting, straight on Redis (as RQ's own command line does,
so they work while the API is down): `status`, `jobs`, `retry`, `cancel`, `replay`, `stats`, `rq-info`.

Every failure is one line on stderr, `dispatcher <command>: <what went wrong>`, and a non-zero exit:
1 when the command could not do its work, 2 for a usage or configuration error.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click
import redis

from dispatcher.config import Settings
from dispatcher.errors import ConfigError
from dispatcher.priorities import PRIORITIES, Priority, parse

LOG_LEVELS = ("debug", "info", "warning", "error")
#: How often `status --watch` reads the job again.
WATCH_INTERVAL = 0.5
_TERMINAL = ("succeeded", "failed", "canceled")

F = TypeVar("F", bound=Callable[..., Any])


class Failed(click.ClickException):
    """The command could not do its work: one line, exit code 1."""

    exit_code = 1


class Misconfigured(click.ClickException):
    """Configuration (environment) unusable: one line, exit code 2."""

    exit_code = 2


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the command line; every failure is one line `dispatcher <command>: ...`."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = cli.main(args=args, prog_name="dispatcher", standalone_mode=False)
    except click.ClickException as exc:
        name = next((arg for arg in args if arg in cli.commands), None)
        message = exc.format_message()
        if isinstance(exc, click.UsageError):
            help_command = f"dispatcher {name} --help" if name else "dispatcher --help"
            message = f"{message.rstrip('.')} (see {help_command})"
        click.echo(f"dispatcher{' ' + name if name else ''}: {message}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(130)
    except redis.RedisError as exc:  # Redis went away while a command was reading it
        name = next((arg for arg in args if arg in cli.commands), None)
        click.echo(f"dispatcher {name}: Redis failed: {exc}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """Dispatcher: send email and call webhooks in the background, with retries, on RQ and Redis.

    Quick start: `dispatcher dev` runs everything here (embedded Redis, the API, a worker). From
    the same directory, the other commands then find that service through ./var/ by themselves.
    Elsewhere they read REDIS_URL (status, jobs, retry, cancel, replay, stats, rq-info) or DISPATCHER_URL and
    DISPATCHER_API_KEY (send-email, send-webhook).
    """


# --- running the service ---------------------------------------------------------------------


@cli.command()
def dev() -> None:
    """Run everything locally: Redis (embedded unless REDIS_URL is set), the API and one worker.

    Generates an API key and a signing secret on first run and keeps them in ./var/, with the Redis
    and API URLs, so that the other commands find this service. Logs are text unless
    DISPATCHER_LOG_FORMAT says otherwise. Ctrl+C stops the API, then the worker (deliveries in
    flight finish), then Redis.
    """
    from dispatcher.dev import run_dev

    with _configuration():
        _exit(run_dev())


@cli.command()
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(LOG_LEVELS), help="the web server's log level"
)
def web(log_level: str) -> None:
    """Serve the API with gunicorn (gevent workers) on $DISPATCHER_HOST:$PORT (default 0.0.0.0:8000).

    Needs REDIS_URL and DISPATCHER_API_KEYS; WEB_CONCURRENCY sets the number of processes.
    """
    with _configuration():
        _exit(run_web(log_level=log_level))


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
        warn_about_server(connection, logging.getLogger("dispatcher.web"))
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
    with _configuration():
        Settings.from_env().require_webhook_secret()
    argv = [sys.executable, "-m", "workers", *WorkerOptions(**options).argv()]
    if processes == 1:
        # The worker is its own package (`python -m workers`): the web side never imports delivery code.
        os.execv(sys.executable, argv)
    _exit(_run_workers(argv, processes))


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


# --- sending, through the API ----------------------------------------------------------------


def _wait_option(command: F) -> F:
    return click.option(
        "--wait",
        is_flag=True,
        help="wait until the job succeeded or failed, print its attempts, and exit 1 unless it succeeded",
    )(command)


def _priority_option(command: F) -> F:
    return click.option(
        "--priority",
        type=click.Choice(PRIORITIES),
        help="the queue to use (default: default)",
    )(command)


def _send_at_option(command: F) -> F:
    return click.option(
        "--send-at",
        metavar="TIME",
        help="when to send it, with its offset, e.g. 2026-12-24T09:00:00+01:00 (up to 30 days ahead)",
    )(command)


def _idempotency_option(command: F) -> F:
    return click.option(
        "--idempotency-key",
        metavar="KEY",
        help="send it once: the same key and request within 24 h print the first job id and enqueue nothing",
    )(command)


@cli.command("send-email")
@click.option(
    "--to", "to", multiple=True, required=True, metavar="ADDRESS",
    help="a recipient: ADDRESS or 'Name <ADDRESS>', as for --cc, --bcc, --from, --reply-to (repeatable)",
)
@click.option("--cc", multiple=True, metavar="ADDRESS", help="a copy recipient (repeatable)")
@click.option("--bcc", multiple=True, metavar="ADDRESS", help="a blind copy recipient (repeatable)")
@click.option("--from", "sender", metavar="ADDRESS", help="the sender (default: DISPATCHER_EMAIL_FROM)")
@click.option("--reply-to", metavar="ADDRESS", help="the Reply-To address")
@click.option("--subject", required=True, help="the subject line")
@click.option("--text", help="the plain-text body ('-' reads it from stdin)")
@click.option("--html", help="the HTML body ('-' reads it from stdin)")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="metadata shown with the job (repeatable)")
@_priority_option
@_send_at_option
@_idempotency_option
@_wait_option
def send_email(
    to: tuple[str, ...],
    cc: tuple[str, ...],
    bcc: tuple[str, ...],
    sender: str | None,
    reply_to: str | None,
    subject: str,
    text: str | None,
    html: str | None,
    metadata: tuple[str, ...],
    priority: Priority | None,
    send_at: str | None,
    idempotency_key: str | None,
    wait: bool,
) -> None:
    """Send an email through the API (POST /v1/emails) and print its job id.

    The API is DISPATCHER_URL (else the one `dispatcher dev` runs here, else http://127.0.0.1:$PORT)
    and the key DISPATCHER_API_KEY (else the first of DISPATCHER_API_KEYS, else dev's key).

    Example: dispatcher send-email --to ada@example.com --subject Hi --text 'Hello Ada'
    """
    fields: dict[str, Any] = {"cc": list(cc) or None, "bcc": list(bcc) or None, "from_": sender}
    fields |= {"reply_to": reply_to, "metadata": _pairs("--metadata", metadata), "send_at": send_at}
    client = _api_client()
    with _api_errors():
        job_id = client.send_email(
            to=list(to),
            subject=subject,
            text=_stdin_or(text),
            html=_stdin_or(html),
            priority=priority,
            idempotency_key=idempotency_key,
            **fields,
        )
    _accepted(client, job_id, wait)


@cli.command("send-webhook")
@click.argument("url")
@click.option("--event-type", required=True, help="the event type, e.g. order.created")
@click.option(
    "--payload",
    default="{}",
    show_default=True,
    metavar="JSON",
    help="the JSON object to send; @FILE reads it from a file, '-' from stdin",
)
@click.option("--header", "headers", multiple=True, metavar="'NAME: VALUE'", help="an extra header (repeatable)")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="metadata shown with the job (repeatable)")
@_priority_option
@_send_at_option
@_idempotency_option
@_wait_option
def send_webhook(
    url: str,
    event_type: str,
    payload: str,
    headers: tuple[str, ...],
    metadata: tuple[str, ...],
    priority: Priority | None,
    send_at: str | None,
    idempotency_key: str | None,
    wait: bool,
) -> None:
    """Send a webhook to URL through the API (POST /v1/webhooks) and print its job id.

    The API is found as for send-email.

    Example: dispatcher send-webhook https://example.com/hook --event-type order.created --payload '{"id": 1}'
    """
    body = _json_object("--payload", payload)
    extra: dict[str, Any] = {"metadata": _pairs("--metadata", metadata), "send_at": send_at}
    if headers:
        extra["headers"] = dict(_header(value) for value in headers)
    client = _api_client()
    with _api_errors():
        job_id = client.send_webhook(
            url=url, event_type=event_type, payload=body, priority=priority, idempotency_key=idempotency_key, **extra
        )
    _accepted(client, job_id, wait)


def _accepted(client: Any, job_id: str, wait: bool) -> None:
    click.echo(job_id)
    if not wait:
        return
    seen = 0
    with _api_errors():
        while True:
            job = client.job(job_id)
            for attempt in job["attempts"][seen:]:
                if attempt.get("finished_at"):
                    click.echo(_attempt_line(attempt))
                    seen += 1
            if job["status"] in _TERMINAL:
                break
            time.sleep(WATCH_INTERVAL)
    click.echo(job["status"])
    if job["status"] != "succeeded":
        _exit(1)


def _api_client() -> Any:
    from dispatcher.client import Client
    from dispatcher.dev import API_KEY_FILE, API_URL_FILE, read_var

    settings = _settings()
    url = os.environ.get("DISPATCHER_URL", "").strip() or read_var(API_URL_FILE) or f"http://127.0.0.1:{settings.port}"
    key = os.environ.get("DISPATCHER_API_KEY", "").strip() or next(iter(settings.api_keys), None)
    key = key or read_var(API_KEY_FILE)
    if not key:
        raise Misconfigured("no API key: set DISPATCHER_API_KEY (or run `dispatcher dev` in this directory)")
    return Client(url, key, retries=2)


@contextlib.contextmanager
def _api_errors() -> Iterator[None]:
    import requests

    from dispatcher.client import DispatcherError, Unavailable, ValidationFailed

    try:
        yield
    except ValidationFailed as exc:
        problems = "; ".join(f"{d['field']}: {d['problem']}" for d in exc.details) or exc.message
        raise Failed(f"refused: {problems}") from None
    except Unavailable as exc:
        if exc.status == 0 and isinstance(exc.__cause__, requests.RequestException):
            request = exc.__cause__.request
            where = str(request.url) if request is not None else "the API"
            raise Failed(f"cannot reach {where}: {_reason(exc.__cause__)}") from None
        raise Failed(f"the API answered {exc.status}: {exc.message}") from None
    except DispatcherError as exc:
        raise Failed(f"the API answered {exc.status}: {exc.message}") from None


def _reason(exc: Exception) -> str:
    """The innermost cause of a failed connection, e.g. `[Errno 111] Connection refused`."""
    text = str(exc)
    for marker in ("Errno", "timed out", "Name or service"):
        start = text.find(f"[{marker}" if marker == "Errno" else marker)
        if start >= 0:
            return text[start:].split(")")[0].strip("'\"")
    return type(exc).__name__


def _stdin_or(value: str | None) -> str | None:
    return sys.stdin.read() if value == "-" else value


def _json_object(option: str, value: str) -> dict[str, Any]:
    if value == "-":
        value = sys.stdin.read()
    elif value.startswith("@"):
        try:
            with open(value[1:], encoding="utf-8") as file:
                value = file.read()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {value[1:]}: {exc.strerror}", param_hint=f"'{option}'") from None
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=f"'{option}'") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object", param_hint=f"'{option}'")
    return parsed


def _pairs(option: str, values: tuple[str, ...]) -> dict[str, str] | None:
    pairs = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint=f"'{option}'")
        pairs[key] = item
    return pairs or None


def _header(value: str) -> tuple[str, str]:
    name, sep, item = value.partition(":")
    if not sep or not name.strip():
        raise click.BadParameter(f"{value!r} is not 'Name: value'", param_hint="'--header'")
    return name.strip(), item.strip()


# --- looking and acting, on Redis ------------------------------------------------------------


@dataclass
class _Store:
    """The configured Redis and the Dispatcher queue's status reader on it."""

    settings: Settings
    source: str
    connection: Any
    status: Any


def _settings() -> Settings:
    with _configuration():
        return Settings.from_env()


def _store() -> _Store:
    """Settings with REDIS_URL from the environment, else from the `dispatcher dev` running here."""
    from dispatcher.dev import REDIS_URL_FILE, VAR_DIR, read_var
    from dispatcher.enqueue import make_queues
    from dispatcher.keys import Keys
    from dispatcher.status import StatusReader

    env = dict(os.environ)
    source = "REDIS_URL"
    if not env.get("REDIS_URL", "").strip():
        written = read_var(REDIS_URL_FILE)
        source = f"{VAR_DIR / REDIS_URL_FILE}, written by dispatcher dev" if written else "the default"
        env["REDIS_URL"] = written or ""
    with _configuration():
        settings = Settings.from_env(env)
    connection = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=10)
    try:
        connection.ping()
    except redis.RedisError as exc:
        raise Failed(f"cannot reach Redis at {_shown(settings.redis_url)} (from {source}): {exc}") from None
    reader = StatusReader(connection, make_queues(connection, settings), Keys(settings.queue_name))
    return _Store(settings, source, connection, reader)


def _shown(url: str) -> str:
    """A Redis URL without its password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


_json_flag = click.option("--json", "as_json", is_flag=True, help="print the API's JSON instead of a summary")


@cli.command()
@click.argument("job_id", metavar="ID")
@click.option("--watch", is_flag=True, help="follow it live until it is over (attempts; a batch's progress bar)")
@_json_flag
def status(job_id: str, watch: bool, as_json: bool) -> None:
    """Show a job: its status, target and every attempt (as GET /v1/jobs/ID shows it); or a batch
    (an ID starting ba_, as GET /v1/batches/ID): its jobs by status and how much is done.

    With --watch, follow it live: each attempt of a job is printed as it ends, a batch's progress bar
    moves; the command exits when it is over: 0 when everything was delivered, 1 when anything failed.
    """
    from dispatcher.batches import ID_PREFIX

    store = _store()
    if job_id.startswith(ID_PREFIX):
        _batch_status(store, job_id, watch, as_json)
        return
    job = _job(store, job_id)
    if not watch:
        click.echo(json.dumps(job, indent=2) if as_json else _job_text(job))
        return
    click.echo(_job_text({**job, "attempts": []}, header_only=True))
    printed = 0
    last = None
    while True:
        finished = [a for a in job["attempts"] if a.get("finished_at")]
        for attempt in finished[printed:]:
            click.echo(_attempt_line(attempt))
        printed = max(printed, len(finished))
        state = (job["status"], job.get("next_attempt_at"))
        if state != last:
            click.echo(_state_line(job))
            last = state
        if job["status"] in _TERMINAL:
            _exit(0 if job["status"] == "succeeded" else 1)
        time.sleep(WATCH_INTERVAL)
        job = _job(store, job_id)


def _batch_status(store: _Store, batch_id: str, watch: bool, as_json: bool) -> None:
    from dispatcher.batches import batch_view
    from dispatcher.keys import Keys

    keys = Keys(store.settings.queue_name)

    def read() -> dict:
        view = batch_view(store.connection, keys, batch_id, 0, 20)
        if view is None:
            raise Failed(f"no batch {batch_id} in {store.settings.queue_name} on {_shown(store.settings.redis_url)}")
        return view

    view = read()
    if as_json and not watch:
        click.echo(json.dumps(view, indent=2))
        return
    click.echo(f"{view['id']}  {view['kind']} batch of {view['count']}  (priority {view['priority']})")
    click.echo(f"  created  {view['created_at']}")
    tty = sys.stdout.isatty()
    last = None
    while True:
        line = _progress_line(view)
        if line != last:
            click.echo(f"\r{line}" if tty else line, nl=not tty)
            last = line
        if not watch or view["percent_done"] >= 100:
            break
        time.sleep(WATCH_INTERVAL)
        view = read()
    if tty:
        click.echo()
    if view["failed"]["count"]:
        more = view["failed"]["count"] - len(view["failed"]["ids"])
        click.echo(f"  failed: {' '.join(view['failed']['ids'])}{f' and {more} more' if more > 0 else ''}")
    if view["finished_at"]:
        click.echo(f"  finished {view['finished_at']}")
    if watch:
        _exit(1 if view["failed"]["count"] else 0)


def _progress_line(view: dict) -> str:
    """`[#####.....]  50.0%  succeeded 5  failed 0  ...`: the statuses that have jobs, in order."""
    width = 30
    filled = int(width * view["percent_done"] / 100)
    counts = "  ".join(f"{status} {n}" for status, n in view["by_status"].items() if n)
    return f"  [{'#' * filled}{'.' * (width - filled)}] {view['percent_done']:5.1f}%  {counts}"


def _job(store: _Store, job_id: str) -> dict:
    job = store.status.job(job_id)
    if job is None:
        raise Failed(f"no job {job_id} in {store.settings.queue_name} on {_shown(store.settings.redis_url)}")
    return job  # type: ignore[no-any-return]


def _job_text(job: dict, header_only: bool = False) -> str:
    target = job.get("target") or {}
    lines = [f"{job['id']}  {job['kind']}  {job['status']}  (priority {job.get('priority') or '?'})"]
    if "url" in target:
        lines.append(f"  to       {target['url']}  ({target.get('event_type')})")
    elif target:
        lines.append(f"  to       {', '.join(target.get('to') or [])}  subject {target.get('subject')!r}")
    lines.append(f"  created  {job.get('created_at')}")
    if header_only:
        return "\n".join(lines)
    if job.get("metadata"):
        lines.append(f"  metadata {json.dumps(job['metadata'])}")
    lines += [_attempt_line(attempt) for attempt in job["attempts"]]
    lines.append(_state_line(job))
    return "\n".join(lines)


def _attempt_line(attempt: dict) -> str:
    duration = f"{attempt['duration_ms']} ms" if attempt.get("duration_ms") is not None else "running"
    code = attempt.get("status_code")
    parts = [f"  attempt {attempt['number']}", attempt.get("finished_at") or attempt["started_at"]]
    parts += [attempt.get("outcome") or "running", str(code) if code is not None else "-", duration]
    if attempt.get("error"):
        parts.append(attempt["error"])
    return "  ".join(parts)


def _state_line(job: dict) -> str:
    if job["status"] == "scheduled" and job.get("next_attempt_at"):
        return f"  scheduled: next attempt at {job['next_attempt_at']}"
    if job["status"] == "failed":
        return f"  failed: {job.get('error')}"
    return f"  {job['status']}"


@cli.command()
@click.option("--kind", type=click.Choice(["email", "webhook"]), help="only emails or only webhooks")
@click.option(
    "--status",
    "status_",
    type=click.Choice(["queued", "scheduled", "running", "succeeded", "failed", "canceled"]),
    help="only jobs in this status",
)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True, help="at most this many")
@_json_flag
def jobs(kind: str | None, status_: str | None, limit: int, as_json: bool) -> None:
    """List recent jobs, newest first (as GET /v1/jobs does)."""
    found = _store().status.list(kind, status_, limit)
    if as_json:
        click.echo(json.dumps({"jobs": found}, indent=2))
        return
    for job in found:
        target = job.get("target") or {}
        shown = target.get("url") or ", ".join(target.get("to") or []) or "-"
        fields = [job["id"], job["kind"], job["status"], job.get("priority") or "?", str(len(job["attempts"]))]
        click.echo("  ".join([*fields, job.get("created_at") or "-", shown]))
    if not found:
        click.echo("no jobs", err=True)


@cli.command()
@click.argument("job_id", metavar="ID")
def retry(job_id: str) -> None:
    """Deliver a failed job again, as a new series of attempts in the same history.

    It keeps its id, so a webhook keeps its webhook-id and an email its Message-ID. This is RQ's
    requeue, as rq-dashboard's Requeue button and `rq requeue` do it (and POST /v1/jobs/ID/retry).
    """
    with _control() as control:
        queue = control.retry(job_id)
    click.echo(f"{job_id} requeued on {queue.name}")


@cli.command()
@click.argument("job_id", metavar="ID")
def cancel(job_id: str) -> None:
    """Cancel a queued or scheduled job: it is never delivered (as DELETE /v1/jobs/ID does).

    A job a worker has started can no longer be canceled, nor one that is over.
    """
    with _control() as control:
        control.cancel(job_id)
    click.echo(f"{job_id} canceled")


def _moment(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    from pydantic import TypeAdapter, ValidationError

    from dispatcher.views import Moment

    if value is None:
        return None
    try:
        return TypeAdapter(Moment).validate_python(value)
    except ValidationError as exc:
        raise click.BadParameter(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


@cli.command()
@click.option("--kind", type=click.Choice(["email", "webhook"]), help="only emails or only webhooks")
@click.option(
    "--since", callback=_moment, metavar="DATETIME", help="only jobs that failed at or after, e.g. 2026-12-04T18:00:00Z"
)
@click.option("--until", callback=_moment, metavar="DATETIME", help="only jobs that failed before this moment")
@click.option("--limit", type=click.IntRange(1, 10_000), default=1000, show_default=True, help="at most this many")
def replay(kind: str | None, since: Any, until: Any, limit: int) -> None:
    """Deliver failed jobs again, as retry does for one (and POST /v1/jobs/replay).

    Prints each job requeued, then how many. Highest priority first, then oldest failure first.
    """
    with _control() as control:
        ids = control.replay(kind, since, until, limit)
    for job_id in ids:
        click.echo(job_id)
    click.echo(f"{len(ids)} requeued", err=True)


@contextlib.contextmanager
def _control() -> Iterator[Any]:
    """The job control of the configured Redis; its refusals become one line and exit code 1."""
    from dispatcher.control import JobControl
    from dispatcher.errors import JobStateConflict, NoSuchJob

    store = _store()
    try:
        yield JobControl.of(store.connection, store.settings)
    except NoSuchJob as exc:
        where = f"{store.settings.queue_name} on {_shown(store.settings.redis_url)}"
        raise Failed(f"no job {exc.job_id} in {where}") from None
    except JobStateConflict as exc:
        raise Failed(str(exc)) from None


@cli.command()
@_json_flag
def stats(as_json: bool) -> None:
    """Count jobs by kind and status, and show per priority the jobs waiting and the live workers
    (and the sending rate in force, when one is set).

    Warns (and exits 1) when jobs wait in a queue that no live worker serves.
    """
    store = _store()
    counts = store.status.stats()
    ready = store.status.readiness()
    if as_json:
        click.echo(json.dumps({"stats": counts, "readiness": ready}, indent=2))
    else:
        click.echo(f"Redis {_shown(store.settings.redis_url)} (from {store.source})")
        columns = ("queued", "scheduled", "running", "succeeded", "failed")
        click.echo(f"{'':10}" + "".join(f"{c:>11}" for c in columns))
        for kind in ("email", "webhook"):
            click.echo(f"{kind:10}" + "".join(f"{counts[kind][c]:>11}" for c in columns))
        click.echo(f"\n{'priority':10}{'queue':>24}{'waiting':>11}{'workers':>11}")
        for priority, queue in ready["queues"].items():
            click.echo(f"{priority:10}{queue['queue']:>24}{queue['queued']:>11}{queue['workers']:>11}")
        from dispatcher import ratelimit

        rates = ratelimit.shared_rates(store.connection, store.status.keys, ratelimit.configured(store.settings))
        for kind, shared in rates.items():  # lowered for a while when the server throttles
            click.echo(f"\n{kind} sending rate: {shared.current():g}/s now, of {shared.rate:g}/s")
    for warning in ready["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    if ready["warnings"]:
        _exit(1)


@cli.command("rq-info", context_settings={"ignore_unknown_options": True})
@click.argument("rq_args", nargs=-1, type=click.UNPROCESSED, metavar="[RQ INFO OPTIONS]...")
def rq_info(rq_args: tuple[str, ...]) -> None:
    """RQ's `rq info` on the configured Redis with the JSON serializer: queues, workers, registries.

    Redis is REDIS_URL, else the one of the `dispatcher dev` running in this directory, and the
    command says which on stderr. Other options go to `rq info`, e.g. `dispatcher rq-info --interval 1`
    (refresh every second); `dispatcher rq-info -- --help` lists them.
    """
    store = _store()
    click.echo(f"Redis {_shown(store.settings.redis_url)} (from {store.source})", err=True)
    store.connection.close()
    argv = [sys.executable, "-m", "rq.cli", "info", "-u", store.settings.redis_url]
    argv += ["-S", "rq.serializers.JSONSerializer", *rq_args]
    sys.stdout.flush()
    os.execv(sys.executable, argv)


@cli.group()
def suppressions() -> None:
    """The suppression list: addresses no mail goes to (a hard bounce adds one).

    Reads and writes Redis directly, as `retry` does: REDIS_URL, else the Redis of the
    `dispatcher dev` running in this directory.
    """


def _suppression_list() -> Any:
    from dispatcher.keys import Keys
    from dispatcher.suppressions import SuppressionList

    store = _store()
    return SuppressionList(store.connection, Keys(store.settings.queue_name))


def _list_address(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """An address argument in the list's form (lower case); a usage error when it is no address."""
    from dispatcher.addresses import AddressError
    from dispatcher.suppressions import normalize

    try:
        return normalize(value)
    except AddressError as exc:
        raise click.BadParameter(f"invalid address: {exc}") from None


@suppressions.command("list")
@_json_flag
def suppressions_list(as_json: bool) -> None:
    """Every suppressed address, in address order, with why and when it was added."""
    listed = _suppression_list()
    entries, after = [], None
    while True:
        page, after = listed.page(after, 1000)
        entries += page
        if after is None:
            break
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    for entry in entries:
        why = "manual"
        if entry["reason"] == "bounce":
            why = f"bounce {entry['smtp_code']} {entry['smtp_message'] or ''}".rstrip()
        click.echo("  ".join([entry["address"], entry["added_at"] or "-", why]))
    if not entries:
        click.echo("no suppressed addresses", err=True)


@suppressions.command("add")
@click.argument("address", callback=_list_address)
def suppressions_add(address: str) -> None:
    """Suppress ADDRESS by hand (an address already listed keeps its entry)."""
    from dispatcher.suppressions import manual

    ((_, added),) = _suppression_list().add([manual(address)])
    click.echo(f"{address} {'added' if added else 'was already suppressed'}")


@suppressions.command("remove")
@click.argument("address", callback=_list_address)
def suppressions_remove(address: str) -> None:
    """Take ADDRESS off the list: mail goes to it again."""
    if not _suppression_list().remove(address):
        raise Failed(f"{address} is not on the suppression list")
    click.echo(f"{address} removed")


# --- shared ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _configuration() -> Iterator[None]:
    try:
        yield
    except ConfigError as exc:
        raise Misconfigured(str(exc)) from None


def _exit(code: int) -> NoReturn:
    raise click.exceptions.Exit(code)


if __name__ == "__main__":
    main()
