"""The OpenAPI 3.1 document of the API, served at `GET /openapi.json`.

Every schema in it is generated from the types the code uses: request bodies from the pydantic
models that validate them, query parameters from the model that parses them, and the answers
from the TypedDicts the status code fills in (dispatcher.views). Only the paths, which operation
answers what, are written out here.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from dispatcher import idempotency
from dispatcher.channels import CHANNELS, Channel
from dispatcher.endpoints import (
    Application,
    ApplicationRequest,
    EndpointPatch,
    EndpointRequest,
    NewSecret,
    RotateRequest,
)
from dispatcher.events import EventRequest
from dispatcher.models import MAX_BATCH
from dispatcher.suppressions import MAX_ADDRESS, Suppression
from dispatcher.views import (
    Accepted,
    AcceptedBatch,
    ApplicationList,
    BatchQuery,
    BatchView,
    EndpointCreated,
    EndpointList,
    EndpointView,
    ErrorBody,
    EventAccepted,
    EventView,
    Health,
    JobList,
    JobsQuery,
    JobView,
    Readiness,
    Recovered,
    RecoverRequest,
    Replayed,
    ReplayRequest,
    Stats,
    StoredTemplate,
    SuppressionPage,
    SuppressionRequest,
    SuppressionsQuery,
    TemplateList,
)

_REF = "#/components/schemas/{model}"

#: The answers' types; the document names each schema after its type.
_ANSWERS: tuple[Any, ...] = (
    ErrorBody, Accepted, AcceptedBatch, Health, Readiness, JobView, JobList, Stats, BatchView, Replayed,
    Suppression, SuppressionPage, StoredTemplate, TemplateList, Application, ApplicationList, EndpointView,
    EndpointList, EndpointCreated, NewSecret, EventAccepted, EventView, Recovered,
)

#: Error answers, by status: (code, description).
_ERRORS = {
    400: "`malformed_json`: the body is not valid JSON or not UTF-8",
    401: "`unauthorized`: no or wrong bearer key",
    404: "`not_found`: unknown (or expired) job or batch, or an address not on the suppression list",
    405: "`method_not_allowed`: `replay` is not a job id (it names POST /v1/jobs/replay)",
    409: "`conflict`: the job's status does not allow it (the message says which it is); or "
    f"`idempotency_conflict`: the `{idempotency.HEADER}` was used for another request within 24 h; or "
    "`idempotency_in_progress`: a request with this key is still running",
    413: "`body_too_large`: the body is over 15 MB",
    414: "`uri_too_long`: the request line (path and query) is over 4,094 bytes",
    415: "`unsupported_media_type`: the body is not `application/json`",
    431: "`headers_too_large`: over 100 header fields, or one over 8,190 bytes",
    422: "`validation_error`: one entry in `details` for every bad field, query parameter or header",
    503: "`unavailable`: Redis is unreachable; `not_replicated`: fewer replicas than DISPATCHER_MIN_REPLICAS "
    "confirmed the write (send it again with the same Idempotency-Key)",
}
_STRING = {"type": "string"}


_LOCATION = {"Location": {"description": "the job's status URL", "schema": _STRING}}
_JOB_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    # (`replay` names POST /v1/jobs/replay, never a job)
    "schema": {"type": "string", "not": {"const": "replay"}},
    "description": "the job id a 202 answered; an unknown or expired one is a 404",
}


def _ref(name: str) -> dict:
    return {"$ref": _REF.format(model=name)}


def _json(schema: dict, description: str, **extra: Any) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}, **extra}


def _responses(ok: int, answer: str, description: str, errors: tuple[int, ...], **extra: Any) -> dict:
    answers = {str(ok): _json(_ref(answer), description, **extra)}
    answers.update({str(status): {"$ref": f"#/components/responses/E{status}"} for status in errors})
    return answers


#: The header parameter of every POST operation (dispatcher.idempotency).
_IDEMPOTENCY_KEY = {
    "name": idempotency.HEADER,
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": idempotency.KEY_PATTERN},
    "description": "makes the request safe to send again: within 24 h, the same key (for the same API key) "
    "with the same method, path and JSON body answers the first answer with 200 and enqueues nothing; "
    "with another request it is a 409",
}
#: What a repeated request with an Idempotency-Key answers.
_REPEATED = "a request with this Idempotency-Key and body was answered before: that answer; nothing was done again"


def _post(
    operation_id: str, summary: str, request: type[BaseModel], answer: str, description: str, **extra: Any
) -> dict:
    """A POST operation of a channel: 202 with new jobs, or 200 with the jobs of an earlier request
    with the same idempotency key."""
    responses = _responses(202, answer, description, (400, 401, 409, 413, 415, 422, 503), **extra)
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request.__name__)}}},
            "responses": responses,
        }
    }


def _accept(channel: Channel) -> dict:
    return _post(
        f"create_{channel.name}", channel.summary, channel.request, "Accepted", "accepted and queued", headers=_LOCATION
    )


def _accept_batch(channel: Channel) -> dict:
    return _post(
        f"create_{channel.name}_batch",
        f"{channel.summary}, for each of up to {MAX_BATCH:,} items: all or none",
        channel.batch,
        "AcceptedBatch",
        "every item accepted and queued (a 422 accepts none)",
    )


def _get(operation_id: str, summary: str, answer: str, errors: tuple[int, ...], **extra: Any) -> dict:
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "responses": _responses(200, answer, "OK", errors),
            **extra,
        }
    }


def _query_parameters(model: type[BaseModel], schema: dict) -> list[dict]:
    """One optional query parameter per field of `model` (its generated `schema`), null left out:
    a parameter is absent or a value, never null."""
    parameters = []
    for name, field in schema["properties"].items():
        variants = [s for s in field.get("anyOf", [field]) if s.get("type") != "null"]
        (value,) = variants
        value = {k: v for k, v in value.items() if k not in ("title", "description")}
        if field.get("default") is not None:
            value["default"] = field["default"]
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": False,
                "schema": value,
                "description": model.model_fields[name].description or "",
            }
        )
    return parameters


def _template_paths() -> dict:
    template_id = {"name": "id", "in": "path", "required": True, "schema": _STRING,
                   "description": "the id POST /v1/templates answered"}
    body = {"required": True, "content": {"application/json": {"schema": _ref("EmailTemplate")}}}
    location = {"Location": {"description": "the stored template's URL", "schema": _STRING}}
    return {
        "/v1/templates": {
            **_get("list_templates", "Every stored email template, newest first", "TemplateList", (401, 503)),
            "post": {
                "operationId": "create_template",
                "summary": "Store an email template (checked now: a syntax error is a 422 naming the part)",
                "requestBody": body,
                "responses": _responses(
                    201, "StoredTemplate", "stored", (400, 401, 409, 413, 415, 422, 503), headers=location
                ),
            },
        },
        "/v1/templates/{id}": {
            **_get("get_template", "One stored template", "StoredTemplate", (401, 404, 414, 503),
                   parameters=[template_id]),
            "put": {
                "operationId": "replace_template",
                "summary": "Replace a stored template's parts",
                "parameters": [template_id],
                "requestBody": body,
                "responses": _responses(
                    200, "StoredTemplate", "replaced", (400, 401, 404, 413, 414, 415, 422, 503)
                ),
            },
            "delete": {
                "operationId": "delete_template",
                "summary": "Delete a stored template (batches already accepted keep their messages)",
                "parameters": [template_id],
                "responses": {
                    "204": {"description": "deleted"},
                    **{str(status): {"$ref": f"#/components/responses/E{status}"} for status in (401, 404, 414, 503)},
                },
            },
        },
    }


def _body(model: str) -> dict:
    return {"required": True, "content": {"application/json": {"schema": _ref(model)}}}


def _delete(operation_id: str, summary: str, parameters: list[dict], errors: tuple[int, ...]) -> dict:
    return {
        "delete": {
            "operationId": operation_id,
            "summary": summary,
            "parameters": parameters,
            "responses": {
                "204": {"description": "deleted"},
                **{str(status): {"$ref": f"#/components/responses/E{status}"} for status in errors},
            },
        }
    }


def _endpoint_paths() -> dict:
    """Applications, their endpoints and secrets, and events (dispatcher.endpoint_api)."""
    app = {"name": "app", "in": "path", "required": True, "schema": _STRING,
           "description": "the id POST /v1/applications answered"}
    endpoint = {"name": "endpoint", "in": "path", "required": True, "schema": _STRING,
                "description": "the id POST .../endpoints answered"}
    event = {"name": "id", "in": "path", "required": True, "schema": _STRING,
             "description": "the id POST .../events answered"}
    location = {"Location": {"description": "the new resource's URL", "schema": _STRING}}
    writes = (400, 401, 404, 413, 415, 422, 503)
    return {
        "/v1/applications": {
            **_get("list_applications", "Every application, oldest first", "ApplicationList", (401, 503)),
            "post": {
                "operationId": "create_application",
                "summary": "Register an application: one of the sender's customers, who owns endpoints",
                "requestBody": _body("ApplicationRequest"),
                "responses": _responses(201, "Application", "created", (400, 401, 409, 413, 415, 422, 503),
                                        headers=location),
            },
        },
        "/v1/applications/{app}": {
            **_get("get_application", "One application", "Application", (401, 404, 503), parameters=[app]),
            "patch": {
                "operationId": "rename_application",
                "summary": "Rename an application",
                "parameters": [app],
                "requestBody": _body("ApplicationRequest"),
                "responses": _responses(200, "Application", "renamed", writes),
            },
            **_delete("delete_application", "Delete an application with its endpoints and their secrets",
                      [app], (401, 404, 503)),
        },
        "/v1/applications/{app}/endpoints": {
            **_get("list_endpoints", "The application's endpoints, oldest first", "EndpointList", (401, 404, 503),
                   parameters=[app]),
            "post": {
                "operationId": "create_endpoint",
                "summary": "Register an endpoint; the answer holds its signing secret, shown this once",
                "parameters": [app],
                "requestBody": _body("EndpointRequest"),
                "responses": _responses(201, "EndpointCreated", "registered", (400, 401, 404, 409, 413, 415, 422, 503),
                                        headers=location),
            },
        },
        "/v1/applications/{app}/endpoints/{endpoint}": {
            **_get("get_endpoint", "One endpoint and its health (never its secret)", "EndpointView", (401, 404, 503),
                   parameters=[app, endpoint]),
            "patch": {
                "operationId": "change_endpoint",
                "summary": "Change the fields given; null clears owner_email, retry or rate_limit",
                "parameters": [app, endpoint],
                "requestBody": _body("EndpointPatch"),
                "responses": _responses(200, "EndpointView", "changed", writes),
            },
            **_delete("delete_endpoint", "Delete an endpoint and its secrets; its queued deliveries fail",
                      [app, endpoint], (401, 404, 503)),
        },
        "/v1/applications/{app}/endpoints/{endpoint}/secret/rotate": {
            "post": {
                "operationId": "rotate_secret",
                "summary": "A new signing secret, shown this once; the old one signs beside it for grace_period s",
                "parameters": [app, endpoint],
                "requestBody": {"required": False, "content": {"application/json": {"schema": _ref("RotateRequest")}}},
                "responses": _responses(200, "NewSecret", "rotated", writes),
            }
        },
        "/v1/applications/{app}/endpoints/{endpoint}/recover": {
            "post": {
                "operationId": "recover_endpoint",
                "summary": "Deliver again the endpoint's failed deliveries of the events accepted in a window",
                "parameters": [app, endpoint],
                "requestBody": _body("RecoverRequest"),
                "responses": _responses(202, "Recovered", "requeued", (400, 401, 404, 409, 413, 415, 422, 503)),
            }
        },
        "/v1/applications/{app}/events": {
            "post": {
                "operationId": "publish_event",
                "summary": "Publish an event: one delivery per subscribed, enabled endpoint, all or none",
                "parameters": [app],
                "requestBody": _body("EventRequest"),
                "responses": _responses(202, "EventAccepted", "accepted and queued", (400, 401, 404, 409, 413, 415,
                                        422, 503), headers=location),
            }
        },
        "/v1/events/{id}": _get("get_event", "An event, its progress and each delivery's status", "EventView",
                                (401, 404, 503), parameters=[event]),
    }


def _suppression_paths(query: dict) -> dict:
    address = {
        "name": "address",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "format": "idn-email", "minLength": 3, "maxLength": MAX_ADDRESS},
        "description": "the address, percent-encoded; compared without regard to case",
    }
    location = {"Location": {"description": "the new entry's URL", "schema": _STRING}}
    added = _responses(201, "Suppression", "added", (400, 401, 413, 415, 422, 503), headers=location)
    added["200"] = _json(_ref("Suppression"), "on the list already: the entry as it was")
    return {
        "/v1/suppressions": {
            **_get(
                "list_suppressions",
                "The suppression list, a page at a time, in address order",
                "SuppressionPage",
                (401, 422, 503),
                parameters=_query_parameters(SuppressionsQuery, query),
            ),
            "post": {
                "operationId": "add_suppression",
                "summary": "Add an address to the suppression list by hand",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("SuppressionRequest")}},
                },
                "responses": added,
            },
        },
        "/v1/suppressions/{address}": {
            **_get(
                "get_suppression", "One address on the suppression list", "Suppression", (401, 404, 422, 503),
                parameters=[address],
            ),
            "delete": {
                "operationId": "remove_suppression",
                "summary": "Take an address off the suppression list: mail goes to it again",
                "parameters": [address],
                "responses": {
                    "204": {"description": "removed"},
                    **{str(status): {"$ref": f"#/components/responses/E{status}"} for status in (401, 404, 422, 503)},
                },
            },
        },
    }


def _paths(jobs_query: dict, batch_query: dict, suppressions_query: dict) -> dict:
    return {
        **{f"/v1/{c.path}": _accept(c) for c in CHANNELS.values()},
        **{f"/v1/{c.path}/batch": _accept_batch(c) for c in CHANNELS.values()},
        "/v1/jobs/{id}": {
            **_get(
                "get_job", "One job's status and attempts", "JobView", (401, 404, 405, 414, 503), parameters=[_JOB_ID]
            ),
            "delete": {
                "operationId": "cancel_job",
                "summary": "Cancel a queued or scheduled job: it is never delivered",
                "parameters": [_JOB_ID],
                "responses": _responses(200, "JobView", "canceled; the job's view", (401, 404, 405, 409, 414, 503)),
            },
        },
        "/v1/jobs/{id}/retry": {
            "post": {
                "operationId": "retry_job",
                "summary": "Deliver a failed job again, with the same id, as a new series of attempts",
                "parameters": [_JOB_ID],
                "responses": _responses(202, "Accepted", "requeued", (401, 404, 409, 414, 503), headers=_LOCATION),
            }
        },
        "/v1/jobs/replay": {
            "post": {
                "operationId": "replay_jobs",
                "summary": "Deliver failed jobs again, chosen by kind and when they failed",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ReplayRequest")}},
                },
                "responses": _responses(200, "Replayed", "the jobs requeued", (400, 401, 413, 415, 422, 503)),
            }
        },
        "/v1/jobs": _get(
            "list_jobs",
            "Jobs, newest first",
            "JobList",
            (401, 414, 422, 503),
            parameters=_query_parameters(JobsQuery, jobs_query),
        ),
        "/v1/batches/{id}": _get(
            "get_batch",
            "A batch's progress: its jobs by status, percent done, a page of the failed ids",
            "BatchView",
            (401, 404, 414, 422, 503),
            parameters=[
                {
                    "name": "id",
                    "in": "path",
                    "required": True,
                    "schema": _STRING,
                    "description": "the batch_id a batch's 202 answered; an unknown or expired one is a 404",
                },
                *_query_parameters(BatchQuery, batch_query),
            ],
        ),
        "/v1/stats": _get(
            "get_stats", "Counts per kind and status, recent failures and successes", "Stats", (401, 503)
        ),
        **_suppression_paths(suppressions_query),
        **_endpoint_paths(),
        **_template_paths(),
        "/healthz": _get("healthz", "The process is up", "Health", (), security=[]),
        "/readyz": _get(
            "readyz", "Redis answers; jobs waiting and workers alive per priority", "Readiness", (503,), security=[]
        ),
    }


def _with_idempotency_key(paths: dict) -> dict:
    """Every POST takes an Idempotency-Key: a repeat answers 200 with the first answer (the 201's or
    202's, or the 200's itself), another request under the key a 409, a key that is none a 422."""
    for operations in paths.values():
        operation = operations.get("post")
        if operation is None:
            continue
        operation["parameters"] = [*operation.get("parameters", ()), _IDEMPOTENCY_KEY]
        responses = operation["responses"]
        first = next((responses[status] for status in ("201", "202") if status in responses), None)
        if first is not None and "200" not in responses:
            responses["200"] = first | {"description": _REPEATED}
        elif "200" in responses:
            responses["200"] = responses["200"] | {"description": f"{responses['200']['description']}; or {_REPEATED}"}
        for status in ("409", "422"):
            responses.setdefault(status, {"$ref": f"#/components/responses/E{status}"})
    return paths


def _with_uri_too_long(paths: dict) -> dict:
    """Every operation with a path or query parameter may meet the server's request-line limit (414),
    and one with a header parameter its header limits (431)."""
    for operations in paths.values():
        for operation in operations.values():
            places = {p["in"] for p in operation.get("parameters", ())}
            if places & {"path", "query"}:
                operation["responses"].setdefault("414", {"$ref": "#/components/responses/E414"})
            if "header" in places:
                operation["responses"].setdefault("431", {"$ref": "#/components/responses/E431"})
    return paths


@cache
def openapi_document() -> dict:
    """The whole document; built once, it only depends on the code."""
    inputs: list[tuple[str, JsonSchemaMode, TypeAdapter[Any]]] = [
        (model.__name__, "validation", TypeAdapter(model)) for c in CHANNELS.values() for model in (c.request, c.batch)
    ]
    inputs += [(query.__name__, "validation", TypeAdapter(query)) for query in (JobsQuery, BatchQuery)]
    inputs.append(("ReplayRequest", "validation", TypeAdapter(ReplayRequest)))
    inputs += [(answer.__name__, "serialization", TypeAdapter(answer)) for answer in _ANSWERS]
    inputs.append(("SuppressionsQuery", "validation", TypeAdapter(SuppressionsQuery)))
    inputs.append(("SuppressionRequest", "validation", TypeAdapter(SuppressionRequest)))
    inputs += [
        (model.__name__, "validation", TypeAdapter(model))
        for model in (ApplicationRequest, EndpointRequest, EndpointPatch, RotateRequest, EventRequest, RecoverRequest)
    ]
    _, definitions = TypeAdapter.json_schemas(inputs, by_alias=True, ref_template=_REF)
    schemas = definitions["$defs"]
    jobs_query, batch_query = schemas.pop("JobsQuery"), schemas.pop("BatchQuery")  # parameters, not bodies
    suppressions_query = schemas.pop("SuppressionsQuery")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Dispatcher",
            "version": "1",
            "description": "Send email and call webhooks in the background. Every error is "
            '`{"error": {"code", "message", "details": [{"field", "problem"}]}}`.',
        },
        "paths": _with_uri_too_long(_with_idempotency_key(_paths(jobs_query, batch_query, suppressions_query))),
        "components": {
            "schemas": schemas,
            "responses": {
                f"E{status}": _json(_ref("ErrorBody"), description) for status, description in _ERRORS.items()
            },
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearerAuth": []}],
    }
