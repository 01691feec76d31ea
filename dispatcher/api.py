"""REST API v1: accept emails and webhooks, answer job status and stats."""

from __future__ import annotations

import functools
import gc
import hmac
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from flask import Blueprint, Response, current_app, g, jsonify, request
from flask.blueprints import BlueprintSetupState
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ValidationError
from werkzeug.routing import BaseConverter

from dispatcher import idempotency
from dispatcher.batches import Group, batch_id_of, batch_view
from dispatcher.channels import CHANNELS, Channel
from dispatcher.control import JobControl
from dispatcher.endpoints import Registry
from dispatcher.enqueue import enqueue, enqueue_many
from dispatcher.errors import AlreadyAccepted, APIError, FieldProblem, JobStateConflict, NoSuchJob
from dispatcher.logs import note_batch, note_job
from dispatcher.openapi import openapi_document
from dispatcher.runtime import Runtime
from dispatcher.templates import RenderBudget, TemplateStore
from dispatcher.views import BatchQuery, JobsQuery, ReplayRequest

QueryModel = TypeVar("QueryModel", bound=BaseModel)

v1 = Blueprint("v1", __name__, url_prefix="/v1")
health = Blueprint("health", __name__)
Q = TypeVar("Q", bound=BaseModel)


class JobIdConverter(BaseConverter):
    """A job id in a path: any segment but `replay`, so GET or DELETE /v1/jobs/replay is the 405 of
    POST /v1/jobs/replay, not a lookup of a job named `replay`."""

    regex = r"(?!replay$)[^/]+"


@v1.record_once
def _register_converter(state: BlueprintSetupState) -> None:
    """Before the routes: a rule's converter must be known when the rule is added."""
    state.app.url_map.converters["job_id"] = JobIdConverter



def runtime() -> Runtime:
    return current_app.extensions["dispatcher"]


@health.get("/healthz")
def healthz() -> Response:
    """The process is up; says nothing about Redis."""
    return jsonify(status="ok")


@health.get("/readyz")
def readyz() -> Response:
    """Redis answers (a RedisError here becomes the usual 503 JSON); and, per priority, the jobs
    waiting and the workers alive to deliver them, with a warning where jobs wait for nobody."""
    rt = runtime()
    rt.connection.ping()
    return jsonify(status="ok", **rt.status.readiness())


@health.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3.1 document of this API; it holds no data, so it needs no key."""
    return jsonify(openapi_document())


@v1.before_request
def authenticate() -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "unauthorized", "send Authorization: Bearer <api key>")
    # Compare against every key without an early exit, so timing reveals nothing.
    matches = [hmac.compare_digest(token.strip().encode(), key.encode()) for key in runtime().settings.api_keys]
    if not any(matches):
        raise APIError(401, "unauthorized", "the API key is not valid")
    g.api_key = token.strip()  # the scope of idempotency keys


def idempotent(view: Callable[..., Any]) -> Callable[..., Any]:
    """A POST that does more than enqueue (retry, replay, a stored template, a suppression), made to
    honour Idempotency-Key: a repeat answers 200 with the first answer (and its Location) and does
    nothing; 409 for another request under the key, or while the first one still runs."""

    @functools.wraps(view)
    def answer(*args: Any, **kwargs: Any) -> ResponseReturnValue:
        raw = request.get_data()  # kept: the view reads it again
        # A JSON body by its content, whatever its key order and spacing; any other (a retry's
        # empty one, which the view never reads) as it is.
        claim = _claim(_json_body() if raw and request.mimetype == "application/json" else raw.decode("latin-1"))
        if claim is None:
            return view(*args, **kwargs)  # type: ignore[no-any-return]
        connection = runtime().connection
        try:
            claim.hold(connection)
        except AlreadyAccepted as earlier:
            text, location = claim.earlier_answer(earlier.record)
            return Response(text, 200, {"Location": location} if location else {}, mimetype="application/json")
        try:
            response = current_app.make_response(view(*args, **kwargs))
        except BaseException:
            claim.release(connection)
            raise
        claim.keep(connection, response.get_data(as_text=True), response.headers.get("Location"))
        return response

    return answer


def _add_channel_routes(channel: Channel) -> None:
    """POST /v1/<path> (one job, 202 with its id) and /v1/<path>/batch (all or none) for a channel."""

    def accept_one() -> tuple[Response, int, dict[str, str]]:
        return _accept(channel)

    def accept_batch() -> tuple[Response, int]:
        return _accept_batch(channel)

    v1.add_url_rule(f"/{channel.path}", f"create_{channel.name}", accept_one, methods=["POST"])
    v1.add_url_rule(f"/{channel.path}/batch", f"create_{channel.name}_batch", accept_batch, methods=["POST"])


for _channel in CHANNELS.values():
    _add_channel_routes(_channel)


@v1.get("/jobs/<job_id:job_id>")
def get_job(job_id: str) -> Response:
    note_job(job_id)
    view = runtime().status.job(job_id)
    if view is None:
        raise APIError(404, "not_found", f"no job with id {job_id!r} (it may have expired)")
    return jsonify(view)


@v1.delete("/jobs/<job_id:job_id>")
def cancel_job(job_id: str) -> Response:
    """Cancel a queued or scheduled job; answers its view, now `canceled`."""
    with _job_errors():
        _control().cancel(job_id)
    return get_job(job_id)


@v1.post("/jobs/<job_id>/retry")
@idempotent
def retry_job(job_id: str) -> tuple[Response, int, dict[str, str]]:
    """Deliver a failed job again, with the same id, as a new series of attempts in its history."""
    with _job_errors():
        _control().retry(job_id)
    note_job(job_id)  # (once it is known to be a job: a path may hold anything, a line break included)
    accepted = _accepted(job_id, {})
    return jsonify(accepted), 202, {"Location": accepted["status_url"]}


@v1.post("/jobs/replay")
@idempotent
def replay_jobs() -> Response:
    """Deliver failed jobs again, as retry does, chosen by kind and when they failed."""
    try:
        replay = ReplayRequest.model_validate(_json_body())
    except ValidationError as exc:
        raise APIError(422, "validation_error", "the request has invalid fields", _details(exc)) from None
    ids = _control().replay(replay.kind, replay.since, replay.until, replay.limit)
    note_batch(ids)
    return jsonify(requeued=len(ids), ids=ids)


def _control() -> JobControl:
    rt = runtime()
    return JobControl(rt.connection, rt.status.queues, rt.keys, rt.settings.failure_ttl)


@contextmanager
def _job_errors() -> Iterator[None]:
    try:
        yield
    except NoSuchJob as exc:
        raise APIError(404, "not_found", str(exc)) from None
    except JobStateConflict as exc:
        raise APIError(409, "conflict", str(exc)) from None


@v1.get("/jobs")
def list_jobs() -> Response:
    query = parse_query(JobsQuery)
    return jsonify(jobs=runtime().status.list(query.kind, query.status, query.limit))


@v1.get("/batches/<batch_id>")
def get_batch(batch_id: str) -> Response:
    query = parse_query(BatchQuery)
    rt = runtime()
    view = batch_view(rt.connection, rt.keys, batch_id, query.failed_offset, query.failed_limit)
    if view is None:
        raise APIError(404, "not_found", f"no batch with id {batch_id!r} (it may have expired)")
    return jsonify(view)


def parse_query(model: type[Q]) -> Q:
    """The request's query parameters as `model`; a 422 naming each bad or repeated one."""
    # One value per parameter: a repeated one would otherwise be read as its first value.
    repeated = [
        {"field": name, "problem": "give it once"}
        for name, values in request.args.lists()
        if len(values) > 1 and name in model.model_fields
    ]
    if repeated:
        raise APIError(422, "validation_error", "invalid query parameters", repeated)
    try:
        return model.model_validate(request.args.to_dict())
    except ValidationError as exc:
        raise APIError(422, "validation_error", "invalid query parameters", _details(exc)) from None


@v1.get("/stats")
def stats() -> Response:
    return jsonify(runtime().status.stats())


def _accept(channel: Channel) -> tuple[Response, int, dict[str, str]]:
    rt = runtime()
    body = _json_body()
    claim = _claim(body)

    def enqueue_new() -> list[str]:
        request = _validate(channel, channel.request, body)
        priority, send_at = request.priority, request.send_at  # type: ignore[attr-defined]
        return [enqueue(rt.connection, rt.settings, channel.name, request, priority, claim, send_at)]

    (job_id,), status = _once(claim, enqueue_new)
    note_job(job_id)
    accepted = _accepted(job_id, body)
    return jsonify(accepted), status, {"Location": accepted["status_url"]}


def _accept_batch(channel: Channel) -> tuple[Response, int]:
    """Every item valid and enqueued in one atomic Redis call, or a 422 naming each bad `items.<i>.<field>`."""
    rt = runtime()
    with _gc_paused():
        body = _json_body()
        claim = _claim(body)

        def enqueue_new() -> list[str]:
            batch = _validate(channel, channel.batch, body)
            items, priority, send_at = batch.items, batch.priority, batch.send_at  # type: ignore[attr-defined]
            return enqueue_many(
                rt.connection, rt.settings, channel.name, items, priority, claim, send_at, group=Group()
            )

        job_ids, status = _once(claim, enqueue_new)
    note_batch(job_ids)
    batch_id = batch_id_of(job_ids)
    answer = {"batch_id": batch_id, "count": len(job_ids), "status_url": f"/v1/batches/{batch_id}"}
    return jsonify(answer | {"items": [_accepted(job_id, body) for job_id in job_ids]}), status


def _claim(body: dict[str, Any] | str) -> idempotency.Claim | None:
    """The request's claim on its Idempotency-Key, if it has one (422 if the header is no key)."""
    value = request.headers.get(idempotency.HEADER)
    return idempotency.claim(value, g.api_key, request.method, request.path, body, runtime().keys)


def _once(claim: idempotency.Claim | None, enqueue_new: Callable[[], list[str]]) -> tuple[list[str], int]:
    """`enqueue_new()`'s job ids and 202; or, when a request with the same idempotency key was
    accepted before, its job ids and 200 (409 if that request was another)."""
    try:
        if claim is not None:
            claim.check(runtime().connection)
        return enqueue_new(), 202
    except AlreadyAccepted as earlier:
        assert claim is not None  # only a claim's check or enqueue raises it
        return claim.earlier_ids(earlier.record), 200


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a batch is parsed, validated and enqueued.

    A 10,000-item batch allocates about a million objects, which set off some 300 collections, the
    later ones walking everything allocated so far: a fifth of the request's time. What it allocates
    holds no reference cycles and is freed by reference counting; collection resumes afterwards.
    """
    if not gc.isenabled():  # already paused (another request's batch, on another thread)
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _validate(channel: Channel, model: type[BaseModel], body: dict[str, Any]) -> BaseModel:
    rt = runtime()
    # Every host the request names is looked up at once, before validation waits on any of them:
    # a batch of distinct hosts takes one lookup's time, and all of them share one bound (dns_timeout).
    lookups = rt.guard.lookups()
    if channel.hosts is not None:
        items = body.get("items") if model is channel.batch else [body]
        hosts = channel.hosts
        lookups.start(host for item in (items if isinstance(items, list) else ()) for host in hosts(item))
    # One budget of template work for the whole request; each stored template read once, and each
    # application an email names (its events go there) looked up once.
    stored = functools.cache(_templates(rt).get)
    applications = functools.cache(lambda application_id: Registry(rt.connection, rt.keys).application(application_id))
    try:
        context = {
            "guard": lookups,
            "email_from": rt.settings.email_from,
            "templates": stored,
            "applications": lambda application_id: applications(application_id) is not None,
        }
        with RenderBudget():
            return model.model_validate(body, context=context)
    except ValidationError as exc:
        raise APIError(422, "validation_error", "the request has invalid fields", _details(exc)) from None


def parse_body(model: type[Q], context: dict[str, Any] | None = None) -> Q:
    """The request's JSON body as `model`; a 422 naming each bad field."""
    try:
        return model.model_validate(_json_body(), context=context)
    except ValidationError as exc:
        raise APIError(422, "validation_error", "the request has invalid fields", _details(exc)) from None


def _templates(rt: Runtime) -> TemplateStore:
    return TemplateStore(rt.connection, rt.keys.templates)


def _accepted(job_id: str, body: dict[str, Any]) -> dict[str, str]:
    """The answer for one job of an accepted `body`: from the body, so that a repeat with an
    idempotency key answers exactly what the first request did."""
    status = "queued" if body.get("send_at") is None else "scheduled"
    return {"id": job_id, "status": status, "status_url": f"/v1/jobs/{job_id}"}


def _json_body() -> dict[str, Any]:
    """The request's body, a JSON object; read once (the stream is not kept), then from `g`."""
    if "json_body" not in g:
        g.json_body = _read_json_body()
    return g.json_body  # type: ignore[no-any-return]


def _read_json_body() -> dict[str, Any]:
    if request.mimetype != "application/json":
        raise APIError(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    raw = request.get_data(cache=False)
    limit = request.max_content_length
    chunked = request.content_length is None
    # A chunked body has no Content-Length to check up front, and werkzeug's reader stops quietly
    # at the limit: one byte more from the server's own stream means the body is too large.
    if limit is not None and chunked and len(raw) >= limit and request.environ["wsgi.input"].read(1):
        raise APIError(413, "body_too_large", "the request body is larger than 15 MB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, "malformed_json", f"the body is not valid UTF-8 (byte {exc.start})") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    except ValueError:
        # int() refuses a number of more than 4300 digits (sys.get_int_max_str_digits()).
        raise APIError(400, "malformed_json", "the body holds a number with too many digits") from None
    except RecursionError:
        raise APIError(400, "malformed_json", "the body's JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError(
            422, "validation_error", "the body must be a JSON object",
            [{"field": "body", "problem": f"must be a JSON object, got {type(body).__name__}"}],
        )
    return body


def _details(exc: ValidationError) -> list[dict[str, str]]:
    details = []
    for error in exc.errors(include_url=False, include_input=False):
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, FieldProblem):
            # Its field is named from the model that raised it: prefix where that model sits
            # (`items.3`), less a last part the field repeats (a field validator's own name).
            where = [str(part) for part in error["loc"]]
            if where and cause.field.split(".")[0] == where[-1]:
                where.pop()
            details.append({"field": ".".join([*where, cause.field]), "problem": cause.problem})
            continue
        field = ".".join(str(part) for part in error["loc"]) or "body"
        problem = error["msg"].removeprefix("Value error, ")
        details.append({"field": field, "problem": problem})
    return details
