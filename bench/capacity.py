"""Capacity: what one worker process delivers, what each job costs Redis, how many workers one Redis serves.

    python -m bench.capacity [--runs 3] [--processes 1,2,4] [--receiver nginx|python]

Starts its own Redis, webhook receiver and aiosmtpd on loopback (bench.services, as bench.run does)
and, in one run:

1. Accept: the API's enqueue code (dispatcher.enqueue) writes `--accept-jobs` webhooks and emails
   with no worker running, one job a call (a single POST) and 500 a call (a batch): Redis commands,
   CPU and bytes per job.
2. Drains (bench.scenarios.drain, as bench.run times them): `dispatcher worker` x N for each N of
   `--processes`, webhooks to the receiver and emails to aiosmtpd, and the same-run baseline, RQ's
   SimpleWorker x1 and x2 with a kept-alive `requests.Session`. Per run: deliveries/s (wall clock),
   the workers' CPU per job, and from Redis's INFO: commands, CPU (used_cpu_user + used_cpu_sys)
   and bytes in and out per job, from just before the queue appears to the last job recorded.
   The drain's figures include the fill (the jobs' enqueue in one transaction); the delivery's own
   cost is the drain's less the batch accept of step 1.
3. A Redis ceiling: `redis-benchmark` (SET/GET, 50 clients, no pipelining) when installed: the
   commands per second and CPU per command of Redis doing nothing else.
4. Idle workers: Redis's CPU and commands per second of `dispatcher worker`s with nothing to do,
   less Redis's own with no client: the fixed cost of each worker process.
5. Memory: bench.memory's method (an embedded Valkey of its own): bytes per job queued and finished.

Prints Markdown tables and the capacity model; writes bench/results/capacity.json. See docs/scaling.md.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import redis

from bench import memory
from bench.report import write_json
from bench.run import machine, revision
from bench.scenarios import Context, background_note, drain
from bench.services import (
    ROOT,
    BenchError,
    Nginx,
    Processes,
    PythonReceiver,
    RedisServer,
    SmtpReceiver,
    find_binary,
)
from bench.setups import email_request, make_setup, webhook_request
from dispatcher.channels.email import EmailRequest
from dispatcher.channels.webhook import WebhookRequest
from dispatcher.config import Settings
from dispatcher.enqueue import enqueue, enqueue_many

#: Jobs of one accept call in the batch measurement (as bench.memory writes them).
BATCH = 500
#: Share of one core a Redis is planned to use at most: headroom for bursts, persistence, failover.
REDIS_HEADROOM = 0.7
#: Default retention of a succeeded job (DISPATCHER_RETENTION_SUCCEEDED), seconds.
RETENTION_S = 7 * 86400


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.capacity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each drain (default 3)")
    parser.add_argument("--processes", default="1,2,4", help="worker process counts for webhooks (default 1,2,4)")
    parser.add_argument("--jobs", type=int, default=6000, help="webhooks per Dispatcher drain (default 6000)")
    parser.add_argument("--emails", type=int, default=2000, help="emails per Dispatcher drain (default 2000; 0: none)")
    parser.add_argument(
        "--baseline-jobs", type=int, default=1500, help="webhooks per SimpleWorker drain (default 1500)"
    )
    parser.add_argument("--accept-jobs", type=int, default=2000, help="jobs of each accept measurement (default 2000)")
    parser.add_argument("--memory-jobs", type=int, default=2000, help="bench.memory's --jobs (default 2000; 0: skip)")
    parser.add_argument(
        "--receiver", choices=("nginx", "python"), default="nginx", help="webhook receiver (python: no nginx needed)"
    )
    parser.add_argument("--no-baseline", action="store_true", help="leave out the SimpleWorker drains")
    parser.add_argument("--no-ceiling", action="store_true", help="leave out redis-benchmark")
    parser.add_argument(
        "--idle-seconds", type=float, default=6.0, help="length of the idle-worker measurement (default 6; 0: skip)"
    )
    parser.add_argument("--redis-server", help="redis-server or valkey-server binary (default: as bench.run)")
    parser.add_argument(
        "--quiet-wait", type=float, default=30.0, help="wait up to this long for a quiet machine before each drain"
    )
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "capacity.json")
    args = parser.parse_args(argv)
    args.processes = [int(p) for p in args.processes.split(",") if p.strip()]
    if not args.processes or min(args.processes) < 1:
        parser.error(f"--processes must list positive counts, got {args.processes!r}")
    return args


def say(message: str) -> None:
    print(f"[capacity] {message}", flush=True)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(entry: dict | None, digits: int = 0) -> str:
    """`1,234 (1,100-1,300)`: the median, then the range of the runs."""
    if not entry:
        return "—"
    f = f"{{:,.{digits}f}}"
    return f"{f.format(entry['median'])} ({f.format(entry['min'])}-{f.format(entry['max'])})"


# --- accept ----------------------------------------------------------------------------------


def accept_costs(server: RedisServer, kind: str, n: int, url: str, runs: int) -> dict[str, dict[str, dict]]:
    """Redis's cost per job of the API's enqueue, one job a call and BATCH a call, no worker running:
    per figure the median and range of `runs` measurements."""
    settings = Settings.from_env({"REDIS_URL": server.url, "DISPATCHER_QUEUE": "capacity"})
    request = (
        WebhookRequest.model_validate(webhook_request(url))
        if kind == "webhook"
        else EmailRequest.model_validate(email_request("accept"))
    )
    connection = redis.Redis.from_url(server.url)
    measured: dict[str, list[dict[str, float]]] = {"single": [], "batch": []}
    try:
        for _ in range(runs):
            for label, per_call in (("single", 1), ("batch", BATCH)):
                server.flush()
                enqueue(connection, settings, kind, request)  # scripts loaded, connection open
                before = server.usage()
                for start in range(0, n, per_call):
                    if per_call == 1:
                        enqueue(connection, settings, kind, request)
                    else:
                        enqueue_many(connection, settings, kind, [request] * min(per_call, n - start))
                used = {k: v - before[k] for k, v in server.usage().items()}
                measured[label].append(
                    {
                        "commands_per_job": (used["commands"] - 1) / n,  # less the first INFO
                        "redis_cpu_us_per_job": used["cpu_s"] * 1e6 / n,
                        "net_in_bytes_per_job": used["net_in"] / n,
                        "net_out_bytes_per_job": used["net_out"] / n,
                    }
                )
    finally:
        connection.close()
        server.flush()
    return {label: {key: spread([m[key] for m in values]) for key in values[0]} for label, values in measured.items()}


# --- drains ----------------------------------------------------------------------------------


def drains(
    ctx: Context,
    name: str,
    kind: str,
    processes: int,
    n: int,
    runs: int,
    log_path: Path,
    url: Callable[[str], str] | None,
) -> dict:
    setup = make_setup(name, kind=kind, processes=processes)
    log = ctx.arrivals(log_path)
    results = []
    for i in range(runs):
        try:
            result = drain(ctx, setup, n, log, url, max(30.0, n / 20))
        except BenchError as exc:
            say(f"{setup.label} {kind}s run {i + 1}: FAILED: {exc}")
            results.append({"error": str(exc), "jobs": n})
            continue
        results.append(result)
        say(
            f"{setup.label} {kind}s run {i + 1}/{runs}: {result['value']:,.0f}/s, "
            f"worker CPU {result['worker_cpu_ms_per_job']:.2f} ms/job, "
            f"Redis CPU {result['redis_cpu_us_per_job']:.0f} us/job, "
            f"{result['redis_calls_per_job']:.1f} commands/job{background_note(result)}"
            + ("" if result["complete"] else f"  PARTIAL: {result['delivered']}/{n}")
        )
    good = [r for r in results if "error" not in r and r["complete"]]
    entry: dict = {"setup": name, "label": setup.label, "kind": kind, "processes": processes, "jobs": n}
    entry["runs"] = results
    if good:
        for key in (
            "value",
            "worker_cpu_ms_per_job",
            "redis_cpu_us_per_job",
            "redis_calls_per_job",
            "redis_net_in_bytes_per_job",
            "redis_net_out_bytes_per_job",
            "background_cpu_pct",
        ):
            entry[key] = spread([r[key] for r in good])
        entry["per_process"] = spread([r["value"] / processes for r in good])
        # Deliveries per second of worker CPU: what one core of workers delivers when busy.
        entry["per_worker_core"] = spread([1000 / r["worker_cpu_ms_per_job"] for r in good])
        # Redis's CPU share while the drain ran, in cores.
        entry["redis_cores"] = spread([r["redis_cpu_ms"] / 1000 / r["seconds"] for r in good])
    return entry


def _per_second(server: RedisServer, seconds: float) -> dict[str, float]:
    before, started = server.usage(), time.monotonic()
    time.sleep(seconds)
    used = {k: v - before[k] for k, v in server.usage().items()}
    elapsed = time.monotonic() - started
    return {"cpu_us": used["cpu_s"] * 1e6 / elapsed, "commands": (used["commands"] - 1) / elapsed}


def idle_cost(ctx: Context, processes: int, seconds: float, runs: int) -> dict:
    """Redis's CPU and commands per second of `processes` idle `dispatcher worker`s (their polls,
    heartbeats, scheduler and reaper), less Redis's own with no client: what each worker costs
    Redis whether or not jobs flow; `runs` windows of `seconds` each."""
    setup = make_setup("ours", processes=processes)
    ctx.redis.flush()
    alone = [_per_second(ctx.redis, seconds) for _ in range(runs)]
    setup.start(ctx.procs, ctx.redis.url, "capacity-idle")
    try:
        setup.wait_ready()
        time.sleep(2.0)  # past start-up: registration, scripts loaded, the scheduler's first pass
        with_workers = [_per_second(ctx.redis, seconds) for _ in range(runs)]
    finally:
        setup.stop(ctx.procs)
    base_cpu = statistics.median(a["cpu_us"] for a in alone)
    base_commands = statistics.median(a["commands"] for a in alone)
    return {
        "processes": processes,
        "redis_alone_cpu_us_per_s": spread([a["cpu_us"] for a in alone]),
        "redis_cpu_us_per_s_per_worker": spread([(w["cpu_us"] - base_cpu) / processes for w in with_workers]),
        "commands_per_s_per_worker": spread([(w["commands"] - base_commands) / processes for w in with_workers]),
    }


# --- the Redis ceiling -----------------------------------------------------------------------


def redis_ceiling(server: RedisServer, requests: int = 200_000) -> dict | None:
    """redis-benchmark SET/GET, 50 clients, no pipelining: Redis's commands/s and CPU per command alone."""
    binary = find_binary("redis-benchmark")
    if binary is None:
        say("no redis-benchmark: the Redis ceiling is left out")
        return None
    server.flush()
    before, started = server.usage(), time.monotonic()
    argv = [binary, "-h", "127.0.0.1", "-p", str(server.port), "-t", "set,get", "-n", str(requests), "-c", "50", "-q"]
    subprocess.run(argv, check=True, capture_output=True, timeout=300)
    seconds = time.monotonic() - started
    used = {k: v - before[k] for k, v in server.usage().items()}
    server.flush()
    return {
        "commands_per_s": used["commands"] / seconds,
        "redis_cpu_us_per_command": used["cpu_s"] * 1e6 / used["commands"],
        "redis_cores": used["cpu_s"] / seconds,
        "command": " ".join(["redis-benchmark", *argv[1:4], "<port>", *argv[5:]]),
    }


# --- the model -------------------------------------------------------------------------------


def model(entry: dict, accept: dict[str, dict[str, dict]] | None, per_process: float) -> dict:
    """What one Redis core sustains, from Redis CPU per job. The drain's own figures are a job accepted
    in a batch and delivered (its fill is one batch enqueue). With Dispatcher's `accept` costs also a
    job accepted one request each: the drain's less the batch enqueue, plus a single one.
    `per_process`: deliveries/s of one worker process with a core to itself (the x1 drain)."""
    costs = {"batch": (entry["redis_cpu_us_per_job"]["median"], entry["redis_calls_per_job"]["median"])}
    if accept is not None:
        batch, single = accept["batch"], accept["single"]
        delivery_us = costs["batch"][0] - batch["redis_cpu_us_per_job"]["median"]
        # bench.scenarios takes off the fill's pipeline (MULTI, EVALSHA, EXEC, TIME) but not what its
        # script runs; the batch accept's commands are that script's, plus one EVALSHA per 500 jobs.
        delivery_commands = costs["batch"][1] - batch["commands_per_job"]["median"]
        costs["single"] = (
            delivery_us + single["redis_cpu_us_per_job"]["median"],
            delivery_commands + single["commands_per_job"]["median"],
        )
    result = {}
    for label, (job_us, commands) in costs.items():
        per_second = 1e6 / job_us  # one Redis core, fully used
        result[label] = {
            "redis_cpu_us_per_job": job_us,
            "commands_per_job": commands,
            "jobs_per_redis_core_s": per_second,
            "jobs_per_s_at_headroom": per_second * REDIS_HEADROOM,
            "worker_processes_at_headroom": per_second * REDIS_HEADROOM / per_process,
            "worker_cores_per_redis_core": entry["worker_cpu_ms_per_job"]["median"] * 1000 / job_us,
        }
    return result


def report(results: dict) -> str:
    lines = []
    accept = results["accept"]
    lines.append("Accept (the API's enqueue code, no worker), per job: commands, Redis CPU, bytes in/out\n")
    lines.append("| channel | one job a call | 500 jobs a call |")
    lines.append("| --- | --- | --- |")
    for kind, costs in accept.items():
        cells = [
            f"{c['commands_per_job']['median']:.1f} commands, {fmt(c['redis_cpu_us_per_job'], 1)} us, "
            f"{c['net_in_bytes_per_job']['median']:,.0f} B in / {c['net_out_bytes_per_job']['median']:,.0f} B out"
            for c in (costs["single"], costs["batch"])
        ]
        lines.append(f"| {kind} | {cells[0]} | {cells[1]} |")
    lines.append("\nDrains (median, then min-max of the runs); Redis figures include the fill (one batch enqueue)\n")
    lines.append(
        "| setup | channel | deliveries/s | per process | per worker CPU-second | worker CPU ms/job | "
        "Redis CPU us/job | Redis commands/job | Redis bytes in/job | Redis bytes out/job | Redis cores busy |"
    )
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for entry in results["drains"]:
        if "value" not in entry:
            lines.append(f"| {entry['label']} | {entry['kind']} | failed | | | | | | | | |")
            continue
        lines.append(
            f"| {entry['label']} | {entry['kind']} | {fmt(entry['value'])} | {fmt(entry['per_process'])} | "
            f"{fmt(entry['per_worker_core'])} | {fmt(entry['worker_cpu_ms_per_job'], 2)} | "
            f"{fmt(entry['redis_cpu_us_per_job'])} | {fmt(entry['redis_calls_per_job'], 1)} | "
            f"{fmt(entry['redis_net_in_bytes_per_job'])} | {fmt(entry['redis_net_out_bytes_per_job'])} | "
            f"{fmt(entry['redis_cores'], 2)} |"
        )
    if results.get("ceiling"):
        c = results["ceiling"]
        lines.append(
            f"\nRedis alone ({c['command']}): {c['commands_per_s']:,.0f} commands/s, "
            f"{c['redis_cpu_us_per_command']:.2f} us Redis CPU per command, {c['redis_cores']:.2f} cores busy"
        )
    if results.get("idle"):
        i = results["idle"]
        lines.append(
            f"\nIdle workers ({i['processes']} processes, no jobs), per second per worker process: "
            f"{fmt(i['redis_cpu_us_per_s_per_worker'])} us Redis CPU, {fmt(i['commands_per_s_per_worker'], 1)} "
            f"commands (Redis with no client: {fmt(i['redis_alone_cpu_us_per_s'])} us CPU per second, not counted)"
        )
    if results.get("memory"):
        lines.append("\nRedis memory per job (bench.memory's method, its own embedded Valkey)\n")
        lines.append("| channel | queued, bytes/job | finished, bytes/job | finished, kept 7 days: GB per job/s |")
        lines.append("| --- | --- | --- | --- |")
        for row in results["memory"]:
            lines.append(
                f"| {row['channel']} | {row['queued']:,.0f} | {row['finished']:,.0f} | "
                f"{row['finished'] * RETENTION_S / 1e9:,.1f} |"
            )
    lines.append(
        f"\nThe model: what one Redis core serves, fully used and at {REDIS_HEADROOM:.0%} (one a request: the "
        "drain's Redis CPU less the batch enqueue, plus a single one)\n"
    )
    lines.append(
        "| setup | channel | accepted | Redis CPU us/job | commands/job | jobs/s per Redis core | "
        f"jobs/s at {REDIS_HEADROOM:.0%} | worker processes at {REDIS_HEADROOM:.0%} (x1 rate) | "
        "worker cores per Redis core |"
    )
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for entry in results["drains"]:
        if "model" not in entry:
            continue
        for label, m in sorted(entry["model"].items(), reverse=True):
            accepted = "one a request" if label == "single" else "in batches (the drain's fill)"
            lines.append(
                f"| {entry['label']} | {entry['kind']} | {accepted} | "
                f"{m['redis_cpu_us_per_job']:.0f} | {m['commands_per_job']:.1f} | {m['jobs_per_redis_core_s']:,.0f} | "
                f"{m['jobs_per_s_at_headroom']:,.0f} | {m['worker_processes_at_headroom']:.0f} | "
                f"{m['worker_cores_per_redis_core']:.0f} |"
            )
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work_dir = Path(tempfile.mkdtemp(prefix="dispatcher-capacity-"))
    (work_dir / "logs").mkdir()
    procs = Processes(work_dir / "logs")

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    info = machine()
    results: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.capacity " + " ".join(argv if argv is not None else sys.argv[1:]),
        "revision": revision(),
        "machine": info,
        "drains": [],
        "errors": [],
    }
    say(f"{info['nproc']} cores ({info['cpu']}); revision {results['revision']}; logs in {work_dir / 'logs'}")
    try:
        server = RedisServer(procs, work_dir / "redis", binary=args.redis_server).start()
        info["versions"]["redis_server"] = server.version
        receiver = PythonReceiver(procs, work_dir / "receiver").start()
        ctx = Context(procs, server, work_dir, receiver, quiet_wait=args.quiet_wait)
        if args.receiver == "nginx":
            ctx.nginx = Nginx(procs, work_dir / "nginx").start()
            info["versions"]["nginx"] = ctx.nginx.version
            hook_log, hook_url = ctx.nginx.log_path, ctx.nginx.url
        else:
            hook_log, hook_url = receiver.log_path, receiver.url
        if args.emails:
            ctx.smtp = SmtpReceiver(procs, work_dir / "smtpd").start()
        say(f"{server.version} on {server.url} (appendonly yes, appendfsync everysec); receiver {args.receiver}")

        results["accept"] = {
            kind: accept_costs(server, kind, args.accept_jobs, hook_url("accept"), args.runs)
            for kind in (["webhook", "email"] if args.emails else ["webhook"])
        }
        for kind, costs in results["accept"].items():
            say(
                f"accept {kind}: one a call {fmt(costs['single']['redis_cpu_us_per_job'], 1)} us Redis CPU/job, "
                f"batches {fmt(costs['batch']['redis_cpu_us_per_job'], 1)} us/job"
            )
        if not args.no_ceiling:
            results["ceiling"] = redis_ceiling(server)
        if args.idle_seconds:
            results["idle"] = idle_cost(ctx, max(args.processes), args.idle_seconds, args.runs)
            say(
                f"idle workers: {fmt(results['idle']['redis_cpu_us_per_s_per_worker'])} us Redis CPU and "
                f"{fmt(results['idle']['commands_per_s_per_worker'], 1)} commands per second per worker process"
            )
        plan: list[tuple[str, str, int, int]] = [("ours", "webhook", p, args.jobs) for p in args.processes]
        if args.emails:
            plan += [("ours", "email", p, args.emails) for p in args.processes if p <= 2]
        if not args.no_baseline:
            plan += [("simple", "webhook", p, args.baseline_jobs) for p in (1, 2)]
        for name, kind, processes, n in plan:
            log_path, url = (hook_log, hook_url) if kind == "webhook" else (ctx.smtp.log_path, None)  # type: ignore[union-attr]
            entry = drains(ctx, name, kind, processes, n, args.runs, log_path, url)
            if "value" in entry:
                # A process's rate is the one measured alone: with more processes than cores they share them.
                alone = next(
                    (
                        e
                        for e in results["drains"]
                        if (e["setup"], e["kind"], e["processes"]) == (name, kind, 1) and "per_process" in e
                    ),
                    entry,
                )
                entry["model"] = model(
                    entry, results["accept"][kind] if name == "ours" else None, alone["per_process"]["median"]
                )
            else:
                results["errors"].append(f"{entry['label']} {kind}: every run failed")
            results["drains"].append(entry)
    except KeyboardInterrupt:
        say("interrupted: stopping everything")
        results["errors"].append("interrupted")
    except Exception as exc:
        say(f"FAILED:\n{traceback.format_exc()}")
        results["errors"].append(f"{type(exc).__name__}: {exc}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.memory_jobs and "interrupted" not in results["errors"]:
        say(f"memory: bench.memory's method, {args.memory_jobs} jobs of each channel")
        results["memory"] = [
            {"channel": channel, "queued": queued, "finished": finished}
            for channel, queued, finished, _, _ in memory.measure(args.memory_jobs)
        ]
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    if "accept" in results:
        text = report(results)
        results["table"] = text
        print("\n" + text + "\n")
    if "interrupted" in results["errors"]:  # keep the last complete results; this partial run goes beside them
        args.json = args.json.with_suffix(".interrupted.json")
    write_json(args.json, results)
    say(f"results: {args.json} ({results['elapsed_s']:.0f} s)")
    if results["errors"]:
        say("errors:\n  " + "\n  ".join(results["errors"]))
        say(f"logs kept in {work_dir}")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
