"""The `dispatcher` command as a user runs it: a real process per command, against the app over HTTP,
real Redis, real workers and a real receiver and SMTP server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dispatcher import cli
from tests.conftest import AUTH, ROOT, free_port, process_env, wait_until

BIN = Path(sys.executable).parent
DISPATCHER = str(BIN / "dispatcher")
#: Seconds any one command may take here (most take well under one).
BOUND = 60
COMMANDS = {
    "dev",
    "web",
    "worker",
    "send-email",
    "send-webhook",
    "status",
    "jobs",
    "retry",
    "cancel",
    "replay",
    "recover",
    "stats",
    "suppressions",
    "rq-info",
}


def run(env: dict[str, str], *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([DISPATCHER, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=BOUND)


@pytest.fixture
def svc_env(service, serve):
    """A service on its own queues, its API over HTTP, and the environment the commands get."""

    def make(**overrides: str):
        svc = service(**overrides)
        env = process_env(svc.env | {"DISPATCHER_URL": serve(svc.settings)})
        return svc, env

    return make


def webhook(env: dict[str, str], url: str, *options: str) -> str:
    done = run(env, "send-webhook", url, "--event-type", "order.created", *options)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def stats(env: dict[str, str]) -> dict:
    done = run(env, "stats", "--json")
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


def api_stats(svc) -> dict:
    """What `dispatcher stats --json` shows, read through the API in this process (the same reader):
    for waiting, where a command started every poll would keep a core busy."""
    ready = svc.client.get("/readyz").get_json()
    return {"stats": svc.client.get("/v1/stats", headers=AUTH).get_json(), "readiness": ready}


# --- help ------------------------------------------------------------------------------------


def test_every_command_is_there_and_explains_itself(capsys):
    assert set(cli.cli.commands) == COMMANDS
    for name, command in cli.cli.commands.items():
        with pytest.raises(SystemExit) as exited:
            cli.main([name, "--help"])
        assert exited.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"Usage: dispatcher {name}"), text
        summary = (command.help or "").split("\n")[0]
        assert len(summary) > 30 and summary[:30] in " ".join(text.split()), (name, text)
        for param in command.params:
            assert all(opt in text for opt in param.opts if opt.startswith("--")), (name, param.opts, text)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    overview = capsys.readouterr().out
    assert all(name in overview for name in COMMANDS)


# --- sending and following -------------------------------------------------------------------


def test_send_webhook_then_status_watch_shows_each_attempt_live(svc_env, receiver):
    # A backoff of 3 s: the watch, polling, must see the job scheduled between its attempts even on
    # a loaded machine (with 1 s it missed it now and then).
    svc, env = svc_env(DISPATCHER_WEBHOOK_MAX_ATTEMPTS="2", DISPATCHER_WEBHOOK_BACKOFF="3")
    svc.start_worker()
    url = receiver.url("fail/1/503")

    job_id = webhook(env, url, "--payload", '{"order": 7}', "--header", "X-Trace: t-1", "--priority", "high")
    watched = run(env, "status", job_id, "--watch")

    assert watched.returncode == 0, watched.stdout + watched.stderr
    lines = watched.stdout.splitlines()
    assert lines[0] == f"{job_id}  webhook  " + lines[0].split("  ")[2] + "  (priority high)", lines
    (first,) = [line for line in lines if line.startswith("  attempt 1 ")]
    (second,) = [line for line in lines if line.startswith("  attempt 2 ")]
    assert "  retryable  503  " in first and "  succeeded  200  " in second, lines
    assert any(line.startswith("  scheduled: next attempt at ") for line in lines), lines
    assert lines.index(first) < lines.index(second) and lines[-1] == "  succeeded", lines
    (_, delivered) = receiver.received(url)
    assert json.loads(delivered.body)["data"] == {"order": 7}
    assert delivered.headers["x-trace"] == "t-1"


def test_status_watch_of_a_failing_job_ends_with_its_error_and_exit_1(svc_env, receiver):
    svc, env = svc_env(DISPATCHER_WEBHOOK_MAX_ATTEMPTS="1")
    svc.start_worker()

    job_id = webhook(env, receiver.url("status/410"))
    watched = run(env, "status", job_id, "--watch")

    assert watched.returncode == 1, watched.stdout + watched.stderr
    assert "  permanent  410  " in watched.stdout
    assert watched.stdout.splitlines()[-1].startswith("  failed: "), watched.stdout


def test_send_email_waits_for_delivery(svc_env, smtp_server):
    svc, env = svc_env()
    svc.start_worker()

    command = ["send-email", "--to", "cli-ada@example.com", "--cc", "cli-bob@example.com", "--subject", "Your order"]
    command += ["--text", "-", "--from", "Shop <shop@example.com>", "--metadata", "order=7", "--wait"]
    done = subprocess.run(
        [DISPATCHER, *command], env=env, cwd=ROOT, input="Thanks from stdin", capture_output=True, text=True,
        timeout=BOUND,
    )

    assert done.returncode == 0, done.stderr
    job_id, attempt, final = done.stdout.splitlines()
    assert job_id.startswith("em_") and "  succeeded  250  " in attempt and final == "succeeded"
    (message,) = smtp_server.handler.messages_to("cli-ada@example.com")
    assert b"Subject: Your order" in message.content and b"Thanks from stdin" in message.content
    shown = json.loads(run(env, "status", job_id, "--json").stdout)
    assert shown["metadata"] == {"order": "7"} and shown["target"]["cc"] == ["cli-bob@example.com"]


def test_retry_delivers_a_failed_job_again_in_the_same_history(svc_env, receiver):
    svc, env = svc_env(DISPATCHER_WEBHOOK_MAX_ATTEMPTS="1")
    svc.start_worker()
    url = receiver.url("fail/1/500")
    job_id = webhook(env, url)
    assert run(env, "status", job_id, "--watch").returncode == 1

    retried = run(env, "retry", job_id)

    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == f"{job_id} requeued on {svc.settings.queue_name}"
    assert run(env, "status", job_id, "--watch").returncode == 0
    assert [r.headers["webhook-id"] for r in receiver.received(url)] == [job_id, job_id]
    shown = json.loads(run(env, "status", job_id, "--json").stdout)
    assert [a["outcome"] for a in shown["attempts"]] == ["retryable", "succeeded"]
    again = run(env, "retry", job_id)
    assert again.returncode == 1
    assert again.stderr.splitlines() == [
        f"dispatcher retry: job {job_id} is succeeded; only a failed job can be retried"
    ]


def test_cancel_then_replay_act_as_the_api_does(svc_env, receiver):
    svc, env = svc_env(DISPATCHER_WEBHOOK_MAX_ATTEMPTS="1")
    canceled = webhook(env, receiver.url("ok"))  # no worker yet: it waits in its queue

    done = run(env, "cancel", canceled)
    again = run(env, "cancel", canceled)

    assert (done.returncode, done.stdout) == (0, f"{canceled} canceled\n"), done.stderr
    assert again.returncode == 1
    assert again.stderr.splitlines() == [
        f"dispatcher cancel: job {canceled} is canceled; only a queued or scheduled job can be canceled"
    ]
    assert run(env, "cancel", "wh_nope").stderr.startswith("dispatcher cancel: no job wh_nope in ")
    svc.start_worker()
    url = receiver.url("fail/1/500")
    failed = webhook(env, url)
    assert run(env, "status", failed, "--watch").returncode == 1

    replayed = run(env, "replay", "--kind", "webhook", "--since", "2000-01-01T00:00:00Z", "--limit", "5")

    assert (replayed.returncode, replayed.stdout, replayed.stderr) == (0, f"{failed}\n", "1 requeued\n")
    assert run(env, "status", failed, "--watch").returncode == 0
    assert [r.headers["webhook-id"] for r in receiver.received(url)] == [failed, failed]
    assert run(env, "status", canceled, "--json").stdout.count('"status": "canceled"') == 1
    bad = run(env, "replay", "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr and "RFC 3339" in bad.stderr, bad.stderr


def test_jobs_lists_newest_first_filtered_by_kind_and_status(svc_env, receiver):
    svc, env = svc_env(DISPATCHER_WEBHOOK_MAX_ATTEMPTS="1")
    svc.start_worker()
    ok = webhook(env, receiver.url("ok"))
    bad = webhook(env, receiver.url("status/410"))
    mail = run(env, "send-email", "--to", "cli-list@example.com", "--subject", "s", "--text", "t", "--wait")
    mail_id = mail.stdout.split()[0]
    wait_until(lambda: api_stats(svc)["stats"]["webhook"]["failed"] == 1, 30, "the 410 did not fail")

    listed = run(env, "jobs")
    failed = json.loads(run(env, "jobs", "--status", "failed", "--json").stdout)["jobs"]
    emails = run(env, "jobs", "--kind", "email")

    assert [line.split()[0] for line in listed.stdout.splitlines()] == [mail_id, bad, ok]
    assert [job["id"] for job in failed] == [bad]
    assert [line.split()[:3] for line in emails.stdout.splitlines()] == [[mail_id, "email", "succeeded"]]


def test_send_with_an_idempotency_key_twice_prints_one_job_id(svc_env):
    _, env = svc_env()
    key = ("--idempotency-key", f"order-{os.getpid()}-{time.time_ns()}")
    mail = ("send-email", "--to", "cli-once@example.com", "--subject", "Once", "--text", "t", *key)

    first, again = run(env, *mail), run(env, *mail)
    other = run(env, *mail[:-4], "--text", "other", *key)

    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert first.stdout == again.stdout and first.stdout.startswith("em_")
    assert other.returncode == 1 and "409" in other.stderr
    assert stats(env)["stats"]["email"]["queued"] == 1


def test_send_at_schedules_the_webhook(svc_env, receiver):
    svc, env = svc_env()
    when = (datetime.now(UTC) + timedelta(hours=1)).isoformat(timespec="seconds")

    job_id = webhook(env, receiver.url("ok"), "--send-at", when)

    view = svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()
    assert view["status"] == "scheduled"
    assert datetime.fromisoformat(view["next_attempt_at"].replace("Z", "+00:00")) == datetime.fromisoformat(when)


# --- operations ------------------------------------------------------------------------------


def test_stats_reports_live_workers_per_queue_and_warns_when_jobs_wait_for_none(svc_env, receiver):
    svc, env = svc_env()
    webhook(env, receiver.url("ok"), "--priority", "low")

    waiting = run(env, "stats")

    assert waiting.returncode == 1
    assert waiting.stderr.splitlines() == [
        f"warning: 1 job(s) wait in {svc.settings.queue_name}-low and no worker serving it is alive"
    ]
    rows = {line.split()[0]: line.split()[1:] for line in waiting.stdout.splitlines() if line.strip()}
    assert rows["low"] == [f"{svc.settings.queue_name}-low", "1", "0"]
    assert rows["webhook"] == ["1", "0", "0", "0", "0"]

    svc.start_worker()
    wait_until(lambda: api_stats(svc)["stats"]["webhook"]["succeeded"] == 1, 30, "not delivered")
    served = run(env, "stats")
    assert served.returncode == 0 and served.stderr == ""
    rows = {line.split()[0]: line.split()[1:] for line in served.stdout.splitlines() if line.strip()}
    assert [rows[p][-1] for p in ("high", "default", "low")] == ["1", "1", "1"]


def test_rq_info_reads_the_redis_dispatcher_dev_wrote_down(svc_env, tmp_path):
    """No REDIS_URL set: the commands read the one in var/redis-url (as `dispatcher dev` leaves it), say
    so, and show every Dispatcher queue, even those that never had a job."""
    svc, env = svc_env()
    worker = svc.start_worker()
    wait_until(lambda: api_stats(svc)["readiness"]["queues"]["low"]["workers"] == 1, 30, "no worker")
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "redis-url").write_text(svc.settings.redis_url + "\n")
    bare = {k: v for k, v in env.items() if k != "REDIS_URL"}

    info = run(bare, "rq-info", cwd=tmp_path)

    assert info.returncode == 0, info.stderr
    source = "(from var/redis-url, written by dispatcher dev)"
    assert info.stderr.splitlines() == [f"Redis {svc.settings.redis_url} {source}"]
    queue = svc.settings.queue_name
    shown = {line.split()[0] for line in info.stdout.splitlines() if "|" in line}
    assert {queue, f"{queue}-high", f"{queue}-low"} <= shown, info.stdout
    worker.kill()
    worker.wait()


@pytest.mark.parametrize(
    ("args", "env_change", "code", "line"),
    [
        (["status", "wh_nope"], {}, 1, "dispatcher status: no job wh_nope in "),
        (["stats"], {"REDIS_URL": "redis://127.0.0.1:{closed}/0"}, 1,
         "dispatcher stats: cannot reach Redis at redis://127.0.0.1:{closed}/0 (from REDIS_URL): "),
        (["jobs"], {"REDIS_URL": "http://x"}, 2, "dispatcher jobs: REDIS_URL"),
        (["rq-info"], {"REDIS_URL": "redis://:pa55word@127.0.0.1:{closed}/0"}, 1,
         "dispatcher rq-info: cannot reach Redis at redis://:***@127.0.0.1:{closed}/0"),
        (["send-webhook", "ftp://example.com/x", "--event-type", "a.b"], {}, 1,
         "dispatcher send-webhook: refused: url: "),
        (["send-webhook", "http://127.0.0.1:1/x", "--event-type", "a.b", "--payload", "[1]"], {}, 2,
         "dispatcher send-webhook: Invalid value for '--payload': must be a JSON object"),
        (["send-webhook", "http://127.0.0.1:1/x"], {}, 2, "dispatcher send-webhook: Missing option '--event-type'"),
        (["send-email", "--to", "a@example.com", "--subject", "s", "--text", "t"],
         {"DISPATCHER_URL": "http://127.0.0.1:{closed}"}, 1,
         "dispatcher send-email: cannot reach http://127.0.0.1:{closed}/v1/emails: [Errno 111] Connection refused"),
        (["send-email", "--to", "a@example.com", "--subject", "s"], {"DISPATCHER_API_KEY": "wrong"}, 1,
         "dispatcher send-email: the API answered 401: "),
        (["jobs", "--status", "lost"], {}, 2, "dispatcher jobs: Invalid value for '--status'"),
        (["worker", "--processes", "0"], {}, 2, "dispatcher worker: Invalid value for '--processes'"),
        (["worker"], {"DISPATCHER_WEBHOOK_SECRET": ""}, 2, "dispatcher worker: DISPATCHER_WEBHOOK_SECRET"),
        (["launch"], {}, 2, "dispatcher: No such command 'launch'"),
    ],
    ids=lambda value: value[0] if isinstance(value, list) else None,
)
def test_a_failure_is_one_line_and_a_non_zero_exit(svc_env, args, env_change, code, line):
    _, env = svc_env()
    closed = str(free_port())
    env = env | {name: value.replace("{closed}", closed) for name, value in env_change.items()}

    done = run(env, *args)

    assert done.returncode == code, done.stdout + done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.startswith(line.replace("{closed}", closed)), done.stderr
    assert "pa55word" not in done.stderr


# --- worker --processes ----------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(child) for child in found]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_worker_processes_runs_that_many_and_stops_them_together(svc_env, receiver):
    svc, env = svc_env()
    log = open(svc.log_dir / "workers-2.log", "wb")  # noqa: SIM115 - closed below
    parent = subprocess.Popen([DISPATCHER, "worker", "--processes", "2"], env=env, cwd=ROOT, stdout=log, stderr=log)
    try:
        wait_until(
            lambda: api_stats(svc)["readiness"]["queues"]["default"]["workers"] == 2, 30, "two workers did not start"
        )
        children = _children(parent.pid)
        assert len(children) == 2
        urls = [receiver.url("ok") for _ in range(10)]
        ids = [webhook(env, url) for url in urls]
        wait_until(lambda: api_stats(svc)["stats"]["webhook"]["succeeded"] == len(ids), 30, "not all delivered")

        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=BOUND) == 0
        wait_until(lambda: all(_gone(child) for child in children), 10, "a worker outlived its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
        log.close()
    assert all(len(receiver.received(url)) == 1 for url in urls)


def test_worker_processes_in_burst_mode_exit_when_the_queue_is_empty(svc_env, receiver):
    _, env = svc_env()
    urls = [receiver.url("ok") for _ in range(6)]
    for url in urls:
        webhook(env, url)
    started = time.monotonic()

    done = run(env, "worker", "--processes", "2", "--burst")

    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started < BOUND
    assert all(len(receiver.received(url)) == 1 for url in urls)
    assert stats(env)["stats"]["webhook"]["succeeded"] == len(urls)
