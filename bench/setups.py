"""The worker setups under test: how each starts, how its queue is filled, how its end is seen.

- `ours`: the Procfile's `worker` process type (`dispatcher worker`), two processes (one per core).
- `rq`: plain `rq worker` (forks a work-horse per job), two processes, `requests.post` per job.
- `simple`: `rq worker -w rq.worker.SimpleWorker`, two processes, a kept-alive `requests.Session`.
- `celery`: Celery 5, Redis broker, `-P prefork -c 2`, a kept-alive `requests.Session` per child.

Every queue is filled while its workers are already up and idle, in one step that makes the
whole queue visible at once (a MULTI/EXEC pipeline for RQ, a RENAME of a pre-filled list for
Celery), so neither worker start-up nor enqueueing is timed.
"""

from __future__ import annotations

import base64
import secrets
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis
from redis.client import Pipeline
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from bench.services import ROOT, BenchError, Processes, child_env, script
from dispatcher.channels import CHANNELS
from dispatcher.channels.email import EmailRequest
from dispatcher.channels.webhook import WebhookRequest
from dispatcher.config import Settings
from dispatcher.enqueue import build_job, enqueue_many
from dispatcher.keys import Keys

#: Worker processes per setup: the machine has 2 cores.
PROCESSES = 2
#: Commands a worker waiting for work is blocked in.
BLOCKING_POPS = frozenset({"blmove", "brpoplpush", "brpop", "blpop", "blmpop"})


def webhook_request(url: str) -> dict:
    """The API request body of the benchmark's webhook; the signed body it becomes is ~1 KB of JSON."""
    items = [
        {"sku": f"SKU-{i:05d}", "name": f"Widget model {i}", "quantity": i % 4 + 1, "unit_price": "19.99"}
        for i in range(11)
    ]
    payload = {
        "order_id": 1042,
        "customer": {"id": "cus_8f14e45fceea167a", "email": "ada@example.com", "name": "Ada Lovelace"},
        "items": items,
        "currency": "EUR",
        "total": "219.89",
    }
    return {"url": url, "event_type": "order.created", "payload": payload}


def email_request(token: str) -> dict:
    text = (
        "Hello Ada,\n\nThanks for your order #1042. We are packing it now and will send you the tracking "
        "number as soon as the parcel leaves our warehouse.\n\n" + "Widget model 1 x 2 ... EUR 39.98\n" * 8
    )
    html = (
        "<html><body><p>Hello Ada,</p><p>Thanks for your order <b>#1042</b>.</p><ul>"
        + ("<li>Widget model 1 &times; 2 &hellip; EUR 39.98</li>" * 8)
        + "</ul></body></html>"
    )
    return {
        "to": [f"bench-{token}@example.com"],
        "from": "Shop <shop@example.com>",
        "subject": "Your order #1042",
        "text": text,
        "html": html,
        "metadata": {"order_id": "1042"},
    }


def new_token() -> str:
    return uuid.uuid4().hex[:16]


@dataclass
class Fill:
    """A prepared queue fill: one MULTI/EXEC transaction that ends with TIME.

    `commit()` sends it and returns Redis's clock at the moment the jobs became visible to the
    workers (the transaction runs as one step), so the time spent sending the fill and reading
    its reply is not counted.
    """

    pipe: Pipeline

    @property
    def commands(self) -> int:
        """Redis commands the commit runs, MULTI and EXEC included."""
        return len(self.pipe.command_stack) + 2

    def commit(self) -> float:
        seconds, microseconds = self.pipe.execute()[-1]
        self.pipe.reset()
        return seconds + microseconds / 1e6


@dataclass
class Setup:
    name: str
    label: str
    kind: str = "webhook"  # or "email"
    concurrency: str | None = None  # DISPATCHER_CONCURRENCY for ours
    max_per_host: str | None = None  # DISPATCHER_MAX_PER_HOST for ours
    processes_count: int = PROCESSES
    workers: list[subprocess.Popen] = field(default_factory=list)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, procs: Processes, redis_url: str, queue: str, smtp_url: str | None = None) -> None:
        self.redis_url, self.queue_name = redis_url, queue
        self.connection = redis.Redis.from_url(redis_url)
        self.ready_file = procs.log_dir / f"celery-ready-{queue}"
        if self.name == "ours":
            env = {
                "REDIS_URL": redis_url,
                "DISPATCHER_QUEUE": queue,
                "DISPATCHER_WEBHOOK_SECRET": WEBHOOK_SECRET,
                "DISPATCHER_ALLOWED_NETWORKS": "127.0.0.0/8",
            }
            if smtp_url:
                env["DISPATCHER_SMTP_URL"] = smtp_url
            if self.concurrency:
                env["DISPATCHER_CONCURRENCY"] = self.concurrency
            if self.max_per_host:
                env["DISPATCHER_MAX_PER_HOST"] = self.max_per_host
            argv = [*script("dispatcher", "dispatcher.cli"), "worker"]
            self.workers = [procs.start(f"ours-{i}", argv, child_env(env)) for i in range(self.processes_count)]
        elif self.name in ("rq", "simple"):
            argv = [*script("rq", "rq.cli"), "worker", "-u", redis_url, "--serializer", "json", "-P", str(ROOT)]
            if self.name == "simple":
                argv += ["-w", "rq.worker.SimpleWorker"]
            self.workers = [
                procs.start(f"{self.name}-{i}", [*argv, queue], child_env({})) for i in range(self.processes_count)
            ]
        elif self.name == "celery":
            env = child_env({"BENCH_CELERY_BROKER": redis_url, "BENCH_CELERY_READY": str(self.ready_file)})
            argv = [
                *script("celery", "celery"),
                "-A",
                "bench.celery_app",
                "worker",
                "-Q",
                queue,
                "-P",
                "prefork",
                "-c",
                str(self.processes_count),
                "--without-heartbeat",
                "--without-mingle",
                "--without-gossip",
            ]
            self.workers = [procs.start("celery", argv, env)]
        else:
            raise ValueError(f"unknown setup {self.name!r}")

    def wait_ready(self, timeout: float = 30) -> None:
        """Until every worker is registered and blocked on its queue (a blocking pop in CLIENT LIST)."""
        deadline = time.monotonic() + timeout
        registered_at = None
        while True:
            self.check_alive()
            if registered_at is None:
                if self.name == "celery":
                    registered = self.ready_file.exists()
                else:
                    queue = Queue(self.queue_name, connection=self.connection, serializer=JSONSerializer)
                    registered = len(Worker.all(queue=queue)) >= self.processes_count
                if registered:
                    registered_at = time.monotonic()
            if registered_at is not None:
                expected = 1 if self.name == "celery" else self.processes_count
                # Blocked in a pop: listening. A worker between two pops is not seen, so wait at most 3 s.
                if self._blocked_clients() >= expected or time.monotonic() - registered_at > 3:
                    return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.label}: workers not ready after {timeout:.0f}s")
            time.sleep(0.02)

    def _blocked_clients(self) -> int:
        return sum(
            1
            for client in self.connection.client_list()
            if "b" in client.get("flags", "") and client.get("cmd", "") in BLOCKING_POPS
        )

    def check_alive(self) -> None:
        for process in self.workers:
            if process.poll() is not None:
                raise BenchError(f"{self.label}: {process.args[0]} exited with {process.returncode}")

    def stop(self, procs: Processes) -> None:
        procs.stop_many(self.workers)
        self.workers = []
        self.connection.close()

    # -- filling ------------------------------------------------------------------------------

    def prepare_fill(self, n: int, url: str | None, token: str, smtp: tuple[str, int] | None = None) -> Fill:
        if self.name == "celery":
            return self._prepare_celery(n, url)
        settings = Settings.from_env({"REDIS_URL": self.redis_url, "DISPATCHER_QUEUE": self.queue_name})
        queue = Queue(self.queue_name, connection=self.connection, serializer=JSONSerializer)
        accepted_at = datetime.now(UTC)
        if self.kind == "webhook":
            request = WebhookRequest.model_validate(webhook_request(url or ""))
            template = build_job(CHANNELS["webhook"], request, accepted_at, settings)[1]
        else:
            request = EmailRequest.model_validate(email_request(token))
        pipe = self.connection.pipeline(transaction=True)
        if self.name == "ours":
            # Exactly what the API enqueues, n times.
            enqueue_many(pipe, settings, self.kind, [request] * n)
            pipe.time()
            return Fill(pipe)
        if self.kind == "webhook":
            function = "bench.baselines.post_webhook" if self.name == "rq" else "bench.baselines.post_webhook_session"
            datas = [Queue.prepare_data(function, args=(url, template["body"])) for _ in range(n)]
        else:
            assert smtp is not None
            mail = {
                "from": request.from_,
                "to": request.to,
                "subject": request.subject,
                "text": request.text,
                "html": request.html,
            }
            datas = [Queue.prepare_data("bench.baselines.send_email", args=(smtp[0], smtp[1], mail)) for _ in range(n)]
        queue.enqueue_many(datas, pipeline=pipe)
        pipe.time()
        return Fill(pipe)

    def _prepare_celery(self, n: int, url: str | None) -> Fill:
        """Publish to a staging list the worker does not read; the commit RENAMEs it onto the worker's queue."""
        from bench.celery_app import app, post_webhook

        app.conf.broker_url = self.redis_url
        staging = f"{self.queue_name}-staging"
        body = build_job(
            CHANNELS["webhook"],
            WebhookRequest.model_validate(webhook_request(url or "")),
            datetime.now(UTC),
            Settings.from_env({"DISPATCHER_QUEUE": self.queue_name}),
        )[1]["body"]
        with app.producer_or_acquire() as producer:
            for _ in range(n):
                post_webhook.apply_async((url, body), queue=staging, producer=producer)
        if self.connection.llen(staging) != n:
            raise BenchError(f"Celery staging queue holds {self.connection.llen(staging)} messages, not {n}")
        pipe = self.connection.pipeline(transaction=True)
        pipe.rename(staging, self.queue_name)
        pipe.time()
        return Fill(pipe)

    # -- the end ------------------------------------------------------------------------------

    def settled(self, n: int) -> tuple[int, int]:
        """(jobs recorded as succeeded, Redis commands this check sent)."""
        if self.name == "ours":
            totals = self.connection.hgetall(Keys(self.queue_name).totals)
            return int(totals.get(f"{self.kind}:succeeded".encode(), 0)), 1
        if self.name in ("rq", "simple"):
            return int(self.connection.zcard(f"rq:finished:{self.queue_name}")), 1
        return n, 0  # Celery keeps no results here; the receiver's count is the evidence


#: A Standard Webhooks signing secret for the benchmark's workers: 24 random bytes.
WEBHOOK_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


SETUP_LABELS = {
    "ours": "Dispatcher worker x2",
    "rq": "rq worker x2",
    "simple": "SimpleWorker x2",
    "celery": "Celery prefork -c2",
}


def make_setup(
    name: str,
    kind: str = "webhook",
    concurrency: str | None = None,
    processes: int = PROCESSES,
    max_per_host: str | None = None,
) -> Setup:
    label = SETUP_LABELS[name]
    if processes != PROCESSES:
        label = label.replace("x2", f"x{processes}").replace("-c2", f"-c{processes}")
    return Setup(
        name=name,
        label=label,
        kind=kind,
        concurrency=concurrency,
        processes_count=processes,
        max_per_host=max_per_host,
    )


def log_tail(procs: Processes, setup: Setup) -> str:
    return "\n".join(procs.tail(p, 1500) for p in setup.workers)
