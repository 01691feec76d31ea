"""A webhook attempt has one hard deadline, DISPATCHER_WEBHOOK_TIMEOUT, however its receiver misbehaves.

Receivers here are raw sockets on loopback that answer slowly on purpose; the client and sender are
the real HttpClient and WebhookSender, and one test runs the whole way through the API and a worker.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from dispatcher.netguard import NetworkGuard
from tests.conftest import WEBHOOK_SECRET, wait_for
from workers.deadline import Deadline
from workers.errors import RetryableDeliveryError
from workers.http import HttpClient
from workers.webhook import WebhookSender

TIMEOUT = 1.0
#: The brief's promise is the timeout plus one second; the assertion adds slack for a noisy machine.
BOUND = TIMEOUT + 1.5
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]
DATA = {"url": "", "body": '{"type":"t","timestamp":"2026-01-01T00:00:00Z","data":{}}', "headers": {}}


@dataclass
class RawReceiver:
    """A TCP server on loopback whose every connection runs `handler(sock, stop)` on its own thread."""

    handler: Callable[[socket.socket, threading.Event], None]
    stop: threading.Event = field(default_factory=threading.Event)
    accepted: int = 0
    closed_by_client: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def url(self, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}/hook/{uuid.uuid4().hex}"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._run, args=(sock,), daemon=True).start()

    def _run(self, sock: socket.socket) -> None:
        # OSError: the client cut the connection, which is what these receivers are for.
        with sock, contextlib.suppress(OSError):
            self.handler(sock, self.stop)

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def raw_receiver() -> Iterator[Callable[..., RawReceiver]]:
    started: list[RawReceiver] = []

    def make(handler: Callable[[socket.socket, threading.Event], None]) -> RawReceiver:
        server = RawReceiver(handler)
        started.append(server)
        return server

    yield make
    for server in started:
        server.close()


def read_request(sock: socket.socket) -> bytes:
    """One HTTP request (headers and a Content-Length body) from `sock`; b"" when it closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        0,
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head


def trickle(sock: socket.socket, stop: threading.Event, data: bytes, forever: bytes = b"") -> None:
    """Send `data`, then `forever` repeated, one byte every 0.2 s, until `stop`."""
    stream = iter(data)
    while not stop.is_set():
        byte = next(stream, None)
        if byte is None:
            if not forever:
                return
            stream = iter(forever)
            continue
        sock.sendall(bytes([byte]))
        time.sleep(0.2)


def never_answers(sock: socket.socket, stop: threading.Event) -> None:
    read_request(sock)
    stop.wait(30)


def trickles_headers(sock: socket.socket, stop: threading.Event) -> None:
    read_request(sock)
    trickle(sock, stop, b"HTTP/1.1 200 OK\r\n", forever=b"X-Slow: a\r\n")


def status_then_trickles_headers(sock: socket.socket, stop: threading.Event) -> None:
    """A 2xx status line at once, then headers that never end: no answer has arrived, whatever the
    status line said (cut short by the deadline, the headers must not read as complete)."""
    read_request(sock)
    sock.sendall(b"HTTP/1.1 200 OK\r\n")
    trickle(sock, stop, b"", forever=b"X-Slow: a\r\n")


BODY = b'{"accepted": true, "padding": "' + b"x" * 4000 + b'"}'


def trickles_the_body(sock: socket.socket, stop: threading.Event) -> None:
    read_request(sock)
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY))
    trickle(sock, stop, BODY)


def slow_tls_handshake(sock: socket.socket, stop: threading.Event) -> None:
    # A TLS record header announcing a 16 KB handshake message, then its bytes one at a time.
    sock.recv(65536)  # the ClientHello
    trickle(sock, stop, b"\x16\x03\x03\x40\x00", forever=b"\x00")


def answers_then_trickles(sock: socket.socket, stop: threading.Event) -> None:
    """Keep-alive: the first request on the connection is answered at once, the next one trickles."""
    read_request(sock)
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    if read_request(sock):
        trickle(sock, stop, b"HTTP/1.1 200 OK\r\n", forever=b"X-Slow: a\r\n")


def answers(sock: socket.socket, stop: threading.Event) -> None:
    while read_request(sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def sender(guard: NetworkGuard | None = None) -> WebhookSender:
    return WebhookSender(HttpClient(guard or NetworkGuard(LOOPBACK), TIMEOUT), WEBHOOK_SECRET)


def send_timed(webhooks: WebhookSender, url: str) -> tuple[float, tuple[int, str] | BaseException]:
    """Run one attempt on a thread; (seconds taken, its result or error). Fails if it outlives 3 x BOUND,
    so a regression shows as a failure rather than a hung test."""
    outcome: list[tuple[int, str] | BaseException] = []

    def attempt() -> None:
        try:
            outcome.append(webhooks.send("msg_" + uuid.uuid4().hex, DATA | {"url": url}))
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(3 * BOUND)
    elapsed = time.monotonic() - started
    assert outcome, f"the attempt was still running after {elapsed:.1f} s"
    return elapsed, outcome[0]


@pytest.mark.parametrize(
    ("handler", "scheme"),
    [
        pytest.param(never_answers, "http", id="accepts-and-never-answers"),
        pytest.param(trickles_headers, "http", id="trickles-status-and-headers"),
        pytest.param(status_then_trickles_headers, "http", id="2xx-status-then-trickled-headers"),
        pytest.param(slow_tls_handshake, "https", id="trickles-the-tls-handshake"),
    ],
)
def test_slow_receiver_attempt_ends_at_the_deadline_as_retryable(raw_receiver, handler, scheme):
    server = raw_receiver(handler)

    elapsed, outcome = send_timed(sender(), server.url(scheme))

    assert isinstance(outcome, RetryableDeliveryError), outcome
    assert "exceeded its 1 s deadline" in str(outcome)
    assert outcome.status_code is None
    assert TIMEOUT * 0.9 <= elapsed < BOUND


def test_kept_alive_connection_is_bounded_too_and_not_pooled_after_the_deadline(raw_receiver):
    server = raw_receiver(answers_then_trickles)
    webhooks = sender()
    url = server.url()

    _, first = send_timed(webhooks, url)
    elapsed, second = send_timed(webhooks, url)

    assert first == (200, "ok")
    assert server.accepted == 1  # the second attempt reused the kept-alive connection
    assert isinstance(second, RetryableDeliveryError), second
    assert "deadline" in str(second)
    assert elapsed < BOUND
    pool = webhooks.client.pool.connection_from_url(url)
    assert all(conn is None or conn.sock is None for conn in list(pool.pool.queue)), "a cut connection was pooled"


def test_headers_in_time_count_even_if_the_excerpt_trickles_past_the_deadline(raw_receiver):
    """The receiver has answered 2xx: retrying would deliver the webhook twice. The excerpt is what
    arrived, and the connection, cut mid-body, is closed instead of pooled."""
    server = raw_receiver(trickles_the_body)
    webhooks = sender()
    url = server.url()

    elapsed, outcome = send_timed(webhooks, url)

    assert not isinstance(outcome, BaseException), outcome
    status, excerpt = outcome
    assert status == 200
    assert 1 <= len(excerpt) < 20  # ~5 bytes at one per 0.2 s
    assert BODY.decode().startswith(excerpt)
    assert elapsed < BOUND
    pool = webhooks.client.pool.connection_from_url(url)
    assert all(conn is None or conn.sock is None for conn in list(pool.pool.queue)), "a cut connection was pooled"


def test_a_fast_receiver_keeps_its_connection_alive(raw_receiver):
    server = raw_receiver(answers)
    webhooks = sender()
    url = server.url()

    results = [send_timed(webhooks, url)[1] for _ in range(5)]

    assert results == [(200, "ok")] * 5
    assert server.accepted == 1


def test_slow_name_resolution_at_delivery_ends_at_the_deadline(raw_receiver):
    """The system resolver cannot be made slow here: a resolver that never answers stands in for it."""
    server = raw_receiver(answers)
    release = threading.Event()

    def hanging_resolver(host, port, *args, **kwargs):
        release.wait(30)
        return socket.getaddrinfo("127.0.0.1", port, *args, **kwargs)

    try:
        elapsed, outcome = send_timed(
            sender(NetworkGuard(LOOPBACK, resolver=hanging_resolver)), server.url(host="hooks.example")
        )
    finally:
        release.set()

    assert isinstance(outcome, RetryableDeliveryError), outcome
    assert "exceeded its 1 s deadline while resolving the host" in str(outcome)
    assert elapsed < BOUND
    assert server.accepted == 0


def test_the_deadline_shuts_a_watched_socket_down_and_leaves_others_open():
    """What HttpClient relies on in workers.deadline: a blocked recv ends at the deadline, `expired`
    says so, and a socket watched by an attempt that ended in time stays usable."""
    left, right = socket.socketpair()
    kept_left, kept_right = socket.socketpair()
    with left, right, kept_left, kept_right:
        with Deadline(10) as early:
            early.watch(kept_left)
        started = time.monotonic()
        with Deadline(0.5) as deadline:
            deadline.watch(left)
            assert left.recv(1) == b""  # shut down, not timed out: no socket timeout is set
        assert deadline.expired and not early.expired
        assert 0.4 <= time.monotonic() - started < 2.0
        time.sleep(0.1)
        kept_right.sendall(b"x")
        assert kept_left.recv(1) == b"x"


def test_trickling_receiver_through_the_api_and_a_worker(raw_receiver, service):
    server = raw_receiver(trickles_headers)
    svc = service(DISPATCHER_WEBHOOK_TIMEOUT=str(TIMEOUT))
    url = server.url()
    job_id = svc.post(
        "/v1/webhooks", {"url": url, "event_type": "order.created", "payload": {}, "retry": {"max_attempts": 1}}
    )
    svc.start_worker()

    job = wait_for(svc.client, job_id)

    assert job["status"] == "failed", (job, svc.logs())
    (attempt,) = job["attempts"]
    assert (attempt["outcome"], attempt["status_code"]) == ("retryable", None)
    assert "exceeded its 1 s deadline" in job["error"]
    assert attempt["duration_ms"] < BOUND * 1000
    assert server.accepted == 1
