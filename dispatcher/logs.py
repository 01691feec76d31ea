"""Logs: one JSON object a line (DISPATCHER_LOG_FORMAT=json, the default) or human text, for the web and
worker processes alike; and the two events they log, one per API request and one per delivery attempt.

Everything those processes log goes through the root logger's one handler set up here: our own loggers,
gunicorn's error log (dispatcher.server.HandOnLogger hands its records on), RQ's worker and
scheduler (RQ adds handlers of its own only where none is in effect) and Python's warnings. So in json
mode every line a log shipper reads is one object, an exception's traceback in its `exc_info` field.

What is never logged: message bodies, subjects, recipients, header values, webhook payloads, URL query
strings or userinfo, API keys, signing secrets, SMTP passwords. A request's line has its path only; an
attempt's line has the host it went to (a webhook's URL host and port, or the SMTP relay's), never the
attempt's error text, which may quote a URL or an address (GET /v1/jobs/<id> has it).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from dispatcher.config import parse_log_format

#: The text format (the one used before DISPATCHER_LOG_FORMAT), then an event's fields as key=value.
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
#: A batch's request line lists this many of its job ids (all 10,000 would make a 370 KB line).
LOGGED_BATCH_IDS = 100
#: Where the API leaves, in the WSGI environ, the fields naming the jobs a request created or read.
JOB_FIELDS = "dispatcher.job_fields"

request_log = logging.getLogger("dispatcher.request")
attempt_log = logging.getLogger("dispatcher.attempt")


#: A LogRecord's own attributes; any other is an event's field (passed as `extra`).
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class _JsonLines(logging.Formatter):
    """{"timestamp", "level", "logger", "message", ...the event's fields, "exc_info"} on one line.

    The standard library's json on a dict: python-json-logger's formatter took 18 us a line, this 8 us
    (a worker writes one per attempt).
    """

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD:
                data[name] = value
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(data, ensure_ascii=False, default=str)


class _TextLines(logging.Formatter):
    """TEXT_FORMAT, then the event's fields as ` key=value` (the facts a json line has)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(
            f"{k}={_one_line(v)}" for k, v in record.__dict__.items() if k not in _STANDARD and v is not None
        )
        if not fields:
            return line
        head, newline, rest = line.partition("\n")  # fields on the first line, before any traceback
        return f"{head} {fields}{newline}{rest}"


#: Characters that would start a new line (or hide one) in a text log: escaped, so a value from a
#: request (a path with an encoded line break, say) cannot forge a line of its own.
_LINE_BREAKERS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, 0x85)} | {0x2028: "\\u2028", 0x2029: "\\u2029"}


def _one_line(value: object) -> str:
    return str(value).translate(_LINE_BREAKERS)


def formatter(log_format: str) -> logging.Formatter:
    return _JsonLines() if log_format == "json" else _TextLines()


def configure(log_format: str, level: int | str = logging.INFO) -> None:
    """Send every log record of this process to stderr, formatted as `log_format` says."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)  # a warning is a record too, not a raw line on stderr


def ensure_configured() -> None:
    """Under a plain `rq worker`, which sets up RQ's loggers only: configure from the environment once,
    so Dispatcher's lines are not lost."""
    if not attempt_log.hasHandlers():
        configure(parse_log_format(os.environ.get("DISPATCHER_LOG_FORMAT", "").strip() or None))


# --- the events ------------------------------------------------------------------------------


def log_attempt(
    job_id: str,
    channel: str,
    number: int,
    outcome: str | None,
    status_code: int | None,
    duration_ms: int | None,
    host: str | None,
    queue: str,
    priority: str,
    verdict: str,
) -> None:
    """One delivery attempt, once it is over (`verdict`: succeeded, retry or failed: what comes next)."""
    attempt_log.info(
        "attempt",
        extra={
            "job_id": job_id,
            "channel": channel,
            "attempt": number,
            "outcome": outcome,
            "status_code": status_code,
            "duration_ms": duration_ms,
            "host": host,
            "queue": queue,
            "priority": priority,
            "verdict": verdict,
        },
    )


def note_job(job_id: str) -> None:
    """Name the job the current API request created or read in its request line."""
    _note({"job_id": job_id})


def note_batch(job_ids: list[str]) -> None:
    """Name a batch's jobs in its request line: how many, and the first LOGGED_BATCH_IDS ids."""
    _note({"job_count": len(job_ids), "job_ids": job_ids[:LOGGED_BATCH_IDS]})


def _note(fields: dict[str, Any]) -> None:
    from flask import request  # here: the workers import this module, not Flask

    request.environ[JOB_FIELDS] = fields


class RequestLog:
    """WSGI middleware: one line per request, once its answer is ready: method, path (never the query
    string), status, duration in ms from its arrival, remote address, and the jobs it created or read."""

    def __init__(self, app: Callable[[dict, Any], Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict, start_response: Any) -> Iterable[bytes]:
        started = time.monotonic()
        status: list[int] = []

        def respond(status_line: str, headers: list, *args: Any) -> Any:
            status.append(int(status_line[:3]))
            return start_response(status_line, headers, *args)

        try:
            return self.app(environ, respond)
        finally:
            if request_log.isEnabledFor(logging.INFO):
                request_log.info("request", extra=_request_fields(environ, status, started))


#: Paths that end in an email address (dispatcher.suppression_api), which a request line never shows.
_ADDRESS_PATHS = "/v1/suppressions/"


def _logged_path(path: str | None) -> str | None:
    if path and path.startswith(_ADDRESS_PATHS) and len(path) > len(_ADDRESS_PATHS):
        return _ADDRESS_PATHS + "<address>"
    return path


def _request_fields(environ: dict, status: list[int], started: float) -> dict[str, Any]:
    return {
        "method": environ.get("REQUEST_METHOD"),
        "path": _logged_path(environ.get("PATH_INFO")),
        "status": status[-1] if status else None,
        "duration_ms": round((time.monotonic() - started) * 1000, 1),
        "remote_addr": environ.get("REMOTE_ADDR"),
        **environ.get(JOB_FIELDS, {}),
    }
