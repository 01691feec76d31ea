"""GET /metrics: the deployment's delivery figures in Prometheus's format, read from Redis at scrape
time, so that every web process answers the same whichever worker process (or machine) delivered:
attempts by channel, priority and outcome, attempt durations as a histogram, queue depths, the
scheduled, failed and started (in flight) registries, live workers; a key when one is configured;
and a Grafana dashboard built on those names."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp

from dispatcher import rqstore
from dispatcher.app import create_app
from dispatcher.channels import KINDS
from dispatcher.history import Attempt
from dispatcher.keys import Keys
from dispatcher.tallies import DURATION_BUCKETS, Tally
from tests.conftest import AUTH, ROOT, Service, free_port, process_env, start_dispatcher, wait_until

#: (name, sorted label pairs) -> value, for every sample of one scrape.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
#: Generous bounds on a shared 2-core machine.
START_BOUND = 30
SETTLE_BOUND = 60
#: Connections tried per request to the web process (see `get`).
CONNECT_TRIES = 3


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def values(samples: Samples, name: str, *label_names: str) -> dict[tuple[str, ...], float]:
    """The samples called `name`, keyed by the values of `label_names`."""
    found = {labels: value for (sample, labels), value in samples.items() if sample == name}
    return {tuple(dict(labels)[n] for n in label_names): value for labels, value in found.items()}


def per_priority(samples: Samples, name: str) -> dict[str, float]:
    return {priority: value for (priority,), value in values(samples, name, "priority").items()}


def attempts(samples: Samples) -> dict[tuple[str, ...], float]:
    """Attempts counted, without the combinations still at zero."""
    counted = values(samples, "dispatcher_delivery_attempts_total", "channel", "priority", "outcome")
    return {key: value for key, value in counted.items() if value}


@pytest.fixture
def web(service_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[Service], int]]:
    """Factory: `dispatcher web` (gunicorn) with 2 worker processes for a service; stopped afterwards."""
    started: list[subprocess.Popen] = []

    def start(svc: Service) -> int:
        port = free_port()
        log = tmp_path / f"web-{port}.log"
        env = process_env(svc.env | {"PORT": str(port), "WEB_CONCURRENCY": "2"})
        process = start_dispatcher("web", env, log)
        started.append(process)
        booted = lambda: log.read_bytes().count(b"Booting worker") >= 2  # noqa: E731
        wait_until(booted, START_BOUND, f"dispatcher web did not start 2 workers: {log.read_text(errors='replace')}")
        return port

    yield start
    for process in started:
        if process.poll() is not None:
            print(f"dispatcher web exited early ({process.returncode})")
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    for log in tmp_path.glob("web-*.log"):
        print(log.read_text(errors="replace")[-5000:])  # shown when the test failed


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Status, content type and body of a GET on a new connection (so the gunicorn workers take turns).

    A refused connection is tried again: about one run in twenty on this shared machine, one of many
    rapid new connections to the running gunicorn was refused (its log shows it listening throughout).
    """
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    for attempt in range(CONNECT_TRIES):
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers["Content-Type"], response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, ConnectionRefusedError) or attempt == CONNECT_TRIES - 1:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def scrape(port: int) -> Samples:
    status, content_type, body = get(port, "/metrics")
    assert status == 200, body
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    return parse(body)


def hook(url: str, priority: str, **extra: object) -> dict:
    return {"url": url, "event_type": "metrics.test", "payload": {}, "priority": priority, **extra}


def mail(address: str, priority: str) -> dict:
    return {"to": [address], "subject": "metrics", "text": "counted", "priority": priority}


def test_every_web_process_reports_what_every_worker_process_did(service, web, receiver) -> None:
    svc = service()
    port = web(svc)
    queue = svc.settings.queue_name
    names = {"high": f"{queue}-high", "default": queue, "low": f"{queue}-low"}
    for _ in range(3):
        svc.post("/v1/webhooks", hook(receiver.url("status/410"), "high"))  # permanent at once
    for _ in range(4):
        svc.post("/v1/webhooks", hook(receiver.url("ok"), "default"))
    # Retryable once, then delivered at once (no backoff); retryable once, then scheduled for minutes.
    svc.post("/v1/webhooks", hook(receiver.url("fail/1/503"), "default", retry={"max_attempts": 2, "backoff": [0]}))
    svc.post("/v1/webhooks", hook(receiver.url("fail/1/503"), "default", retry={"max_attempts": 3, "backoff": [600]}))
    for _ in range(2):
        svc.post("/v1/emails", mail("metrics@example.com", "low"))
    svc.post("/v1/emails", mail("reject550-metrics@example.com", "low"))  # refused for good

    # No worker yet: the queues' depths, and nothing else.
    waiting = scrape(port)
    assert per_priority(waiting, "dispatcher_queued_jobs") == {"high": 3, "default": 6, "low": 3}
    assert values(waiting, "dispatcher_queued_jobs", "priority", "queue") == {
        (p, names[p]): n for p, n in (("high", 3), ("default", 6), ("low", 3))
    }
    assert set(per_priority(waiting, "dispatcher_live_workers").values()) == {0}
    assert attempts(waiting) == {}

    svc.start_worker()
    svc.start_worker()
    expected = {
        ("webhook", "high", "permanent"): 3,
        ("webhook", "default", "succeeded"): 5,
        ("webhook", "default", "retryable"): 2,
        ("email", "low", "succeeded"): 2,
        ("email", "low", "permanent"): 1,
    }

    def settled() -> bool:
        samples = scrape(port)
        return attempts(samples) == expected and set(per_priority(samples, "dispatcher_live_workers").values()) == {2}

    wait_until(settled, SETTLE_BOUND, f"the attempts were not all counted: {attempts(scrape(port))}\n{svc.logs()}")

    # Several scrapes on new connections, answered by either gunicorn worker: the same figures.
    scrapes = [scrape(port) for _ in range(8)]
    assert all(s == scrapes[0] for s in scrapes), "two scrapes disagree"
    samples = scrapes[0]
    assert attempts(samples) == expected
    assert per_priority(samples, "dispatcher_queued_jobs") == {"high": 0, "default": 0, "low": 0}
    assert per_priority(samples, "dispatcher_failed_jobs") == {"high": 3, "default": 0, "low": 1}
    assert per_priority(samples, "dispatcher_scheduled_jobs") == {"high": 0, "default": 1, "low": 0}
    assert per_priority(samples, "dispatcher_in_flight_jobs") == {"high": 0, "default": 0, "low": 0}
    assert per_priority(samples, "dispatcher_live_workers") == {"high": 2, "default": 2, "low": 2}
    assert_histograms_match_attempts(samples)

    # A delivery in flight: a receiver that never answers, cut off by the 2 s test deadline.
    svc.post("/v1/webhooks", hook(receiver.url("slow/30"), "high", retry={"max_attempts": 1}))
    wait_until(
        lambda: per_priority(scrape(port), "dispatcher_in_flight_jobs")["high"] == 1, SETTLE_BOUND,
        "the slow delivery never showed in flight",
    )
    expected[("webhook", "high", "retryable")] = 1
    wait_until(lambda: attempts(scrape(port)) == expected, SETTLE_BOUND, "the timed-out attempt was not counted")
    samples = scrape(port)
    assert per_priority(samples, "dispatcher_in_flight_jobs")["high"] == 0
    assert per_priority(samples, "dispatcher_failed_jobs")["high"] == 4
    assert_histograms_match_attempts(samples)
    # It took at least the 2 s deadline; the other retryable webhook attempts were two quick 503s.
    buckets = values(samples, "dispatcher_attempt_duration_seconds_bucket", "channel", "outcome", "le")
    assert buckets["webhook", "retryable", "+Inf"] - buckets["webhook", "retryable", "1.0"] >= 1
    total = values(samples, "dispatcher_attempt_duration_seconds_sum", "channel", "outcome")
    assert total["webhook", "retryable"] >= 2.0


def assert_histograms_match_attempts(samples: Samples) -> None:
    """Per channel and outcome: the histogram counts every attempt, and its buckets are cumulative."""
    counted: Counter[tuple[str, str]] = Counter()
    for (channel, _priority, outcome), value in attempts(samples).items():
        counted[channel, outcome] += int(value)
    counts = values(samples, "dispatcher_attempt_duration_seconds_count", "channel", "outcome")
    assert {key: value for key, value in counts.items() if value} == dict(counted)
    buckets = values(samples, "dispatcher_attempt_duration_seconds_bucket", "channel", "outcome", "le")
    bounds = [*(str(float(b)) for b in DURATION_BUCKETS), "+Inf"]
    for channel, outcome in counts:
        series = [buckets[channel, outcome, le] for le in bounds]
        assert series == sorted(series), f"{channel} {outcome} buckets are not cumulative: {series}"
        assert series[-1] == counts[channel, outcome]


def test_a_plain_rq_worker_counts_its_attempts_too(burst_worker, receiver) -> None:
    """RQ's own worker runs workers.jobs, one attempt per job run: each is counted."""
    worker = burst_worker()
    client = create_app(worker.settings).test_client()
    retried = hook(receiver.url("fail/1/503"), "default", retry={"max_attempts": 2, "backoff": [0]})
    for body in (hook(receiver.url("ok"), "default"), hook(receiver.url("status/410"), "default"), retried):
        assert client.post("/v1/webhooks", json=body, headers=AUTH).status_code == 202

    worker.run()

    samples = parse(client.get("/metrics").get_data(as_text=True))
    assert attempts(samples) == {
        ("webhook", "default", "succeeded"): 2,
        ("webhook", "default", "permanent"): 1,
        ("webhook", "default", "retryable"): 1,
    }
    assert_histograms_match_attempts(samples)
    assert per_priority(samples, "dispatcher_failed_jobs")["default"] == 1


def test_the_metrics_key_is_required_once_configured(service) -> None:
    key = "metrics-" + os.urandom(8).hex()
    client = service(DISPATCHER_METRICS_KEY=key).client
    for headers in ({}, {"Authorization": "Bearer wrong"}, AUTH, {"Authorization": key}):
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401, headers
        assert response.get_json()["error"]["code"] == "unauthorized"
    response = client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    assert "dispatcher_queued_jobs" in response.get_data(as_text=True)


def test_a_batch_costs_one_command_per_distinct_field(redis_conn: redis.Redis) -> None:
    """A worker's batch of attempts alike adds them up first: one HINCRBY per field, not per attempt."""
    keys = Keys("tally-test-" + os.urandom(4).hex())
    tally = Tally()
    kind = KINDS[0]
    for n in range(1, 11):
        tally.add(kind, keys.prefix, Attempt(n, "", duration_ms=3, outcome="succeeded"))
    with redis_conn.pipeline(transaction=False) as pipe:
        tally.write(pipe, keys)
        assert len(pipe.command_stack) == 2  # the count of its bucket, the sum of its durations
        pipe.execute()
    stored = redis_conn.hgetall(keys.tallies)
    redis_conn.delete(keys.tallies)
    assert sorted(int(v) for v in stored.values()) == [10, 30]


def test_registry_sizes_are_what_rqs_own_count_says_without_its_cleanup(redis_conn: redis.Redis) -> None:
    """The started and failed registries' expired entries do not count (RQ's cleanup would drop them);
    every scheduled entry counts, due or not; and reading writes nothing."""
    queue = Queue(f"sizes-{os.urandom(4).hex()}", connection=redis_conn, serializer=JSONSerializer)
    registries = (queue.scheduled_job_registry, queue.started_job_registry, queue.failed_job_registry)
    at = current_timestamp()
    for registry, (past, future) in zip(registries, (("due", "later"), ("a:1", "b:2"), ("old", "kept")), strict=True):
        redis_conn.zadd(registry.key, {past: at - 10, future: at + 600})
    try:
        with redis_conn.pipeline(transaction=False) as pipe:
            assert rqstore.read_registry_sizes(pipe, [queue]) == 3
            sizes = pipe.execute()
        assert [redis_conn.zcard(registry.key) for registry in registries] == [2, 2, 2]  # nothing removed
        assert sizes == [registry.count for registry in registries] == [2, 1, 1]
    finally:
        redis_conn.delete(*(registry.key for registry in registries))


# --- the Grafana dashboard -------------------------------------------------------------------------

#: PromQL words that are not metric names.
_PROMQL_WORDS = {"offset", "bool", "and", "or", "unless"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once label matchers, ranges,
    grouping clauses, strings, numbers and function calls are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group()
        rest = expr[match.end() :].lstrip()
        if word not in _PROMQL_WORDS and not rest.startswith("("):
            names.add(word)
    return names


def test_the_grafana_dashboard_reads_only_metrics_that_metrics_exposes(client) -> None:
    exposed = {name for name, _ in parse(client.get("/metrics").get_data(as_text=True))}
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    used: set[str] = set()
    for panel in panels:
        assert panel["title"] and set(panel["gridPos"]) >= {"x", "y", "w", "h"}, panel
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"panel {panel['title']!r}: no metric in {target['expr']!r}"
            assert names <= exposed, f"panel {panel['title']!r} reads {sorted(names - exposed)}, not exposed"
            used |= names
    assert {name.removesuffix("_total") for name in used} >= {
        "dispatcher_delivery_attempts", "dispatcher_attempt_duration_seconds_bucket", "dispatcher_queued_jobs",
        "dispatcher_scheduled_jobs", "dispatcher_failed_jobs", "dispatcher_live_workers", "dispatcher_in_flight_jobs",
    }  # fmt: skip
    assert any("histogram_quantile(" in t["expr"] for p in panels for t in p["targets"])
