"""The Redis keys Dispatcher keeps beside RQ's own, shared by the API and the workers."""

from __future__ import annotations

import hashlib

#: A channel's name (dispatcher.channels): the `kind` of a job in the API.
Kind = str


class Keys:
    """Redis keys Dispatcher keeps beside RQ's own, namespaced by the Dispatcher queue's name (its
    priorities' RQ queues share them: dispatcher.priorities)."""

    def __init__(self, queue_name: str) -> None:
        self.prefix = f"dispatcher:{queue_name}"
        #: Sorted set of job ids scored by acceptance time: the index behind GET /v1/jobs.
        self.index = f"{self.prefix}:jobs"
        #: Hash of running totals, fields like `webhook:succeeded`.
        self.totals = f"{self.prefix}:totals"
        #: List of the most recent failures (JSON), newest first.
        self.recent_failures = f"{self.prefix}:recent_failures"
        #: List of the most recent successes (JSON), newest first.
        self.recent_successes = f"{self.prefix}:recent_successes"
        #: List of tokens, one per job enqueued, that idle workers of several queues block on.
        self.wake = f"{self.prefix}:wake"
        #: Hash of stored email templates: id -> JSON (dispatcher.templates).
        self.templates = f"{self.prefix}:templates"
        #: Hash of attempt counts by channel, priority, outcome and duration bucket (dispatcher.tallies).
        self.tallies = f"{self.prefix}:tallies"
        #: Hash of the suppression list: address -> why and when it was added (dispatcher.suppressions).
        self.suppressed = f"{self.prefix}:suppressed"
        #: Sorted set of the same addresses, all scored 0: the list in address order, for paging.
        self.suppressed_index = f"{self.prefix}:suppressed:index"
        #: Hash of applications, the sender's customers: id -> JSON (dispatcher.endpoints).
        self.applications = f"{self.prefix}:applications"
        #: Hash of every application's endpoints: id -> JSON, with its application's id.
        self.endpoints = f"{self.prefix}:endpoints"
        #: Hash of endpoints' signing secrets: endpoint id -> JSON list, newest first, each with its expiry.
        self.endpoint_secrets = f"{self.prefix}:endpoint-secrets"
        #: List of endpoint health changes (JSON) whose email and event are still to be enqueued
        #: (dispatcher.health): the outbox any worker empties.
        self.health_outbox = f"{self.prefix}:health:outbox"
        #: The key the API writes before WAIT, so that WAIT vouches for its earlier writes (dispatcher.replicas).
        self.replication_fence = f"{self.prefix}:replication-fence"

    def application_endpoints(self, application_id: str) -> str:
        """Set of one application's endpoint ids."""
        return f"{self.prefix}:application:{application_id}:endpoints"

    def endpoint_rate(self, endpoint_id: str) -> str:
        """Hash of an endpoint's shared rate schedule (workers.endpoints)."""
        return f"{self.prefix}:endpoint:{endpoint_id}:rate"

    def ordered(self, endpoint_id: str, ordering_key: str | None) -> str:
        """List of an ordered endpoint's deliveries of one ordering key (None: the events without
        one), by job id in acceptance order, until each is done (workers.endpoints). The key is
        user input: a hash of it names the list."""
        part = "-" if ordering_key is None else hashlib.sha256(ordering_key.encode()).hexdigest()[:32]
        return f"{self.prefix}:ordered:{endpoint_id}:{part}"

    def endpoint_health(self, endpoint_id: str) -> str:
        """Hash of an endpoint's health: its circuit breaker and failures (dispatcher.health)."""
        return f"{self.prefix}:endpoint:{endpoint_id}:health"

    def endpoint_probe(self, endpoint_id: str) -> str:
        """String: the id of the job probing an endpoint whose breaker is half-open, with a TTL."""
        return f"{self.prefix}:endpoint:{endpoint_id}:probe"

    def endpoint_changes(self, endpoint_id: str) -> str:
        """List of an endpoint's changes of health (JSON), newest first, capped."""
        return f"{self.prefix}:endpoint:{endpoint_id}:changes"

    def rate(self, kind: Kind) -> str:
        """Hash of a channel's shared sending rate: its schedule and how far it is slowed (dispatcher.ratelimit)."""
        return f"{self.prefix}:rate:{kind}"

    def attempts(self, job_id: str) -> str:
        """Hash of one job's attempts: field `n` is the counter, fields `1`, `2`, ... the records."""
        return f"{self.prefix}:attempts:{job_id}"

    def alive(self, worker_name: str) -> str:
        """A worker's liveness: set with a short TTL by its reaper thread every few seconds."""
        return f"{self.prefix}:alive:{worker_name}"

    def batch(self, batch_id: str) -> str:
        """Hash of one batch: its kind, priority, count and acceptance time (dispatcher.batches)."""
        return f"{self.prefix}:batch:{batch_id}"

    def batch_jobs(self, batch_id: str) -> str:
        """List of one batch's job ids, in the order of its items."""
        return f"{self.prefix}:batch:{batch_id}:jobs"

    def idempotency(self, client: str, key: str) -> str:
        """String: what the request that first used Idempotency-Key `key` left (dispatcher.idempotency);
        `client` is a hash of its API key, which scopes the key."""
        return f"{self.prefix}:idempotency:{client}:{key}"

    def limbo(self, job_id: str) -> str:
        """When a reaper first saw this job popped but not started (a worker clears it as it starts the job)."""
        return f"{self.prefix}:limbo:{job_id}"
