"""RQ's worker contract, kept by Dispatcher's worker, which runs its own loop in place of RQ's `work()`.

`rq suspend` and `rq resume`, `--burst`, `--max-jobs` and `--max-idle-time` (from `python -m workers`,
`dispatcher worker` and `rq worker -w`), options it cannot honour refused, the worker's state and
counts as `rq info` and `Worker.all()` read them, and a dead worker's execution cleared from every list
RQ keeps of it once the reaper requeues its job.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from rq import Queue, Retry
from rq.serializers import JSONSerializer
from rq.suspension import resume, suspend
from rq.worker import SimpleWorker, Worker

from dispatcher import cli
from tests.conftest import AUTH, ROOT, process_env, wait_for, wait_until
from workers import main as worker_main
from workers.worker import IDLE_BLOCK, SUSPENSION_CHECK_INTERVAL, DispatcherWorker

BIN = Path(sys.executable).parent
#: Generous bounds for a worker process to start, do a little and exit, on a shared 2-core machine.
EXIT_BOUND = 60
STATE_BOUND = 30


@pytest.fixture
def rq_conn(redis_url: str) -> Iterator[redis.Redis]:
    """A connection of its own for RQ's Worker objects (they raise its socket timeout to 415 s)."""
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def suspension(rq_conn: redis.Redis) -> Iterator[redis.Redis]:
    """The suite's Redis, resumed afterwards whatever the test did (`rq suspend` acts on every worker)."""
    yield rq_conn
    resume(rq_conn)


def start_worker(svc, *args: str, command: tuple[str, ...] = (sys.executable, "-m", "workers")) -> subprocess.Popen:
    """A worker process with `args`, logged and stopped at the end like the service's own workers."""
    log = open(svc.log_dir / f"worker-{len(svc.workers)}.log", "wb")  # noqa: SIM115 - closed with the process
    # PYTHONFAULTHANDLER: a worker that does not exit in time is sent SIGABRT and logs where it was.
    env = process_env(svc.env | {"PYTHONFAULTHANDLER": "1"})
    process = subprocess.Popen([*command, *args], env=env, cwd=ROOT, stdout=log, stderr=log)
    log.close()
    svc.workers.append(process)
    return process


def exit_code(process: subprocess.Popen, svc) -> int:
    try:
        return process.wait(timeout=EXIT_BOUND)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        process.wait(timeout=10)
        pytest.fail(f"the worker did not exit within {EXIT_BOUND}s: {svc.logs()}")


def rq_worker(connection: redis.Redis, svc) -> Worker | None:
    """The service's one worker, as RQ reads it (`rq info`, rq-dashboard): Worker.all on its queue."""
    queue = Queue(svc.settings.queue_name, connection=connection, serializer=JSONSerializer)
    workers = Worker.all(queue=queue)
    assert len(workers) <= 1, workers
    return workers[0] if workers else None  # type: ignore[return-value]


def wait_for_state(connection: redis.Redis, svc, state: str) -> Worker:
    def there() -> bool:
        worker = rq_worker(connection, svc)
        return worker is not None and worker.get_state() == state

    wait_until(there, STATE_BOUND, f"the worker's state never became {state!r}: {svc.logs()}")
    worker = rq_worker(connection, svc)
    assert worker is not None
    return worker


def status(svc, job_id: str) -> str:
    return svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()["status"]


def webhook(svc, url: str, **extra) -> str:
    return svc.post("/v1/webhooks", {"url": url, "event_type": "a.b", "payload": {}, **extra})


# --- suspension ---------------------------------------------------------------------------------


def test_rq_suspend_stops_new_jobs_lets_those_in_flight_finish_and_rq_resume_goes_on(
    service, receiver, suspension, redis_url
):
    svc = service(DISPATCHER_WEBHOOK_TIMEOUT="15")
    start_worker(svc)
    wait_for_state(suspension, svc, "idle")
    slow = receiver.url("slow/2")
    in_flight = webhook(svc, slow)
    wait_until(lambda: receiver.received(slow), 15, "the delivery never reached the receiver")

    subprocess.run([BIN / "rq", "suspend", "-u", redis_url], check=True, capture_output=True, timeout=60)
    wait_for_state(suspension, svc, "suspended")
    later_url = receiver.url("ok")
    later = webhook(svc, later_url)

    assert wait_for(svc.client, in_flight)["status"] == "succeeded", svc.logs()
    assert len(receiver.received(slow)) == 1, "finished, not interrupted and sent again"
    time.sleep(2 * SUSPENSION_CHECK_INTERVAL + IDLE_BLOCK)  # a few of the worker's looks later
    assert status(svc, later) == "queued"
    assert receiver.received(later_url) == []
    assert rq_worker(suspension, svc).get_state() == "suspended"  # type: ignore[union-attr]
    assert svc.logs().count("suspended, run `rq resume` to resume") == 1

    subprocess.run([BIN / "rq", "resume", "-u", redis_url], check=True, capture_output=True, timeout=60)
    assert wait_for(svc.client, later)["status"] == "succeeded", svc.logs()
    assert len(receiver.received(later_url)) == 1
    wait_for_state(suspension, svc, "idle")


def test_a_burst_worker_exits_when_suspended_and_takes_no_job(service, receiver, suspension):
    svc = service()
    url = receiver.url("ok")
    job_id = webhook(svc, url)
    suspend(suspension)

    worker = start_worker(svc, "--burst")

    assert exit_code(worker, svc) == 0, svc.logs()
    assert "suspended in burst mode, exiting" in svc.logs()
    assert status(svc, job_id) == "queued"
    assert receiver.received(url) == []


# --- burst, max_jobs, max_idle_time -------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [(sys.executable, "-m", "workers"), (str(BIN / "dispatcher"), "worker")],
    ids=["python -m workers", "dispatcher worker"],
)
def test_burst_delivers_what_is_queued_then_exits(service, receiver, command):
    svc = service()
    urls = [receiver.url("ok") for _ in range(3)]
    ids = [webhook(svc, url) for url in urls]

    worker = start_worker(svc, "--burst", command=command)

    assert exit_code(worker, svc) == 0, svc.logs()
    assert [status(svc, job_id) for job_id in ids] == ["succeeded"] * 3, svc.logs()
    assert all(len(receiver.received(url)) == 1 for url in urls)
    assert "done, quitting" in svc.logs()


def test_max_jobs_takes_that_many_jobs_then_exits(service, receiver):
    svc = service()
    ids = [webhook(svc, receiver.url("ok")) for _ in range(3)]

    worker = start_worker(svc, "--max-jobs", "2")

    assert exit_code(worker, svc) == 0, svc.logs()
    assert sorted(status(svc, job_id) for job_id in ids) == ["queued", "succeeded", "succeeded"], svc.logs()
    assert "finished executing 2 jobs, quitting" in svc.logs()


def test_max_idle_time_exits_after_idling_that_long(service):
    svc = service()

    worker = start_worker(svc, "--max-idle-time", "1")

    assert exit_code(worker, svc) == 0, svc.logs()
    assert "idle for 1 seconds, quitting" in svc.logs()


@pytest.mark.parametrize(
    "option",
    [
        {"dequeue_strategy": "random"},
        {"dequeue_strategy": "round_robin"},
        {"max_jobs": 0},
        {"max_idle_time": 0},
        {"an_option_from_a_later_rq": True},
    ],
    ids=lambda option: next(iter(option)),
)
def test_work_refuses_an_option_it_cannot_honour(service, rq_conn, option):
    svc = service()
    queue = Queue(svc.settings.queue_name, connection=rq_conn, serializer=JSONSerializer)
    worker = DispatcherWorker([queue], connection=rq_conn, serializer=JSONSerializer, concurrency=1)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(ValueError, match=next(iter(option))) as refused:
            worker.work(burst=True, with_scheduler=False, **option)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert "\n" not in str(refused.value)
    assert Worker.count(queue=queue) == 0, "refused before it registered"


def test_the_constructor_refuses_exception_handlers_it_would_never_call(service, rq_conn):
    svc = service()
    queue = Queue(svc.settings.queue_name, connection=rq_conn, serializer=JSONSerializer)
    with pytest.raises(ValueError, match="exception_handlers"):
        DispatcherWorker([queue], connection=rq_conn, exception_handlers=[print])


@pytest.mark.parametrize("run", [worker_main.main, lambda argv: cli.main(["worker", *argv])], ids=["workers", "cli"])
def test_worker_help_describes_the_options(run, capsys):
    with pytest.raises(SystemExit) as exited:
        run(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for option in ("--burst", "--max-jobs", "--max-idle-time", "rq suspend", "rq resume"):
        assert option in text, text


def rq_worker_command(svc, redis_url: str, *options: str, queues: list[str] | None = None) -> list[str]:
    """`rq worker` with Dispatcher's worker class on the service's queue (or `queues`)."""
    return [
        str(BIN / "rq"),
        "worker",
        "-w",
        "workers.worker.DispatcherWorker",
        "-u",
        redis_url,
        "-S",
        "rq.serializers.JSONSerializer",
        *options,
        *(queues or [svc.settings.queue_name]),
    ]


def run_in(svc, command: list) -> subprocess.CompletedProcess:
    """Run `command` in the service's environment, from the project's root, within EXIT_BOUND."""
    return subprocess.run(
        command, env=process_env(svc.env), cwd=ROOT, capture_output=True, text=True, timeout=EXIT_BOUND
    )


def test_rq_worker_with_dispatchers_worker_class_honours_burst_and_max_jobs(service, receiver, redis_url):
    svc = service()
    ids = [webhook(svc, receiver.url("ok")) for _ in range(2)]

    done = run_in(svc, rq_worker_command(svc, redis_url, "--burst", "--max-jobs", "1"))

    assert done.returncode == 0, done.stderr
    assert sorted(status(svc, job_id) for job_id in ids) == ["queued", "succeeded"], done.stderr


def test_rq_worker_with_dispatchers_worker_class_refuses_a_dequeue_strategy(service, redis_url):
    svc = service()

    done = run_in(svc, rq_worker_command(svc, redis_url, "--burst", "--dequeue-strategy", "random"))

    assert done.returncode == 1
    assert "dequeue_strategy must be 'default'" in done.stderr, done.stderr


# --- state and counts ---------------------------------------------------------------------------


def test_the_worker_is_idle_with_nothing_in_flight_and_busy_while_delivering(service, receiver, rq_conn):
    svc = service(DISPATCHER_WEBHOOK_TIMEOUT="15")
    start_worker(svc)
    wait_for_state(rq_conn, svc, "idle")

    slow = receiver.url("slow/2")
    job_id = webhook(svc, slow)
    wait_until(lambda: receiver.received(slow), 15, "the delivery never reached the receiver")
    assert rq_worker(rq_conn, svc).get_state() == "busy"  # type: ignore[union-attr]

    assert wait_for(svc.client, job_id)["status"] == "succeeded"
    wait_for_state(rq_conn, svc, "idle")


def test_the_worker_counts_jobs_and_working_time_as_rq_reads_them(service, receiver, rq_conn):
    svc = service()
    start_worker(svc)
    delivered = webhook(svc, receiver.url("slow/0.2"))
    refused = webhook(svc, receiver.url("status/410"))  # 410 Gone: failed at once, no retry

    assert wait_for(svc.client, delivered)["status"] == "succeeded"
    assert wait_for(svc.client, refused)["status"] == "failed"

    worker = rq_worker(rq_conn, svc)
    assert worker is not None
    assert (worker.successful_job_count, worker.failed_job_count) == (1, 1)
    assert worker.total_working_time >= 0.2


def _json_loads_failing_twice_under_rqs_own_worker(connection: redis.Redis) -> int:
    """RQ's own SimpleWorker on a job that fails and is retried once, then fails for good: its failed count."""

    class QuietWorker(SimpleWorker):
        def subscribe(self) -> None:
            """No command channel (its thread would outlive the burst)."""

    queue = Queue(f"rq-parity-{uuid.uuid4().hex[:8]}", connection=connection)
    queue.enqueue("json.loads", "not json", retry=Retry(max=1))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    worker = QuietWorker([queue], connection=connection)
    try:
        worker.work(burst=True)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    worker.refresh()
    return worker.failed_job_count


def test_failed_job_count_counts_failed_attempts_retried_or_not_as_rqs_own_worker_does(service, receiver, rq_conn):
    """RQ 3.0's worker adds one to failed_job_count for every failed attempt, also one it retries
    (handle_job_failure and handle_job_retry both count it): Dispatcher's does the same."""
    assert _json_loads_failing_twice_under_rqs_own_worker(rq_conn) == 2

    svc = service()
    start_worker(svc)
    job_id = webhook(svc, receiver.url("status/500"), retry={"max_attempts": 2, "backoff": [1]})
    assert wait_for(svc.client, job_id)["status"] == "failed", svc.logs()

    worker = rq_worker(rq_conn, svc)
    assert worker is not None
    assert (worker.successful_job_count, worker.failed_job_count) == (0, 2)


# --- executions after the reaper ----------------------------------------------------------------

#: Run in a process of its own, so that RQ reads RQ_KEY_PREFIX as it does (once, at import): a worker
#: starts a job and dies (never beats); another worker's reaper requeues the job. Prints what RQ's
#: lists of executions hold before and after.
_DEAD_WORKER = """
import json, sys, uuid
import redis
from rq.executions import ExecutionRegistry
from rq.serializers import JSONSerializer
from dispatcher.config import Settings
from dispatcher.enqueue import enqueue, make_queue
from dispatcher.channels.webhook import WebhookRequest
from workers.recovery import Reaper
from workers.worker import DispatcherWorker

settings = Settings.from_env()
connection = redis.Redis.from_url(settings.redis_url)
queue = make_queue(connection, settings)
job_id = enqueue(connection, settings, "webhook", WebhookRequest(url=sys.argv[1], event_type="a.b", payload={}))
dead = DispatcherWorker([queue], connection=connection, serializer=JSONSerializer, concurrency=1)
(item,) = dead._start(1, 1, None)
execution = item.execution
registry = ExecutionRegistry(job_id, connection)

def lists():
    return {
        "job_executions": [m.decode() for m in connection.zrange(registry.key, 0, -1)],
        "worker_executions": sorted(m.decode() for m in connection.smembers(dead.executions_key)),
    }

before = lists()
requeued = Reaper(connection, [queue], "reaper-" + uuid.uuid4().hex, index_ttl=60).reap()
after = lists()
connection.delete(dead.key)
queued = [j.decode() for j in connection.lrange(queue.key, 0, -1)]
print(json.dumps({
    "before": before, "after": after, "requeued": requeued, "queued": queued, "job_id": job_id,
    "execution_id": execution.id, "composite": execution.composite_key,
    "keys": [registry.key, dead.executions_key],
}))
"""


@pytest.mark.parametrize("prefix", [None, "ctr"], ids=["rq prefix", "RQ_KEY_PREFIX=ctr"])
def test_the_reaper_clears_a_dead_workers_execution_from_rqs_lists(service, receiver, prefix):
    svc = service(**({"RQ_KEY_PREFIX": prefix} if prefix else {}))
    done = run_in(svc, [sys.executable, "-c", _DEAD_WORKER, receiver.url("ok")])
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert all(key.startswith(f"{prefix or 'rq'}:") for key in seen["keys"]), seen["keys"]
    assert seen["before"] == {"job_executions": [seen["execution_id"]], "worker_executions": [seen["composite"]]}

    assert (seen["requeued"], seen["queued"]) == (1, [seen["job_id"]])
    assert seen["after"] == {"job_executions": [], "worker_executions": []}
