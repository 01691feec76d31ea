"""REST API v1: applications, their endpoints and secrets (dispatcher.endpoints), and events
(dispatcher.events)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from dispatcher import health
from dispatcher.api import _claim, _control, _json_body, authenticate, idempotent, parse_body, runtime
from dispatcher.endpoints import (
    ApplicationRequest,
    Endpoint,
    EndpointPatch,
    EndpointRequest,
    Registry,
    RegistryFull,
    RotateRequest,
)
from dispatcher.errors import AlreadyAccepted, APIError
from dispatcher.events import EventRequest, NoSuchApplication, event_view, publish
from dispatcher.logs import note_batch
from dispatcher.views import RecoverRequest

routes = Blueprint("endpoints", __name__, url_prefix="/v1")
routes.before_request(authenticate)


def _registry() -> Registry:
    rt = runtime()
    return Registry(rt.connection, rt.keys)


def _no_application(application_id: str) -> APIError:
    return APIError(404, "not_found", f"no application with id {application_id!r}")


def _no_endpoint(endpoint_id: str) -> APIError:
    return APIError(404, "not_found", f"no endpoint with id {endpoint_id!r} in this application")


def _guarded() -> dict[str, Any]:
    """The validation context of an endpoint's URL: the network guard judges it at registration."""
    return {"guard": runtime().guard}


# --- applications ------------------------------------------------------------------------------


@routes.get("/applications")
def list_applications() -> Response:
    return jsonify(applications=_registry().applications())


@routes.post("/applications")
@idempotent
def create_application() -> tuple[Response, int, dict[str, str]]:
    request = parse_body(ApplicationRequest)
    try:
        record = _registry().create_application(request.name)
    except RegistryFull as exc:
        raise APIError(409, "conflict", str(exc)) from None
    return jsonify(record), 201, {"Location": f"/v1/applications/{record['id']}"}


@routes.get("/applications/<application_id>")
def get_application(application_id: str) -> Response:
    record = _registry().application(application_id)
    if record is None:
        raise _no_application(application_id)
    return jsonify(record)


@routes.patch("/applications/<application_id>")
def rename_application(application_id: str) -> Response:
    request = parse_body(ApplicationRequest)
    record = _registry().rename_application(application_id, request.name)
    if record is None:
        raise _no_application(application_id)
    return jsonify(record)


@routes.delete("/applications/<application_id>")
def delete_application(application_id: str) -> Response:
    """204: the application, its endpoints and their secrets are gone; deliveries already queued
    to them fail (their endpoint no longer exists)."""
    if not _registry().delete_application(application_id):
        raise _no_application(application_id)
    return _no_content()


# --- endpoints ---------------------------------------------------------------------------------


@routes.get("/applications/<application_id>/endpoints")
def list_endpoints(application_id: str) -> Response:
    records = _registry().endpoints(application_id)
    if records is None:
        raise _no_application(application_id)
    return jsonify(endpoints=_shown(records))


@routes.post("/applications/<application_id>/endpoints")
@idempotent
def create_endpoint(application_id: str) -> tuple[Response, int, dict[str, str]]:
    """201 with the endpoint and its signing secret: the only answer that shows it."""
    registry = _registry()
    if registry.application(application_id) is None:
        raise _no_application(application_id)
    request = parse_body(EndpointRequest, _guarded())
    try:
        created = registry.create_endpoint(application_id, request.model_dump(mode="json"))
    except RegistryFull as exc:
        raise APIError(409, "conflict", str(exc)) from None
    if created is None:
        raise _no_application(application_id)
    record, secret = created
    location = f"/v1/applications/{application_id}/endpoints/{record['id']}"
    return jsonify(_shown([record])[0] | {"secret": secret}), 201, {"Location": location}


@routes.get("/applications/<application_id>/endpoints/<endpoint_id>")
def get_endpoint(application_id: str, endpoint_id: str) -> Response:
    return jsonify(_shown([_endpoint(application_id, endpoint_id)])[0])


@routes.patch("/applications/<application_id>/endpoints/<endpoint_id>")
def change_endpoint(application_id: str, endpoint_id: str) -> Response:
    """The fields given replace the endpoint's. `disabled` changes its health too: disabling is
    recorded, enabling resets its circuit breaker (dispatcher.health); either is mailed to its
    owner and published to its application as an event."""
    _endpoint(application_id, endpoint_id)  # a 404 before a 422: the path is judged first
    patch = parse_body(EndpointPatch, _guarded())
    fields = patch.model_dump(mode="json", include=patch.model_fields_set)
    registry = _registry()
    if "disabled" in fields:
        record, changed = health.change_endpoint(registry, application_id, endpoint_id, fields)
        if changed:
            rt = runtime()
            health.notify(rt.connection, rt.settings)
    else:
        record = registry.change_endpoint(application_id, endpoint_id, fields)
    if record is None:
        raise _no_endpoint(endpoint_id)
    return jsonify(_shown([record])[0])


@routes.delete("/applications/<application_id>/endpoints/<endpoint_id>")
def delete_endpoint(application_id: str, endpoint_id: str) -> Response:
    if not _registry().delete_endpoint(application_id, endpoint_id):
        raise _no_endpoint(endpoint_id)
    return _no_content()


@routes.post("/applications/<application_id>/endpoints/<endpoint_id>/secret/rotate")
@idempotent
def rotate_secret(application_id: str, endpoint_id: str) -> Response:
    """The new secret, once; the old one signs beside it for `grace_period` seconds."""
    _endpoint(application_id, endpoint_id)
    request = parse_body(RotateRequest) if _has_body() else RotateRequest()
    rotated = _registry().rotate_secret(application_id, endpoint_id, request.grace_period)
    if rotated is None:
        raise _no_endpoint(endpoint_id)
    return jsonify(rotated)


@routes.post("/applications/<application_id>/endpoints/<endpoint_id>/recover")
@idempotent
def recover_endpoint(application_id: str, endpoint_id: str) -> tuple[Response, int]:
    """202: the endpoint's failed deliveries of the events accepted in the window are requeued, as
    POST /v1/jobs/<id>/retry requeues one (dispatcher.control.JobControl.recover). 409 if the endpoint
    is disabled: they would fail again at once; enable it first."""
    endpoint = _endpoint(application_id, endpoint_id)
    recover = parse_body(RecoverRequest)
    if endpoint["disabled"]:
        raise APIError(
            409, "conflict",
            f"endpoint {endpoint_id} is disabled, so its deliveries would fail again; enable it first "
            "(PATCH it with disabled: false)",
        )
    assert recover.until is not None  # the model fills it in
    recovered = _control().recover(endpoint_id, recover.since, recover.until, recover.limit)
    note_batch(recovered.ids)
    return jsonify(requeued=len(recovered.ids), ids=recovered.ids, remaining=recovered.remaining), 202


def _shown(records: list[Endpoint]) -> list[dict[str, Any]]:
    """Endpoints as the API answers them: each with its `health` (dispatcher.health)."""
    rt = runtime()
    return health.with_health(rt.connection, rt.keys, records)


def _endpoint(application_id: str, endpoint_id: str) -> Endpoint:
    registry = _registry()
    record = registry.endpoint(application_id, endpoint_id)
    if record is None:
        if registry.application(application_id) is None:
            raise _no_application(application_id)
        raise _no_endpoint(endpoint_id)
    return record


# --- events ------------------------------------------------------------------------------------


@routes.post("/applications/<application_id>/events")
def publish_event(application_id: str) -> tuple[Response, int, dict[str, str]]:
    """202: one delivery per subscribed, enabled endpoint, enqueued atomically (none: an event
    without deliveries). With an Idempotency-Key, a repeat answers the first answer with 200."""
    rt = runtime()
    claim = _claim(_json_body())
    try:
        if claim is not None:
            claim.check(rt.connection)  # a repeat is answered without validating again
        if _registry().application(application_id) is None:
            raise _no_application(application_id)
        event = parse_body(EventRequest)
        try:
            event_id, job_ids, endpoint_ids = publish(rt.connection, rt.settings, application_id, event, claim)
        except NoSuchApplication:
            raise _no_application(application_id) from None
        status = 202
    except AlreadyAccepted as earlier:
        assert claim is not None  # only a claim's check or the enqueue raises it
        job_ids = claim.earlier_ids(earlier.record)
        event_id = claim.earlier_group(earlier.record) or ""
        view = event_view(rt.connection, rt.keys, event_id)
        if view is None:
            raise APIError(404, "not_found", f"the event {event_id!r} this key made has expired") from None
        endpoint_ids = [delivery["endpoint"] for delivery in view["deliveries"]]
        status = 200
    note_batch(job_ids)
    location = f"/v1/events/{event_id}"
    answer = {
        "id": event_id,
        "count": len(job_ids),
        "deliveries": [
            {"id": job_id, "endpoint": endpoint_id, "status_url": f"/v1/jobs/{job_id}"}
            for job_id, endpoint_id in zip(job_ids, endpoint_ids, strict=True)
        ],
        "status_url": location,
    }
    return jsonify(answer), status, {"Location": location}


@routes.get("/events/<event_id>")
def get_event(event_id: str) -> Response:
    rt = runtime()
    view = event_view(rt.connection, rt.keys, event_id)
    if view is None:
        raise APIError(404, "not_found", f"no event with id {event_id!r} (it may have expired)")
    return jsonify(view)


def _no_content() -> Response:
    response = Response(status=204)
    del response.headers["Content-Type"]
    return response


def _has_body() -> bool:
    return bool(request.get_data())
