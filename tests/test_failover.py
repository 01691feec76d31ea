"""Failover with real servers: the master of a sentinel-watched cluster is SIGKILLed under load."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.sentinel import Sentinel

from tests.ha import Cluster, start_cluster

# A cluster of six servers and a failover: one at a time, on one test process.
pytestmark = pytest.mark.xdist_group("failover")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with start_cluster(tmp_path / "cluster") as running:
        yield running


def test_the_cluster_fails_over(cluster: Cluster) -> None:
    sentinel = Sentinel(cluster.sentinel_addresses, socket_timeout=2)
    old = cluster.master_address()
    master = sentinel.master_for(cluster.name, socket_timeout=2, decode_responses=True)
    master.set("acknowledged", "by a replica")
    assert master.execute_command("WAIT", 1, 1000) >= 1

    killed_at = cluster.kill_master()
    took = cluster.wait_for_new_master(since=killed_at)
    print(f"\nnew master after {took:.2f}s")

    new = cluster.master_address()
    assert new != old
    assert sentinel.discover_master(cluster.name) == new
    # The same client object: its next connection asks the sentinels again.
    deadline = time.monotonic() + 10
    while True:
        try:
            assert master.get("acknowledged") == "by a replica"
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert master.info("replication")["role"] == "master"
