"""The OpenAPI 3.1 document of the API, served at `GET /openapi.json`.

Request bodies come from the pydantic models themselves, so the document cannot drift
from what the API validates; the paths and the answers are written out here.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema

from dispatcher.channels import CHANNELS, KINDS, Channel
from dispatcher.models import MAX_BATCH
from dispatcher.priorities import PRIORITIES
from dispatcher.status import MAX_LIST_LIMIT, Status

_REF = "#/components/schemas/{model}"
_COUNTS = ("queued", "scheduled", "running", "succeeded", "failed")


def _target(channel: Channel) -> str:
    return f"{channel.name.capitalize()}Target"


def _ref(name: str) -> dict:
    return {"$ref": _REF.format(model=name)}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(properties: dict[str, dict], required: tuple[str, ...] | None = None) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties if required is None else required),
        "additionalProperties": False,
    }


_STRING = {"type": "string"}
_TIME = {"type": "string", "format": "date-time"}
_STRINGS = {"type": "array", "items": _STRING}

_SCHEMAS: dict[str, dict] = {
    "Error": _object(
        {
            "error": _object(
                {
                    "code": _STRING,
                    "message": _STRING,
                    "details": {
                        "type": "array",
                        "items": _object({"field": _STRING, "problem": _STRING}),
                    },
                }
            )
        }
    ),
    "Accepted": _object(
        {"id": _STRING, "status": {"type": "string", "enum": ["queued"]}, "status_url": _STRING}
    ),
    "Health": _object({"status": {"type": "string", "enum": ["ok"]}}),
    "Readiness": _object(
        {
            "status": {"type": "string", "enum": ["ok"]},
            "queues": _object(
                {
                    p: _object(
                        {"queue": _STRING, "queued": {"type": "integer", "minimum": 0},
                         "workers": {"type": "integer", "minimum": 0}}
                    )
                    for p in PRIORITIES
                }
            ),
            "warnings": _STRINGS,
        }
    ),
    **{_target(c): _object(c.target_schema["properties"]) for c in CHANNELS.values()},
    "Attempt": _object(
        {
            "number": {"type": "integer", "minimum": 1},
            "started_at": _TIME,
            "finished_at": _nullable(_TIME),
            "duration_ms": _nullable({"type": "integer"}),
            "outcome": {"enum": ["succeeded", "retryable", "permanent", None]},
            "status_code": _nullable({"type": "integer"}),
            "error": _nullable(_STRING),
            "response_excerpt": _nullable(_STRING),
        }
    ),
    "Job": _object(
        {
            "id": _STRING,
            "kind": {"type": "string", "enum": list(KINDS)},
            "status": {"type": "string", "enum": [s.value for s in Status]},
            "priority": {"enum": [*PRIORITIES, None]},
            "created_at": _nullable(_TIME),
            "updated_at": _nullable(_TIME),
            "next_attempt_at": _nullable(_TIME),
            "attempts": {"type": "array", "items": _ref("Attempt")},
            "error": _nullable(_STRING),
            "metadata": {"type": "object", "additionalProperties": _STRING},
            "target": {"anyOf": [*(_ref(_target(c)) for c in CHANNELS.values()), {"type": "null"}]},
        }
    ),
    "JobList": _object({"jobs": {"type": "array", "items": _ref("Job")}}),
    "Counts": _object({name: {"type": "integer", "minimum": 0} for name in _COUNTS}),
    "Failure": _object(
        {
            "id": _STRING,
            "kind": {"type": "string", "enum": list(KINDS)},
            "failed_at": _nullable(_TIME),
            "attempts": {"type": "integer"},
            "error": _nullable(_STRING),
            "target": {"anyOf": [*(_ref(_target(c)) for c in CHANNELS.values()), {"type": "null"}]},
        }
    ),
    "Stats": _object(
        {
            **{kind: _ref("Counts") for kind in KINDS},
            "recent_failures": {"type": "array", "items": _ref("Failure")},
        }
    ),
}

#: Error answers, by status: (code, description).
_ERRORS = {
    400: "`malformed_json`: the body is not valid JSON or not UTF-8",
    401: "`unauthorized`: no or wrong bearer key",
    404: "`not_found`: unknown (or expired) job",
    413: "`body_too_large`: the body is over 15 MB",
    415: "`unsupported_media_type`: the body is not `application/json`",
    422: "`validation_error`: one entry in `details` for every bad field",
    503: "`unavailable`: Redis is unreachable",
}


def _json(schema: dict, description: str, **extra: Any) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}, **extra}


def _responses(ok: int, schema: dict, description: str, errors: tuple[int, ...], **extra: Any) -> dict:
    answers = {str(ok): _json(schema, description, **extra)}
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
                202, _ref("Accepted"), "accepted and queued", (400, 401, 413, 415, 422, 503), headers=location
            ),
        }
    }


def _accept_batch(channel: Channel) -> dict:
    accepted = _object({"items": {"type": "array", "items": _ref("Accepted")}})
    return {
        "post": {
            "operationId": f"create_{channel.name}_batch",
            "summary": f"{channel.summary}, for each of up to {MAX_BATCH:,} items: all or none",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(channel.batch.__name__)}},
            },
            "responses": _responses(
                202, accepted, "every item accepted and queued (a 422 accepts none)", (400, 401, 413, 415, 422, 503)
            ),
        }
    }


def _get(operation_id: str, summary: str, schema: dict, errors: tuple[int, ...], **extra: Any) -> dict:
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "responses": _responses(200, schema, "OK", errors),
            **extra,
        }
    }


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_PATHS = {
    **{f"/v1/{c.path}": _accept(c) for c in CHANNELS.values()},
    **{f"/v1/{c.path}/batch": _accept_batch(c) for c in CHANNELS.values()},
    "/v1/jobs/{id}": _get(
        "get_job",
        "One job's status and attempts",
        _ref("Job"),
        (401, 404, 503),
        parameters=[{"name": "id", "in": "path", "required": True, "schema": _STRING}],
    ),
    "/v1/jobs": _get(
        "list_jobs",
        "Jobs, newest first",
        _ref("JobList"),
        (401, 422, 503),
        parameters=[
            _query("kind", {"type": "string", "enum": list(KINDS)}, "only jobs of this kind"),
            _query("status", {"type": "string", "enum": [s.value for s in Status]}, "only jobs in this status"),
            _query(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": 50},
                "at most this many jobs",
            ),
        ],
    ),
    "/v1/stats": _get("get_stats", "Counts per kind and status, recent failures", _ref("Stats"), (401, 503)),
    "/healthz": _get("healthz", "The process is up", _ref("Health"), (), security=[]),
    "/readyz": _get(
        "readyz", "Redis answers; jobs waiting and workers alive per priority", _ref("Readiness"), (503,), security=[]
    ),
}


@cache
def openapi_document() -> dict:
    """The whole document; built once, it only depends on the code."""
    _, generated = models_json_schema(
        [(model, "validation") for c in CHANNELS.values() for model in (c.request, c.batch)],
        by_alias=True,
        ref_template=_REF,
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Dispatcher",
            "version": "1",
            "description": "Send email and call webhooks in the background. Every error is "
            '`{"error": {"code", "message", "details": [{"field", "problem"}]}}`.',
        },
        "paths": _PATHS,
        "components": {
            "schemas": generated["$defs"] | _SCHEMAS,
            "responses": {
                f"E{status}": _json(_ref("Error"), description) for status, description in _ERRORS.items()
            },
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearerAuth": []}],
    }
