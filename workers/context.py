"""What a worker process builds once and every job reuses: HTTP pools, SMTP connections, the signer,
a Redis connection for what a delivery itself reads and writes (the suppression list, endpoints' secrets)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import redis

from dispatcher.config import Settings
from dispatcher.connection import connect
from dispatcher.endpoints import Registry
from dispatcher.keys import Keys
from dispatcher.netguard import NetworkGuard
from dispatcher.priorities import split
from dispatcher.suppressions import SuppressionList
from workers.http import HttpClient
from workers.smtp import MailTransport, OutboxTransport, SmtpTransport
from workers.webhook import WebhookSender

#: Redis timeouts of a delivery's own reads and writes: a Redis that does not answer makes the attempt
#: fail as retryable soon, well within the attempt's deadline.
REDIS_TIMEOUT = 5.0
#: The Dispatcher queue of the job this thread is delivering (workers.attempt.run sets it).
_queue: ContextVar[str | None] = ContextVar("dispatcher_queue", default=None)


@contextmanager
def delivering(queue: str | None) -> Iterator[None]:
    """Within it, this thread delivers a job of RQ queue `queue` (any of its priorities' queues):
    its Redis keys are that Dispatcher queue's, whatever DISPATCHER_QUEUE says."""
    token = _queue.set(split(queue)[0] if queue else None)
    try:
        yield
    finally:
        _queue.reset(token)


@dataclass
class DeliveryContext:
    settings: Settings
    webhooks: WebhookSender
    _local: threading.local = field(default_factory=threading.local)
    _transports: list[MailTransport] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _redis: redis.Redis | None = None

    @classmethod
    def build(cls, settings: Settings) -> DeliveryContext:
        """Raise ConfigError when the settings cannot deliver (no signing secret)."""
        # One pooled connection per concurrent delivery to any one host.
        client = HttpClient(NetworkGuard(settings.allowed_networks), settings.webhook_timeout, settings.concurrency)
        return cls(settings=settings, webhooks=WebhookSender(client, settings.require_webhook_secret()))

    def mail(self) -> MailTransport:
        """This thread's mail transport: an SMTP connection is not shared between threads."""
        transport = getattr(self._local, "mail", None)
        if transport is None:
            smtp = self.settings.smtp
            transport = (
                SmtpTransport(smtp, self.settings.smtp_timeout)
                if smtp is not None
                else OutboxTransport(self.settings.outbox_dir)
            )
            self._local.mail = transport
            with self._lock:
                self._transports.append(transport)
        return transport

    def suppressions(self) -> SuppressionList:
        """The suppression list of the Dispatcher queue whose job this thread delivers."""
        return SuppressionList(self._connection(), self._keys())

    def registry(self) -> Registry:
        """The applications and endpoints of the Dispatcher queue whose job this thread delivers."""
        return Registry(self._connection(), self._keys())

    def queue_settings(self) -> Settings:
        """The settings, with the Dispatcher queue of the job this thread delivers as their queue:
        what enqueueing there needs (an email's events, workers.email_events)."""
        queue = _queue.get()
        if queue is None or queue == self.settings.queue_name:
            return self.settings
        return dataclasses.replace(self.settings, queue_name=queue)

    def connection(self) -> redis.Redis:
        """The Redis connection a delivery's own reads and writes use (its pool serves every thread)."""
        return self._connection()

    def _keys(self) -> Keys:
        return Keys(_queue.get() or self.settings.queue_name)

    def _connection(self) -> redis.Redis:
        with self._lock:
            if self._redis is None:  # one pool for every thread
                # (No CLIENT SETINFO: two commands more for each delivery thread's connection.)
                self._redis = connect(
                    self.settings.redis_url,
                    socket_timeout=REDIS_TIMEOUT,
                    socket_connect_timeout=REDIS_TIMEOUT,
                    driver_info=None,
                )
            return self._redis

    def close(self) -> None:
        self.webhooks.client.close()
        if self._redis is not None:
            self._redis.close()
        with self._lock:
            transports, self._transports = self._transports, []
        for transport in transports:
            transport.close()


_context: DeliveryContext | None = None


def configure(settings: Settings) -> DeliveryContext:
    """Build this process's context; the worker entry point calls it at start-up."""
    global _context
    if _context is not None:
        _context.close()
    _context = DeliveryContext.build(settings)
    return _context


def current() -> DeliveryContext:
    """This process's context, built from the environment on first use (e.g. under a plain `rq worker`)."""
    return _context if _context is not None else configure(Settings.from_env())
