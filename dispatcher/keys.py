"""Names shared by the API and the workers: job kinds, job ids, Redis keys, job functions."""

from __future__ import annotations

import secrets
from typing import Literal

Kind = Literal["email", "webhook"]
KINDS: tuple[Kind, ...] = ("email", "webhook")

#: Job ids carry their kind, so counting a registry by kind needs no job lookups.
_ID_PREFIX: dict[Kind, str] = {"email": "em_", "webhook": "wh_"}

#: The API enqueues by dotted path and never imports the worker code.
JOB_FUNCTIONS: dict[Kind, str] = {
    "email": "workers.jobs.send_email",
    "webhook": "workers.jobs.deliver_webhook",
}


def new_job_id(kind: Kind) -> str:
    """The kind's prefix and 128 random bits in hex (as a uuid4's hex, without building a UUID)."""
    return _ID_PREFIX[kind] + secrets.token_hex(16)


def kind_of(job_id: str) -> Kind | None:
    for kind, prefix in _ID_PREFIX.items():
        if job_id.startswith(prefix):
            return kind
    return None


class Keys:
    """Redis keys Dispatcher keeps beside RQ's own, namespaced by queue name."""

    def __init__(self, queue_name: str) -> None:
        self.prefix = f"dispatcher:{queue_name}"
        #: Sorted set of job ids scored by acceptance time: the index behind GET /v1/jobs.
        self.index = f"{self.prefix}:jobs"
        #: Hash of running totals, fields like `webhook:succeeded`.
        self.totals = f"{self.prefix}:totals"
        #: List of the most recent failures (JSON), newest first.
        self.recent_failures = f"{self.prefix}:recent_failures"

    def attempts(self, job_id: str) -> str:
        """Hash of one job's attempts: field `n` is the counter, fields `1`, `2`, ... the records."""
        return f"{self.prefix}:attempts:{job_id}"

    def limbo(self, job_id: str) -> str:
        """When a reaper first saw this job popped but not started (a worker clears it as it starts the job)."""
        return f"{self.prefix}:limbo:{job_id}"
