"""`dispatcher send-email` and `send-webhook`: sending through the API, as an application does."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import click

from dispatcher.cli.base import (
    TERMINAL,
    WATCH_INTERVAL,
    Failed,
    Misconfigured,
    attempt_line,
    cli,
    exit_with,
    load_settings,
)
from dispatcher.priorities import PRIORITIES, Priority

_wait_option = click.option(
    "--wait",
    is_flag=True,
    help="wait until the job succeeded or failed, print its attempts, and exit 1 unless it succeeded",
)


_priority_option = click.option(
    "--priority",
    type=click.Choice(PRIORITIES),
    help="the queue to use (default: default)",
)


_send_at_option = click.option(
    "--send-at",
    metavar="TIME",
    help="when to send it, with its offset, e.g. 2026-12-24T09:00:00+01:00 (up to 30 days ahead)",
)


_idempotency_option = click.option(
    "--idempotency-key",
    metavar="KEY",
    help="send it once: the same key and request within 24 h print the first job id and enqueue nothing",
)


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
                    click.echo(attempt_line(attempt))
                    seen += 1
            if job["status"] in TERMINAL:
                break
            time.sleep(WATCH_INTERVAL)
    click.echo(job["status"])
    if job["status"] != "succeeded":
        exit_with(1)


def _api_client() -> Any:
    from dispatcher.client import Client
    from dispatcher.dev import API_KEY_FILE, API_URL_FILE, read_var

    settings = load_settings()
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
