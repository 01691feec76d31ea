"""Hosts for tests: Linux network namespaces joined by one bridge, addressed from 192.0.2.0/24.

Every namespace, link and address lives in namespaces this module creates: the bridge sits
in a namespace of its own, so the host's own network never changes. Each host's link is a
veth pair whose far end is a port of the bridge; setting that port down cuts the host off as
a pulled cable would (its packets are lost, no error reaches its sockets at once).

192.0.2.0/24 is TEST-NET-1 (RFC 5737), a documentation range: no real host has it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

IP = "/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "ip"
NETWORK = "192.0.2"
#: CLONE_NEWNET (linux/sched.h): setns() joins a network namespace.
CLONE_NEWNET = 0x40000000
#: How long one `ip` command may take.
IP_TIMEOUT = 10

T = TypeVar("T")


class NamespacesUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no CAP_SYS_ADMIN, no iproute2)."""


def _ip(*args: str) -> None:
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=IP_TIMEOUT)
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, [IP, *args], result.stdout, result.stderr)


def _setns(path: str) -> None:
    """Move the calling thread (only it: a network namespace is per thread) into the namespace at `path`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


@dataclass
class Network:
    """Namespaces named `<prefix>-<host>`, each with one address on a bridge in `<prefix>-switch`."""

    prefix: str
    hosts: dict[str, str] = field(default_factory=dict)  # name -> address
    processes: list[subprocess.Popen] = field(default_factory=list)
    _made: list[str] = field(default_factory=list)
    _threads: list[ThreadPoolExecutor] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    @property
    def switch(self) -> str:
        return self.ns("switch")

    def _port(self, host: str) -> str:
        """The bridge's port for `host` (an interface name: at most 15 characters)."""
        return f"p{list(self.hosts).index(host)}"

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def start(self, hosts: list[str]) -> None:
        """Make the switch and one namespace per host, `host` i at 192.0.2.(i + 1)."""
        try:
            self._add_namespace(self.switch)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
            raise NamespacesUnavailable(f"`ip netns add` failed: {detail}") from exc
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for index, host in enumerate(hosts):
            address = f"{NETWORK}.{index + 1}"
            self.hosts[host] = address
            ns = self.ns(host)
            self._add_namespace(ns)
            port = self._port(host)
            # Made inside the switch with its peer inside the host: no interface ever appears in ours.
            _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def cut(self, host: str) -> None:
        """Unplug `host`: its bridge port goes down, its packets are lost."""
        _ip("-n", self.switch, "link", "set", self._port(host), "down")

    def restore(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", self._port(host), "up")

    def popen(self, host: str, argv: list[str], **kwargs) -> subprocess.Popen:  # type: ignore[no-untyped-def]
        """Start `argv` inside `host`'s namespace (`ip netns exec` execs it: the pid is the command's)."""
        process = subprocess.Popen([IP, "netns", "exec", self.ns(host), *argv], **kwargs)
        self.processes.append(process)
        return process

    def thread(self, host: str) -> Callable[[Callable[[], T], float], T]:
        """A thread of this process living in `host`'s namespace: `call(fn, timeout)` runs fn there.
        Sockets keep the namespace they were made in, so what fn opens stays there."""
        pool = ThreadPoolExecutor(1, initializer=_setns, initargs=(f"/run/netns/{self.ns(host)}",))
        self._threads.append(pool)

        def call(fn: Callable[[], T], timeout: float) -> T:
            return pool.submit(fn).result(timeout=timeout)

        return call

    def close(self) -> None:
        """Stop every process started here, then remove the namespaces (their links go with them)."""
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, 9) if _leads_group(process) else process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        for pool in self._threads:
            pool.shutdown(wait=False, cancel_futures=True)
        for name in reversed(self._made):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                _ip("netns", "delete", name)
        self._made.clear()


def _leads_group(process: subprocess.Popen) -> bool:
    with contextlib.suppress(ProcessLookupError):
        return os.getpgid(process.pid) == process.pid
    return False


@contextlib.contextmanager
def network(hosts: list[str]) -> Iterator[Network]:
    """A Network of `hosts`, removed again (processes, namespaces, links) however the block ends."""
    net = Network(f"dsp-{os.getpid()}-{threading.get_ident() % 10000}")
    try:
        net.start(hosts)
        yield net
    finally:
        net.close()
