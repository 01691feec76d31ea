"""rq-dashboard in the web process, at /dashboard/: its login, its actions, and what it may show.

rq-dashboard 0.9.0 (pinned in pyproject.toml) is a Flask blueprint with no login and no CSRF
protection, one action that runs on GET, and pages that insert job descriptions, meta and error
texts into the page as raw HTML. Mounted here it:

- has a Redis connection of its own: listing workers makes RQ raise its connection's socket timeout
  to 415 s, and the API's connection must keep its 1 s (it answers 503 quickly when Redis is away);
- reads jobs with RQ's JSON serializer, as every Dispatcher job is written;
- wants HTTP Basic credentials on every request: any user name, an API key as the password;
- acts (requeue, delete, empty, compact, requeue all) only on a POST sent by its own pages: with a
  header a cross-site form cannot send, not marked cross-site by the browser, and never in a frame;
- shows no secret: its JSON answers are rewritten so that URLs lose their user info, query and
  fragment, the values of a job's custom headers and URL query are redacted from every text, a
  partner's response excerpt (which may echo the headers) is left out, and the text its pages
  insert as HTML is escaped.
"""

from __future__ import annotations

import hmac
import html
import json
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import redis
import rq_dashboard
import rq_dashboard.web
from flask import Flask, Response, current_app, jsonify, request
from rq import Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from dispatcher.config import Settings
from dispatcher.connection import connect
from dispatcher.errors import APIError

#: Where the dashboard is mounted.
PREFIX = "/dashboard"
REALM = "Dispatcher"
#: The dashboard's own connection. Its pages may wait longer for Redis than the API does, and RQ
#: raises the socket timeout to 415 s on it anyway once a page lists workers.
CONNECT_TIMEOUT = 2.0
SOCKET_TIMEOUT = 10.0
#: rq-dashboard's views that change state: POST only, and only from the dashboard's own pages.
ACTIONS = frozenset(
    {
        "rq_dashboard.requeue_job_view",
        "rq_dashboard.delete_job_view",
        "rq_dashboard.requeue_all",
        "rq_dashboard.empty_queue",
        "rq_dashboard.compact_queue",
    }
)
#: jQuery adds this header to the dashboard's own (same-origin) POSTs. A cross-site form cannot
#: send it, and a cross-site script can only after a CORS preflight, which is never granted.
CSRF_HEADER = "X-Requested-With"
CSRF_HEADER_VALUE = "XMLHttpRequest"
#: Shorter values are not redacted from texts: "1" or "on" would blot out everything and hide nothing.
MIN_SECRET_LENGTH = 4
REDACTED = "[redacted]"
#: A URL with a scheme anywhere in a text (a description, an error).
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def init_app(app: Flask, settings: Settings) -> None:
    """Mount rq-dashboard at PREFIX on `app`, with its own connection to `settings.redis_url`."""
    connection = connect(
        settings.redis_url,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=SOCKET_TIMEOUT,
        health_check_interval=30,
    )
    # rq-dashboard keeps its serializer in a module global; JSON is the only one Dispatcher writes.
    rq_dashboard.web.config.serializer = JSONSerializer
    app.config.update(
        # Shown in the navigation bar only: the views use `app.redis_conn`, set below.
        RQ_DASHBOARD_REDIS_URL=(display_url(settings.redis_url),),
        # Full arguments would show a job's payload: its headers, body and email content.
        RQ_DASHBOARD_SHOW_FULL_ARGS=False,
    )
    app.register_blueprint(rq_dashboard.blueprint, url_prefix=PREFIX)
    for rule in app.url_map.iter_rules():
        if rule.endpoint in ACTIONS:
            # rq-dashboard's /requeue/<queue> requeues on GET too: a link or an <img> could do it.
            rule.methods = {"POST"}
    # rq-dashboard's own hook connects anew from the URL on most requests (a new pool each time,
    # through a parser that refuses some URLs redis-py takes): the views get ours instead.
    app.before_request_funcs["rq_dashboard"].remove(rq_dashboard.web.push_rq_connection)
    app.redis_conn = connection  # type: ignore[attr-defined]  # where rq-dashboard's views look for it
    app.view_functions["rq_dashboard.list_workers"] = _list_workers
    app.extensions["dispatcher.dashboard"] = connection
    keys = settings.api_keys
    secrets = _settings_secrets(settings)

    @app.before_request
    def guard() -> Response | None:
        if not _in_dashboard(request.path):
            return None
        if not _logged_in(keys):
            message = "log in with any user name and an API key (DISPATCHER_API_KEYS) as the password"
            error = APIError(401, "unauthorized", message)
            challenge = {"WWW-Authenticate": f'Basic realm="{REALM}"'}
            return Response(json.dumps(error.to_json()), 401, challenge, mimetype="application/json")
        if (request.view_args or {}).get("instance_number", 0) != 0:
            raise APIError(404, "not_found", "the dashboard shows one Redis, number 0")
        if request.endpoint in ACTIONS:
            if request.method != "POST":  # (routing refuses other methods already; this holds if it changes)
                error = APIError(405, "method_not_allowed", "dashboard actions take POST")
                return Response(json.dumps(error.to_json()), 405, {"Allow": "POST"}, mimetype="application/json")
            refusal = _cross_site_refusal()
            if refusal:
                raise APIError(403, "forbidden", refusal)
        return None

    @app.after_request
    def protect(response: Response) -> Response:
        if not _in_dashboard(request.path):
            return response
        # Its buttons act with the user's credentials: no other site may frame them (clickjacking).
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = "frame-ancestors 'none'"
        response.headers["X-Content-Type-Options"] = "nosniff"
        rewrite = _REWRITES.get(request.endpoint or "")
        if rewrite is not None and response.status_code == 200 and response.is_json:
            answer = json.loads(response.get_data())
            rewrite(answer, _Redactor(connection, secrets))
            response.set_data(json.dumps(answer))
        return response

    @app.errorhandler(NoSuchJobError)
    def no_such_job(exc: NoSuchJobError) -> tuple[Response, int]:
        return jsonify(APIError(404, "not_found", "no such job (it may have expired)").to_json()), 404


def _list_workers(instance_number: int) -> tuple[Response, dict[str, str]]:
    """rq-dashboard's /<n>/data/workers.json, reading a busy worker's job as JSON. Its own reads it
    with pickle, and fails (500), and would show the job's arguments: RQ's call string of its payload."""
    connection: redis.Redis = current_app.redis_conn  # type: ignore[attr-defined]
    workers = []
    for worker in Worker.all(connection=connection, serializer=JSONSerializer):
        current: str | dict[str, Any] = "idle"
        job_id = worker.get_current_job_id()
        if job_id:
            try:
                job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
                description, created_at = job.description, rq_dashboard.web.serialize_date(job.created_at)
            except Exception:  # gone meanwhile, or unreadable (a poison job): the list still shows the worker
                description, created_at = "(job unreadable or gone)", None
            current = {
                "job_id": job_id,
                "description": description,
                "created_at": created_at,
                "call_string": description,
            }
        workers.append(
            {
                "name": worker.name,
                "pid": worker.pid,
                "queues": [queue.name for queue in worker.queues],
                "state": str(worker.get_state()),
                "current_job": current,
                "last_heartbeat": worker.last_heartbeat,
                "birth_date": worker.birth_date,
                "successful_job_count": worker.successful_job_count,
                "failed_job_count": worker.failed_job_count,
                "total_working_time": worker.total_working_time,
                "version": getattr(worker, "version", ""),
                "python_version": getattr(worker, "python_version", ""),
            }
        )
    workers.sort(key=lambda w: (w["state"], w["queues"], w["name"]))
    return jsonify(workers=workers), {"Cache-Control": "no-store"}


def display_url(url: str) -> str:
    """`url` without user info, password, query or fragment: what a page may show of a URL."""
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "[unreadable URL]"
    # Not urlunsplit: it would write unix:///path, with its empty host, as unix:/path.
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else host + parts.path


def _in_dashboard(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def _logged_in(keys: Iterable[str]) -> bool:
    """HTTP Basic with any user name and one of `keys` as the password, compared in constant time."""
    auth = request.authorization
    if auth is None or auth.type != "basic" or not auth.password:
        return False
    given = auth.password.encode()
    # Every key is compared, without an early exit, so timing reveals nothing about which matched.
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]
    return any(matches)


def _cross_site_refusal() -> str | None:
    """Why this action request may come from another site, or None when it is the dashboard's own."""
    if request.headers.get(CSRF_HEADER) != CSRF_HEADER_VALUE:
        return f"dashboard actions need the header {CSRF_HEADER}: {CSRF_HEADER_VALUE} (the dashboard's pages send it)"
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site != "same-origin":
        return f"dashboard actions come from the dashboard's own pages only (Sec-Fetch-Site: {site})"
    return None


def _settings_secrets(settings: Settings) -> set[str]:
    """Secrets of the configuration, redacted from anything the dashboard shows."""
    found = set(settings.api_keys)
    found.update(s for s in (settings.webhook_secret, settings.smtp.password if settings.smtp else None) if s)
    found.update(_url_secrets(settings.redis_url))
    return found


def _url_secrets(url: str) -> set[str]:
    """The parts of a URL that may be credentials: user info, query (whole and each value), fragment."""
    try:
        parts = urlsplit(url)
        found = {parts.username or "", parts.password or "", parts.query, parts.fragment}
        found.update(value for _, value in parse_qsl(parts.query))
    except ValueError:
        return set()
    return found


def _payload_secrets(payload: Any) -> set[str]:
    """What a job's payload holds that a page must never show: its custom header values (a partner's
    API key, say) and its URL's credentials and query."""
    if not isinstance(payload, dict):
        return set()
    found: set[str] = set()
    headers = payload.get("headers")
    if isinstance(headers, dict):
        found.update(str(value) for value in headers.values())
    url = payload.get("url")
    if isinstance(url, str):
        found.update(_url_secrets(url))
    return found


class _Redactor:
    """Cleans the texts of a dashboard answer: URLs shortened, secrets of the settings and of the jobs
    named in the answer replaced by REDACTED."""

    def __init__(self, connection: redis.Redis, secrets: set[str]) -> None:
        self.connection = connection
        self.secrets = secrets
        self.jobs: dict[str, list[str]] = {}

    def _secrets_of(self, job_id: str) -> list[str]:
        if job_id not in self.jobs:
            try:
                job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
                payload = job.args[0] if job.args else None
            except Exception:  # unreadable job data (a poison job) holds nothing to match
                payload = None
            found = (self.secrets | _payload_secrets(payload)) - {""}
            # Longest first, so a secret that contains another is replaced whole.
            self.jobs[job_id] = sorted((s for s in found if len(s) >= MIN_SECRET_LENGTH), key=len, reverse=True)
        return self.jobs[job_id]

    def text(self, value: str, job_id: str | None) -> str:
        value = _URL.sub(lambda match: display_url(match.group()), value)
        for secret in self._secrets_of(job_id) if job_id else self._global():
            value = value.replace(secret, REDACTED)
        return value

    def _global(self) -> list[str]:
        return sorted((s for s in self.secrets if len(s) >= MIN_SECRET_LENGTH), key=len, reverse=True)

    def deep(self, value: Any, job_id: str | None) -> Any:
        if isinstance(value, str):
            return self.text(value, job_id)
        if isinstance(value, list):
            return [self.deep(item, job_id) for item in value]
        if isinstance(value, dict):
            return {key: self.deep(item, job_id) for key, item in value.items()}
        return value


def _escaped(value: Any, keep: frozenset[str] = frozenset()) -> Any:
    """Every string in `value` HTML-escaped, except under the keys in `keep` (those the page escapes itself)."""
    if isinstance(value, str):
        return html.escape(value)
    if isinstance(value, list):
        return [_escaped(item, keep) for item in value]
    if isinstance(value, dict):
        return {key: item if key in keep else _escaped(item, keep) for key, item in value.items()}
    return value


def _meta_view(raw: Any) -> Any:
    """A job's meta as the dashboard shows it: without the partner's response excerpt (it may echo
    the request's headers; GET /v1/jobs/<id> has it)."""
    try:
        meta = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return {}
    if isinstance(meta, dict) and isinstance(meta.get("last_attempt"), dict):
        meta["last_attempt"] = {k: v for k, v in meta["last_attempt"].items() if k != "response_excerpt"}
    return meta


def _job_info(answer: dict, redactor: _Redactor) -> None:
    """/<n>/data/job/<id>.json: job.html inserts every field as raw HTML."""
    job_id = (request.view_args or {}).get("job_id")
    answer["metadata"] = json.dumps(redactor.deep(_meta_view(answer.get("metadata")), job_id))
    answer.update(_escaped(redactor.deep({k: v for k, v in answer.items() if k != "metadata"}, job_id)))
    answer["metadata"] = html.escape(answer["metadata"])


def _job_list(answer: dict, redactor: _Redactor) -> None:
    """/<n>/data/jobs/...json: jobs.html escapes the description and the error, and nothing else."""
    jobs = []
    for job in answer.get("jobs") or []:
        job = redactor.deep(job, str(job.get("id")))
        jobs.append(_escaped(job, keep=frozenset({"description", "exc_info"})))
    answer["jobs"] = jobs
    answer["pagination"] = _escaped(answer.get("pagination"))
    answer["name"] = _escaped(answer.get("name"))


def _workers(answer: dict, redactor: _Redactor) -> None:
    """/<n>/data/workers.json (_list_workers): workers.html inserts all but the description as raw HTML."""
    workers = []
    for worker in answer.get("workers") or []:
        current = worker.get("current_job")
        if isinstance(current, dict):
            worker["current_job"] = redactor.deep(current, str(current.get("job_id")))
        workers.append(_escaped(worker, keep=frozenset({"description"})))
    answer["workers"] = workers


def _queues(answer: dict, redactor: _Redactor) -> None:
    """/<n>/data/queues.json: queues.html inserts the names as raw HTML."""
    answer["queues"] = _escaped(answer.get("queues"))


_REWRITES: dict[str, Callable[[dict, _Redactor], None]] = {
    "rq_dashboard.job_info": _job_info,
    "rq_dashboard.list_jobs": _job_list,
    "rq_dashboard.list_workers": _workers,
    "rq_dashboard.list_queues": _queues,
}
