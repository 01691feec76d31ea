"""What a worker process builds once and every job reuses: HTTP pools, SMTP connections, the signer."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from dispatcher.config import Settings
from dispatcher.netguard import NetworkGuard
from workers.http import HttpClient
from workers.smtp import MailTransport, OutboxTransport, SmtpTransport
from workers.webhook import WebhookSender


@dataclass
class DeliveryContext:
    settings: Settings
    webhooks: WebhookSender
    _local: threading.local = field(default_factory=threading.local)
    _transports: list[MailTransport] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

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

    def close(self) -> None:
        self.webhooks.client.close()
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
