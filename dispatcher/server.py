"""The web process: gunicorn with gevent workers, so a slow client costs a greenlet, not a worker.

gunicorn's sync workers serve one connection at a time: six clients sending their headers slowly
held every worker. A gevent worker serves each connection in its own greenlet, bounds the time a
client has to send a request's headers (`KEEPALIVE`), and here also the time to send its body
(`BODY_TIMEOUT`). Errors gunicorn answers itself (a bad request line, 414, 431) are JSON like the
app's.

The configuration is validated in the master, but the app is built in each worker after gevent has
patched the standard library: objects built before (Redis pools, locks) would hold native locks.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import socket
import time
import warnings
from collections import deque
from typing import Any

import gevent
from gevent.event import Event
from gevent.monkey import MonkeyPatchWarning
from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from gunicorn.http import errors as http_errors
from gunicorn.util import write_nonblock
from gunicorn.workers.ggevent import GeventWorker
from werkzeug.exceptions import BadRequest, HTTPException, RequestTimeout

from dispatcher.config import DEFAULT_WEB_HOST, Settings
from dispatcher.errors import APIError, ConfigError
from dispatcher.logs import RequestLog
from dispatcher.watch import DeliveryWatch

#: Seconds a client has to send a request's line and headers, and that an idle kept-alive
#: connection stays open. A client still sending headers then is disconnected.
KEEPALIVE = 5
#: Seconds a client has to send a whole request body once its headers are in (15 MB at 1 MB/s
#: fits); a slower one gets 408.
BODY_TIMEOUT = 30.0
#: Connections one worker process holds at once (each costs a greenlet, a few KB).
WORKER_CONNECTIONS = 2000
#: Requests one worker process runs through the app at once (see InArrivalOrder). Two, so that one
#: request's Redis round trip overlaps another's CPU work; measured against 1, 3 and no gate in
#: docs/benchmarks.md.
APP_SLOTS = 2
#: Seconds a stopping worker lets the requests in hand finish.
GRACEFUL_TIMEOUT = 10
#: The longest request line gunicorn reads (its default, 4094 bytes); longer is a 414.
LIMIT_REQUEST_LINE = 4094
#: Header fields and their size (gunicorn's defaults); more is a 431.
LIMIT_REQUEST_FIELDS = 100
LIMIT_REQUEST_FIELD_SIZE = 8190

log = logging.getLogger("dispatcher.web")


def web_concurrency() -> int:
    """Worker processes: WEB_CONCURRENCY, else one per core (each serves many connections)."""
    raw = os.environ.get("WEB_CONCURRENCY", "").strip()
    if not raw:
        return os.cpu_count() or 1
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= 256):
        raise ConfigError(f"WEB_CONCURRENCY must be a number of worker processes from 1 to 256, got {raw!r}")
    return int(raw)


def check_address_free(host: str, port: int) -> None:
    """Raise ConfigError naming PORT when `host:port` cannot be listened on (gunicorn would retry, then fail
    with a screenful); bound the way gunicorn binds, SO_REUSEADDR on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be listened on ({exc.strerror})"
            raise ConfigError(f"PORT={port}: the address {host}:{port} {reason}") from None


class WebServer(BaseApplication):
    """`dispatcher web`: the API on `host:settings.port`, built in each worker from `settings`."""

    def __init__(self, settings: Settings, host: str | None = None, log_level: str = "info") -> None:
        self.settings = settings
        self.host = host or settings.web_host or DEFAULT_WEB_HOST
        self.log_level = log_level
        self.workers = web_concurrency()
        super().__init__()

    def load_config(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.cfg.set("bind", f"{host}:{self.settings.port}")
        self.cfg.set("workers", self.workers)
        self.cfg.set("worker_class", "dispatcher.server.JsonGeventWorker")
        self.cfg.set("worker_connections", WORKER_CONNECTIONS)
        self.cfg.set("keepalive", KEEPALIVE)
        self.cfg.set("graceful_timeout", GRACEFUL_TIMEOUT)
        self.cfg.set("limit_request_line", LIMIT_REQUEST_LINE)
        self.cfg.set("limit_request_fields", LIMIT_REQUEST_FIELDS)
        self.cfg.set("limit_request_field_size", LIMIT_REQUEST_FIELD_SIZE)
        # gunicorn 25+ opens an unauthenticated control socket at a path shared by every instance on
        # the host; nothing here uses it.
        self.cfg.set("control_socket_disable", True)
        self.cfg.set("loglevel", self.log_level)
        # One line per request comes from dispatcher.logs.RequestLog; gunicorn's own lines go to our handler.
        self.cfg.set("accesslog", None)
        self.cfg.set("logger_class", "dispatcher.server.HandOnLogger")
        self.cfg.set("when_ready", self._watch_delivery)

    def _watch_delivery(self, arbiter: Any) -> None:
        """In the master process, once it listens: warn in its log when jobs wait for no worker."""
        DeliveryWatch(self.settings).start()

    def load(self):  # type: ignore[no-untyped-def]
        """Called in each worker, after gevent patched it: build the app there."""
        from dispatcher.app import create_app

        return RequestLog(InArrivalOrder(create_app(self.settings), APP_SLOTS))


class HandOnLogger(glogging.Logger):
    """gunicorn's logger, handing its error log's records on to the root logger's handler
    (dispatcher.logs), so they are formatted like every other line; it writes no access log."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in list(self.error_log.handlers):
            self.error_log.removeHandler(handler)
        self.error_log.propagate = True


class InArrivalOrder:
    """The app behind a gate of `slots` requests at a time, each let in once its body has arrived.

    Greenlets that all run the app at once share the process's core in turn, so under load a
    request waits for every other one in hand (the accept p99 went from ~30 to ~50 ms); through the
    gate they are served in arrival order, as the sync workers served them. The body is read before a request queues for
    the gate (within BODY_TIMEOUT, at most MAX_BODY_BYTES + 1 bytes, so the app still sees an
    oversized chunked body as such), so a slow client never holds a slot; and the app's answer is
    collected inside, written to the client outside.
    """

    def __init__(self, app: Any, slots: int) -> None:
        from dispatcher.app import MAX_BODY_BYTES

        self.app = app
        self.free = slots
        #: Requests waiting for a slot, oldest first. A released slot is handed to the oldest
        #: directly: with gevent's Semaphore a request arriving meanwhile could take it first, and
        #: under load some requests then waited half a second.
        self.waiting: deque[Event] = deque()
        self.limit = MAX_BODY_BYTES

    def __call__(self, environ: dict, start_response: Any) -> list[bytes]:
        _buffer_body(environ, self.limit)
        self._enter()
        try:
            answer = self.app(environ, start_response)
            try:
                return list(answer)
            finally:
                if hasattr(answer, "close"):
                    answer.close()
        finally:
            self._leave()

    def _enter(self) -> None:
        if self.free and not self.waiting:
            self.free -= 1
            return
        turn = Event()
        self.waiting.append(turn)
        try:
            turn.wait()
        except BaseException:  # killed while waiting (a stopping worker): pass a slot already handed on
            if turn.is_set():
                self._leave()
            else:
                self.waiting.remove(turn)
            raise

    def _leave(self) -> None:
        if self.waiting:
            self.waiting.popleft().set()  # the slot passes on, still taken
        else:
            self.free += 1


class _Unreadable(io.RawIOBase):
    """A body whose reading failed before the app ran: reading it raises that error for the app to answer."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise self.error


def _buffer_body(environ: dict, limit: int) -> None:
    """Replace wsgi.input by the body read in full (a declared length over `limit` is left to the app)."""
    length = environ.get("CONTENT_LENGTH") or ""
    if length.isdigit() and int(length) > limit:
        return  # the app answers 413 without reading it
    want = int(length) if length.isdigit() else limit + 1
    stream, chunks, size = environ["wsgi.input"], [], 0
    try:
        while size < want:
            chunk = stream.read(min(want - size, 64 * 1024))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except HTTPException as exc:  # the body's deadline passed (408), or bad chunked encoding (400)
        environ["wsgi.input"] = _Unreadable(exc)
        return
    environ["wsgi.input"] = io.BytesIO(b"".join(chunks))


def _error_response(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps(APIError(status, code, message).to_json()).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


#: What gunicorn's parse errors are answered with: (status, reason, code, message).
_PARSE_ERRORS: list[tuple[type[Exception], tuple[int, str, str, str]]] = [
    (http_errors.LimitRequestLine, (414, "URI Too Long", "uri_too_long", "the request line is too long")),
    (
        http_errors.LimitRequestHeaders,
        (431, "Request Header Fields Too Large", "headers_too_large", "the request headers are too large"),
    ),
    (
        http_errors.UnsupportedTransferCoding,
        (501, "Not Implemented", "not_implemented", "the transfer coding is not supported"),
    ),
    (
        http_errors.ExpectationFailed,
        (417, "Expectation Failed", "expectation_failed", "the Expect header is not supported"),
    ),
    (http_errors.ForbiddenProxyRequest, (403, "Forbidden", "forbidden", "the proxy request is not allowed")),
    (http_errors.ParseException, (400, "Bad Request", "bad_request", "the request is not valid HTTP/1.1")),
]


_CHUNK_ERRORS = (http_errors.InvalidChunkSize, http_errors.ChunkMissingTerminator, http_errors.InvalidChunkExtension)


class DeadlineBody:
    """A request body that must arrive by a deadline; gunicorn's chunk errors become 400s."""

    def __init__(self, body: Any, seconds: float) -> None:
        self._body = body
        self._deadline = time.monotonic() + seconds
        self._timeout = RequestTimeout("the request body did not arrive in time")

    def _call(self, method: str, *args: Any) -> Any:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise self._timeout
        try:
            with gevent.Timeout(remaining, self._timeout):
                return getattr(self._body, method)(*args)
        except http_errors.ParseException as exc:
            # Raised while the app reads a chunked body: the client's fault, answered as a 400 JSON.
            raise BadRequest(f"the request body is not valid chunked encoding: {exc}") from None

    def read(self, size: int | None = None) -> bytes:
        return self._call("read", size)

    def readline(self, size: int | None = None) -> bytes:
        return self._call("readline", size)

    def readlines(self, hint: int | None = None) -> list[bytes]:
        return self._call("readlines", hint)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.readline, b"")


class JsonGeventWorker(GeventWorker):
    """gunicorn's gevent worker with a deadline on request bodies and JSON for its own errors."""

    def patch(self) -> None:
        # The master imported redis (its package imports redis.asyncio) and urllib3 before this
        # worker patched ssl; the web process opens no TLS connection through either (redis-py's
        # sync client reaches ssl through the module, which is patched), so gevent's warning is noise.
        warnings.filterwarnings("ignore", message="Monkey-patching ssl after ssl", category=MonkeyPatchWarning)
        super().patch()

    def handle_quit(self, sig, frame):  # type: ignore[no-untyped-def]
        """SIGINT/SIGQUIT: stop like SIGTERM, letting requests in hand finish. gunicorn's quick exit
        calls sys.exit in a greenlet, which gevent prints as a traceback."""
        self.alive = False

    def handle_request(self, listener_name, req, sock, addr):  # type: ignore[no-untyped-def]
        body = req.body
        if body is None:
            return super().handle_request(listener_name, req, sock, addr)
        req.body = DeadlineBody(body, BODY_TIMEOUT)
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            # The parser drains what the app left unread before the next request on the connection,
            # bounded by KEEPALIVE; it needs its own body object back for that.
            req.body = body

    def handle_error(self, req, client, addr, exc):  # type: ignore[no-untyped-def]
        """Answer what gunicorn refused itself as JSON (its default is an HTML page)."""
        if isinstance(exc, _CHUNK_ERRORS):
            # The app reads bodies through DeadlineBody, which turns these into a 400; here the parser
            # met them draining a body the app left unread, after its answer went out: just close.
            self.log.debug("Closing after a malformed chunked body from %s: %s", (addr or ("",))[0], exc)
            return
        answer = _parse_error_answer(exc)
        if answer is not None:
            self.log.warning("Invalid request from %s: %s", (addr or ("",))[0], exc)
        else:
            self.log.exception("Error handling request")
            answer = (500, "Internal Server Error", "internal_error", "an unexpected error occurred")
        try:
            write_nonblock(client, _error_response(*answer))
        except OSError:
            self.log.debug("Failed to send the error response")


def _parse_error_answer(exc: BaseException) -> tuple[int, str, str, str] | None:
    """(status, reason, code, message) for one of gunicorn's parse errors; None for anything else."""
    for kind, answer in _PARSE_ERRORS:
        if isinstance(exc, kind):
            return answer
    return None
