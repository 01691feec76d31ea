"""Child processes of `dispatcher dev` and `dispatcher worker --processes N`: start, watch, stop in order."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable


def say(command: str, message: str) -> None:
    print(f"dispatcher {command}: {message}", file=sys.stderr, flush=True)


class StopRequest:
    """SIGINT/SIGTERM to the parent: the first asks for a stop, a later one for a faster one."""

    def __init__(self) -> None:
        self.count = 0
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.count += 1

    @property
    def requested(self) -> bool:
        return self.count > 0


def spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start a child in its own session (out of the terminal's reach: a Ctrl+C reaches only the parent,
    which stops the children in order); on Linux it gets SIGTERM if the parent dies."""
    return subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_parent_death_signal())


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when its parent dies (say, SIGKILL), else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    return lambda: libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def wait_listening(
    host: str, port: int, children: list[subprocess.Popen], stop: StopRequest, timeout: float
) -> bool:
    """Wait until something accepts connections on host:port; False if a child exits, a stop comes or
    `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not stop.requested and all(child.poll() is None for child in children):
        try:
            with socket.create_connection(("127.0.0.1" if host == "0.0.0.0" else host, port), timeout=0.5):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
    return False


def first_exit(stop: StopRequest, children: dict[str, subprocess.Popen]) -> tuple[str, int] | None:
    """Return None when asked to stop, or the name and exit code of the first child that exits by itself."""
    while not stop.requested:
        for name, child in children.items():
            if child.poll() is not None:
                return name, child.returncode
        time.sleep(0.2)
    return None


def stop_child(command: str, name: str, child: subprocess.Popen, timeout: float, stop: StopRequest) -> None:
    """SIGTERM `child` and wait; another Ctrl+C passes SIGTERM on again (a worker then puts its jobs
    back); past `timeout`, SIGKILL."""
    if child.poll() is not None:
        return
    say(command, f"stopping {name}")
    child.terminate()
    signals_seen = stop.count
    deadline = time.monotonic() + timeout
    while child.poll() is None:
        if stop.count > signals_seen:
            signals_seen = stop.count
            child.terminate()
        if time.monotonic() > deadline:
            say(command, f"{name} did not stop within {timeout:.0f}s; killing it")
            child.kill()
            child.wait()
            return
        time.sleep(0.05)
