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

from dispatcher.channels import CHANNELS, Channel
from dispatcher.models import MAX_BATCH
from dispatcher.views import (
    Accepted,
    AcceptedBatch,
    ErrorBody,
    Health,
    JobList,
    JobsQuery,
    JobView,
    Readiness,
    Stats,
)

_REF = "#/components/schemas/{model}"

#: The answers' types; the document names each schema after its type.
_ANSWERS: tuple[Any, ...] = (ErrorBody, Accepted, AcceptedBatch, Health, Readiness, JobView, JobList, Stats)

#: Error answers, by status: (code, description).
_ERRORS = {
    400: "`malformed_json`: the body is not valid JSON or not UTF-8",
    401: "`unauthorized`: no or wrong bearer key",
    404: "`not_found`: unknown (or expired) job",
    413: "`body_too_large`: the body is over 15 MB",
    415: "`unsupported_media_type`: the body is not `application/json`",
    422: "`validation_error`: one entry in `details` for every bad field or query parameter",
    503: "`unavailable`: Redis is unreachable",
}
_STRING = {"type": "string"}


def _ref(name: str) -> dict:
    return {"$ref": _REF.format(model=name)}


def _json(schema: dict, description: str, **extra: Any) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}, **extra}


def _responses(ok: int, answer: str, description: str, errors: tuple[int, ...], **extra: Any) -> dict:
    answers = {str(ok): _json(_ref(answer), description, **extra)}
    answers.update({str(status): {"$ref": f"#/components/responses/E{status}"} for status in errors})
    return answers


def _accept(channel: Channel) -> dict:
    location = {"Location": {"description": "the job's status URL", "schema": _STRING}}
    return {
        "post": {
            "operationId": f"create_{channel.name}",
            "summary": channel.summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(channel.request.__name__)}},
            },
            "responses": _responses(
                202, "Accepted", "accepted and queued", (400, 401, 413, 415, 422, 503), headers=location
            ),
        }
    }


def _accept_batch(channel: Channel) -> dict:
    return {
        "post": {
            "operationId": f"create_{channel.name}_batch",
            "summary": f"{channel.summary}, for each of up to {MAX_BATCH:,} items: all or none",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(channel.batch.__name__)}},
            },
            "responses": _responses(
                202,
                "AcceptedBatch",
                "every item accepted and queued (a 422 accepts none)",
                (400, 401, 413, 415, 422, 503),
            ),
        }
    }


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


def _paths(jobs_query: dict) -> dict:
    return {
        **{f"/v1/{c.path}": _accept(c) for c in CHANNELS.values()},
        **{f"/v1/{c.path}/batch": _accept_batch(c) for c in CHANNELS.values()},
        "/v1/jobs/{id}": _get(
            "get_job",
            "One job's status and attempts",
            "JobView",
            (401, 404, 503),
            parameters=[
                {
                    "name": "id",
                    "in": "path",
                    "required": True,
                    "schema": _STRING,
                    "description": "the job id a 202 answered; an unknown or expired one is a 404",
                }
            ],
        ),
        "/v1/jobs": _get(
            "list_jobs",
            "Jobs, newest first",
            "JobList",
            (401, 422, 503),
            parameters=_query_parameters(JobsQuery, jobs_query),
        ),
        "/v1/stats": _get(
            "get_stats", "Counts per kind and status, recent failures and successes", "Stats", (401, 503)
        ),
        "/healthz": _get("healthz", "The process is up", "Health", (), security=[]),
        "/readyz": _get(
            "readyz", "Redis answers; jobs waiting and workers alive per priority", "Readiness", (503,), security=[]
        ),
    }


@cache
def openapi_document() -> dict:
    """The whole document; built once, it only depends on the code."""
    inputs: list[tuple[str, JsonSchemaMode, TypeAdapter[Any]]] = [
        (model.__name__, "validation", TypeAdapter(model)) for c in CHANNELS.values() for model in (c.request, c.batch)
    ]
    inputs.append(("JobsQuery", "validation", TypeAdapter(JobsQuery)))
    inputs += [(answer.__name__, "serialization", TypeAdapter(answer)) for answer in _ANSWERS]
    _, definitions = TypeAdapter.json_schemas(inputs, by_alias=True, ref_template=_REF)
    schemas = definitions["$defs"]
    jobs_query = schemas.pop("JobsQuery")  # parameters, not a body
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Dispatcher",
            "version": "1",
            "description": "Send email and call webhooks in the background. Every error is "
            '`{"error": {"code", "message", "details": [{"field", "problem"}]}}`.',
        },
        "paths": _paths(jobs_query),
        "components": {
            "schemas": schemas,
            "responses": {
                f"E{status}": _json(_ref("ErrorBody"), description) for status, description in _ERRORS.items()
            },
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearerAuth": []}],
    }
