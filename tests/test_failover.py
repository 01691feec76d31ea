"""Failover with real servers: the master of a sentinel-watched cluster is SIGKILLed under load."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
import requests
from redis.sentinel import Sentinel

from tests.conftest import AUTH, ROOT, Receiver, free_port, listening, process_env, start_dispatcher, wait_until
from tests.ha import Cluster, start_cluster

# A cluster of six servers and a failover: one at a time, on one test process; tens of seconds each.
pytestmark = [pytest.mark.xdist_group("failover"), pytest.mark.long]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with start_cluster(tmp_path / "cluster") as running:
        yield running


def test_the_cluster_fails_over(cluster: Cluster) -> None:
    sentinel = Sentinel(cluster.sentinel_addresses, socket_timeout=2)
    old = cluster.master_address()
    master = sentinel.master_for(cluster.name, socket_timeout=2, decode_responses=True)
    master.set("acknowledged", "by a replica")
    assert master.execute_command("WAIT", 1, 1000) >= 1

    killed_at = cluster.kill_master()
    took = cluster.wait_for_new_master(since=killed_at)
    print(f"\nnew master after {took:.2f}s")

    new = cluster.master_address()
    assert new != old
    assert sentinel.discover_master(cluster.name) == new
    # The same client object: its next connection asks the sentinels again.
    deadline = time.monotonic() + 10
    while True:
        try:
            assert master.get("acknowledged") == "by a replica"
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert master.info("replication")["role"] == "master"


# --- Dispatcher under load ------------------------------------------------------------------

#: Webhooks POSTed per second, each with an Idempotency-Key of its own.
RATE = 50
#: Seconds of load before the master is killed, and after.
BEFORE_KILL, AFTER_KILL = 1.5, 5.0
#: Seconds a stopped load waits for the accepted jobs to be delivered (or shown lost).
DRAIN_TIMEOUT = 40.0
#: How long the replicas lag behind in the "lagging" fault: frozen and cut off from the master for this
#: long before it is killed. A write the master acknowledges in this time reached no replica.
LAG = 0.5


@dataclass
class Answer:
    seq: int
    sent_at: float  # time.monotonic()
    answered_at: float
    status: int | None  # None: no answer (connection refused or reset, timeout)
    job_id: str | None = None
    error: str = ""


class Load:
    """POSTs one webhook to `target` every 1/RATE s from a pool of threads, and records every answer."""

    def __init__(self, base_url: str, target: str) -> None:
        self.base_url, self.target = base_url, target
        self.run_id = uuid.uuid4().hex[:8]
        self.answers: list[Answer] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=32)
        self.sessions = threading.local()
        self.ticker = threading.Thread(target=self._tick, daemon=True)

    def __enter__(self) -> Load:
        self.ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.ticker.join()
        self.pool.shutdown(wait=True)

    def _tick(self) -> None:
        start = time.monotonic()
        for seq in itertools.count():
            delay = start + seq / RATE - time.monotonic()
            if self.stopping.wait(max(delay, 0)):
                return
            self.pool.submit(self._post, seq)

    def _post(self, seq: int) -> None:
        session = getattr(self.sessions, "session", None) or requests.Session()
        self.sessions.session = session
        body = {"url": self.target, "event_type": "failover.probe", "payload": {"seq": seq}}
        headers = AUTH | {"Idempotency-Key": f"failover-{self.run_id}-{seq}"}
        sent_at = time.monotonic()
        try:
            response = session.post(f"{self.base_url}/v1/webhooks", json=body, headers=headers, timeout=10)
        except requests.RequestException as exc:
            answer = Answer(seq, sent_at, time.monotonic(), None, error=type(exc).__name__)
        else:
            job_id = response.json().get("id") if response.status_code == 202 else None
            answer = Answer(seq, sent_at, time.monotonic(), response.status_code, job_id, response.text[:200])
        with self.lock:
            self.answers.append(answer)


@dataclass
class Dispatcher:
    """`dispatcher web` and two worker processes, all on the cluster through its sentinels."""

    base_url: str
    processes: list[subprocess.Popen]
    logs: list[Path]

    def log_text(self) -> str:
        return "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}" for log in self.logs)


@contextlib.contextmanager
def run_dispatcher(env: dict[str, str], home: Path) -> Iterator[Dispatcher]:
    (home / "run").mkdir(parents=True)
    port = free_port()
    env = process_env(env | {"PORT": str(port), "HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run")})
    logs = [home / "web.log", home / "worker-0.log", home / "worker-1.log"]
    processes = [start_dispatcher("web", env, logs[0], home)]
    try:
        for log in logs[1:]:
            with open(log, "wb") as out:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "workers"],
                        env=env,
                        cwd=ROOT,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        service = Dispatcher(f"http://127.0.0.1:{port}", processes, logs)
        wait_until(lambda: listening(port) or processes[0].poll() is not None, 30, "dispatcher web did not start")
        assert processes[0].poll() is None, service.log_text()
        yield service
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def lagging_replicas_then_kill(cluster: Cluster) -> float:
    """The replicas fall LAG seconds behind (frozen, their links to the master cut, as a network partition
    would), and the master dies in that time: what it acknowledged meanwhile exists nowhere else."""
    master = cluster.master()
    replicas = [node for port, node in cluster.servers.items() if port != master.port and node.alive()]
    for node in replicas:
        node.process.send_signal(signal.SIGSTOP)
    try:
        with master.client() as client:
            client.client_kill_filter(_type="replica")
        time.sleep(LAG)
        return cluster.kill_master()
    finally:
        for node in replicas:
            node.process.send_signal(signal.SIGCONT)


#: What happens to the master, each returning its time.monotonic(): it dies; it dies with replicas
#: lagging behind; the sentinels move it while it stays up (as an operator's failover does, and a
#: spurious one after a stall or a partition).
FAULTS = {"kill": Cluster.kill_master, "lagging": lagging_replicas_then_kill, "switch": Cluster.switch_master}


@dataclass
class Outcome:
    """What one run under load measured; times in seconds from the kill."""

    answers: list[Answer]
    killed_at: float
    deliveries: Counter[str]  # webhook-id -> deliveries
    delivered_seqs: set[int]
    statuses: dict[str, str | None]  # accepted job id -> its status at the end; None: unknown to the API (404)
    resumed: float | None  # the first delivery of a webhook POSTed after the kill

    def __post_init__(self) -> None:
        self.accepted = {a.job_id: a for a in self.answers if a.status == 202 and a.job_id}
        self.refused = sorted((a for a in self.answers if a.status != 202), key=lambda a: a.answered_at)
        self.forgotten = {job_id for job_id, status in self.statuses.items() if status is None}
        #: Accepted, never delivered, and gone from Redis: what the client was told was safe and is not.
        self.lost = {job_id for job_id in self.forgotten if not self.deliveries[job_id]}
        self.unfinished = {job_id for job_id, status in self.statuses.items() if status not in (None, "succeeded")}
        self.undelivered = {job_id for job_id in self.accepted if not self.deliveries[job_id]}

    @property
    def refused_window(self) -> tuple[float, float] | None:
        if not self.refused:
            return None
        return self.refused[0].answered_at - self.killed_at, self.refused[-1].answered_at - self.killed_at

    @property
    def recovery(self) -> float | None:
        """From the kill to the first 202 to a request sent after it."""
        after = [a.answered_at for a in self.answers if a.status == 202 and a.sent_at > self.killed_at]
        return min(after) - self.killed_at if after else None

    @property
    def duplicates(self) -> int:
        return sum(count - 1 for count in self.deliveries.values() if count > 1)

    @property
    def delivered_after_refusal(self) -> int:
        """Requests answered with something other than 202 whose webhook was delivered all the same."""
        return len({a.seq for a in self.refused} & self.delivered_seqs)

    def report(self, label: str) -> str:
        answers = Counter(str(a.status or a.error) for a in self.answers)
        window = self.refused_window
        window_text = f"{window[0]:+.2f}s to {window[1]:+.2f}s" if window else "none"
        recovery = f"{self.recovery:.2f}s" if self.recovery is not None else "never"
        resumed = f"{self.resumed:.2f}s" if self.resumed is not None else "never"
        return (
            f"\n[{label}] {len(self.answers)} requests: {dict(answers)}; non-202 answers from {window_text} after"
            f" the kill; first 202 after the kill at {recovery}, first delivery of a later POST at {resumed};"
            f" accepted {len(self.accepted)}, delivered {len(self.accepted) - len(self.undelivered)},"
            f" duplicates {self.duplicates}; accepted but unknown after the failover {len(self.forgotten)}"
            f" (delivered before it {len(self.forgotten - self.lost)}, lost {len(self.lost)});"
            f" not succeeded {len(self.unfinished)}; delivered despite a non-202 answer {self.delivered_after_refusal}"
        )


def job_status(base_url: str, job_id: str) -> str | None:
    """The job's status as the API reports it; None if the API does not know it (404)."""
    response = requests.get(f"{base_url}/v1/jobs/{job_id}", headers=AUTH, timeout=10)
    assert response.status_code in (200, 404), response.text
    return response.json()["status"] if response.status_code == 200 else None


def run_under_load(cluster: Cluster, dispatcher: Dispatcher, receiver: Receiver, fault: str) -> Outcome:
    target = receiver.url("ok")
    with Load(dispatcher.base_url, target) as load:
        time.sleep(BEFORE_KILL)
        killed_at = FAULTS[fault](cluster)
        print(f"\nnew master after {cluster.wait_for_new_master(since=killed_at):.2f}s")
        time.sleep(max(0.0, killed_at + AFTER_KILL - time.monotonic()))
    # Drained when every accepted job is finished or unknown (gone with the old master); waiting for
    # the finish, not the first delivery, also counts a job delivered again after the failover.
    statuses: dict[str, str | None] = {}
    pending = {a.job_id for a in load.answers if a.status == 202 and a.job_id}
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while pending:
        for job_id in list(pending):
            statuses[job_id] = status = job_status(dispatcher.base_url, job_id)
            if status in (None, "succeeded", "failed", "canceled"):
                pending.discard(job_id)
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    received = receiver.received(target)
    deliveries = Counter(r.headers["webhook-id"] for r in received)
    seqs = {json.loads(r.body)["data"]["seq"] for r in received}
    # The receiver stamps with time.time(): the kill on that clock.
    killed_at_wall = killed_at + time.time() - time.monotonic()
    posted_after = {a.seq for a in load.answers if a.sent_at > killed_at}
    later = [r.received_at for r in received if json.loads(r.body)["data"]["seq"] in posted_after]
    resumed = min(later) - killed_at_wall if later else None
    return Outcome(load.answers, killed_at, deliveries, seqs, statuses, resumed)


@pytest.mark.parametrize(
    ("min_replicas", "fault"),
    [
        (1, "kill"),
        (0, "kill"),
        (1, "lagging"),
        (0, "lagging"),
        # The old master of a switch answers as one for ~10 s after the sentinels promoted another, to
        # every client still connected to it, and WAIT 1 there counts the replica it keeps until that one
        # is moved too: what it accepts then is lost. WAIT for every replica (2) fails once one is promoted.
        (2, "switch"),
    ],
)
def test_accepted_webhooks_survive_a_failover(
    cluster: Cluster, receiver: Receiver, service_env: dict[str, str], tmp_path: Path, min_replicas: int, fault: str
) -> None:
    env = service_env | {
        "REDIS_URL": cluster.sentinel_url(),
        "DISPATCHER_QUEUE": f"failover-{uuid.uuid4().hex[:10]}",
        "DISPATCHER_MIN_REPLICAS": str(min_replicas),
    }
    with run_dispatcher(env, tmp_path / "dispatcher") as dispatcher:
        outcome = run_under_load(cluster, dispatcher, receiver, fault)
        print(outcome.report(f"DISPATCHER_MIN_REPLICAS={min_replicas}, fault {fault}"))
        logs = dispatcher.log_text()
        # The same processes: each found the new master by itself.
        assert all(process.poll() is None for process in dispatcher.processes), logs

    assert len(outcome.accepted) > RATE, logs  # the load ran, before the kill and after the recovery
    assert outcome.recovery is not None and outcome.recovery < 30, outcome.report("no recovery") + logs
    assert outcome.resumed is not None and outcome.resumed < 30, outcome.report("no deliveries") + logs
    # Every refusal is a 503 (Redis away, or the write not on enough replicas), never a 500 or a dropped connection.
    assert {a.status for a in outcome.refused} <= {503}, [(a.status, a.error) for a in outcome.refused]
    # Every accepted job Redis still has is delivered and finished: none is stuck after the failover.
    assert not outcome.unfinished, {job_id: outcome.statuses[job_id] for job_id in outcome.unfinished}
    assert outcome.undelivered <= outcome.lost, sorted(outcome.undelivered - outcome.lost)[:5]
    if min_replicas:
        # A 202 was on a replica too: the failover kept every one.
        assert not outcome.forgotten, outcome.report("accepted jobs gone") + logs


#: Seconds after its due time a scheduled send may go out once the cluster has a new master: the
#: failover, a worker's restart (0.5 s after a Redis error) and the scheduler's pass, with room for a loaded machine.
BOUND = 20.0


def post_until_accepted(base_url: str, body: dict, timeout: float = 30) -> str:
    """POST a webhook, again while the API answers 503; its job id."""
    deadline = time.monotonic() + timeout
    while True:
        response = requests.post(f"{base_url}/v1/webhooks", json=body, headers=AUTH, timeout=10)
        if response.status_code == 202:
            return response.json()["id"]
        assert response.status_code == 503 and time.monotonic() < deadline, response.text
        time.sleep(0.2)


def send_at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def test_scheduled_sends_go_out_soon_after_a_failover(
    cluster: Cluster, receiver: Receiver, service_env: dict[str, str], tmp_path: Path
) -> None:
    env = service_env | {"REDIS_URL": cluster.sentinel_url(), "DISPATCHER_QUEUE": f"failover-{uuid.uuid4().hex[:10]}"}
    with run_dispatcher(env, tmp_path / "dispatcher") as dispatcher:
        # One scheduled send before: a worker's scheduler runs, and its lock is on the replicas too.
        before = receiver.url("ok")
        post_until_accepted(
            dispatcher.base_url, {"url": before, "event_type": "failover.probe", "payload": {}, "send_at": send_at(1)}
        )
        wait_until(lambda: receiver.received(before), 30, "the scheduled send before the failover was not delivered")

        killed_at = cluster.kill_master()
        cluster.wait_for_new_master(since=killed_at)
        after, late = receiver.url("ok"), receiver.url("fail/1/500")  # a retry is a scheduled job too
        post_until_accepted(
            dispatcher.base_url, {"url": after, "event_type": "failover.probe", "payload": {}, "send_at": send_at(1)}
        )
        due = time.time() + 1
        retry = {"max_attempts": 2, "backoff": [1]}
        post_until_accepted(
            dispatcher.base_url, {"url": late, "event_type": "failover.probe", "payload": {}, "retry": retry}
        )
        while not (receiver.received(after) and len(receiver.received(late)) == 2) and time.time() < due + BOUND:
            time.sleep(0.1)
        logs = dispatcher.log_text()
    sent = [r.received_at - due for r in receiver.received(after)] + [
        r.received_at - due for r in receiver.received(late)[1:]
    ]
    print(f"\nafter the failover, scheduled send and retry out at {[f'{s:+.1f}s' for s in sent]} from their time")
    assert receiver.received(after), f"the scheduled send did not go out within {BOUND:.0f}s of its time\n" + logs
    assert len(receiver.received(late)) == 2, f"the retry did not go out within {BOUND:.0f}s\n" + logs
