"""The suite's xdist groups hold: tests marked `xdist_group` run on one test process, one after another.

Several groups exist because their tests share something that cannot be shared at once (the
embedded Redis's fixed port, network namespaces); pytest 9.2 with pytest-xdist 3.8 silently
spread them over every process. This runs a small suite as the real one runs (pytest-xdist,
`--dist loadgroup`) and checks where each test ran.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

SUITE = '''
import os
import pytest

@pytest.mark.xdist_group("one")
@pytest.mark.parametrize("i", range(6))
def test_grouped(i):
    with open(os.environ["GROUPS_OUT"], "a") as out:
        out.write(f"grouped {os.environ['PYTEST_XDIST_WORKER']}\\n")

@pytest.mark.parametrize("i", range(6))
def test_free(i):
    with open(os.environ["GROUPS_OUT"], "a") as out:
        out.write(f"free {os.environ['PYTEST_XDIST_WORKER']}\\n")
'''


def test_a_group_runs_on_one_test_process(tmp_path: Path) -> None:
    (tmp_path / "test_small.py").write_text(SUITE)
    out = tmp_path / "where.txt"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "3", "--dist", "loadgroup",
         "test_small.py"],
        cwd=tmp_path, env={"GROUPS_OUT": str(out), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    workers: dict[str, set[str]] = defaultdict(set)
    for line in out.read_text().splitlines():
        kind, worker = line.split()
        workers[kind].add(worker)
    assert len(workers["grouped"]) == 1, workers
