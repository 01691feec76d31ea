"""What a worker process builds once and every job reuses: HTTP pools, the SMTP connection, the signer."""

from __future__ import annotations

from dataclasses import dataclass

from dispatcher.config import Settings
from dispatcher.netguard import NetworkGuard
from workers.http import HttpClient
from workers.smtp import MailTransport, OutboxTransport, SmtpTransport
from workers.webhook import WebhookSender


@dataclass
class DeliveryContext:
    settings: Settings
    webhooks: WebhookSender
    mail: MailTransport

    @classmethod
    def build(cls, settings: Settings) -> DeliveryContext:
        """Raise ConfigError when the settings cannot deliver (no signing secret)."""
        client = HttpClient(NetworkGuard(settings.allowed_networks), settings.webhook_timeout)
        mail: MailTransport = (
            SmtpTransport(settings.smtp) if settings.smtp is not None else OutboxTransport(settings.outbox_dir)
        )
        return cls(settings=settings, webhooks=WebhookSender(client, settings.require_webhook_secret()), mail=mail)

    def close(self) -> None:
        self.webhooks.client.close()
        self.mail.close()


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
