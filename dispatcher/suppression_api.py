"""REST API v1: the suppression list (dispatcher.suppressions): list, look up, add by hand, remove."""

from __future__ import annotations

from urllib.parse import quote

from flask import Blueprint, Response, jsonify, request
from flask.blueprints import BlueprintSetupState
from pydantic import ValidationError
from werkzeug.routing import BaseConverter

from dispatcher import suppressions
from dispatcher.addresses import AddressError
from dispatcher.api import _details, _json_body, authenticate, idempotent, parse_query, runtime
from dispatcher.errors import APIError
from dispatcher.suppressions import SuppressionList
from dispatcher.views import SuppressionRequest, SuppressionsQuery


class AddressConverter(BaseConverter):
    """The rest of the path, whatever it holds: an address may start with `/` or hold `//` (werkzeug's
    `path` would miss the first and redirect the second), and one with a line break must reach the
    view to be refused naming `address`."""

    part_isolating = False
    regex = r"[\s\S]+"


routes = Blueprint("suppressions", __name__, url_prefix="/v1/suppressions")
routes.before_request(authenticate)


@routes.record_once
def _register_converter(state: BlueprintSetupState) -> None:
    state.app.url_map.converters["address"] = AddressConverter


def _store() -> SuppressionList:
    rt = runtime()
    return SuppressionList(rt.connection, rt.keys)


def _listed(address: str) -> str:
    """`address` (from the path) in the list's form; 422 naming `address` when it is none."""
    try:
        return suppressions.normalize(address)
    except AddressError as exc:
        raise APIError(
            422, "validation_error", "invalid path", [{"field": "address", "problem": f"invalid address: {exc}"}]
        ) from None


def _not_listed(address: str) -> APIError:
    return APIError(404, "not_found", f"{address!r} is not on the suppression list")


@routes.get("")
def list_suppressions() -> Response:
    query = parse_query(SuppressionsQuery)
    records, following = _store().page(query.after, query.limit)
    return jsonify(suppressions=records, next=following)


@routes.post("")
@idempotent
def add_suppression() -> tuple[Response, int, dict[str, str]]:
    """201 with the new entry, or 200 with the one already there (whose reason and time stay)."""
    try:
        body = SuppressionRequest.model_validate(_json_body())
    except ValidationError as exc:
        raise APIError(422, "validation_error", "the request has invalid fields", _details(exc)) from None
    ((record, added),) = _store().add([suppressions.manual(body.address)])
    if not added:
        return jsonify(record), 200, {}
    return jsonify(record), 201, {"Location": f"{request.path}/{quote(record['address'], safe='@')}"}


@routes.get("/<address:address>", merge_slashes=False)
def get_suppression(address: str) -> Response:
    record = _store().get(_listed(address))
    if record is None:
        raise _not_listed(address)
    return jsonify(record)


@routes.delete("/<address:address>", merge_slashes=False)
def remove_suppression(address: str) -> Response:
    """204: mail goes to the address again; 404 if it was not on the list."""
    if not _store().remove(_listed(address)):
        raise _not_listed(address)
    response = Response(status=204)
    del response.headers["Content-Type"]  # no content, so no type
    return response
