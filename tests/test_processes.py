"""The service as users run it: the Procfile's processes under honcho, and `dispatcher dev`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, TERMINAL, free_port, process_env

#: `dispatcher dev` without REDIS_URL starts its embedded Redis on port 16379 when free: one such test at
#: a time (pytest-xdist runs a group on one worker), or two could race for the port.
pytestmark = pytest.mark.xdist_group("embedded-redis-port")

BIN = Path(sys.executable).parent


def http(method: str, url: str, key: str | None = None, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_ready(base: str, process: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the service exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if http("GET", f"{base}/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the service was not ready in {timeout}s:\n{log.read_text()[-3000:]}")


def wait_job(base: str, key: str, job_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, job = http("GET", f"{base}/v1/jobs/{job_id}", key)
        assert status == 200, job
        if job["status"] in TERMINAL or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def stop(process: subprocess.Popen) -> int:
    """SIGTERM to the whole process group, as a Procfile platform or Ctrl+C in a terminal would."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


def test_procfile_web_and_worker_deliver(tmp_path, redis_url, smtp_server, receiver):
    port = free_port()
    key = "procfile-key"
    env = process_env(
        {
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PORT": str(port),
            "REDIS_URL": redis_url,
            "DISPATCHER_QUEUE": f"procfile-{uuid.uuid4().hex[:8]}",
            "DISPATCHER_API_KEYS": key,
            "DISPATCHER_WEBHOOK_SECRET": "whsec_" + "A" * 32,
            "DISPATCHER_EMAIL_FROM": "shop@example.com",
            "DISPATCHER_SMTP_URL": smtp_server.url,
            "DISPATCHER_ALLOWED_NETWORKS": "127.0.0.0/8",
        }
    )
    log = tmp_path / "honcho.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "honcho", "start", "-f", str(ROOT / "Procfile")],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, log)
        url = receiver.url("ok")
        status, accepted = http("POST", f"{base}/v1/webhooks", key, {"url": url, "event_type": "a.b", "payload": {}})
        assert status == 202, accepted
        rcpt = f"procfile-{uuid.uuid4().hex[:8]}@example.com"
        status, mail = http("POST", f"{base}/v1/emails", key, {"to": [rcpt], "subject": "Hi", "text": "x"})
        assert status == 202, mail

        assert wait_job(base, key, accepted["id"])["status"] == "succeeded", log.read_text()[-3000:]
        assert wait_job(base, key, mail["id"])["status"] == "succeeded", log.read_text()[-3000:]
        assert receiver.received(url)[0].headers["webhook-id"] == accepted["id"]
        assert len(smtp_server.handler.messages_to(rcpt)) == 1
    finally:
        stop(process)


def test_dev_runs_everything_with_embedded_redis(tmp_path, receiver):
    port = free_port()
    env = process_env({"PORT": str(port), "DISPATCHER_ALLOWED_NETWORKS": "127.0.0.0/8"})
    log = tmp_path / "dev.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(BIN / "dispatcher"), "dev"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, log)
        key = (tmp_path / "var" / "dev-api-key").read_text().strip()
        assert key in log.read_text(), "dev mode prints the API key it generated"
        url = receiver.url("ok")
        _, hook = http("POST", f"{base}/v1/webhooks", key, {"url": url, "event_type": "a.b", "payload": {"n": 1}})
        _, mail = http(
            "POST", f"{base}/v1/emails", key,
            {"to": ["a@example.com"], "bcc": ["hidden@example.com"], "from": "me@example.com", "subject": "Hi",
             "text": "hello"},
        )
        assert wait_job(base, key, hook["id"])["status"] == "succeeded", log.read_text()[-3000:]
        assert wait_job(base, key, mail["id"])["status"] == "succeeded", log.read_text()[-3000:]
        eml = (tmp_path / "var" / "outbox" / f"{mail['id']}.eml").read_text()
        assert "Subject: Hi" in eml
        assert "hidden@example.com" not in eml
        assert list((tmp_path / "var" / "redis").glob("appendonly*")), "the embedded Redis persists with AOF"
        redis_port = int(re.search(r"REDIS_URL +redis://127\.0\.0\.1:(\d+)", log.read_text())[1])
    finally:
        assert stop(process) == 0
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", redis_port), timeout=1):
        pass  # the embedded Redis stopped with the service
