"""The Flask application factory."""

from __future__ import annotations

import logging

import redis
from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from dispatcher import dashboard, endpoint_api, metrics, suppression_api, template_api
from dispatcher.api import health, v1
from dispatcher.config import Settings
from dispatcher.docs import docs
from dispatcher.errors import APIError, NotReplicated
from dispatcher.runtime import Runtime

#: A request body over this is answered 413 before it is read.
MAX_BODY_BYTES = 15 * 1024 * 1024

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app from `settings`, or from the environment; raise ConfigError when unusable."""
    settings = settings or Settings.from_env()
    settings.require_api_keys()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["dispatcher"] = Runtime.build(settings)
    app.register_blueprint(health)
    app.register_blueprint(v1)
    app.register_blueprint(suppression_api.routes)
    app.register_blueprint(template_api.routes)
    app.register_blueprint(endpoint_api.routes)
    dashboard.init_app(app, settings)
    metrics.init_app(app)
    app.register_blueprint(docs)
    _register_error_handlers(app)
    app.after_request(_confirm_writes)
    return app


#: Methods whose success may have written to Redis.
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _confirm_writes(response: Response) -> Response:
    """With DISPATCHER_MIN_REPLICAS, a write succeeds only once that many replicas have it
    (dispatcher.replicas): until then its answer is a 503, whatever the route."""
    rt: Runtime = current_app.extensions["dispatcher"]
    if request.method not in WRITES or response.status_code >= 400 or not rt.settings.min_replicas:
        return response
    try:
        rt.settings.replicas.confirm(rt.connection, rt.keys.replication_fence)
    except NotReplicated as exc:
        return _not_replicated(exc)
    except redis.RedisError as exc:  # the master went away after the write: as unsure as too few replicas
        log.warning("could not confirm a write on the replicas: %s", exc)
        return _not_replicated(NotReplicated(0, rt.settings.min_replicas, rt.settings.min_replicas_timeout))
    return response


def _not_replicated(exc: NotReplicated) -> Response:
    log.warning("write not replicated: %s", exc)
    message = (
        f"the job store's primary has the request, but {exc} (DISPATCHER_MIN_REPLICAS): a failover "
        "could lose it; send it again with the same Idempotency-Key, which finds it if it was kept"
    )
    response = jsonify(APIError(503, "not_replicated", message).to_json())
    response.status_code = 503
    response.headers["Retry-After"] = "1"
    return response


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(APIError)
    def api_error(exc: APIError) -> tuple[Response, int]:
        return jsonify(exc.to_json()), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        message = "the request body is larger than 15 MB" if status == 413 else (exc.description or exc.name)
        error = APIError(status, _HTTP_CODES.get(status, "http_error"), message)
        # werkzeug's own headers minus its HTML content type: a 405 keeps its Allow (RFC 9110 15.5.6).
        headers = [(name, value) for name, value in exc.get_headers() if name.lower() != "content-type"]
        return jsonify(error.to_json()), status, headers  # type: ignore[return-value]

    @app.errorhandler(redis.RedisError)
    def redis_error(exc: redis.RedisError) -> tuple[Response, int]:
        log.warning("Redis unavailable: %s", exc)
        if isinstance(exc, redis.exceptions.OutOfMemoryError):
            message = "the job store (Redis) is out of memory; nothing was enqueued, try again later"
        elif isinstance(exc, redis.ResponseError):
            message = "the job store (Redis) refused the request; nothing was enqueued, try again later"
        else:
            message = "the job store (Redis) is unreachable; try again shortly"
        error = APIError(503, "unavailable", message)
        return jsonify(error.to_json()), 503

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return jsonify(APIError(500, "internal_error", "an unexpected error occurred").to_json()), 500
