"""Mail transports: SMTP (one reused connection per worker) and an outbox directory of .eml files."""

from __future__ import annotations

import contextlib
import os
import smtplib
import ssl
import tempfile
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

from dispatcher.config import SmtpSettings
from workers.errors import PermanentDeliveryError, RetryableDeliveryError

SMTP_TIMEOUT = 30.0
#: Login refused or required: a configuration error the operator can fix, so the mail waits.
_CONFIG_CODES = frozenset({530, 534, 535})


class MailTransport(Protocol):
    def send(self, message: EmailMessage, sender: str, recipients: list[str]) -> tuple[int, str | None]:
        """Send one message; return (status code, note) or raise a DeliveryError."""
        ...

    def close(self) -> None: ...


class OutboxTransport:
    """Writes each message to `<dir>/<message id>.eml`, so the demo works with no mail server."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def send(self, message: EmailMessage, sender: str, recipients: list[str]) -> tuple[int, str | None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = str(message["Message-ID"]).strip("<>").split("@")[0] + ".eml"
        # Write then rename, so a reader never sees half a message.
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(message.as_bytes())
        os.replace(tmp, self.directory / name)
        return 250, None

    def close(self) -> None:
        pass


class SmtpTransport:
    def __init__(self, settings: SmtpSettings, timeout: float = SMTP_TIMEOUT) -> None:
        self.settings = settings
        self.timeout = timeout
        self._connection: smtplib.SMTP | None = None

    def send(self, message: EmailMessage, sender: str, recipients: list[str]) -> tuple[int, str | None]:
        reused = self._connection is not None
        try:
            try:
                refused = self._connect().send_message(message, sender, recipients)
            except smtplib.SMTPServerDisconnected:
                if not reused:
                    raise
                # The server closed our idle connection; nothing was accepted, so send once more on a new one.
                self.close()
                refused = self._connect().send_message(message, sender, recipients)
        except smtplib.SMTPRecipientsRefused as exc:
            self.close()
            codes = [code for code, _ in exc.recipients.values()]
            detail = "; ".join(f"{addr}: {code} {_text(msg)}" for addr, (code, msg) in exc.recipients.items())
            error_type = RetryableDeliveryError if any(400 <= c < 500 for c in codes) else PermanentDeliveryError
            raise error_type(f"all recipients refused: {detail}", codes[0]) from None
        except smtplib.SMTPResponseException as exc:
            self.close()
            message_text = f"SMTP {exc.smtp_code} {_text(exc.smtp_error)}"
            if exc.smtp_code in _CONFIG_CODES:
                raise RetryableDeliveryError(f"{message_text} (check DISPATCHER_SMTP_URL)", exc.smtp_code) from None
            if 400 <= exc.smtp_code < 500:
                raise RetryableDeliveryError(message_text, exc.smtp_code) from None
            raise PermanentDeliveryError(message_text, exc.smtp_code) from None
        except (smtplib.SMTPException, OSError) as exc:
            self.close()
            raise RetryableDeliveryError(f"SMTP connection failed: {type(exc).__name__}: {exc}") from None
        if refused:
            detail = "; ".join(f"{addr}: {code} {_text(msg)}" for addr, (code, msg) in refused.items())
            # The others have the mail; retrying would send it to them twice.
            return 250, f"accepted, but some recipients were refused: {detail}"
        return 250, None

    def _connect(self) -> smtplib.SMTP:
        if self._connection is not None:
            return self._connection
        s = self.settings
        context = ssl.create_default_context()
        connection: smtplib.SMTP
        if s.ssl:
            connection = smtplib.SMTP_SSL(s.host, s.port, timeout=self.timeout, context=context)
        else:
            connection = smtplib.SMTP(s.host, s.port, timeout=self.timeout)
        try:
            if s.starttls:
                connection.starttls(context=context)
            if s.username:
                connection.login(s.username, s.password or "")
        except BaseException:
            with contextlib.suppress(Exception):
                connection.close()
            raise
        self._connection = connection
        return connection

    def close(self) -> None:
        if self._connection is None:
            return
        connection, self._connection = self._connection, None
        with contextlib.suppress(Exception):
            connection.quit()
        with contextlib.suppress(Exception):
            connection.close()


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
