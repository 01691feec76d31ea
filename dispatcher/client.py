"""A Python client for Dispatcher's REST API (v1), on `requests`.

    from dispatcher.client import Client
    client = Client("http://127.0.0.1:8000", api_key="...")
    job_id = client.send_webhook(url="https://example.com/hooks", event_type="order.created", payload={"id": 1})
    print(client.wait(job_id)["status"])

Every error answer is raised as an exception carrying the API's `code`, `message` and field
`details`. A `503` (Redis unreachable; the API wrote nothing) and a failure to connect are retried a
few times with backoff; a request that may have reached the server is never sent twice, so a POST is
not retried after a read timeout (it could have enqueued a job), unless it carries an idempotency key
(`idempotency_key=`): the API then answers a repeat with the first answer and enqueues nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal, TypedDict

import requests
from urllib3.exceptions import MaxRetryError, NewConnectionError

Priority = Literal["high", "default", "low"]
Kind = Literal["email", "webhook"]
#: Job statuses from which a job moves no further.
TERMINAL = frozenset({"succeeded", "failed", "canceled"})


class FieldError(TypedDict):
    field: str
    problem: str


class Attempt(TypedDict):
    number: int
    started_at: str
    finished_at: str | None
    duration_ms: int | None
    outcome: str | None
    status_code: int | None
    error: str | None
    response_excerpt: str | None
    suppressed: list[str] | None


class Job(TypedDict):
    id: str
    kind: Kind
    status: str
    priority: Priority | None
    created_at: str | None
    updated_at: str | None
    next_attempt_at: str | None
    attempts: list[Attempt]
    error: str | None
    metadata: dict[str, str]
    target: dict[str, Any] | None


class DispatcherError(Exception):
    """An error answer of the API: its HTTP status, `code`, `message` and field `details`."""

    def __init__(self, status: int, code: str, message: str, details: list[FieldError] | None = None) -> None:
        fields = "".join(f"; {d['field']}: {d['problem']}" for d in details or [])
        super().__init__(f"{status} {code}: {message}{fields}")
        self.status = status
        self.code = code
        self.message = message
        self.details: list[FieldError] = details or []


class ValidationFailed(DispatcherError):
    """422: `details` names every bad field (`items.<index>.<field>` in a batch)."""


class Unauthorized(DispatcherError):
    """401: no API key, or not one of DISPATCHER_API_KEYS."""


class NotFound(DispatcherError):
    """404: no such job (or it expired)."""


class Unavailable(DispatcherError):
    """503 after every retry, or the server could not be reached (status 0)."""


class Conflict(DispatcherError):
    """409: the job's status does not allow a cancel or a retry (the message says its status), or the
    idempotency key was used for another request within 24 h."""


_ERRORS: dict[int, type[DispatcherError]] = {
    422: ValidationFailed,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    503: Unavailable,
}


class Client:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        session: requests.Session | None = None,
    ) -> None:
        """`retries`: how many times a 503 or a failed connection is tried again (0: never), waiting
        `backoff` seconds, then twice that, and so on."""
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.session = session or requests.Session()
        self.session.headers["Authorization"] = f"Bearer {api_key}"

    # --- sending -------------------------------------------------------------------------------

    def send_email(
        self,
        *,
        to: list[str],
        subject: str | None = None,
        text: str | None = None,
        html: str | None = None,
        priority: Priority | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> str:
        """Enqueue one email; returns its job id. `fields`: cc, bcc, from_ (sent as `from`),
        reply_to, attachments, headers, metadata, retry, send_at (an RFC 3339 string), application (whose
        endpoints get its email.* events), as the API documents them;
        or, instead of subject, text and html, template_id (a stored template) and its variables.
        `idempotency_key`: the same key and email within 24 h answers the same id, sending once."""
        body = _drop_none({"to": to, "subject": subject, "text": text, "html": html, "priority": priority})
        body.update(_email_fields(fields))
        return str(self._request("POST", "/v1/emails", body, idempotency_key=idempotency_key)["id"])

    def send_webhook(
        self,
        *,
        url: str,
        event_type: str,
        payload: dict[str, Any],
        priority: Priority | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> str:
        """Enqueue one webhook; returns its job id. `fields`: headers, metadata, retry, send_at.
        `idempotency_key`: as for send_email."""
        body = _drop_none({"url": url, "event_type": event_type, "payload": payload, "priority": priority})
        body.update(_drop_none(fields))
        return str(self._request("POST", "/v1/webhooks", body, idempotency_key=idempotency_key)["id"])

    def send_emails(
        self,
        items: Iterable[dict[str, Any]],
        priority: Priority | None = None,
        idempotency_key: str | None = None,
        send_at: str | None = None,
    ) -> list[str]:
        """Enqueue a batch (all or none; `low` priority unless given); returns the job ids in order.
        Items are the API's email objects (`from`, not `from_`). `send_at`: when, for every item."""
        return self._batch("/v1/emails/batch", items, priority, idempotency_key, send_at)

    def send_webhooks(
        self,
        items: Iterable[dict[str, Any]],
        priority: Priority | None = None,
        idempotency_key: str | None = None,
        send_at: str | None = None,
    ) -> list[str]:
        """Enqueue a batch of webhooks (all or none; `low` priority unless given); returns the ids."""
        return self._batch("/v1/webhooks/batch", items, priority, idempotency_key, send_at)

    # --- controlling ---------------------------------------------------------------------------

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or scheduled job; returns its view, now `canceled`. Conflict if it is not waiting."""
        return self._request("DELETE", _job_path(job_id))  # type: ignore[return-value]

    def retry(self, job_id: str, idempotency_key: str | None = None) -> None:
        """Deliver a failed job again, with the same id. Conflict if it is not failed (or, with an
        `idempotency_key` used before for this job, nothing: the first retry stands)."""
        self._request("POST", f"{_job_path(job_id)}/retry", idempotency_key=idempotency_key)

    def replay(
        self,
        kind: Kind | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        limit: int | None = None,
        idempotency_key: str | None = None,
    ) -> list[str]:
        """Deliver failed jobs again (of `kind`, failed from `since` until before `until`, at most
        `limit`, 1000 unless given); returns the ids requeued. With an `idempotency_key` used before
        for the same replay: the ids that one requeued, and nothing requeued again."""
        moments = {"since": since, "until": until}
        moments = {name: value.isoformat() if isinstance(value, datetime) else value for name, value in moments.items()}
        body = _drop_none({"kind": kind, "limit": limit, **moments})
        return self._request("POST", "/v1/jobs/replay", body, idempotency_key=idempotency_key)["ids"]  # type: ignore[no-any-return]

    def recover(
        self,
        application: str,
        endpoint: str,
        since: datetime | str,
        until: datetime | str | None = None,
        limit: int | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Deliver again to one endpoint the events accepted from `since` until before `until` (now
        unless given) whose delivery to it failed, at most `limit` (1000 unless given), oldest first:
        {"requeued": n, "ids": [...], "remaining": m}, `remaining` the failed ones left beyond the
        limit. NotFound for an unknown application or endpoint, Conflict if the endpoint is disabled.
        With an `idempotency_key` used before for the same recovery: that one's answer, and nothing
        requeued again."""
        moments = {"since": since, "until": until}
        moments = {name: value.isoformat() if isinstance(value, datetime) else value for name, value in moments.items()}
        body = _drop_none({"limit": limit, **moments})
        path = f"{_endpoint_path(application, endpoint)}/recover"
        return self._request("POST", path, body, idempotency_key=idempotency_key)

    # --- applications, endpoints and events ----------------------------------------------------

    def create_application(self, name: str, idempotency_key: str | None = None) -> dict[str, Any]:
        """A new application (one of your customers): {"id", "name", "created_at", "updated_at"}."""
        return self._request("POST", "/v1/applications", {"name": name}, idempotency_key=idempotency_key)

    def applications(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/applications")["applications"]  # type: ignore[no-any-return]

    def delete_application(self, application: str) -> None:
        """Delete it with its endpoints and their secrets; NotFound if there is none."""
        self._request("DELETE", _application_path(application))

    def create_endpoint(
        self, application: str, url: str, idempotency_key: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Register an endpoint; the answer holds its signing secret (`secret`), which no other
        answer shows. `fields`: description, event_types, headers, owner_email, retry, rate_limit,
        ordered, disabled, as the API documents them."""
        path = f"{_application_path(application)}/endpoints"
        return self._request("POST", path, {"url": url, **fields}, idempotency_key=idempotency_key)

    def endpoints(self, application: str) -> list[dict[str, Any]]:
        return self._request("GET", f"{_application_path(application)}/endpoints")["endpoints"]  # type: ignore[no-any-return]

    def change_endpoint(self, application: str, endpoint: str, **fields: Any) -> dict[str, Any]:
        """Change the fields given (None clears owner_email, retry or rate_limit); the endpoint as it is now."""
        return self._request("PATCH", _endpoint_path(application, endpoint), fields)

    def delete_endpoint(self, application: str, endpoint: str) -> None:
        self._request("DELETE", _endpoint_path(application, endpoint))

    def rotate_secret(self, application: str, endpoint: str, grace_period: int | None = None) -> dict[str, Any]:
        """A new signing secret: {"secret", "previous_expires_at"}; the old one signs beside it for
        `grace_period` seconds (a day unless given)."""
        body = _drop_none({"grace_period": grace_period})
        return self._request("POST", f"{_endpoint_path(application, endpoint)}/secret/rotate", body)

    def publish(
        self,
        application: str,
        event_type: str,
        payload: dict[str, Any],
        ordering_key: str | None = None,
        priority: Priority | None = None,
        send_at: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Publish an event to the application's subscribed endpoints: {"id", "count", "deliveries",
        "status_url"}, each delivery a webhook job to follow with `job()`."""
        body = _drop_none({"event_type": event_type, "payload": payload, "ordering_key": ordering_key,
                           "priority": priority, "send_at": send_at})
        return self._request("POST", f"{_application_path(application)}/events", body, idempotency_key=idempotency_key)

    def event(self, event_id: str) -> dict[str, Any]:
        """The event, its progress and each delivery's status; NotFound if there is none (or it expired)."""
        return self._request("GET", f"/v1/events/{requests.utils.quote(event_id, safe='')}")

    # --- reading -------------------------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        """The job's status and attempts; NotFound if there is none (or it expired)."""
        return self._request("GET", _job_path(job_id))  # type: ignore[return-value]

    def jobs(self, kind: Kind | None = None, status: str | None = None, limit: int = 50) -> list[Job]:
        """Newest first, filtered by kind and status."""
        params = _drop_none({"kind": kind, "status": status, "limit": limit})
        return self._request("GET", "/v1/jobs", params=params)["jobs"]  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        return self._request("GET", "/v1/stats")

    def ready(self) -> bool:
        """Whether the API answers and reaches Redis (GET /readyz), without retrying."""
        try:
            response = self.session.get(f"{self.base_url}/readyz", timeout=self.timeout)
        except requests.RequestException:
            return False
        return response.status_code == 200

    def wait(self, job_id: str, timeout: float = 60.0, poll: float = 0.2) -> Job:
        """Poll the job until it succeeded, failed or was canceled; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout}s")
            time.sleep(poll)

    # --- the suppression list --------------------------------------------------------------------

    def suppressions(self, after: str | None = None, limit: int = 100) -> dict[str, Any]:
        """A page of the list in address order: `{"suppressions": [...], "next": ...}`; pass `next` as
        `after` for the page after it (None: this was the last)."""
        return self._request("GET", "/v1/suppressions", params=_drop_none({"after": after, "limit": limit}))

    def suppression(self, address: str) -> dict[str, Any]:
        """The address's entry (why and when it was added); NotFound if it is not on the list."""
        return self._request("GET", _suppression_path(address))

    def suppress(self, address: str) -> dict[str, Any]:
        """Add the address by hand; its entry, which an address already listed keeps."""
        return self._request("POST", "/v1/suppressions", {"address": address})

    def unsuppress(self, address: str) -> None:
        """Take the address off the list; NotFound if it was not on it."""
        self._request("DELETE", _suppression_path(address))

    # --- transport -----------------------------------------------------------------------------

    def _batch(
        self,
        path: str,
        items: Iterable[dict[str, Any]],
        priority: Priority | None,
        idempotency_key: str | None,
        send_at: str | None,
    ) -> list[str]:
        body = _drop_none({"items": list(items), "priority": priority, "send_at": send_at})
        return [item["id"] for item in self._request("POST", path, body, idempotency_key=idempotency_key)["items"]]

    def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self.session.request(
                    method, self.base_url + path, json=body, params=params, headers=headers, timeout=self.timeout
                )
            except requests.RequestException as exc:
                # A GET or DELETE may always be sent again; a POST only if it never left (else it may have
                # enqueued), or if it has an idempotency key (a repeat enqueues nothing).
                if last or not (method in ("GET", "DELETE") or headers or _never_sent(exc)):
                    raise Unavailable(0, "unreachable", f"{method} {path}: {exc}") from exc
            else:
                # A 503, or the same request with its key still running on the server (one that
                # timed out here, say): ask again after a pause.
                if not (response.status_code == 503 or _still_running(response)) or last:
                    return _answer(response)
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")  # the last attempt returns or raises


def _answer(response: requests.Response) -> dict[str, Any]:
    if response.status_code == 204:
        return {}
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.ok and isinstance(data, dict):
        return data
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        error = {"code": "unexpected_answer", "message": response.text[:200] or response.reason}
    kind = _ERRORS.get(response.status_code, DispatcherError)
    raise kind(response.status_code, str(error.get("code")), str(error.get("message")), error.get("details"))


def _still_running(response: requests.Response) -> bool:
    if response.status_code != 409:
        return False
    try:
        return bool(response.json()["error"]["code"] == "idempotency_in_progress")
    except (ValueError, KeyError, TypeError):
        return False


def _never_sent(exc: requests.RequestException) -> bool:
    """Whether the connection failed before the request went out (so a POST can be sent again)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = exc.args[0] if exc.args else None
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    return isinstance(reason, NewConnectionError)


def _application_path(application: str) -> str:
    return f"/v1/applications/{requests.utils.quote(application, safe='')}"


def _endpoint_path(application: str, endpoint: str) -> str:
    return f"{_application_path(application)}/endpoints/{requests.utils.quote(endpoint, safe='')}"


def _job_path(job_id: str) -> str:
    return f"/v1/jobs/{requests.utils.quote(job_id, safe='')}"


def _suppression_path(address: str) -> str:
    return f"/v1/suppressions/{requests.utils.quote(address, safe='@')}"


def _drop_none(fields: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def _email_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Keyword names to the API's: `from_` is `from` (a Python keyword)."""
    return {("from" if name == "from_" else name): value for name, value in _drop_none(fields).items()}
