"""REST API v1: stored email templates (dispatcher.templates): create, list, read, replace, delete.

A batch names one with `template_id` (dispatcher.channels.email); a template is checked when it is
stored, so a syntax error is a 422 naming the part then, not when it is first used.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from pydantic import ValidationError

from dispatcher.api import _details, _json_body, authenticate, idempotent, runtime
from dispatcher.channels.email import EmailTemplate
from dispatcher.errors import APIError
from dispatcher.templates import TemplateProblem, TemplateStore, TemplateStoreFull

routes = Blueprint("templates", __name__, url_prefix="/v1/templates")
routes.before_request(authenticate)


def _store() -> TemplateStore:
    rt = runtime()
    return TemplateStore(rt.connection, rt.keys.templates)


def _parts() -> dict[str, str | None]:
    """The request's template, validated (422 naming each bad field)."""
    try:
        template = EmailTemplate.model_validate(_json_body())
    except ValidationError as exc:
        raise APIError(422, "validation_error", "the request has invalid fields", _details(exc)) from None
    return template.model_dump()


def _not_found(template_id: str) -> APIError:
    return APIError(404, "not_found", f"no stored template with id {template_id!r}")


def _invalid(exc: TemplateProblem) -> APIError:
    details = [{"field": exc.field, "problem": exc.message}]
    return APIError(422, "validation_error", "the template cannot be used", details)


@routes.get("")
def list_templates() -> Response:
    return jsonify(templates=_store().list())


@routes.post("")
@idempotent
def create_template() -> tuple[Response, int, dict[str, str]]:
    try:
        record = _store().create(_parts())
    except TemplateProblem as exc:
        raise _invalid(exc) from None
    except TemplateStoreFull as exc:
        raise APIError(409, "conflict", str(exc)) from None
    return jsonify(record), 201, {"Location": f"/v1/templates/{record['id']}"}


@routes.get("/<template_id>")
def get_template(template_id: str) -> Response:
    record = _store().get(template_id)
    if record is None:
        raise _not_found(template_id)
    return jsonify(record)


@routes.put("/<template_id>")
def replace_template(template_id: str) -> Response:
    parts = _parts()
    try:
        record = _store().replace(template_id, parts)
    except TemplateProblem as exc:
        raise _invalid(exc) from None
    if record is None:
        raise _not_found(template_id)
    return jsonify(record)


@routes.delete("/<template_id>")
def delete_template(template_id: str) -> tuple[str, int]:
    if not _store().delete(template_id):
        raise _not_found(template_id)
    return "", 204
