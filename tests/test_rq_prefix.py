"""RQ_KEY_PREFIX, RQ 3.0's documented setting, renames every key RQ writes; RQ reads it once, when
`rq.defaults` is imported. The contract tests between Dispatcher and RQ (the job hashes RQ reads,
RQ's requeue, delete and cancel, rq info and rq-dashboard) run again here in a process of their own
with it set, on this suite's Redis: a key name written by hand would break them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

#: The test files that hold Dispatcher and RQ to one storage layout.
CONTRACT_TESTS = ("tests/test_enqueue.py", "tests/test_rq_tools.py", "tests/test_rq_executions.py")
PREFIX = "dsp"


@pytest.mark.long
def test_the_rq_contract_tests_pass_under_rq_key_prefix(redis_url, redis_conn):
    env = os.environ | {"RQ_KEY_PREFIX": PREFIX, "TEST_REDIS_URL": redis_url}
    # Two test processes: these tests mostly wait (on workers, retries' backoff), so the run takes about
    # half as long as in one.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", *CONTRACT_TESTS],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
    # RQ's keys really were renamed.
    assert redis_conn.keys(f"{PREFIX}:job:*")
    assert redis_conn.keys(f"{PREFIX}:queue:*")
