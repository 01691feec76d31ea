"""`dispatcher status`, `jobs`, `retry`, `cancel`, `replay`, `stats`, `rq-info` and `suppressions`:
looking and acting straight on Redis, as RQ's own command line does, so they work while the API is down.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import click
import redis

from dispatcher.cli.base import (
    TERMINAL,
    WATCH_INTERVAL,
    Failed,
    attempt_line,
    cli,
    configuration,
    exit_with,
)
from dispatcher.config import Settings
from dispatcher.connection import connect, is_sentinel, shown_url


@dataclass
class _Store:
    """The configured Redis and the Dispatcher queue's status reader on it."""

    settings: Settings
    source: str
    connection: Any
    status: Any


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
    with configuration():
        settings = Settings.from_env(env)
    connection = connect(settings.redis_url, socket_connect_timeout=3, socket_timeout=10)
    try:
        connection.ping()
    except redis.RedisError as exc:
        raise Failed(f"cannot reach Redis at {shown_url(settings.redis_url)} (from {source}): {exc}") from None
    reader = StatusReader(connection, make_queues(connection, settings), Keys(settings.queue_name))
    return _Store(settings, source, connection, reader)


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
            click.echo(attempt_line(attempt))
        printed = max(printed, len(finished))
        state = (job["status"], job.get("next_attempt_at"))
        if state != last:
            click.echo(_state_line(job))
            last = state
        if job["status"] in TERMINAL:
            exit_with(0 if job["status"] == "succeeded" else 1)
        time.sleep(WATCH_INTERVAL)
        job = _job(store, job_id)


def _batch_status(store: _Store, batch_id: str, watch: bool, as_json: bool) -> None:
    from dispatcher.batches import batch_view
    from dispatcher.keys import Keys

    keys = Keys(store.settings.queue_name)

    def read() -> dict:
        view = batch_view(store.connection, keys, batch_id, 0, 20)
        if view is None:
            raise Failed(f"no batch {batch_id} in {store.settings.queue_name} on {shown_url(store.settings.redis_url)}")
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
        exit_with(1 if view["failed"]["count"] else 0)


def _progress_line(view: dict) -> str:
    """`[#####.....]  50.0%  succeeded 5  failed 0  ...`: the statuses that have jobs, in order."""
    width = 30
    filled = int(width * view["percent_done"] / 100)
    counts = "  ".join(f"{status} {n}" for status, n in view["by_status"].items() if n)
    return f"  [{'#' * filled}{'.' * (width - filled)}] {view['percent_done']:5.1f}%  {counts}"


def _job(store: _Store, job_id: str) -> dict:
    job = store.status.job(job_id)
    if job is None:
        raise Failed(f"no job {job_id} in {store.settings.queue_name} on {shown_url(store.settings.redis_url)}")
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
    lines += [attempt_line(attempt) for attempt in job["attempts"]]
    lines.append(_state_line(job))
    return "\n".join(lines)


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


@cli.command()
@click.argument("endpoint_id", metavar="ENDPOINT")
@click.option(
    "--since", callback=_moment, required=True, metavar="DATETIME",
    help="events accepted at or after, e.g. 2026-12-04T18:00:00Z",
)
@click.option("--until", callback=_moment, metavar="DATETIME", help="events accepted before this moment [default: now]")
@click.option("--limit", type=click.IntRange(1, 10_000), default=1000, show_default=True, help="at most this many")
def recover(endpoint_id: str, since: Any, until: Any, limit: int) -> None:
    """Deliver again to ENDPOINT (its id, ep_...) the events accepted in a window whose delivery to
    it failed, as retry does for one (and POST /v1/applications/APP/endpoints/ENDPOINT/recover).

    At most 30 days; oldest event first. Queued, scheduled, running, succeeded and canceled
    deliveries are left alone. Prints each delivery requeued, then how many, and how many failed
    ones remain beyond --limit.
    """
    from dispatcher.control import recovery_window
    from dispatcher.endpoints import Registry
    from dispatcher.errors import FieldProblem

    try:
        until = recovery_window(since, until)
    except FieldProblem as exc:
        raise click.BadParameter(exc.problem, param_hint=f"--{exc.field}") from None
    with _control() as control:
        endpoint = Registry(control.connection, control.keys).endpoint_by_id(endpoint_id)
        if endpoint is None:
            raise Failed(f"no endpoint {endpoint_id} in {control.keys.prefix.partition(':')[2]}")
        if endpoint["disabled"]:
            raise Failed(f"endpoint {endpoint_id} is disabled, so its deliveries would fail again; enable it first")
        recovered = control.recover(endpoint_id, since, until, limit)
    for job_id in recovered.ids:
        click.echo(job_id)
    click.echo(f"{len(recovered.ids)} requeued, {recovered.remaining} remaining", err=True)


@contextlib.contextmanager
def _control() -> Iterator[Any]:
    """The job control of the configured Redis; its refusals become one line and exit code 1."""
    from dispatcher.control import JobControl
    from dispatcher.errors import JobStateConflict, NoSuchJob

    store = _store()
    try:
        yield JobControl.of(store.connection, store.settings)
    except NoSuchJob as exc:
        where = f"{store.settings.queue_name} on {shown_url(store.settings.redis_url)}"
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
        click.echo(f"Redis {shown_url(store.settings.redis_url)} (from {store.source})")
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
        exit_with(1)


@cli.command("rq-info", context_settings={"ignore_unknown_options": True})
@click.argument("rq_args", nargs=-1, type=click.UNPROCESSED, metavar="[RQ INFO OPTIONS]...")
def rq_info(rq_args: tuple[str, ...]) -> None:
    """RQ's `rq info` on the configured Redis with the JSON serializer: queues, workers, registries.

    Redis is REDIS_URL, else the one of the `dispatcher dev` running in this directory, and the
    command says which on stderr. Other options go to `rq info`, e.g. `dispatcher rq-info --interval 1`
    (refresh every second); `dispatcher rq-info -- --help` lists them.
    """
    store = _store()
    click.echo(f"Redis {shown_url(store.settings.redis_url)} (from {store.source})", err=True)
    store.connection.close()
    # RQ's CLI reads a Sentinel URL only from a settings module (workers.rqconfig reads REDIS_URL).
    where = ["-c", "workers.rqconfig"] if is_sentinel(store.settings.redis_url) else ["-u", store.settings.redis_url]
    argv = [sys.executable, "-m", "rq.cli", "info", *where]
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
