"""`dispatcher web` as deployed, over raw sockets: slow clients, body limits, the server's own errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dispatcher.config import Settings
from dispatcher.server import KEEPALIVE, WebServer
from tests.conftest import API_KEY, ROOT, free_port, listening, process_env, start_dispatcher

#: The issue's bound: with slow clients connected, /healthz and a POST still answer within this.
ANSWER_BOUND = 1.0
SLOW_CLIENTS = 64
#: A socket read in these tests gives up after this, so a starved server fails the test, not hangs it.
READ_TIMEOUT = 10.0
MB = 1024 * 1024


@dataclass
class Web:
    port: int
    process: subprocess.Popen
    home: Path
    log: Path
    receiver_url: str

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def web(service_env: dict[str, str], receiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    """The real `dispatcher web` on a free port, two worker processes, HOME and XDG_RUNTIME_DIR of its own."""
    home = tmp_path_factory.mktemp("web-home")
    (home / "run").mkdir()
    port = free_port()
    env = process_env(
        service_env
        | {"PORT": str(port), "WEB_CONCURRENCY": "2", "HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run")}
    )
    log = home / "web.log"
    process = start_dispatcher("web", env, log, home)
    deadline = time.monotonic() + 30
    while not listening(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"dispatcher web did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    try:
        yield Web(port, process, home, log, receiver.url("ok"))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# --- raw HTTP ------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def read_answer(sock: socket.socket) -> Answer:
    """Read one HTTP/1.1 response (Content-Length framed) from `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Answer(status, headers, body)


def exchange(port: int, raw: bytes) -> Answer:
    """Send `raw` on a new connection (in a thread, so a server answering early cannot block us)."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:

        def send() -> None:
            with contextlib.suppress(OSError):  # the server answered and closed before reading everything
                sock.sendall(raw)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = read_answer(sock)
        sender.join(timeout=READ_TIMEOUT)
        return answer


def post(path: str, body: bytes, extra: str = "", key: str = API_KEY) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode() + body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


def webhook_body(url: str, pad: int = 0) -> bytes:
    return json.dumps({"url": url, "event_type": "slow.test", "payload": {"pad": "x" * pad}}).encode()


def chunked(body: bytes, chunk: int = MB) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i : i + chunk]), body[i : i + chunk]) for i in range(0, len(body), chunk)]
    return b"".join(parts) + b"0\r\n\r\n"


def post_chunked(path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + chunked(body)


def assert_json_error(answer: Answer, status: int) -> dict:
    assert answer.status == status, answer
    assert answer.headers["content-type"].startswith("application/json"), answer
    error = answer.json()["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert isinstance(error["code"], str) and error["code"] and error["message"], error
    assert error["details"] == [], error
    return error


# --- slow clients --------------------------------------------------------------------------


class Tricklers:
    """`count` connections that send a request one byte at a time, reconnecting whenever the server
    drops one (as an attacker would): `prefix` first at once, then `drip` a byte every `interval`."""

    def __init__(self, port: int, count: int, prefix: bytes, drip: bytes, interval: float = 0.2) -> None:
        self.port, self.count, self.prefix, self.drip, self.interval = port, count, prefix, drip, interval
        self.dropped = 0  # connections the server closed on us
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=READ_TIMEOUT)
        sock.sendall(self.prefix)
        sock.setblocking(False)
        return sock

    def _run(self) -> None:
        socks = [self._connect() for _ in range(self.count)]
        sent = [0] * self.count
        while not self._stop.wait(self.interval):
            for i, sock in enumerate(socks):
                try:
                    sock.send(self.drip[sent[i] % len(self.drip) : sent[i] % len(self.drip) + 1])
                    sent[i] += 1
                    if sock.recv(65536) == b"":
                        raise ConnectionError
                except BlockingIOError:
                    pass  # nothing to read: the connection is still held open
                except OSError:
                    self.dropped += 1
                    sock.close()
                    socks[i], sent[i] = self._connect(), 0
        for sock in socks:
            sock.close()

    def __enter__(self) -> Tricklers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def timed(port: int, raw: bytes) -> tuple[float, Answer]:
    started = time.monotonic()
    answer = exchange(port, raw)
    return time.monotonic() - started, answer


def test_slow_clients_do_not_delay_health_or_posts(web: Web) -> None:
    """64 connections trickling their headers and 64 trickling their bodies, all held open (and reopened
    when the server drops them), while /healthz and POST /v1/webhooks are timed, several times over."""
    header_prefix = b"POST /v1/webhooks HTTP/1.1\r\nHost: x\r\n"
    body = webhook_body(web.receiver_url)
    body_prefix = post("/v1/webhooks", b"", key=API_KEY).replace(b"Content-Length: 0", b"Content-Length: 100000")
    with (
        Tricklers(web.port, SLOW_CLIENTS, header_prefix, b"X-Slow: a-header-sent-one-byte-at-a-time\r\n"),
        Tricklers(web.port, SLOW_CLIENTS, body_prefix, b" "),
    ):
        time.sleep(1.0)  # every slow connection open and accepted
        took: dict[str, list[float]] = {"healthz": [], "post": []}
        for _ in range(KEEPALIVE + 2):  # long enough for the server's header deadline to pass
            seconds, answer = timed(web.port, get("/healthz"))
            assert answer.status == 200, answer
            took["healthz"].append(seconds)
            seconds, answer = timed(web.port, post("/v1/webhooks", body))
            assert answer.status == 202, answer
            took["post"].append(seconds)
            time.sleep(0.5)
    print(f"with {2 * SLOW_CLIENTS} slow clients, the answers took: {took}")  # shown with -s
    # A starved server (sync workers each held by a slow client) delays every answer by at least one
    # header deadline (KEEPALIVE seconds). The typical answer must meet the bound; a single
    # answer may lose a second to the shared CI machine's load, never a whole deadline.
    for name, seconds in took.items():
        assert statistics.median(seconds) < ANSWER_BOUND, (name, seconds)
        assert max(seconds) < KEEPALIVE, (name, seconds)


def test_a_client_trickling_its_headers_is_disconnected(web: Web) -> None:
    """The server bounds the time to send a request's headers (KEEPALIVE seconds), however slowly they come."""
    with socket.create_connection(("127.0.0.1", web.port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        while True:
            try:
                sock.sendall(b"X")
                sock.settimeout(0.3)
                if sock.recv(1024) == b"":
                    break
            except TimeoutError:
                pass
            except OSError:
                break
            assert time.monotonic() - started < KEEPALIVE + 5, "the server never dropped the slow client"
    assert time.monotonic() - started >= KEEPALIVE - 1


# --- body limits ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [15 * MB + 1, 16 * MB, 20 * MB], ids=["15MB+1", "16MB", "20MB"])
def test_a_chunked_body_over_15_mb_is_413_json(web: Web, size: int) -> None:
    body = webhook_body(web.receiver_url)
    padded = body[:-2] + b" " * (size - len(body)) + body[-2:]  # still valid JSON, just too large
    assert len(padded) == size
    error = assert_json_error(exchange(web.port, post_chunked("/v1/webhooks", padded)), 413)
    assert error["code"] == "body_too_large"


@pytest.mark.parametrize("size", [1000, MB, 15 * MB], ids=["1KB", "1MB", "15MB"])
def test_a_chunked_body_within_the_limit_is_accepted(web: Web, size: int) -> None:
    body = webhook_body(web.receiver_url)
    padded = body[:-2] + b" " * (size - len(body)) + body[-2:]
    answer = exchange(web.port, post_chunked("/v1/webhooks", padded))
    assert answer.status == 202, answer


def test_a_content_length_over_15_mb_is_413_json(web: Web) -> None:
    head = post("/v1/webhooks", b"").replace(b"Content-Length: 0", f"Content-Length: {16 * MB}".encode())
    assert_json_error(exchange(web.port, head + b" " * MB), 413)


# --- errors the server produces itself -----------------------------------------------------

_HEADERS_200KB = "".join(f"X-Filler-{i}: {'v' * 90}\r\n" for i in range(2000))

SERVER_ERRORS = {
    "garbage request line": (b"GARBAGE\r\n\r\n", 400),
    "no version": (b"GET /healthz\r\n\r\n", 400),
    "bad version": (b"GET /healthz HTTP/9.x\r\nHost: x\r\n\r\n", 400),
    "bad method": (b"G(T /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "NUL in the target": (b"GET /health\x00z HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "bad header name": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n", 400),
    "header without colon": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n", 400),
    "two content lengths": (
        b"POST /v1/webhooks HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        400,
    ),
    "chunked after Content-Length": (
        b"POST /v1/webhooks HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "chunked twice": (
        b"POST /v1/webhooks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "gzip without chunked": (b"POST /v1/webhooks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    "10 KB URI": (f"GET /{'a' * 10240} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 414),
    "200 KB of headers": (f"GET /healthz HTTP/1.1\r\nHost: x\r\n{_HEADERS_200KB}\r\n".encode(), 431),
    "one 200 KB header": (f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {'v' * 200_000}\r\n\r\n".encode(), 431),
    "unknown transfer coding": (
        b"POST /v1/webhooks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: bogus, chunked\r\n\r\n",
        501,
    ),
}


@pytest.mark.parametrize(("raw", "status"), list(SERVER_ERRORS.values()), ids=list(SERVER_ERRORS))
def test_errors_the_server_produces_are_json(web: Web, raw: bytes, status: int) -> None:
    assert_json_error(exchange(web.port, raw), status)


BAD_CHUNKS = {
    "size not hex": b"zz\r\n{}\r\n0\r\n\r\n",
    "size shorter than the data": b"2\r\n{}{}\r\n0\r\n\r\n",
    "no CRLF after the data": b"2\r\n{}XX0\r\n\r\n",
    "bad extension": b"2;\x00\r\n{}\r\n0\r\n\r\n",
    "negative size": b"-2\r\n{}\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("chunks", list(BAD_CHUNKS.values()), ids=list(BAD_CHUNKS))
def test_a_bad_chunk_reaches_the_app_as_400_json(web: Web, chunks: bytes) -> None:
    """A chunk error found while the app reads the body is the client's fault: 400 JSON, no traceback."""
    head = post_chunked("/v1/webhooks", b"").split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert_json_error(exchange(web.port, head + chunks), 400)
    assert "Traceback" not in web.log_text()


@pytest.mark.parametrize("chunks", list(BAD_CHUNKS.values()), ids=list(BAD_CHUNKS))
def test_a_bad_chunk_the_app_never_read_gets_one_answer(web: Web, chunks: bytes) -> None:
    """Refused before its body was read (401), a bad chunked body makes the server close, not answer twice."""
    raw = b"POST /v1/webhooks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    with socket.create_connection(("127.0.0.1", web.port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(raw)
        answer = read_answer(sock)
        rest = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                rest += chunk
    assert answer.status == 401 and answer.json()["error"]["code"] == "unauthorized", answer
    assert rest == b"", rest


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/webhooks", {"POST"}),
        ("DELETE", "/v1/emails", {"POST"}),
        ("POST", "/healthz", {"GET", "HEAD"}),
        ("PUT", "/v1/jobs/wh_x", {"GET", "HEAD"}),
        ("POST", "/v1/jobs", {"GET", "HEAD"}),
    ],
)
def test_405_carries_allow(web: Web, method: str, path: str, allowed: set[str]) -> None:
    raw = f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n\r\n"
    answer = exchange(web.port, raw.encode())
    error = assert_json_error(answer, 405)
    assert error["code"] == "method_not_allowed"
    assert allowed <= {m.strip() for m in answer.headers["allow"].split(",")}, answer.headers


# --- what the process opens ----------------------------------------------------------------


def _unix_socket_paths() -> list[str]:
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return [line.split()[7] for line in lines if len(line.split()) > 7]


def test_no_control_socket(web: Web, settings: Settings) -> None:
    assert exchange(web.port, get("/healthz")).status == 200
    assert WebServer(settings).cfg.control_socket_disable is True
    assert not list(web.home.rglob("*.ctl")), "gunicorn opened a control socket under HOME or XDG_RUNTIME_DIR"
    # Only this server's HOME: other gunicorns on the machine are not under test.
    assert not [path for path in _unix_socket_paths() if path.startswith(str(web.home))]


def listening_addresses(port: int) -> set[str]:
    """The local addresses of sockets listening on `port`, from /proc/net/tcp (hex, as the kernel writes them)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, _, hex_port = fields[1].partition(":")
        if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_web_listens_on_every_address_by_default(web: Web) -> None:
    assert listening_addresses(web.port) == {"0.0.0.0"}


def test_web_listens_where_dispatcher_host_says(service_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    env = process_env(service_env | {"PORT": str(port), "WEB_CONCURRENCY": "1", "DISPATCHER_HOST": "127.0.0.1"})
    process = subprocess.Popen(
        [sys.executable, "-m", "dispatcher.cli", "web"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not listening_addresses(port):
            assert process.poll() is None and time.monotonic() < deadline, "dispatcher web did not start"
            time.sleep(0.1)
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)


def test_port_in_use_is_one_line(service_env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        env = process_env(service_env | {"PORT": str(taken.getsockname()[1])})
        result = subprocess.run(
            [sys.executable, "-m", "dispatcher.cli", "web"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2, result
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and "in use" in lines[0] and "PORT" in lines[0], lines


class _TricklingBody:
    """Stands in for gunicorn's socket body: each read waits `delay` seconds (cooperatively) for one byte."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def read(self, size: int | None = None) -> bytes:
        import gevent

        gevent.sleep(self.delay)
        return b"x"


def test_a_body_that_does_not_arrive_in_time_is_408() -> None:
    """BODY_TIMEOUT bounds the whole body, not each read: reads that each come in time still run out."""
    from werkzeug.exceptions import RequestTimeout

    from dispatcher.server import DeadlineBody

    body = DeadlineBody(_TricklingBody(0.05), seconds=0.3)
    started = time.monotonic()
    with pytest.raises(RequestTimeout):
        while True:
            body.read(1)
    assert 0.25 < time.monotonic() - started < 2
    with pytest.raises(RequestTimeout):
        DeadlineBody(_TricklingBody(5), seconds=0.2).read(1)  # one read that never ends


def test_the_base_install_brings_what_the_gevent_worker_imports():
    """gunicorn's gevent worker imports `packaging`, which only its `gevent` extra declares; the test extras
    bring it anyway (pytest needs it), so without this the suite passes and a fresh `pip install -e .` fails."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    wanted = [Requirement(r) for r in requires("dispatcher") or []]
    base = [r for r in wanted if r.marker is None]
    assert any(r.name == "gunicorn" and "gevent" in r.extras for r in base), base
