"""GET /docs: Swagger UI on the OpenAPI document, from the files of the installed `swagger-ui-py`
package, served by the app itself (machines without internet access get the page too)."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

from flask import Blueprint, Response, send_from_directory, url_for

from dispatcher.errors import APIError

docs = Blueprint("docs", __name__)

#: The Swagger UI files the page loads (swagger-ui-py ships others: the editor, source maps).
ASSETS = frozenset({"swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png"})

_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Dispatcher API</title>
  <link rel="stylesheet" href="{css}">
  <link rel="icon" type="image/png" href="{icon}">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{js}"></script>
  <script>
    window.ui = SwaggerUIBundle({{
      url: "{document}",
      dom_id: "#swagger-ui",
      deepLinking: true,
      presets: [SwaggerUIBundle.presets.apis],
      layout: "BaseLayout",
      // Swagger UI would otherwise send the document to its public validator for a badge.
      validatorUrl: null
    }});
  </script>
</body>
</html>
"""


@cache
def swagger_ui_files() -> Path:
    """The directory of Swagger UI's files in the installed swagger-ui-py package (not imported:
    its adapters for other frameworks are of no use here)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package is not installed: pip install -e .")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


@docs.get("/docs")
def page() -> Response:
    """The interactive API page; like the document, it needs no key (requests made from it do)."""
    html = _PAGE.format(
        css=url_for("docs.asset", name="swagger-ui.css"),
        icon=url_for("docs.asset", name="favicon-32x32.png"),
        js=url_for("docs.asset", name="swagger-ui-bundle.js"),
        document=url_for("health.openapi"),
    )
    return Response(html, mimetype="text/html")


@docs.get("/docs/<name>")
def asset(name: str) -> Response:
    if name not in ASSETS:
        raise APIError(404, "not_found", f"no such file: {name!r}")
    return send_from_directory(swagger_ui_files(), name, max_age=86400)
