"""Mail transports: SMTP (one reused connection per worker) and an outbox directory of .eml files.

By the book: bodies are always 7-bit clean (workers.mail), so a message needs nothing of
the server unless an address is internationalized; then the server must offer SMTPUTF8
(RFC 6531) and the message goes with `SMTPUTF8 BODY=8BITMIME`, else the job fails for
good naming the address. An internationalized domain needs nothing: it goes as its A-label.
A whole send (connect, TLS, login, MAIL, RCPT, DATA) has one deadline, not one per read.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import smtplib
import socket
import ssl
import tempfile
from collections.abc import Callable
from email.generator import BytesGenerator
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

from dispatcher.addresses import AddressError, wire_address
from dispatcher.config import SmtpSettings
from workers import deadline
from workers.deadline import Deadline
from workers.errors import PermanentDeliveryError, RetryableDeliveryError, ThrottledDeliveryError
from workers.mail import job_id_of, utf8_addresses

SMTP_TIMEOUT = 60.0
#: How long closing a connection may wait for the server's answer to QUIT.
QUIT_TIMEOUT = 5.0
#: Login refused or required: a configuration error the operator can fix, so the mail waits.
_CONFIG_CODES = frozenset({530, 534, 535})
#: Replies that mean "you send too fast": 421 (service unavailable, closing: what providers answer a
#: sender over its rate or connection limit) and 454 (Amazon SES's "Throttling failure"), and any
#: other 4xx whose text says so (Gmail's 450 "... at a rate that prevents additional messages").
_THROTTLE_CODES = frozenset({421, 454})
_THROTTLE_TEXT = re.compile(r"\brate\b|throttl|too many (messages|mails|emails|connections)", re.IGNORECASE)

#: Recipients a server refused at RCPT: address (as sent) -> (reply code, reply text).
Refusals = dict[str, tuple[int, str]]
#: Told of every refusal at RCPT, whether or not the others were accepted.
OnRefused = Callable[[Refusals], None]


class MailTransport(Protocol):
    def send(
        self, message: EmailMessage, sender: str, recipients: list[str], on_refused: OnRefused | None = None
    ) -> tuple[int, str | None]:
        """Send one message; return (status code, note) or raise a DeliveryError. `on_refused` hears
        of the recipients the server refused, before either."""
        ...

    def close(self) -> None: ...


def wire_bytes(message: EmailMessage, linesep: str = "\r\n") -> bytes:
    """The message as it goes out, in the message's own policy (UTF-8 headers only if it has them)."""
    with io.BytesIO() as buffer:
        BytesGenerator(buffer, policy=message.policy).flatten(message, linesep=linesep)
        return buffer.getvalue()


class OutboxTransport:
    """Writes each message to `<dir>/<job id>.eml`, so the demo works with no mail server."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def send(
        self, message: EmailMessage, sender: str, recipients: list[str], on_refused: OnRefused | None = None
    ) -> tuple[int, str | None]:
        # Named only from a validated job id (em_ and 32 hex digits), never from other text in the job.
        name = job_id_of(str(message["Message-ID"])) + ".eml"
        self.directory.mkdir(parents=True, exist_ok=True)
        content = wire_bytes(message, "\n")
        # Write then rename, so a reader never sees half a message.
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        os.replace(tmp, self.directory / name)
        return 250, None

    def close(self) -> None:
        pass


class _WatchedSMTP(smtplib.SMTP):
    """An SMTP client whose socket the running attempt's Deadline shuts down when time is up."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        current = deadline.active()
        connect_timeout = timeout if current is None else max(0.001, min(timeout, current.remaining()))
        sock = super()._get_socket(host, port, connect_timeout)  # type: ignore[misc]  # private; typeshed omits it
        sock.settimeout(timeout)  # each later read, also on reuse; the deadline bounds the whole send
        if current is not None:
            current.watch(sock)  # before the greeting is read (and, for SMTPS, before the TLS handshake)
        return sock


class _WatchedSMTP_SSL(smtplib.SMTP_SSL, _WatchedSMTP):
    """SMTPS: SMTP_SSL wraps the socket that _WatchedSMTP opened and registered."""


class SmtpTransport:
    def __init__(self, settings: SmtpSettings, timeout: float = SMTP_TIMEOUT) -> None:
        self.settings = settings
        self.timeout = timeout
        self._connection: smtplib.SMTP | None = None

    def send(
        self, message: EmailMessage, sender: str, recipients: list[str], on_refused: OnRefused | None = None
    ) -> tuple[int, str | None]:
        with Deadline(self.timeout) as limit:
            try:
                result = self._send(message, sender, recipients, limit, on_refused)
            except Exception as exc:
                if limit.expired:
                    # Whatever the cut-off connection let smtplib read last (nothing, half a reply), it
                    # is the deadline that ended the send, and the connection is not fit for reuse.
                    self._drop()
                    raise RetryableDeliveryError(f"SMTP send exceeded the {self.timeout:g} s deadline") from None
                if not isinstance(exc, smtplib.SMTPException | OSError):
                    raise
                self._drop()
                raise RetryableDeliveryError(f"SMTP connection failed: {type(exc).__name__}: {exc}") from None
            if limit.expired:
                # The server's 250 arrived (the mail is accepted: retrying would send it twice) and then
                # the deadline cut the rest of its reply off: the connection is not fit for reuse.
                self._drop()
            return result

    def _send(
        self,
        message: EmailMessage,
        sender: str,
        recipients: list[str],
        limit: Deadline,
        on_refused: OnRefused | None,
    ) -> tuple[int, str | None]:
        reused = self._connection is not None
        try:
            try:
                refused = self._transmit(message, sender, recipients, limit)
            except smtplib.SMTPServerDisconnected:
                if not reused or limit.expired:
                    raise
                # The server closed our idle connection; nothing was accepted, so send once more on a new one.
                self._drop()
                refused = self._transmit(message, sender, recipients, limit)
        except smtplib.SMTPRecipientsRefused as exc:
            self._drop()
            if on_refused is not None:
                on_refused({addr: (code, _text(msg)) for addr, (code, msg) in exc.recipients.items()})
            codes = [code for code, _ in exc.recipients.values()]
            detail = "; ".join(f"{addr}: {code} {_text(msg)}" for addr, (code, msg) in exc.recipients.items())
            error_type = RetryableDeliveryError if any(400 <= c < 500 for c in codes) else PermanentDeliveryError
            if all(_throttling(code, msg) for code, msg in exc.recipients.values()):
                error_type = ThrottledDeliveryError
            raise error_type(f"all recipients refused: {detail}", codes[0]) from None
        except smtplib.SMTPResponseException as exc:
            self._drop()
            message_text = f"SMTP {exc.smtp_code} {_text(exc.smtp_error)}"
            if exc.smtp_code in _CONFIG_CODES:
                raise RetryableDeliveryError(f"{message_text} (check DISPATCHER_SMTP_URL)", exc.smtp_code) from None
            if _throttling(exc.smtp_code, exc.smtp_error):
                raise ThrottledDeliveryError(message_text, exc.smtp_code) from None
            if 400 <= exc.smtp_code < 500:
                raise RetryableDeliveryError(message_text, exc.smtp_code) from None
            raise PermanentDeliveryError(message_text, exc.smtp_code) from None
        if refused:
            if on_refused is not None:
                on_refused({addr: (code, _text(msg)) for addr, (code, msg) in refused.items()})
            detail = "; ".join(f"{addr}: {code} {_text(msg)}" for addr, (code, msg) in refused.items())
            # The others have the mail; retrying would send it to them twice.
            return 250, f"accepted, but some recipients were refused: {detail}"
        return 250, None

    def _transmit(
        self, message: EmailMessage, sender: str, recipients: list[str], limit: Deadline
    ) -> dict[str, tuple[int, bytes]]:
        try:
            # An internationalized domain as its A-label: then only a non-ASCII local part needs SMTPUTF8.
            sender, recipients = wire_address(sender), [wire_address(address) for address in recipients]
        except AddressError as exc:
            raise PermanentDeliveryError(f"invalid address in the envelope: {exc}") from None
        connection = self._connect(limit)
        options: list[str] = []
        international = utf8_addresses(message, sender, recipients)
        if international:
            if not connection.has_extn("smtputf8"):
                raise PermanentDeliveryError(
                    f"the mail server does not offer SMTPUTF8, which these addresses need: {', '.join(international)}"
                )
            options = ["SMTPUTF8", "BODY=8BITMIME"]
        return connection.sendmail(sender, recipients, wire_bytes(message), options)

    def _connect(self, limit: Deadline) -> smtplib.SMTP:
        if self._connection is not None:
            if self._connection.sock is not None:
                limit.watch(self._connection.sock)
            return self._connection
        s = self.settings
        context = ssl.create_default_context()
        connection: smtplib.SMTP
        if s.ssl:
            connection = _WatchedSMTP_SSL(s.host, s.port, timeout=self.timeout, context=context)
        else:
            connection = _WatchedSMTP(s.host, s.port, timeout=self.timeout)
        try:
            if s.starttls:
                connection.starttls(context=context)  # the same descriptor: still watched
            if s.username:
                connection.login(s.username, s.password or "")
            connection.ehlo_or_helo_if_needed()  # the extensions decide how the message goes
        except BaseException:
            with contextlib.suppress(Exception):
                connection.close()
            raise
        self._connection = connection
        return connection

    def _drop(self) -> None:
        """Forget the connection without a word: after an error its state is unknown (or it is dead)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def close(self) -> None:
        """Say QUIT (waiting at most QUIT_TIMEOUT for the answer) and close."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        with Deadline(QUIT_TIMEOUT) as limit:
            if connection.sock is not None:
                limit.watch(connection.sock)
            with contextlib.suppress(Exception):
                connection.quit()
        with contextlib.suppress(Exception):
            connection.close()


def hard_bounces(refused: Refusals) -> Refusals:
    """The refusals that say the mailbox is no good: a 5xx at RCPT, except a login the server wants
    (530, 534, 535: our configuration) and an X.7.x enhanced code (security or policy, RFC 3463:
    relaying denied, the sender or the content blocked), which say nothing about the mailbox."""
    return {
        address: (code, text)
        for address, (code, text) in refused.items()
        if 500 <= code < 600 and code not in _CONFIG_CODES and not text.lstrip().startswith("5.7.")
    }


def _throttling(code: int, reply: bytes | str) -> bool:
    """Whether a reply asks us to send more slowly rather than refusing this message."""
    return code in _THROTTLE_CODES or (400 <= code < 500 and _THROTTLE_TEXT.search(_text(reply)) is not None)


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
