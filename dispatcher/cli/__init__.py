"""The `dispatcher` command.

Running the service: `dev`, `web`, `worker`. Sending, through the API (as an application does):
`send-email`, `send-webhook`. Looking and acting, straight on Redis (as RQ's own command line does,
so they work while the API is down): `status`, `jobs`, `retry`, `cancel`, `replay`, `stats`, `rq-info`.

Every failure is one line on stderr, `dispatcher <command>: <what went wrong>`, and a non-zero exit:
1 when the command could not do its work, 2 for a usage or configuration error.
"""

from __future__ import annotations

# The commands join the group as their modules load.
from dispatcher.cli import operating, sending, service  # noqa: F401
from dispatcher.cli.base import cli, main
from dispatcher.cli.service import WORKER_EPILOG, WORKER_HELP, WorkerOptions, run_web, worker_options

__all__ = ["WORKER_EPILOG", "WORKER_HELP", "WorkerOptions", "cli", "main", "run_web", "worker_options"]
