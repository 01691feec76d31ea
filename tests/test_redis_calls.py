"""Redis commands per delivered job, end to end: accepted by the API, popped, started, attempted and
recorded by one worker process, until the job is `succeeded`.

Commands per job decide how many deliveries one Redis can serve, so this test keeps them from
creeping up. It runs a Redis server of its own, so `INFO commandstats` counts this test's commands
alone, including those run inside Lua scripts (the benchmark, bench/scenarios.py, counts the same
way).

Background activity is measured and subtracted: the worker's heartbeat (5 s), its reaper (3 s), RQ's
scheduler (1 s), the suspension check (1 s) and the idle dequeue (1 s) cost commands whether or not
jobs flow. After the busy windows the worker is left idle for as long as they lasted together (at
least IDLE_MIN_SECONDS, so the rate is not one reaper pass more or less), and each window is charged
only what exceeds that idle rate over its own duration. The test's own commands (INFO, polling) are
counted as it sends them and taken off too.

`pytest -s` prints the per-job table, by command name.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from rq import Worker

from dispatcher.embedded import start_embedded_redis
from dispatcher.enqueue import make_queue
from dispatcher.keys import Keys, Kind
from tests.conftest import AUTH, Receiver, Service, SmtpServer, free_port, wait_until

#: Most Redis commands one delivered job may cost, for each kind, accepted as below (3/4 in batches
#: of 50, 1/4 one request each). Measured with this test on 2026-12-04 (2 cores, Valkey 9.1.2):
#: 37.6 per webhook and 37.7 per email at first; 32.8 and 33.0 once a finished job's status, end
#: time and meta went in one write, the worker's counts in one per batch, and the begin script lost
#: its TYPE and HINCRBY; 34.6 and 34.7 with three priority queues (a pop looks at each; idle workers
#: wake on a token list); 27.3 and 27.8 once a pop moved many jobs in three commands and a batch's
#: executions and registries took one command per shared key; 26.7 and 26.7 without a PERSIST per
#: job; the suppression list costs an email one HMGET per message (and the delivery threads' new
#: connections a HELLO each), and each success joins the recent successes (an LPUSH, an LTRIM per
#: ten): 26.4-28.2 per webhook and 28.1-29.2 per email in most runs on a busy machine (the
#: one-request windows are the noisy ones: 33-54 per job). Whole commands per job move it by 1.0,
#: so anything above is a regression, not noise. Issue #12 added no command to a plain webhook or
#: email (the per-command rows stayed), yet an email measured 29.8-31.5 during whole-suite runs on
#: 2 loaded cores: a loaded worker pops fewer jobs per call, so the pop's commands are shared by
#: fewer jobs, and the idle rate subtracted moves with the load. The bound allows that spread; run
#: this test alone (28-30 per job) to judge a change.
BOUND = 33
#: The project's target: 20 commands or fewer per job. BOUND is to come down to it.
TARGET = 20

#: Jobs per kind: BATCHES requests of BATCH_SIZE jobs, then SINGLES requests of one job each.
BATCHES = 3
BATCH_SIZE = 50
SINGLES = 50
#: Jobs of each kind run before measuring: scripts loaded, SMTP and HTTP connections open.
WARMUP = 4
#: Shortest idle period measured: two reaper passes, a heartbeat, six scheduler and suspension checks.
IDLE_MIN_SECONDS = 6.0
#: How long a window may wait for all its jobs to succeed.
SETTLE_TIMEOUT = 60.0


@dataclass
class Snapshot:
    at: float  # monotonic
    server: Counter[str]  # calls per command since the server started
    own: Counter[str]  # this test's own commands sent before the snapshot


@dataclass
class Window:
    """One busy period: its jobs, how long it lasted, its commands (less the test's own)."""

    kind: Kind
    name: str
    jobs: int
    seconds: float
    commands: Counter[str]


def minus(a: Counter[str], b: Counter[str]) -> Counter[str]:
    """a - b per key, negatives kept (Counter's `-` drops them)."""
    result = Counter(a)
    result.subtract(b)
    return result


class Meter:
    """Reads INFO commandstats and keeps count of the commands this test sends itself."""

    def __init__(self, connection: redis.Redis) -> None:
        self.connection = connection
        self.own: Counter[str] = Counter()

    def snapshot(self) -> Snapshot:
        own = Counter(self.own)  # an INFO does not count itself: it shows in the next snapshot
        stats = self.connection.info("commandstats")
        self.own["info"] += 1
        server = Counter({name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()})
        return Snapshot(time.monotonic(), server, own)

    @staticmethod
    def between(before: Snapshot, after: Snapshot) -> Counter[str]:
        return minus(minus(after.server, before.server), minus(after.own, before.own))


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis server for this test alone: its INFO commandstats are this test's commands only."""
    server = start_embedded_redis(tmp_path / "redis", ports=[free_port()])
    try:
        yield server.connection_url
    finally:
        server.stop()


def webhook(url: str, n: int) -> dict:
    return {"url": url, "event_type": "calls.counted", "payload": {"n": n, "note": "x" * 200}}


def email(address: str, n: int) -> dict:
    return {"to": [address], "subject": f"counted {n}", "text": "Redis calls per job. " * 10}


def test_redis_commands_per_delivered_job(
    private_redis: str, service: Callable[..., Service], receiver: Receiver, smtp_server: SmtpServer
) -> None:
    svc = service(REDIS_URL=private_redis)
    svc.start_worker()
    hook_url, address = receiver.url("ok"), f"calls-{uuid.uuid4().hex[:8]}@example.com"
    make: dict[Kind, Callable[[int], dict]] = {
        "webhook": lambda n: webhook(hook_url, n),
        "email": lambda n: email(address, n),
    }
    with redis.Redis.from_url(private_redis) as connection:
        queue = make_queue(connection, svc.settings)
        totals = Keys(svc.settings.queue_name).totals
        wait_until(lambda: Worker.all(queue=queue), 20, f"the worker never registered:\n{svc.logs()}")
        (worker,) = Worker.all(queue=queue)
        meter = Meter(connection)
        sent: Counter[str] = Counter()

        def settled(kind: Kind) -> bool:
            """Every job of `kind` sent so far counted as succeeded, and none left in the worker's
            executions set: the SREM from it is the last command of a job's record."""
            with connection.pipeline(transaction=False) as pipe:
                pipe.hget(totals, f"{kind}:succeeded")
                pipe.scard(worker.executions_key)
                done, in_hand = pipe.execute()
            meter.own.update(("hget", "scard"))
            return int(done or 0) >= sent[kind] and in_hand == 0

        def send(kind: Kind, items: list[dict], batch_size: int | None) -> list[str]:
            """POST the items (in batches, or one request each) and wait until all have succeeded."""
            if batch_size is None:
                ids = [svc.post(f"/v1/{kind}s", item) for item in items]
            else:
                ids = []
                for start in range(0, len(items), batch_size):
                    body = {"items": items[start : start + batch_size]}
                    response = svc.client.post(f"/v1/{kind}s/batch", json=body, headers=AUTH)
                    assert response.status_code == 202, response.get_json()
                    ids += [item["id"] for item in response.get_json()["items"]]
            sent[kind] += len(ids)
            wait_until(lambda: settled(kind), SETTLE_TIMEOUT, f"{kind}s did not all succeed:\n{svc.logs()}")
            return ids

        for kind, item in make.items():
            send(kind, [item(n) for n in range(WARMUP)], 2)
            send(kind, [item(n) for n in range(WARMUP)], None)

        windows: list[Window] = []
        last_ids: list[str] = []
        for kind, item in make.items():
            for name, count, batch_size in (("batches", BATCHES * BATCH_SIZE, BATCH_SIZE), ("single", SINGLES, None)):
                before = meter.snapshot()
                last_ids.append(send(kind, [item(n) for n in range(count)], batch_size)[-1])
                after = meter.snapshot()
                windows.append(Window(kind, name, count, after.at - before.at, Meter.between(before, after)))

        before = meter.snapshot()
        time.sleep(max(IDLE_MIN_SECONDS, sum(w.seconds for w in windows)))
        after = meter.snapshot()
        idle_rate = {name: calls / (after.at - before.at) for name, calls in Meter.between(before, after).items()}

    per_job = per_job_columns(windows, idle_rate)
    print_table(per_job, idle_rate, windows)

    for job_id in last_ids:
        view = svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()
        assert view["status"] == "succeeded", view
    each = 2 * WARMUP + BATCHES * BATCH_SIZE + SINGLES
    assert len(receiver.received(hook_url)) == each
    assert len(smtp_server.handler.messages_to(address)) == each
    for kind in make:
        total = sum(per_job[f"{kind} all"].values())
        assert total <= BOUND, (
            f"one {kind} costs {total:.1f} Redis commands, more than {BOUND} (target {TARGET}): "
            "see the table pytest -s prints"
        )


def per_job_columns(windows: list[Window], idle_rate: dict[str, float]) -> dict[str, dict[str, float]]:
    """Column name -> command -> calls per job, less the idle rate over the column's time: one column per
    window, and one per kind for all its windows together."""
    columns: dict[str, list[Window]] = {}
    for window in windows:
        columns[f"{window.kind} {window.name}"] = [window]
        columns.setdefault(f"{window.kind} all", []).append(window)
    per_job = {}
    for column, group in columns.items():
        jobs = sum(w.jobs for w in group)
        seconds = sum(w.seconds for w in group)
        commands: Counter[str] = Counter()
        for window in group:
            commands.update(window.commands)
        names = set(commands) | set(idle_rate)
        per_job[column] = {name: (commands[name] - idle_rate.get(name, 0) * seconds) / jobs for name in names}
    return dict(sorted(per_job.items(), key=lambda item: (item[0].split()[0] == "email", item[0].endswith("all"))))


def print_table(per_job: dict[str, dict[str, float]], idle_rate: dict[str, float], windows: list[Window]) -> None:
    columns = list(per_job)
    names = sorted(
        {name for column in per_job.values() for name in column}, key=lambda n: -sum(c[n] for c in per_job.values())
    )
    names = [n for n in names if max(*(abs(c[n]) for c in per_job.values()), idle_rate.get(n, 0)) >= 0.005]
    width = max(len(n) for n in [*names, "command"]) + 2
    lines = [
        f"\nRedis commands per delivered job, idle rate subtracted (bound {BOUND}, target {TARGET})",
        "command".ljust(width) + "".join(c.rjust(16) for c in columns) + "idle/s".rjust(10),
    ]
    for name in names:
        cells = "".join(f"{round(per_job[c][name], 2) or 0.0:16.2f}" for c in columns)  # no "-0.00"
        lines.append(name.ljust(width) + cells + f"{idle_rate.get(name, 0):10.2f}")
    cells = "".join(f"{sum(per_job[c].values()):16.2f}" for c in columns)
    lines.append("TOTAL".ljust(width) + cells + f"{sum(idle_rate.values()):10.2f}")
    lines.append("windows: " + ", ".join(f"{w.kind} {w.name}: {w.jobs} jobs in {w.seconds:.2f} s" for w in windows))
    print("\n".join(lines))
