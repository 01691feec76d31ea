"""The scenarios: each measures one figure of the issue, `runs` times, and returns rows for the report.

Drain timing (webhooks, emails, slow receiver): the workers start on an empty queue and wait until
registered and idle; the whole queue then becomes visible at once (see bench.setups), and the clock
runs from that moment to the last delivery the receiver logged. Redis calls per job: INFO
commandstats just before the queue appears and after the last job is recorded, minus the
benchmark's own commands, divided by the jobs delivered. Worker CPU per job: user + system time of
the workers' process trees (RQ's work-horses and Celery's pool children included) over the same
window, divided by the jobs delivered: less sensitive than the rate to other processes on the machine.
"""

from __future__ import annotations

import http.client
import json
import re
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench import clients
from bench.services import (
    ArrivalLog,
    BenchError,
    CpuWatch,
    Nginx,
    Processes,
    PythonReceiver,
    RedisServer,
    SmtpReceiver,
    child_env,
    ensure_binary,
    free_port,
    process_tree,
    rss_bytes,
    script,
    tree_cpu_ms,
    wait_for_port,
    wait_for_quiet,
)
from bench.setups import Fill, Setup, make_setup, new_token, webhook_request
from dispatcher.events import event_view
from dispatcher.keys import Keys
from dispatcher.rqstore import WAKE_TOKENS

API_KEY = "bench-key-0123456789abcdef"
#: The slow receiver answers after this long.
SLOW_DELAY = 0.1


@dataclass
class Sizes:
    """How much each scenario does; `quick()` is the smoke-test size."""

    webhooks: dict[str, int] = field(
        default_factory=lambda: {"ours": 10_000, "rq": 300, "simple": 3_000, "celery": 3_000}
    )
    emails: dict[str, int] = field(default_factory=lambda: {"ours": 3_000, "simple": 1_000})
    slow: dict[str, int] = field(default_factory=lambda: {"ours": 3_000, "rq": 40, "simple": 100})
    #: Longest a slow-receiver drain may take; past it the rate so far is reported (marked partial).
    slow_deadline: float = 30.0
    accept_seconds: float = 10.0
    accept_warmup: float = 2.0
    wrk_connections: int = 32
    batch_items: int = 10_000
    latency_rate: float = 200.0
    latency_seconds: float = 10.0
    latency_warmup: float = 1.0
    rss_jobs: int = 4_000
    rss_seconds: float = 6.0
    rss_in_flight: int = 64
    ceiling_seconds: float = 3.0
    #: Fan-out: endpoints of the one application, and events published per run (each to all of them).
    fanout_endpoints: int = 100
    fanout_events: int = 50

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            webhooks={"ours": 200, "rq": 20, "simple": 200, "celery": 200},
            emails={"ours": 200, "simple": 100},
            slow={"ours": 200, "rq": 10, "simple": 20},
            slow_deadline=6.0,
            accept_seconds=3.0,
            accept_warmup=1.0,
            batch_items=200,
            latency_seconds=3.0,
            latency_warmup=0.5,
            rss_jobs=600,
            rss_seconds=3.0,
            ceiling_seconds=1.0,
            fanout_endpoints=20,
            fanout_events=3,
        )


#: Floor rates (jobs/s) used only to set a drain's deadline, so that a stuck setup cannot hang the run.
_FLOOR_RATE = {"ours": 50.0, "rq": 3.0, "simple": 30.0, "celery": 30.0}


@dataclass
class Context:
    procs: Processes
    redis: RedisServer
    work_dir: Path
    receiver: PythonReceiver
    nginx: Nginx | None = None
    smtp: SmtpReceiver | None = None
    concurrency: str | None = None
    #: Before each measurement, wait up to `quiet_wait` s for other processes to use under `quiet_percent` of the CPU.
    quiet_percent: float = 10.0
    quiet_wait: float = 30.0
    #: A run during which other processes used this much of the CPU (% of all cores) is repeated,
    #: up to `extra_runs` more runs per measurement.
    disturbed_percent: float = 15.0
    extra_runs: int = 3
    logs: dict[Path, ArrivalLog] = field(default_factory=dict)

    def quiet(self) -> None:
        if self.quiet_wait > 0:
            wait_for_quiet(self.quiet_percent, self.quiet_wait, self.say)

    def arrivals(self, path: Path) -> ArrivalLog:
        if path not in self.logs:
            self.logs[path] = ArrivalLog(path)
        return self.logs[path]

    def say(self, message: str) -> None:
        print(f"[bench] {message}", flush=True)


# --- statistics ------------------------------------------------------------------------------


def summary(values: list[float]) -> dict:
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def setup_entry(label: str, runs: list[dict], key: str = "value", extra: dict | None = None) -> dict:
    entry = {"label": label, "runs": runs} | summary([r[key] for r in runs if r.get(key) is not None])
    calls = [r["redis_calls_per_job"] for r in runs if r.get("redis_calls_per_job") is not None]
    entry["redis_calls_per_job"] = statistics.median(calls) if calls else None
    return entry | (extra or {})


def is_clean(ctx: Context, run: dict) -> bool:
    return "error" not in run and (run.get("background_cpu_pct") or 0) < ctx.disturbed_percent


def attempts(ctx: Context, runs: int, results: list[dict]) -> Iterator[int]:
    """Run numbers for a measurement loop that appends each run's result to `results`: `runs` of them,
    and more (up to `ctx.extra_runs`) while fewer than `runs` were clean (no error, a quiet machine)."""
    number = 0
    while True:
        clean = sum(1 for r in results if is_clean(ctx, r))
        if clean >= runs or number >= runs + ctx.extra_runs:
            return
        if number >= runs:
            ctx.say(f"{runs - clean} of {runs} runs failed or shared the CPU with other processes: one more run")
        yield number
        number += 1


def select(ctx: Context, results: list[dict], runs: int) -> tuple[list[dict], list[dict]]:
    """(the `runs` results reported: clean ones first, then the least disturbed; the others), in run order."""
    ranked = sorted(results, key=lambda r: (not is_clean(ctx, r), "error" in r, r.get("background_cpu_pct") or 0))
    kept = {id(r) for r in ranked[:runs]}
    return [r for r in results if id(r) in kept], [r for r in results if id(r) not in kept]


def background_note(run: dict) -> str:
    share = run.get("background_cpu_pct") or 0
    return f" (other processes used {share:.0f}% of the CPU meanwhile)" if share >= 5 else ""


# --- one drain -------------------------------------------------------------------------------


def drain(
    ctx: Context, setup: Setup, n: int, log: ArrivalLog, url: Callable[[str], str] | None, deadline: float
) -> dict:
    """Start the setup's workers, fill its queue with `n` jobs at once, time until the receiver saw them all."""
    ctx.redis.flush()
    ctx.quiet()
    token = new_token()
    smtp = ("127.0.0.1", ctx.smtp.port) if ctx.smtp is not None and setup.kind == "email" else None
    setup.start(ctx.procs, ctx.redis.url, f"bench-{token}", ctx.smtp.url if smtp else None)
    try:
        setup.wait_ready()
        fill = setup.prepare_fill(n, url(token) if url else None, token, smtp)
        return timed_drain(ctx, setup, n, log, token, fill, deadline)
    finally:
        setup.stop(ctx.procs)
        log.forget(token)


def timed_drain(
    ctx: Context,
    setup: Setup,
    n: int,
    log: ArrivalLog,
    token: str,
    fill: Fill,
    deadline: float,
    succeeded_before: int = 0,
) -> dict:
    """With the setup's workers ready and idle: commit `fill`, which makes `n` jobs visible at once,
    and time until the receiver logged `n` arrivals of `token`. `succeeded_before`: jobs the setup's
    totals counted as succeeded before this drain (a second drain on the same Redis)."""
    log.poll()
    calls_before = ctx.redis.calls()
    usage_before = ctx.redis.usage()
    own_commands = 2 + fill.commands  # those two INFO, and the fill itself
    cpu = CpuWatch().start()
    worker_pids = [p.pid for p in setup.workers]
    # Taken before the commit: once the jobs are visible the workers start at once.
    worker_cpu_before = tree_cpu_ms(worker_pids)
    t0 = fill.commit()
    limit = time.monotonic() + deadline
    while True:
        time.sleep(0.02)
        log.poll()
        if log.count(token) >= n:
            break
        setup.check_alive()
        if time.monotonic() > limit:
            break
    background = cpu.foreign_percent()
    arrivals = log.arrivals(token)
    delivered = len(arrivals)
    t_last = max((a.at for a in arrivals), default=t0)
    succeeded, commands = setup.settled(n)
    own_commands += commands
    settle_limit = time.monotonic() + 10
    while delivered >= n and succeeded - succeeded_before < n and time.monotonic() < settle_limit:
        time.sleep(0.02)
        succeeded, commands = setup.settled(n)
        own_commands += commands
    succeeded -= succeeded_before
    # After the settle wait, as for the Redis calls: the last jobs' bookkeeping is part of their cost.
    worker_cpu = tree_cpu_ms(worker_pids) - worker_cpu_before
    calls = ctx.redis.calls() - calls_before - own_commands
    # Redis's CPU and traffic include the fill (the jobs' enqueue) and the benchmark's polling.
    redis_used = {k: v - usage_before[k] for k, v in ctx.redis.usage().items()}
    seconds = max(t_last - t0, 1e-6)
    first = min((a.at for a in arrivals), default=t0)
    ids = [a.message_id for a in arrivals if a.message_id != "-"]  # Dispatcher's webhook-id / Message-ID
    return {
        "jobs": n,
        "delivered": delivered,
        "succeeded": succeeded,
        "complete": delivered >= n and succeeded >= n,
        "seconds": round(seconds, 4),
        "value": delivered / seconds,
        "first_delivery_after_s": round(first - t0, 4),
        "redis_calls": calls,
        "redis_calls_per_job": calls / delivered if delivered else None,
        "worker_cpu_ms": round(worker_cpu, 1),
        "worker_cpu_ms_per_job": worker_cpu / delivered if delivered else None,
        "redis_cpu_ms": round(redis_used["cpu_s"] * 1000, 1),
        "redis_cpu_us_per_job": redis_used["cpu_s"] * 1e6 / delivered if delivered else None,
        "redis_net_in_bytes_per_job": redis_used["net_in"] / delivered if delivered else None,
        "redis_net_out_bytes_per_job": redis_used["net_out"] / delivered if delivered else None,
        "duplicates": len(ids) - len(set(ids)),
        "max_in_flight_at_receiver": max((a.in_flight for a in arrivals), default=0),
        "background_cpu_pct": round(background, 1),
    }


def measure_drains(
    ctx: Context,
    scenario: str,
    setup_names: list[str],
    sizes: dict[str, int],
    runs: int,
    log: ArrivalLog,
    url: Callable[[str], str] | None,
    kind: str = "webhook",
    deadline: float | None = None,
) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for name in setup_names:
        if name not in sizes:
            continue
        setup = make_setup(name, kind=kind, concurrency=ctx.concurrency if name == "ours" else None)
        n = sizes[name]
        limit = deadline if deadline is not None else max(20.0, n / _FLOOR_RATE[name])
        run_results: list[dict] = []
        for i in attempts(ctx, runs, run_results):
            try:
                result = drain(ctx, setup, n, log, url, limit)
            except BenchError as exc:
                ctx.say(f"{scenario} / {setup.label} run {i + 1}: FAILED: {exc}")
                result = {"error": str(exc), "jobs": n}
            run_results.append(result)
            if "error" not in result:
                partial = "" if result["complete"] else f"  PARTIAL: {result['delivered']}/{n} in the time limit"
                ctx.say(
                    f"{scenario} / {setup.label} run {i + 1}/{runs}: {n} jobs, {result['value']:,.0f}/s "
                    f"in {result['seconds']:.2f}s, {result['redis_calls_per_job'] or 0:.1f} Redis calls/job, "
                    f"{result['worker_cpu_ms_per_job'] or 0:.2f} ms worker CPU/job{background_note(result)}{partial}"
                )
        kept, discarded = select(ctx, run_results, runs)
        cpu = [r["worker_cpu_ms_per_job"] for r in kept if r.get("worker_cpu_ms_per_job") is not None]
        results[name] = setup_entry(setup.label, kept) | {
            "worker_cpu_ms_per_job": statistics.median(cpu) if cpu else None,
            "jobs": n,
            "processes": setup.processes_count,
            "discarded_runs": discarded,
        }
    return results


# --- scenarios -------------------------------------------------------------------------------


def webhooks(ctx: Context, setups: list[str], sizes: Sizes, runs: int, receiver: str = "nginx") -> list[dict]:
    if receiver == "nginx":
        assert ctx.nginx is not None
        log, url, where = ctx.arrivals(ctx.nginx.log_path), ctx.nginx.url, "local nginx"
    else:
        log, url, where = ctx.arrivals(ctx.receiver.log_path), ctx.receiver.url, "the Python receiver"
    results = measure_drains(ctx, "webhooks", setups, sizes.webhooks, runs, log, url)
    ours = results.get("ours", {}).get("median")
    rq = results.get("rq", {}).get("median")
    met = None
    if ours is not None:
        met = ours >= 1000 and (rq is None or ours / rq >= 30)
    return [
        {
            "id": "webhooks",
            "title": f"Webhooks drained from a full queue to {where}",
            "unit": "deliveries/s",
            "better": "higher",
            "setups": results,
            "target": ">= 1,000/s and >= 30x rq worker",
            "met": met,
            "ratio_target": {"vs": "rq", "min": 30},
        }
    ]


def emails(ctx: Context, setups: list[str], sizes: Sizes, runs: int) -> list[dict]:
    assert ctx.smtp is not None
    log = ctx.arrivals(ctx.smtp.log_path)
    results = measure_drains(ctx, "emails", setups, sizes.emails, runs, log, None, kind="email")
    ours = results.get("ours", {}).get("median")
    return [
        {
            "id": "emails",
            "title": "Emails drained from a full queue to aiosmtpd",
            "unit": "deliveries/s",
            "better": "higher",
            "setups": results,
            "target": ">= 300/s",
            "met": None if ours is None else ours >= 300,
        }
    ]


def slow(ctx: Context, setups: list[str], sizes: Sizes, runs: int) -> list[dict]:
    log = ctx.arrivals(ctx.receiver.log_path)
    results = measure_drains(
        ctx,
        "slow receiver",
        setups,
        sizes.slow,
        runs,
        log,
        lambda token: ctx.receiver.url(token, SLOW_DELAY),
        deadline=sizes.slow_deadline,
    )
    ours = results.get("ours", {}).get("median")
    return [
        {
            "id": "slow",
            "title": "Webhooks to a receiver answering after 100 ms",
            "unit": "deliveries/s",
            "better": "higher",
            "setups": results,
            "target": ">= 400/s",
            "met": None if ours is None else ours >= 400,
        }
    ]


# --- the API ---------------------------------------------------------------------------------


def start_web(ctx: Context, queue: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = child_env(
        {
            "PORT": str(port),
            "REDIS_URL": ctx.redis.url,
            "DISPATCHER_QUEUE": queue,
            "DISPATCHER_API_KEYS": API_KEY,
            "DISPATCHER_ALLOWED_NETWORKS": "127.0.0.0/8",
        }
    )
    process = ctx.procs.start("web", [*script("dispatcher", "dispatcher.cli"), "web"], env)
    wait_for_port(port, 30, process, "dispatcher web")
    deadline = time.monotonic() + 20
    while True:  # gunicorn listens before its workers answer
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return process, port
        except OSError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            raise BenchError(f"dispatcher web did not become ready:\n{ctx.procs.tail(process)}")
        time.sleep(0.1)


@contextmanager
def fresh_web(ctx: Context) -> Iterator[tuple[str, int]]:
    """An emptied Redis, a quiet machine and a new `dispatcher web` on a queue of its own: (queue, port)."""
    ctx.redis.flush()
    ctx.quiet()
    queue = f"bench-{new_token()}"
    web, port = start_web(ctx, queue)
    try:
        yield queue, port
    finally:
        ctx.procs.stop(web)


WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"

done = function(summary, latency, requests)
  io.write(string.format(
    "BENCH_JSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d,\\"max_us\\":%d," ..
    "\\"mean_us\\":%.1f,\\"connect_errors\\":%d,\\"read_errors\\":%d,\\"write_errors\\":%d," ..
    "\\"status_errors\\":%d,\\"timeouts\\":%d}}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    latency.mean, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout))
end
"""


def lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_wrk(wrk: str, script_path: Path, port: int, seconds: float, connections: int) -> dict:
    argv = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "-s",
        str(script_path),
        f"http://127.0.0.1:{port}/v1/webhooks",
    ]
    output = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    match = re.search(r"BENCH_JSON (\{.*\})", output.stdout)
    if output.returncode != 0 or match is None:
        raise BenchError(f"wrk failed ({output.returncode}): {output.stdout[-2000:]} {output.stderr[-2000:]}")
    result = json.loads(match.group(1))
    result["output"] = output.stdout
    return result


def accept(ctx: Context, sizes: Sizes, runs: int) -> list[dict]:
    """POST /v1/webhooks under `dispatcher web` (gunicorn with gevent workers, the Procfile's web process), by wrk."""
    wrk = ensure_binary("wrk", ["wrk"])
    version = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    ctx.wrk_version = (version.stdout or version.stderr).strip().splitlines()[0]  # type: ignore[attr-defined]
    target = ctx.nginx.url("accept") if ctx.nginx else ctx.receiver.url("accept")
    body = json.dumps(webhook_request(target), separators=(",", ":"))
    script_path = ctx.work_dir / "post-webhook.lua"
    script_path.write_text(WRK_SCRIPT.format(body=lua_string(body), key=API_KEY))
    run_results: list[dict] = []
    for i in attempts(ctx, runs, run_results):
        try:
            with fresh_web(ctx) as (queue, port):
                warm = run_wrk(wrk, script_path, port, sizes.accept_warmup, sizes.wrk_connections)
                calls_before = ctx.redis.calls()
                cpu = CpuWatch().start()
                result = run_wrk(wrk, script_path, port, sizes.accept_seconds, sizes.wrk_connections)
                background = cpu.foreign_percent()
                calls = ctx.redis.calls() - calls_before - 1
                queued = ctx.redis.client.llen(f"rq:queue:{queue}")
        except BenchError as exc:
            ctx.say(f"accept run {i + 1}: FAILED: {exc}")
            run_results.append({"error": str(exc)})
            continue
        ok = result["requests"] - result["status_errors"]
        expected_queued = warm["requests"] - warm["status_errors"] + ok
        rate = result["requests"] / (result["duration_us"] / 1e6)
        run = {
            "value": rate,
            "requests": result["requests"],
            "p50_ms": result["p50_us"] / 1000,
            "p99_ms": result["p99_us"] / 1000,
            "max_ms": result["max_us"] / 1000,
            "non_2xx": result["status_errors"],
            "socket_errors": result["connect_errors"]
            + result["read_errors"]
            + result["write_errors"]
            + result["timeouts"],
            "queued_jobs": queued,
            "all_accepted_jobs_queued": queued == expected_queued,
            "redis_calls_per_job": calls / ok if ok else None,
            "background_cpu_pct": round(background, 1),
            "wrk_output": result["output"],
        }
        run_results.append(run)
        ctx.say(
            f"accept run {i + 1}/{runs}: {rate:,.0f} req/s, p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms, "
            f"non-2xx {run['non_2xx']}, socket errors {run['socket_errors']}, "
            f"{run['redis_calls_per_job'] or 0:.1f} Redis calls/request{background_note(run)}"
        )
    label = f"dispatcher web (gunicorn, gevent workers), wrk -t1 -c{sizes.wrk_connections}"
    kept, discarded = select(ctx, run_results, runs)
    good = [r for r in kept if "error" not in r]
    rate = setup_entry(label, kept) | {"discarded_runs": discarded}
    p99 = setup_entry(label, [{"value": r["p99_ms"]} for r in good]) | {"redis_calls_per_job": None}
    p99["runs"] = [
        {"value": r["p99_ms"], "p50_ms": r["p50_ms"], "background_cpu_pct": r["background_cpu_pct"]} for r in good
    ]
    return [
        {
            "id": "accept_rate",
            "title": f"Accept rate: POST /v1/webhooks, wrk {sizes.wrk_connections} connections",
            "unit": "req/s",
            "better": "higher",
            "setups": {"ours": rate},
            "target": ">= 2,000 req/s",
            "met": None if rate["median"] is None else rate["median"] >= 2000,
        },
        {
            "id": "accept_p99",
            "same_runs_as": "accept_rate",
            "title": "Accept latency p99 (same runs)",
            "unit": "ms",
            "better": "lower",
            "setups": {"ours": p99},
            "target": "<= 50 ms",
            "met": None if p99["median"] is None else p99["median"] <= 50,
        },
    ]


def batch(ctx: Context, sizes: Sizes, runs: int) -> list[dict]:
    """One `POST /v1/webhooks/batch` of `batch_items` webhooks under `dispatcher web`, timed by this process.

    Baseline, in the same runs: RQ's own `Queue.enqueue_many` of as many jobs in one pipeline, called
    in-process (no HTTP, no validation), with the same signed body per job.
    """
    target = ctx.nginx.url("batch") if ctx.nginx else ctx.receiver.url("batch")
    n = sizes.batch_items
    items = [webhook_request(target) for _ in range(n)]
    for i, item in enumerate(items):
        item["payload"]["order_id"] = i
    body = json.dumps({"items": items}, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    ours: list[dict] = []
    theirs: list[dict] = []
    for i in attempts(ctx, runs, ours):
        try:
            with fresh_web(ctx) as (queue, port):
                # The first batch a fresh server takes is slower (its memory grows, Redis's too):
                # it is reported, the second is the figure, as the accept scenario warms up first.
                first, _ = post_batch(port, body, headers)
                queued_first = ctx.redis.client.llen(f"rq:queue:{queue}")
                calls_before = ctx.redis.calls()
                cpu = CpuWatch().start()
                took, (response, answer) = post_batch(port, body, headers)
                background = cpu.foreign_percent()
                calls = ctx.redis.calls() - calls_before - 1
                queued = ctx.redis.client.llen(f"rq:queue:{queue}") - queued_first
        except (BenchError, OSError) as exc:
            ctx.say(f"batch run {i + 1}: FAILED: {exc}")
            ours.append({"error": str(exc)})
            continue
        if response.status != 202 or len(answer["items"]) != n or queued != n:
            ours.append({"error": f"status {response.status}, {len(answer['items'])} ids, {queued} queued of {n}"})
            ctx.say(f"batch run {i + 1}: FAILED: {ours[-1]['error']}")
            continue
        baseline = _rq_enqueue_many(ctx.redis, n, target)
        ours.append(
            {
                "value": took * 1000,
                "first_batch_ms": first * 1000,
                "items": n,
                "redis_calls_per_job": calls / n,
                "background_cpu_pct": round(background, 1),
            }
        )
        theirs.append({"value": baseline["seconds"] * 1000, "redis_calls_per_job": baseline["calls"] / n})
        ctx.say(
            f"batch run {i + 1}/{runs}: {n:,} webhooks accepted in {took * 1000:,.0f} ms "
            f"(the server's first batch: {first * 1000:,.0f} ms) "
            f"({calls / n:.2f} Redis calls/job); RQ Queue.enqueue_many in-process: "
            f"{baseline['seconds'] * 1000:,.0f} ms{background_note(ours[-1])}"
        )
    kept, discarded = select(ctx, ours, runs)
    good = [r for r in kept if "error" not in r]
    ours_entry = setup_entry(f"POST /v1/webhooks/batch, {n:,} items", kept) | {"discarded_runs": discarded}
    ours_entry["redis_calls_per_job"] = statistics.median(r["redis_calls_per_job"] for r in good) if good else None
    rq_entry = setup_entry("Queue.enqueue_many in-process (no HTTP, no validation)", theirs)
    rq_entry["redis_calls_per_job"] = statistics.median(r["redis_calls_per_job"] for r in theirs) if theirs else None
    return [
        {
            "id": "accept_batch",
            "title": f"A {n:,}-item batch accepted (rq column: RQ's Queue.enqueue_many, in-process)",
            "unit": "ms",
            "better": "lower",
            "setups": {"ours": ours_entry, "rq": rq_entry},
            "target": "<= 1,000 ms",
            "met": None if ours_entry["median"] is None else ours_entry["median"] <= 1000,
        }
    ]


def template_batch(ctx: Context, sizes: Sizes, runs: int) -> list[dict]:
    """One `POST /v1/emails/batch` of a template and `batch_items` recipients, each with its own
    variables, rendered by the API as it accepts them; against, in the same runs, the same emails
    rendered by the client and sent as a plain batch of `items`."""
    n = sizes.batch_items
    template = {
        "subject": "Your order {{ order }}, {{ name }}",
        "text": "Hello {{ name }},\n{% for item in items %}- {{ item }}\n{% endfor %}Thank you!",
        "html": "<p>Hello {{ name }}</p><ul>{% for item in items %}<li>{{ item }}</li>{% endfor %}</ul>",
    }
    variables = [{"name": f"Customer {i}", "order": i, "items": ["book", "pen", f"gift {i}"]} for i in range(n)]
    recipients = [{"to": [f"customer{i}@example.com"], "variables": v} for i, v in enumerate(variables)]
    templated = json.dumps({"template": template, "recipients": recipients, "from": "shop@example.com"}).encode()
    items = [
        {
            "to": r["to"],
            "from": "shop@example.com",
            "subject": f"Your order {v['order']}, {v['name']}",
            "text": f"Hello {v['name']},\n" + "".join(f"- {item}\n" for item in v["items"]) + "Thank you!",
            "html": f"<p>Hello {v['name']}</p><ul>" + "".join(f"<li>{item}</li>" for item in v["items"]) + "</ul>",
        }
        for r, v in zip(recipients, variables, strict=True)
    ]
    plain = json.dumps({"items": items}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    ours: list[dict] = []
    theirs: list[dict] = []
    for i in attempts(ctx, runs, ours):
        try:
            with fresh_web(ctx) as (_, port):
                post_batch(port, plain, headers, "emails")  # warm the server up, as `batch` does
                cpu = CpuWatch().start()
                took, (response, answer) = post_batch(port, templated, headers, "emails")
                background = cpu.foreign_percent()
                plain_took, (plain_response, _) = post_batch(port, plain, headers, "emails")
        except (BenchError, OSError) as exc:
            ctx.say(f"template batch run {i + 1}: FAILED: {exc}")
            ours.append({"error": str(exc)})
            continue
        if response.status != 202 or answer["count"] != n or plain_response.status != 202:
            ours.append({"error": f"status {response.status} and {plain_response.status}"})
            ctx.say(f"template batch run {i + 1}: FAILED: {ours[-1]['error']}")
            continue
        ours.append({"value": took * 1000, "items": n, "background_cpu_pct": round(background, 1)})
        theirs.append({"value": plain_took * 1000})
        ctx.say(
            f"template batch run {i + 1}/{runs}: {n:,} recipients rendered and accepted in {took * 1000:,.0f} ms; "
            f"the same emails rendered by the client: {plain_took * 1000:,.0f} ms{background_note(ours[-1])}"
        )
    kept, discarded = select(ctx, ours, runs)
    ours_entry = setup_entry(f"POST /v1/emails/batch, a template and {n:,} recipients", kept)
    return [
        {
            "id": "template_batch",
            "title": f"A {n:,}-recipient template batch accepted (simple column: the same emails as items)",
            "unit": "ms",
            "better": "lower",
            "setups": {"ours": ours_entry | {"discarded_runs": discarded},
                       "simple": setup_entry("the same emails, rendered by the client, as items", theirs)},
            # Rendering costs what it costs; the figure to watch is its ratio to the plain batch.
            "target": "—",
            "met": None,
        }
    ]


def post_batch(port: int, body: bytes, headers: dict[str, str], path: str = "webhooks") -> tuple[float, tuple]:
    """POST a batch; (seconds until the whole answer was read, (response, its JSON))."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/{path}/batch", body, headers)
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - started, (response, answer)


def _rq_enqueue_many(redis_server: RedisServer, n: int, url: str) -> dict:
    """RQ's own bulk enqueue of `n` webhook jobs (as the baseline workers run them) in one pipeline."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    queue = Queue(f"bench-{new_token()}", connection=redis_server.client, serializer=JSONSerializer)
    request = webhook_request(url)
    calls_before = redis_server.calls()
    started = time.perf_counter()
    datas = [
        Queue.prepare_data(
            "bench.baselines.post_webhook",
            args=(url, json.dumps({"type": request["event_type"], "data": request["payload"] | {"order_id": i}})),
        )
        for i in range(n)
    ]
    with redis_server.client.pipeline() as pipe:
        queue.enqueue_many(datas, pipeline=pipe)
        pipe.execute()
    seconds = time.perf_counter() - started
    calls = redis_server.calls() - calls_before - 1
    if queue.count != n:
        raise BenchError(f"RQ enqueue_many queued {queue.count} of {n} jobs")
    return {"seconds": seconds, "calls": calls}


def latency(ctx: Context, sizes: Sizes, runs: int) -> list[dict]:
    """202 from the API to the receiver getting the webhook, at a fixed request rate, API and workers running."""
    log = ctx.arrivals(ctx.receiver.log_path)
    run_results: list[dict] = []
    for i in attempts(ctx, runs, run_results):
        ctx.redis.flush()
        ctx.quiet()
        token = new_token()
        queue = f"bench-{token}"
        setup = make_setup("ours", concurrency=ctx.concurrency)
        web = None
        try:
            web, port = start_web(ctx, queue)
            setup.start(ctx.procs, ctx.redis.url, queue)
            setup.wait_ready()
            body = json.dumps(webhook_request(ctx.receiver.url(token))).encode()
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
            log.poll()
            calls_before = ctx.redis.calls()
            seconds = sizes.latency_warmup + sizes.latency_seconds
            cpu = CpuWatch().start()
            accepted = clients.fixed_rate(port, "/v1/webhooks", body, headers, sizes.latency_rate, seconds)
            background = cpu.foreign_percent()
            ids = {a.job_id for a in accepted if a.job_id}
            limit = time.monotonic() + 20
            while True:
                log.poll()
                if {a.message_id for a in log.arrivals(token)} >= ids or time.monotonic() > limit:
                    break
                setup.check_alive()
                time.sleep(0.05)
            time.sleep(0.2)  # the last jobs' bookkeeping after their POST
            calls = ctx.redis.calls() - calls_before - 1
        except BenchError as exc:
            ctx.say(f"latency run {i + 1}: FAILED: {exc}")
            run_results.append({"error": str(exc)})
            continue
        finally:
            if setup.workers:
                setup.stop(ctx.procs)
            if web is not None:
                ctx.procs.stop(web)
            arrived: dict[str, float] = {}
            for arrival in log.arrivals(token):
                arrived.setdefault(arrival.message_id, arrival.at)
            log.forget(token)
        start = min(a.due for a in accepted)
        measured = [a for a in accepted if a.due - start >= sizes.latency_warmup]
        ok = [a for a in measured if a.status == 202]
        latencies = [(arrived[a.job_id] - a.accepted_at) * 1000 for a in ok if a.job_id in arrived]
        accept_ms = [(a.accepted_at - a.sent_at) * 1000 for a in ok]
        lateness = [max(0.0, a.late) * 1000 for a in measured]
        if not latencies:
            run_results.append({"error": "no webhook arrived"})
            continue
        run = {
            "requests": len(measured),
            "accepted": len(ok),
            "delivered": len(latencies),
            "rate": len(measured) / sizes.latency_seconds,
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies),
            "accept_p50_ms": percentile(accept_ms, 50),
            "accept_p99_ms": percentile(accept_ms, 99),
            "generator_lateness_p99_ms": percentile(lateness, 99),
            "redis_calls_per_job": calls / len(accepted) if accepted else None,
            "background_cpu_pct": round(background, 1),
        }
        run_results.append(run)
        ctx.say(
            f"latency run {i + 1}/{runs}: {run['accepted']} accepted at {sizes.latency_rate:.0f}/s, "
            f"{run['delivered']} delivered; 202 -> receiver p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms, "
            f"max {run['max_ms']:.1f} ms (generator late by {run['generator_lateness_p99_ms']:.1f} ms p99; "
            f"{run['redis_calls_per_job'] or 0:.1f} Redis calls per webhook, API + worker){background_note(run)}"
        )
    kept, discarded = select(ctx, run_results, runs)
    good = [r for r in kept if "error" not in r]
    label = "dispatcher web + Dispatcher worker x2"
    rows = []
    for pct, limit_ms in (("p50", 10), ("p99", 100)):
        entry = setup_entry(label, [{"value": r[f"{pct}_ms"]} | r for r in good])
        rows.append(
            {
                "id": f"latency_{pct}",
                "same_runs_as": "latency_p50" if pct == "p99" else None,
                "title": f"Latency 202 -> receiver at {sizes.latency_rate:.0f} req/s, {pct}",
                "unit": "ms",
                "better": "lower",
                "setups": {"ours": entry},
                "target": f"<= {limit_ms} ms",
                "met": None if entry["median"] is None else entry["median"] <= limit_ms,
            }
        )
    rows[0]["setups"]["ours"]["runs"] = kept
    rows[0]["setups"]["ours"]["discarded_runs"] = discarded
    return rows


def rss(ctx: Context, sizes: Sizes, runs: int) -> list[dict]:
    """Peak RSS of one worker process (and any children) while it has `rss_in_flight` deliveries to a slow receiver."""
    log = ctx.arrivals(ctx.receiver.log_path)
    run_results: list[dict] = []
    for i in attempts(ctx, runs, run_results):
        ctx.redis.flush()
        ctx.quiet()
        token = new_token()
        # Every delivery goes to one receiver: the per-host share would keep a quarter of the slots
        # free for other hosts, and the point here is the memory of all of them in flight.
        in_flight = str(sizes.rss_in_flight)
        setup = make_setup("ours", concurrency=in_flight, processes=1, max_per_host=in_flight)
        try:
            setup.start(ctx.procs, ctx.redis.url, f"bench-{token}")
            setup.wait_ready()
            pid = setup.workers[0].pid
            idle = rss_bytes(pid)
            fill = setup.prepare_fill(sizes.rss_jobs, ctx.receiver.url(token, SLOW_DELAY), token)
            fill.commit()
            peak, peak_main, samples, tree = idle, rss_bytes(pid, tree=False), [], len(process_tree(pid))
            end = time.monotonic() + sizes.rss_seconds
            while time.monotonic() < end:
                time.sleep(0.1)
                current = rss_bytes(pid)
                samples.append(current)
                peak = max(peak, current)
                peak_main = max(peak_main, rss_bytes(pid, tree=False))
                tree = max(tree, len(process_tree(pid)))
                setup.check_alive()
            log.poll()
            arrivals = log.arrivals(token)
        except BenchError as exc:
            ctx.say(f"rss run {i + 1}: FAILED: {exc}")
            run_results.append({"error": str(exc)})
            continue
        finally:
            if setup.workers:
                setup.stop(ctx.procs)
            log.forget(token)
        in_flight = [a.in_flight for a in arrivals]
        steady = in_flight[len(in_flight) // 4 :] or in_flight
        run = {
            "value": peak / 2**20,
            "main_process_peak_mb": peak_main / 2**20,
            "processes_in_tree": tree,
            "idle_mb": idle / 2**20,
            "median_mb": statistics.median(samples) / 2**20 if samples else None,
            "max_in_flight": max(in_flight, default=0),
            "median_in_flight": statistics.median(steady) if steady else 0,
            "delivered": len(arrivals),
            "deliveries_per_s": len(arrivals) / sizes.rss_seconds,
        }
        run_results.append(run)
        ctx.say(
            f"rss run {i + 1}/{runs}: peak {run['value']:.1f} MB in {tree} process(es) "
            f"(main process {run['main_process_peak_mb']:.1f} MB; idle {run['idle_mb']:.1f} MB), "
            f"in flight at the receiver: max {run['max_in_flight']}, median {run['median_in_flight']:.0f}; "
            f"{run['deliveries_per_s']:.0f} deliveries/s"
        )
    kept, discarded = select(ctx, run_results, runs)
    entry = setup_entry(f"Dispatcher worker x1, DISPATCHER_CONCURRENCY={sizes.rss_in_flight}", kept)
    entry["discarded_runs"] = discarded
    good = [r for r in kept if "error" not in r]
    in_flight = max((r["max_in_flight"] for r in good), default=0)
    entry["max_in_flight"] = in_flight
    met = None
    if entry["median"] is not None:
        met = entry["median"] < 150 and in_flight >= sizes.rss_in_flight
    return [
        {
            "id": "rss",
            "title": f"Worker RSS with {sizes.rss_in_flight} deliveries in flight (100 ms receiver)",
            "unit": "MB",
            "better": "lower",
            "setups": {"ours": entry},
            "target": "< 150 MB",
            "met": met,
            "note": None
            if in_flight >= sizes.rss_in_flight
            else f"only {in_flight} deliveries were ever in flight at once, not {sizes.rss_in_flight}",
        }
    ]


# --- fan-out: one event to many endpoints ---------------------------------------------------


def fanout(ctx: Context, sizes: Sizes, runs: int, receiver: str = "nginx") -> list[dict]:
    """One application with `fanout_endpoints` endpoints (each its own URL on the receiver), and
    `fanout_events` events published per run, each delivered to every endpoint.

    Baseline, in the same runs (the simple column): the same deliveries as plain webhooks, one
    `POST /v1/webhooks/batch` of `fanout_endpoints` items (the same URLs and payload) per event,
    delivered by the same Dispatcher workers. What separates them is the endpoint registry: the
    event's publish reads the application's endpoints, and each delivery reads its endpoint and
    secrets (one pipelined round trip) and passes its gate.

    Each run: a fresh `dispatcher web`, no worker; the application and its endpoints registered
    through the API; one event and one batch to warm the server up (their jobs are dropped); then
    events and batches POSTed alternately over one kept-alive connection, each timed until its whole
    202 answer is read. Events join the `default` priority's queue, batches the `low` one (their
    defaults), so the two sets stay apart; both lists are then moved aside. The web server stops
    and each set is drained as the webhooks scenario drains a queue: Dispatcher's 2 workers start,
    and once they are idle the list is moved back in one MULTI/EXEC (with wake tokens and TIME), timed
    to the last arrival. The two drains alternate in order from run to run.
    """
    if receiver == "nginx" and ctx.nginx is not None:
        log, url, where = ctx.arrivals(ctx.nginx.log_path), ctx.nginx.url, "local nginx"
    else:
        log, url, where = ctx.arrivals(ctx.receiver.log_path), ctx.receiver.url, "the Python receiver"
    endpoints, events = sizes.fanout_endpoints, sizes.fanout_events
    n = endpoints * events
    results: list[dict] = []
    for i in attempts(ctx, runs, results):
        try:
            result = _fanout_run(ctx, sizes, log, url, drains_first="simple" if i % 2 else "ours")
        except (BenchError, OSError, KeyError, ValueError) as exc:
            ctx.say(f"fanout run {i + 1}: FAILED: {type(exc).__name__}: {exc}")
            results.append({"error": str(exc)})
            continue
        results.append(result)
        ours, plain = result["ours"], result["simple"]
        ctx.say(
            f"fanout run {i + 1}/{runs}: {events} events x {endpoints} endpoints; an event accepted in "
            f"{ours['accept_ms_median']:.1f} ms (median; a {endpoints}-item batch: "
            f"{plain['accept_ms_median']:.1f} ms); delivered {ours['value']:,.0f}/s in {ours['seconds']:.2f}s, "
            f"{ours['redis_calls_per_job'] or 0:.1f} Redis calls/job, {ours['worker_cpu_ms_per_job'] or 0:.2f} ms "
            f"worker CPU/job (plain webhooks: {plain['value']:,.0f}/s in {plain['seconds']:.2f}s, "
            f"{plain['redis_calls_per_job'] or 0:.1f}, {plain['worker_cpu_ms_per_job'] or 0:.2f}); "
            f"{result['events_finished']}/{events} events finished{background_note(result)}"
            + ("" if ours["complete"] and plain["complete"] else "  PARTIAL")
        )
    kept, discarded = select(ctx, results, runs)
    labels = {
        "ours": f"events, {endpoints} endpoints each; Dispatcher worker x2",
        "simple": f"plain webhooks, one {endpoints}-item batch per event; Dispatcher worker x2",
    }
    accept_labels = {
        "ours": f"POST /v1/applications/<app>/events, {endpoints} endpoints",
        "simple": f"POST /v1/webhooks/batch, {endpoints} items",
    }
    rate: dict[str, dict] = {}
    accepted: dict[str, dict] = {}
    for name in ("ours", "simple"):
        drains = [r[name] if "error" not in r else r for r in kept]
        cpu = [d["worker_cpu_ms_per_job"] for d in drains if d.get("worker_cpu_ms_per_job") is not None]
        rate[name] = setup_entry(labels[name], drains) | {
            "worker_cpu_ms_per_job": statistics.median(cpu) if cpu else None,
            "jobs": n,
            "processes": 2,
        }
        accept_runs = [
            {"value": r[name]["accept_ms_median"], "background_cpu_pct": r["accept_background_cpu_pct"]}
            for r in kept
            if "error" not in r
        ]
        accepted[name] = setup_entry(accept_labels[name], accept_runs) | {"redis_calls_per_job": None}
    rate["ours"]["discarded_runs"] = discarded
    return [
        {
            "id": "fanout_rate",
            "title": f"Fan-out: {events} events x {endpoints} endpoints delivered to {where} "
            "(simple column: the same as plain webhook batches)",
            "unit": "deliveries/s",
            "better": "higher",
            "setups": rate,
            # Not a target of the issue's: the figure to watch is the ratio to the plain batches.
            "target": "—",
            "met": None,
            "chart": False,
            "endpoints": endpoints,
            "events": events,
        },
        {
            "id": "fanout_accept",
            "same_runs_as": "fanout_rate",
            "title": f"Fan-out: one event to {endpoints} endpoints accepted, median per run "
            f"(simple column: a {endpoints}-item webhook batch)",
            "unit": "ms",
            "better": "lower",
            "setups": accepted,
            "target": "—",
            "met": None,
        },
    ]


def _fanout_run(ctx: Context, sizes: Sizes, log: ArrivalLog, url: Callable[[str], str], drains_first: str) -> dict:
    endpoints, events = sizes.fanout_endpoints, sizes.fanout_events
    n = endpoints * events
    tokens = {"ours": new_token(), "simple": new_token()}
    urls = {name: [f"{url(token)}/e{j}" for j in range(endpoints)] for name, token in tokens.items()}
    request = webhook_request("")
    event = json.dumps({"event_type": request["event_type"], "payload": request["payload"]}).encode()
    items = [{"url": u, "event_type": request["event_type"], "payload": request["payload"]} for u in urls["simple"]]
    batch = json.dumps({"items": items}).encode()
    accept_ms: dict[str, list[float]] = {"ours": [], "simple": []}
    event_ids: list[str] = []
    with fresh_web(ctx) as (queue, port):
        lists = {"ours": f"rq:queue:{queue}", "simple": f"rq:queue:{queue}-low"}  # default and low priority
        stashes = {name: f"{key}-bench-stash" for name, key in lists.items()}
        api = _Api(port)
        try:
            application = api.post("/v1/applications", {"name": "bench fan-out"}, 201)["id"]
            for endpoint_url in urls["ours"]:
                api.post(f"/v1/applications/{application}/endpoints", {"url": endpoint_url}, 201)
            events_path = f"/v1/applications/{application}/events"
            api.post(events_path, event, 202)  # warm the server up: these jobs are dropped below
            api.post("/v1/webhooks/batch", batch, 202)
            ctx.redis.client.delete(*lists.values())
            cpu = CpuWatch().start()
            for _ in range(events):
                started = time.perf_counter()
                answer = api.post(events_path, event, 202)
                accept_ms["ours"].append((time.perf_counter() - started) * 1000)
                if answer["count"] != endpoints:
                    raise BenchError(f"an event went to {answer['count']} endpoints, not {endpoints}")
                event_ids.append(answer["id"])
                started = time.perf_counter()
                answer = api.post("/v1/webhooks/batch", batch, 202)
                accept_ms["simple"].append((time.perf_counter() - started) * 1000)
                if len(answer["items"]) != endpoints:
                    raise BenchError(f"a batch answered {len(answer['items'])} ids, not {endpoints}")
            accept_background = cpu.foreign_percent()
        finally:
            api.close()
        client = ctx.redis.client
        for key in lists.values():
            if client.llen(key) != n:
                raise BenchError(f"{key} holds {client.llen(key)} jobs, not {n}")
        with client.pipeline(transaction=True) as pipe:
            for name, key in lists.items():
                pipe.rename(key, stashes[name])
            pipe.delete(Keys(queue).wake)
            pipe.execute()
    # The web server has stopped: the workers have the machine to themselves.
    setup = make_setup("ours", concurrency=ctx.concurrency)
    drained: dict[str, dict] = {}
    finished = 0
    for name in (drains_first, "simple" if drains_first == "ours" else "ours"):
        setup.start(ctx.procs, ctx.redis.url, queue)
        try:
            setup.wait_ready()
            before, _ = setup.settled(n)
            pipe = setup.connection.pipeline(transaction=True)
            pipe.rename(stashes[name], lists[name])
            pipe.rpush(Keys(queue).wake, *[1] * WAKE_TOKENS)
            pipe.time()
            deadline = max(20.0, n / _FLOOR_RATE["ours"])
            drained[name] = timed_drain(ctx, setup, n, log, tokens[name], Fill(pipe), deadline, before)
            if name == "ours":
                views = [event_view(setup.connection, Keys(queue), event_id) for event_id in event_ids]
                finished = sum(1 for view in views if view is not None and view["finished_at"] is not None)
        finally:
            setup.stop(ctx.procs)
            log.forget(tokens[name])
    result: dict = {
        "events": events,
        "endpoints": endpoints,
        "drained_first": drains_first,
        "events_finished": finished,
        "accept_background_cpu_pct": round(accept_background, 1),
    }
    for name in ("ours", "simple"):
        took = accept_ms[name]
        # What the report keeps of a run is each column's part: it holds the run's shared figures too.
        result[name] = drained[name] | {
            "accept_ms_median": statistics.median(took),
            "accept_ms_p90": percentile(took, 90),
            "accept_ms_max": max(took),
            "accept_background_cpu_pct": result["accept_background_cpu_pct"],
            "drained_first": drains_first,
        }
    result["ours"]["events_finished"] = finished
    result["background_cpu_pct"] = max(
        result["accept_background_cpu_pct"], *(drained[name]["background_cpu_pct"] for name in drained)
    )
    return result


class _Api:
    """Requests to `dispatcher web` over one kept-alive connection."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}

    def post(self, path: str, body: bytes | dict, status: int) -> dict:
        """POST `body` (bytes, or a dict sent as JSON) and read the whole answer; BenchError unless `status`."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.connection.request("POST", path, data, self.headers)
        response = self.connection.getresponse()
        raw = response.read()
        if response.status != status:
            raise BenchError(f"POST {path}: {response.status} (expected {status}): {raw[:500]!r}")
        return json.loads(raw)

    def close(self) -> None:
        self.connection.close()


def ceilings(ctx: Context, sizes: Sizes, smtp: bool) -> dict:
    """What the Python receivers can answer on their own, so it is known whether they are the bottleneck."""
    body = json.dumps(webhook_request("http://127.0.0.1/")).encode()
    port, seconds = ctx.receiver.port, sizes.ceiling_seconds
    result = {
        "receiver_100ms_64_connections": clients.hammer(port, f"/hook/ceiling?delay={SLOW_DELAY:g}", body, 64, seconds),
        "receiver_no_delay_64_connections": clients.hammer(port, "/hook/ceiling", body, 64, seconds),
    }
    ctx.arrivals(ctx.receiver.log_path).poll()
    ctx.arrivals(ctx.receiver.log_path).forget("ceiling")
    ctx.say(
        f"Python receiver alone, 64 kept-alive connections: {result['receiver_100ms_64_connections']:,.0f}/s "
        f"answering after 100 ms (64 connections allow at most {64 / SLOW_DELAY:,.0f}/s); "
        f"{result['receiver_no_delay_64_connections']:,.0f}/s with no delay (bounded by the Python client)"
    )
    if smtp and ctx.smtp is not None:
        result["smtpd_2x4_connections"] = clients.smtp_hammer(ctx.smtp.port, seconds)
        ctx.arrivals(ctx.smtp.log_path).poll()
        ctx.arrivals(ctx.smtp.log_path).forget("ceiling")
        ctx.say(
            f"aiosmtpd alone, 2 client processes x 4 kept-open connections: {result['smtpd_2x4_connections']:,.0f} "
            "mails/s (the clients share the 2 cores with it)"
        )
    return result
