"""The benchmark suite runs: its smallest scenario, Dispatcher only, to a Python receiver (no nginx, no apt).

No timing is asserted here; only that every job was delivered and the report has its shape.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.scenarios import Sizes

ROOT = Path(__file__).resolve().parent.parent
JOBS = 100


def test_bench_smallest_scenario_delivers_every_job(tmp_path: Path) -> None:
    results_path = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_") and k not in ("REDIS_URL", "PORT")}
    completed = subprocess.run(
        [
            sys.executable, "-m", "bench.run",
            "--only", "webhooks", "--setups", "ours", "--receiver", "python",
            "--jobs", str(JOBS), "--runs", "1", "--extra-runs", "0", "--quiet-wait", "0",
            "--json", str(results_path), "--no-chart",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]

    results = json.loads(results_path.read_text())
    assert {"machine", "options", "rows", "table", "notes", "errors", "elapsed_s"} <= set(results)
    assert results["errors"] == []
    (row,) = results["rows"]
    assert row["id"] == "webhooks"
    assert {"title", "unit", "setups", "target", "met"} <= set(row)
    ours = row["setups"]["ours"]
    assert {"label", "runs", "median", "min", "max", "redis_calls_per_job", "jobs"} <= set(ours)
    (run,) = ours["runs"]
    assert run["jobs"] == JOBS
    assert run["delivered"] == JOBS  # the receiver logged every webhook
    assert run["succeeded"] == JOBS  # and Dispatcher counted every one as succeeded
    assert run["complete"] is True
    assert run["value"] > 0 and run["redis_calls_per_job"] > 0

    header = results["table"].splitlines()[0]
    for column in ("scenario", "ours", "rq worker", "SimpleWorker", "Celery", "Redis calls/job", "target", "met?"):
        assert column in header
    assert results["table"] in completed.stdout


def test_bench_fanout_delivers_every_event_to_every_endpoint(tmp_path: Path) -> None:
    """The fan-out scenario at its --quick size (3 events x 20 endpoints, and the same deliveries
    as plain webhook batches), to the Python receiver."""
    results_path = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_") and k not in ("REDIS_URL", "PORT")}
    completed = subprocess.run(
        [
            sys.executable, "-m", "bench.run", "--quick",
            "--only", "fanout", "--setups", "ours,simple", "--receiver", "python",
            "--runs", "1", "--extra-runs", "0", "--quiet-wait", "0",
            "--json", str(results_path), "--no-chart",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]

    results = json.loads(results_path.read_text())
    assert results["errors"] == []
    rate, accept = results["rows"]
    assert (rate["id"], accept["id"]) == ("fanout_rate", "fanout_accept")
    events, endpoints = rate["events"], rate["endpoints"]
    assert endpoints == Sizes.quick().fanout_endpoints == 20
    for name in ("ours", "simple"):  # events, then the same deliveries as plain webhook batches
        (run,) = rate["setups"][name]["runs"]
        assert run["jobs"] == run["delivered"] == run["succeeded"] == events * endpoints
        assert run["complete"] is True and run["duplicates"] == 0
        assert run["accept_ms_median"] > 0 and run["redis_calls_per_job"] > 0
        assert accept["setups"][name]["median"] == run["accept_ms_median"]
    assert rate["setups"]["ours"]["runs"][0]["events_finished"] == events
    assert "Fan-out" in results["table"] and results["table"] in completed.stdout


def test_capacity_measures_redis_cost_per_job(tmp_path: Path) -> None:
    """bench.capacity at its smallest: one worker process, 100 webhooks to the Python receiver, the accept
    measured on 50 jobs; no baseline, ceiling, idle window or memory pass. Only shapes, no timing."""
    results_path = tmp_path / "capacity.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_") and k not in ("REDIS_URL", "PORT")}
    completed = subprocess.run(
        [
            sys.executable, "-m", "bench.capacity",
            "--runs", "1", "--processes", "1", "--jobs", str(JOBS), "--emails", "0", "--accept-jobs", "50",
            "--no-baseline", "--no-ceiling", "--idle-seconds", "0", "--memory-jobs", "0",
            "--receiver", "python", "--quiet-wait", "0", "--json", str(results_path),
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]

    results = json.loads(results_path.read_text())
    assert results["errors"] == []
    single, batch = results["accept"]["webhook"]["single"], results["accept"]["webhook"]["batch"]
    # One request is one script call; a batch shares it: fewer commands and less Redis CPU per job.
    assert single["commands_per_job"]["median"] > batch["commands_per_job"]["median"] > 0
    assert batch["redis_cpu_us_per_job"]["median"] > 0
    (entry,) = results["drains"]
    assert (entry["setup"], entry["kind"], entry["processes"]) == ("ours", "webhook", 1)
    (run,) = entry["runs"]
    assert run["delivered"] == run["succeeded"] == JOBS
    assert run["redis_cpu_us_per_job"] > 0 and run["redis_net_in_bytes_per_job"] > 0
    model = entry["model"]
    assert model["single"]["redis_cpu_us_per_job"] > model["batch"]["redis_cpu_us_per_job"] > 0
    assert model["batch"]["jobs_per_redis_core_s"] == 1e6 / model["batch"]["redis_cpu_us_per_job"]
    assert "The model" in results["table"] and results["table"] in completed.stdout
