"""Structured logs from the real processes: `dispatcher web` (gunicorn) and `python -m workers` write one
JSON object per line by default, with one line per request and one per delivery attempt, and never a
secret or a message's content; DISPATCHER_LOG_FORMAT=text writes the same facts for people, and is
what `dispatcher dev` writes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from dispatcher.config import Settings
from tests.conftest import (
    API_KEY,
    AUTH,
    ROOT,
    TERMINAL,
    SmtpHandler,
    free_port,
    listening,
    process_env,
    start_dispatcher,
    wait_until,
)

#: Strings that must never reach a log line: one per kind of secret or content a request carries.
HEADER_SECRET = "hdrsecret" + uuid.uuid4().hex
QUERY_SECRET = "qrysecret" + uuid.uuid4().hex
PAYLOAD_MARKER = "payloadmarker" + uuid.uuid4().hex
SUBJECT_MARKER = "subjectmarker" + uuid.uuid4().hex
BODY_MARKER = "bodymarker" + uuid.uuid4().hex
MAIL_HEADER_SECRET = "mailhdrsecret" + uuid.uuid4().hex
RECIPIENT = f"rcpt{uuid.uuid4().hex[:12]}@example.com"
SMTP_USER = "smtpuser" + uuid.uuid4().hex[:8]
SMTP_PASSWORD = "smtppassword" + uuid.uuid4().hex
USERINFO_SECRET = "userinfosecret" + uuid.uuid4().hex
WRONG_KEY = "wrongkey" + uuid.uuid4().hex
LOGGED_FIELDS = {"timestamp", "level", "logger", "message"}


# --- the real processes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_smtp() -> Iterator[tuple[int, SmtpHandler]]:
    """An SMTP server that wants a login (over plain text, for the test) with SMTP_USER/SMTP_PASSWORD."""

    def authenticate(server, session, envelope, mechanism, auth_data) -> AuthResult:  # type: ignore[no-untyped-def]
        ok = auth_data.login.decode() == SMTP_USER and auth_data.password.decode() == SMTP_PASSWORD
        return AuthResult(success=ok)

    handler = SmtpHandler()
    port = free_port()
    controller = Controller(
        handler, hostname="127.0.0.1", port=port, authenticator=authenticate, auth_require_tls=False
    )
    controller.start()
    try:
        yield port, handler
    finally:
        controller.stop()


@dataclass
class Run:
    """A `dispatcher web` and a worker on a queue of their own, and the HTTP requests sent to the web."""

    port: int
    web_log: Path
    worker_log: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    requests: int = 0

    def call(self, method: str, path: str, body: dict | None = None, key: str = API_KEY) -> tuple[int, dict]:
        self.requests += 1
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def send(self, path: str, body: dict) -> str:
        status, answer = self.call("POST", path, body)
        assert status == 202, answer
        return answer["id"]

    def wait(self, job_id: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status, job = self.call("GET", f"/v1/jobs/{job_id}")
            assert status == 200, job
            if job["status"] in TERMINAL:
                return job
            assert time.monotonic() < deadline, (job, self.worker_log.read_text(errors="replace")[-3000:])
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM and wait, so every line is written (and the shutdown lines too)."""
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def start(env: dict[str, str], directory: Path) -> Run:
    port = free_port()
    env = process_env(env | {"PORT": str(port), "WEB_CONCURRENCY": "1"})
    run = Run(port, directory / "web.log", directory / "worker.log")
    for command, log in (
        ([sys.executable, "-m", "dispatcher.cli", "web"], run.web_log),
        ([sys.executable, "-m", "workers"], run.worker_log),
    ):
        with open(log, "wb") as out:
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        run.processes.append(process)
    try:
        wait_until(lambda: listening(port), 30, f"dispatcher web did not listen: {run.web_log.read_text()}")
    except BaseException:
        run.stop()
        raise
    return run


def records(log: Path) -> list[dict]:
    """Every line of `log` parsed as a JSON object (the test fails on the first one that is not)."""
    parsed = []
    for number, line in enumerate(log.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"{log.name} line {number} is not JSON: {line!r}")
        assert isinstance(record, dict) and record.keys() >= LOGGED_FIELDS, (log.name, number, line)
        parsed.append(record)
    return parsed


# --- json (the default) ------------------------------------------------------------------------


@dataclass
class Traffic:
    run: Run
    retried: str
    retried_url: str
    gone: str
    email: str
    batch: list[str]
    smtp_port: int
    web: list[dict]
    worker: list[dict]


@pytest.fixture(scope="module")
def traffic(service_env, receiver, auth_smtp, tmp_path_factory) -> Iterator[Traffic]:
    """One run in the default format: a webhook retried once (secret header, query token, marked payload),
    one refused for good (410), an email through an SMTP server that wants a password, a batch, and
    requests refused (no key, a URL with userinfo); then both processes stopped."""
    smtp_port, _ = auth_smtp
    env = service_env | {
        "DISPATCHER_QUEUE": f"logs-{uuid.uuid4().hex[:10]}",
        "DISPATCHER_SMTP_URL": f"smtp://{SMTP_USER}:{SMTP_PASSWORD}@127.0.0.1:{smtp_port}",
    }
    run = start(env, tmp_path_factory.mktemp("json"))
    try:
        retried_url = receiver.url("fail/1/503") + f"?token={QUERY_SECRET}"
        hook = {
            "event_type": "order.created",
            "payload": {"note": PAYLOAD_MARKER},
            "headers": {"X-Api-Token": HEADER_SECRET},
            "retry": {"max_attempts": 3, "backoff": [0.1]},
        }
        retried = run.send("/v1/webhooks", hook | {"url": retried_url})
        gone = run.send("/v1/webhooks", hook | {"url": receiver.url("status/410")})
        email = run.send(
            "/v1/emails",
            {
                "to": [RECIPIENT],
                "subject": SUBJECT_MARKER,
                "text": BODY_MARKER,
                "headers": {"X-Custom": MAIL_HEADER_SECRET},
            },
        )
        status, answer = run.call("POST", "/v1/webhooks/batch", {"items": [hook | {"url": receiver.url("ok")}] * 2})
        assert status == 202, answer
        batch = [item["id"] for item in answer["items"]]
        assert run.call("GET", f"/v1/jobs?kind=webhook&limit=5&token={QUERY_SECRET}")[0] == 200
        assert run.call("GET", "/v1/stats", key=WRONG_KEY)[0] == 401
        userinfo = {"url": f"http://user:{USERINFO_SECRET}@127.0.0.1:{receiver.port}/ok/x"}
        assert run.call("POST", "/v1/webhooks", hook | userinfo)[0] == 422
        for job_id in (retried, gone, email, *batch):
            run.wait(job_id)
    finally:
        run.stop()
    yield Traffic(
        run, retried, retried_url, gone, email, batch, smtp_port, records(run.web_log), records(run.worker_log)
    )


def test_every_line_of_web_and_worker_is_a_json_object(traffic: Traffic) -> None:
    """records() fails on any line that is not: our lines, gunicorn's, RQ's (exceptions would be a field)."""
    web_loggers = {record["logger"] for record in traffic.web}
    worker_loggers = {record["logger"] for record in traffic.worker}
    assert {"gunicorn.error", "dispatcher.request"} <= web_loggers, web_loggers
    assert {"rq.worker", "dispatcher.attempt"} <= worker_loggers, worker_loggers
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", r["timestamp"]) for r in traffic.web)


def _attempts(traffic: Traffic, job_id: str) -> list[dict]:
    return [r for r in traffic.worker if r["logger"] == "dispatcher.attempt" and r["job_id"] == job_id]


def test_one_line_per_webhook_attempt_with_its_facts(traffic: Traffic, receiver) -> None:
    host = f"127.0.0.1:{receiver.port}"
    lines = _attempts(traffic, traffic.retried)
    assert [(r["attempt"], r["outcome"], r["status_code"], r["verdict"]) for r in lines] == [
        (1, "retryable", 503, "retry"),
        (2, "succeeded", 200, "succeeded"),
    ]
    for record in lines:
        assert record["channel"] == "webhook" and record["host"] == host and record["message"] == "attempt"
        assert record["level"] == "INFO" and record["priority"] == "default"
        assert record["queue"].startswith("logs-")
        assert isinstance(record["duration_ms"], int) and record["duration_ms"] >= 0
    [gone] = _attempts(traffic, traffic.gone)
    assert (gone["attempt"], gone["outcome"], gone["status_code"], gone["verdict"]) == (1, "permanent", 410, "failed")
    assert [len(_attempts(traffic, job_id)) for job_id in traffic.batch] == [1, 1]


def test_an_email_attempt_names_the_smtp_relay_not_the_recipient(traffic: Traffic) -> None:
    [line] = _attempts(traffic, traffic.email)
    assert (line["channel"], line["outcome"], line["status_code"]) == ("email", "succeeded", 250)
    assert line["host"] == f"127.0.0.1:{traffic.smtp_port}"


def test_one_line_per_request_with_its_facts_and_no_access_log(traffic: Traffic) -> None:
    requests = [r for r in traffic.web if r["logger"] == "dispatcher.request"]
    assert len(requests) == traffic.run.requests  # one each: no second line from gunicorn's access log
    assert not [r for r in traffic.web if r["logger"] == "gunicorn.access"]
    for record in requests:
        assert record["remote_addr"] == "127.0.0.1" and record["duration_ms"] >= 0 and record["message"] == "request"

    def find(method: str, path: str) -> list[dict]:
        return [r for r in requests if (r["method"], r["path"]) == (method, path)]

    created = [r for r in find("POST", "/v1/webhooks") if r["status"] == 202]
    assert [r["job_id"] for r in created] == [traffic.retried, traffic.gone]
    assert [r["job_id"] for r in find("POST", "/v1/emails")] == [traffic.email]
    [batch] = find("POST", "/v1/webhooks/batch")
    assert (batch["status"], batch["job_count"], batch["job_ids"]) == (202, 2, traffic.batch)
    reads = find("GET", f"/v1/jobs/{traffic.email}")
    assert reads and all(r["status"] == 200 and r["job_id"] == traffic.email for r in reads)
    [listed] = find("GET", "/v1/jobs")  # the query string is not part of the path
    assert listed["status"] == 200 and "job_id" not in listed
    assert [r["status"] for r in find("GET", "/v1/stats")] == [401]
    assert [r["status"] for r in find("POST", "/v1/webhooks") if r["status"] != 202] == [422]


@pytest.mark.parametrize(
    "secret",
    [
        pytest.param(HEADER_SECRET, id="header value"),
        pytest.param(QUERY_SECRET, id="url query"),
        pytest.param(PAYLOAD_MARKER, id="payload"),
        pytest.param(SUBJECT_MARKER, id="subject"),
        pytest.param(BODY_MARKER, id="body"),
        pytest.param(MAIL_HEADER_SECRET, id="mail header"),
        pytest.param(RECIPIENT, id="recipient"),
        pytest.param(SMTP_USER, id="smtp user"),
        pytest.param(SMTP_PASSWORD, id="smtp password"),
        pytest.param(USERINFO_SECRET, id="url userinfo"),
        pytest.param(API_KEY, id="api key"),
        pytest.param(WRONG_KEY, id="wrong key"),
    ],
)
def test_no_secret_or_content_reaches_the_logs(traffic: Traffic, secret: str, service_env) -> None:
    text = traffic.run.web_log.read_text() + traffic.run.worker_log.read_text()
    assert secret not in text
    assert service_env["DISPATCHER_WEBHOOK_SECRET"].removeprefix("whsec_") not in text


def test_an_exception_is_a_field_and_a_warning_a_line_of_json(tmp_path: Path) -> None:
    """What the web and worker processes set up (dispatcher.logs.configure), in a process of its own."""
    script = (
        "import logging, warnings\n"
        "from dispatcher import logs\n"
        "logs.configure('json')\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    logging.getLogger('dispatcher.web').exception('unhandled error')\n"
        "warnings.warn('deprecated thing')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    log = tmp_path / "out.log"
    log.write_text(result.stdout + result.stderr)
    failure, warning = records(log)
    assert failure["message"] == "unhandled error" and failure["level"] == "ERROR"
    assert failure["exc_info"].startswith("Traceback") and "ZeroDivisionError" in failure["exc_info"]
    assert warning["logger"] == "py.warnings" and "deprecated thing" in warning["message"]


# --- text, and `dispatcher dev` --------------------------------------------------------------------


def test_text_format_has_the_same_facts_for_people(service_env, receiver, tmp_path: Path) -> None:
    env = service_env | {"DISPATCHER_QUEUE": f"logs-{uuid.uuid4().hex[:10]}", "DISPATCHER_LOG_FORMAT": "text"}
    run = start(env, tmp_path)
    try:
        job_id = run.send("/v1/webhooks", {"url": receiver.url("ok"), "event_type": "a.b", "payload": {}})
        assert run.wait(job_id)["status"] == "succeeded"
        # A path with encoded line breaks may not forge a line of its own.
        forged = urllib.request.Request(
            f"http://127.0.0.1:{run.port}/v1/jobs/x%0D%0A2026-12-04%2000:00:00,000%20forged%E2%80%A8INFO", headers=AUTH
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(forged, timeout=10)
        assert refused.value.code == 404
    finally:
        run.stop()
    web, worker = run.web_log.read_text(), run.worker_log.read_text()
    assert [" dispatcher.request INFO request method=GET path=/v1/jobs/x\\x0d\\x0a2026" in line
            for line in web.splitlines() if "forged" in line] == [True], web
    for line in (web + worker).splitlines():
        with pytest.raises(ValueError):
            json.loads(line)
    host = f"127.0.0.1:{receiver.port}"
    attempt = rf" dispatcher\.attempt INFO attempt job_id={job_id} channel=webhook attempt=1 outcome=succeeded "
    attempt += rf"status_code=200 duration_ms=\d+ host={re.escape(host)} .*verdict=succeeded$"
    assert re.search(attempt, worker, re.M), worker
    request = r" dispatcher\.request INFO request method=POST path=/v1/webhooks status=202 duration_ms=[\d.]+ "
    assert re.search(request + rf"remote_addr=127\.0\.0\.1 job_id={job_id}$", web, re.M), web
    assert re.search(r" gunicorn\.error INFO Booting worker", web), web


def test_dispatcher_dev_writes_text(redis_url: str, tmp_path: Path) -> None:
    """Text, with the requests it serves as well as the attempts."""
    port = free_port()
    env = process_env({"PORT": str(port), "REDIS_URL": redis_url, "DISPATCHER_QUEUE": f"logs-{uuid.uuid4().hex[:10]}"})
    log = tmp_path / "dev.log"
    dev = start_dispatcher("dev", env, log, tmp_path)
    try:
        running = ("Press Ctrl+C to stop.", " rq.worker INFO ")
        wait_until(lambda: all(line in log.read_text() for line in running), 30, log.read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz?probe=1", timeout=10) as answer:
            assert answer.status == 200
        request_line = " dispatcher.request INFO request method=GET path=/healthz status=200 "
        wait_until(lambda: request_line in log.read_text(), 10, log.read_text())
    finally:
        dev.send_signal(signal.SIGTERM)
        dev.wait(timeout=60)
    assert '"logger"' not in log.read_text(), log.read_text()


@pytest.mark.parametrize(("value", "expected"), [(None, "json"), ("", "json"), ("json", "json"), ("TEXT", "text")])
def test_the_log_format_setting(value: str | None, expected: str) -> None:
    env = {} if value is None else {"DISPATCHER_LOG_FORMAT": value}
    assert Settings.from_env(env).log_format == expected


@pytest.mark.parametrize(
    ("command", "name"),
    [(("dispatcher.cli", "web"), "dispatcher web"), (("workers",), "dispatcher worker")],
)
def test_an_unknown_log_format_is_one_line_naming_the_variable(service_env, command, name) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=ROOT,
        env=process_env(service_env | {"DISPATCHER_LOG_FORMAT": "xml", "PORT": str(free_port())}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2, lines
    assert lines == [f"{name}: DISPATCHER_LOG_FORMAT must be json or text, got 'xml'"]


# --- a plain `rq worker` -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [(), ("-c", "workers.rqconfig", "--disable-job-desc-logging"), ("-w", "workers.worker.DispatcherWorker")],
    ids=["rq worker", "rq worker -c workers.rqconfig", "rq worker -w DispatcherWorker"],
)
def test_a_plain_rq_worker_logs_each_attempt_too(service, receiver, config, tmp_path: Path) -> None:
    """The job functions (workers.jobs) under RQ's own worker, and Dispatcher's worker under RQ's command
    line, which sets up RQ's loggers only; with Dispatcher's settings module for RQ (workers.rqconfig),
    RQ's lines are JSON too, and name no URL."""
    svc = service()
    url = receiver.url("ok") + f"?token={QUERY_SECRET}"
    job_id = svc.post("/v1/webhooks", {"url": url, "event_type": "a.b", "payload": {}})
    rq = str(Path(sys.executable).parent / "rq")
    command = [rq, "worker", "-u", svc.settings.redis_url, "-S", "rq.serializers.JSONSerializer", *config]
    log = tmp_path / "rq.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [*command, svc.settings.queue_name], cwd=ROOT, env=process_env(svc.env), stdout=out, stderr=out
        )
    # Not --burst: RQ's own worker can wait a minute on its command channel before it exits (see
    # DispatcherWorker.unsubscribe); the lines read here are written by then.
    try:
        wait_until(lambda: "dispatcher.attempt" in log.read_text(), 30, log.read_text())
    finally:
        worker.kill()
        worker.wait()
    lines = log.read_text().splitlines()
    ours = [json.loads(line) for line in lines if line.startswith("{")]
    [line] = [r for r in ours if r["logger"] == "dispatcher.attempt"]
    expected = (job_id, "webhook", 1, "succeeded", 200, f"127.0.0.1:{receiver.port}", "default")
    assert tuple(line[k] for k in ("job_id", "channel", "attempt", "outcome", "status_code", "host", "priority")) == (
        expected
    )
    if "-c" in config:
        assert len(ours) == len(lines) and {"rq.worker", "dispatcher.attempt"} <= {r["logger"] for r in ours}
        assert QUERY_SECRET not in log.read_text()
