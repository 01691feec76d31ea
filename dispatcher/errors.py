"""Every error type the dispatcher package raises."""

from __future__ import annotations


class DispatcherError(Exception):
    """Base class for Dispatcher's own errors."""


class ConfigError(DispatcherError, ValueError):
    """A setting in the environment is missing or invalid; the message names it."""


class DestinationRefused(DispatcherError):
    """A webhook destination resolves to, or connected to, an address the network guard forbids."""


class ResolutionFailed(DispatcherError):
    """A webhook host did not resolve (no such name, or a DNS error)."""


class ResolutionTimedOut(ResolutionFailed):
    """A webhook host did not resolve within the time allowed."""

    def __init__(self, host: str, seconds: float) -> None:
        super().__init__(f"host {host!r} did not resolve within {seconds:.3g} s")
        self.host = host
        self.seconds = seconds


class FieldProblem(DispatcherError, ValueError):
    """One request field is wrong; `field` is its dotted path."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class NoSuchJob(DispatcherError, LookupError):
    """No job with this id in this Dispatcher queue (or it has expired)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r} (it may have expired)")
        self.job_id = job_id


class JobStateConflict(DispatcherError):
    """The job's state does not allow the operation (cancel, retry); the message says why."""


class AlreadyAccepted(DispatcherError):
    """A request with the same idempotency key was accepted before; `record` is what it left
    (dispatcher.idempotency judges it)."""

    def __init__(self, record: bytes) -> None:
        super().__init__("a request with this idempotency key was accepted before")
        self.record = record


class APIError(DispatcherError):
    """An error answered to an API client as JSON."""

    def __init__(
        self, status: int, code: str, message: str, details: list[dict[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []

    def to_json(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class NotReplicated(DispatcherError):
    """A write is on the Redis master but fewer replicas than DISPATCHER_MIN_REPLICAS confirmed it in
    time (dispatcher.replicas): a failover now could lose it."""

    def __init__(self, acknowledged: int, wanted: int, timeout_ms: int) -> None:
        super().__init__(f"{acknowledged} of {wanted} replicas confirmed the write within {timeout_ms} ms")
        self.acknowledged = acknowledged
        self.wanted = wanted
        self.timeout_ms = timeout_ms
