"""SMTP by the book, a deadline for a whole send, and outbox files named only from valid ids.

Against aiosmtpd servers started here, with and without SMTPUTF8 and 8BITMIME, and raw-socket
servers on loopback that trickle their replies.
"""

from __future__ import annotations

import base64
import email
import email.policy
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from dispatcher.channels.email import EmailRequest
from dispatcher.config import SmtpSettings
from tests.conftest import free_port
from tests.test_mail_headers import parse, rewrite_job_data
from workers.errors import RetryableDeliveryError
from workers.mail import build_message, envelope
from workers.smtp import SmtpTransport


@dataclass
class Seen:
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    content: bytes


@dataclass
class Recorder:
    """Accepts everything and keeps what it saw; without `eight_bit`, its EHLO drops 8BITMIME."""

    eight_bit: bool = True
    messages: list[Seen] = field(default_factory=list)
    mail_commands: int = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return [r for r in responses if self.eight_bit or "8BITMIME" not in r]

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mail_commands += 1
        # SIZE= (smtplib adds it when offered) says nothing about the encoding: leave it out.
        options = [option for option in mail_options if not option.upper().startswith("SIZE=")]
        envelope.mail_from, envelope.mail_options = address, options
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        content = envelope.original_content or envelope.content
        self.messages.append(Seen(envelope.mail_from, envelope.mail_options, list(envelope.rcpt_tos), content))
        return "250 Message accepted"

    def to(self, address: str) -> Seen:
        (seen,) = [m for m in self.messages if address in m.rcpt_tos]
        return seen


@pytest.fixture(scope="module", params=["utf8", "plain"])
def server(request) -> Iterator[tuple[str, Recorder, SmtpSettings]]:
    """`utf8`: SMTPUTF8 and 8BITMIME offered; `plain`: neither."""
    recorder = Recorder(eight_bit=request.param == "utf8")
    port = free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port, enable_SMTPUTF8=request.param == "utf8")
    controller.start()
    try:
        yield request.param, recorder, SmtpSettings("127.0.0.1", port)
    finally:
        controller.stop()


def unique(local: str = "u", domain: str = "example.com") -> str:
    return f"{local}{uuid.uuid4().hex[:10]}@{domain}"


def send(burst_worker, smtp: SmtpSettings, **fields) -> dict:
    worker = burst_worker(smtp=smtp)
    body = {"subject": "Hello"} | ({} if "html" in fields or "text" in fields else {"text": "Hi."}) | fields
    job_id = worker.enqueue("email", EmailRequest.model_validate(body, context={"email_from": "shop@example.com"}))
    worker.run()
    return worker.job(job_id)


BODIES = {
    "html only, short non-ASCII": {"html": "<p>Grüße</p>", "text": None},
    "text, short non-ASCII": {"text": "Grüße ☃"},
    "text and html, non-ASCII": {"text": "naïve", "html": "<p>naïve</p>"},
    "long ASCII lines": {"text": "x" * 2000},
    "control characters": {"text": "a\x00b\x1bc\x7f"},
    "attachment": {
        "text": "See it.",
        "attachments": [{"filename": "ü.bin", "content": base64.b64encode(bytes(range(256))).decode()}],
    },
}


@pytest.mark.parametrize("fields", BODIES.values(), ids=BODIES.keys())
def test_bodies_are_7bit_clean_and_need_no_extension(burst_worker, server, fields):
    """No BODY=8BITMIME, no SMTPUTF8, every byte below 0x80, whether or not the server offers them."""
    _, recorder, smtp = server
    to = unique()
    fields = {k: v for k, v in fields.items() if v is not None}
    job = send(burst_worker, smtp, to=[to], **fields)

    assert job["status"] == "succeeded", job
    seen = recorder.to(to)
    assert seen.mail_options == []
    assert max(seen.content) < 0x80
    assert not re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", seen.content)  # no control bytes in 7bit either
    message = parse(seen.content)
    for part in message.walk():
        if part.get_content_maintype() == "text":
            assert part["Content-Transfer-Encoding"] in ("7bit", "quoted-printable", "base64")
            expected = fields["html"] if part.get_content_subtype() == "html" else fields["text"]
            assert part.get_content().replace("\r\n", "\n").rstrip("\n") == expected


def test_an_internationalized_domain_goes_as_its_a_label(burst_worker, server):
    _, recorder, smtp = server
    local = f"a{uuid.uuid4().hex[:8]}"
    job = send(burst_worker, smtp, to=[f"{local}@bücher.example"], cc=[f"{local}@пример.рф"])

    assert job["status"] == "succeeded", job
    seen = recorder.to(f"{local}@xn--bcher-kva.example")
    assert seen.rcpt_tos == [f"{local}@xn--bcher-kva.example", f"{local}@xn--e1afmkfd.xn--p1ai"]
    assert seen.mail_options == []
    assert max(seen.content) < 0x80
    message = parse(seen.content)
    assert message["To"] == f"{local}@xn--bcher-kva.example"
    assert message["Cc"] == f"{local}@xn--e1afmkfd.xn--p1ai"


NON_ASCII = {
    "to": lambda a: {"to": [a]},
    "cc": lambda a: {"to": [unique()], "cc": [a]},
    "bcc": lambda a: {"to": [unique()], "bcc": [a]},
    "from": lambda a: {"to": [unique()], "from": f"Ünïcode <{a}>"},
    "reply_to": lambda a: {"to": [unique()], "reply_to": a},
}


@pytest.mark.parametrize("where", NON_ASCII)
def test_a_non_ascii_local_part_needs_smtputf8(burst_worker, server, where):
    kind, recorder, smtp = server
    address = unique("ü", "bücher.example")
    fields = NON_ASCII[where](address)
    mail_commands = recorder.mail_commands

    job = send(burst_worker, smtp, **fields)

    wire = address.replace("bücher.example", "xn--bcher-kva.example")
    if kind == "plain":
        assert job["status"] == "failed", job
        (attempt,) = job["attempts"]
        assert attempt["outcome"] == "permanent"
        assert "SMTPUTF8" in job["error"] and wire in job["error"], job["error"]
        assert recorder.mail_commands == mail_commands  # not even a MAIL FROM
        return
    assert job["status"] == "succeeded", job
    (seen,) = recorder.messages[-1:]
    assert seen.mail_options == ["SMTPUTF8", "BODY=8BITMIME"]
    message = email.message_from_string(seen.content.decode("utf-8"), policy=email.policy.default)
    if where in ("to", "cc", "bcc"):
        assert wire in seen.rcpt_tos
    if where == "bcc":
        assert wire.encode() not in seen.content
    else:
        header = {"to": "To", "cc": "Cc", "from": "From", "reply_to": "Reply-To"}[where]
        assert message[header].addresses[0].addr_spec == wire
        assert wire.encode() in seen.content  # raw UTF-8 (RFC 6532), not an encoded word


# --- The deadline of a whole send -------------------------------------------------------------


class TrickleServer:
    """A raw-socket SMTP server: it answers every command, trickling the reply to `slow` (one of
    greeting, EHLO, MAIL, RCPT, DATA, .) one byte at a time, `delay` apart; it counts connections."""

    def __init__(self, slow: str | None, delay: float = 0.1) -> None:
        self.slow = slow
        self.delay = delay
        self.connections = 0
        self.delivered = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _reply(self, conn: socket.socket, stage: str, text: str) -> None:
        data = (text + "\r\n").encode()
        if stage != self.slow:
            conn.sendall(data)
            return
        for byte in data:
            conn.sendall(bytes([byte]))
            time.sleep(self.delay)

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            try:
                self._reply(conn, "greeting", "220 trickle ESMTP " + "x" * 200)
                in_data = False
                for line in lines:
                    if in_data:
                        if line == b".\r\n":
                            in_data = False
                            self.delivered += 1
                            self._reply(conn, ".", "250 accepted " + "x" * 200)
                        continue
                    verb = line[:4].decode(errors="replace").upper().strip()
                    if verb == "EHLO":
                        self._reply(conn, "EHLO", "250-trickle\r\n250 " + "x" * 200)
                    elif verb == "DATA":
                        in_data = True
                        self._reply(conn, "DATA", "354 go on " + "x" * 200)
                    elif verb == "QUIT":
                        self._reply(conn, "QUIT", "221 bye")
                        return
                    else:
                        self._reply(conn, verb, "250 ok " + "x" * 200)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


def message_for(to: str) -> tuple[EmailMessage, str, list[str]]:
    data = {
        "from": "shop@example.com",
        "to": [to],
        "subject": "s",
        "text": "t",
        "date": time.time(),
        "message_id": f"<em_{uuid.uuid4().hex}@example.com>",
    }
    return build_message(data), *envelope(data)


@pytest.mark.parametrize("slow", ["greeting", "EHLO", "MAIL", "RCPT", "DATA", "."])
def test_a_trickling_server_ends_the_send_at_its_deadline(slow):
    # Slow enough that not even the reply code arrives in time (a whole 250 after DATA is an acceptance).
    server = TrickleServer(slow, delay=2.0)
    transport = SmtpTransport(SmtpSettings("127.0.0.1", server.port), timeout=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(RetryableDeliveryError, match=r"SMTP send exceeded the 1 s deadline"):
            transport.send(*message_for(unique()))
        assert time.monotonic() - started < 2.0
        assert transport._connection is None  # dropped, not kept for the next mail
    finally:
        transport.close()
        server.close()


def test_an_acceptance_cut_off_by_the_deadline_counts_and_the_connection_is_dropped():
    """The 250 after DATA arrived, the rest of the reply did not: the server has the mail."""
    server = TrickleServer(".", delay=0.1)
    transport = SmtpTransport(SmtpSettings("127.0.0.1", server.port), timeout=1.0)
    try:
        started = time.monotonic()
        assert transport.send(*message_for(unique())) == (250, None)
        assert time.monotonic() - started < 2.0
        assert transport._connection is None
    finally:
        transport.close()
        server.close()


def test_a_reused_connection_is_bound_by_the_deadline_too():
    server = TrickleServer(None)
    transport = SmtpTransport(SmtpSettings("127.0.0.1", server.port), timeout=1.0)
    try:
        assert transport.send(*message_for(unique())) == (250, None)
        server.slow = "MAIL"  # the same connection, now trickling
        started = time.monotonic()
        with pytest.raises(RetryableDeliveryError, match="deadline"):
            transport.send(*message_for(unique()))
        assert time.monotonic() - started < 2.0
        server.slow = None
        assert transport.send(*message_for(unique())) == (250, None)
        assert (server.connections, server.delivered) == (2, 2)  # a new connection after the deadline
    finally:
        transport.close()
        server.close()


def test_a_trickling_server_makes_a_retryable_attempt_through_the_worker(burst_worker):
    server = TrickleServer("greeting")
    try:
        worker = burst_worker(smtp=SmtpSettings("127.0.0.1", server.port), smtp_timeout=1.0)
        request = EmailRequest.model_validate(
            {"to": [unique()], "subject": "s", "text": "t", "retry": {"max_attempts": 2, "backoff": [60]}},
            context={"email_from": "shop@example.com"},
        )
        job_id = worker.enqueue("email", request)
        worker.run()
        job = worker.job(job_id)
    finally:
        server.close()
    assert job["status"] == "scheduled", job
    (attempt,) = job["attempts"]
    assert attempt["outcome"] == "retryable"
    assert attempt["error"] == "SMTP send exceeded the 1 s deadline"
    assert attempt["duration_ms"] < 2000


# --- Outbox files named from validated ids only ----------------------------------------------

CRAFTED_IDS = [
    "<../../../tmp/x@y>",
    "<../escaped@example.com>",
    "</tmp/absolute@example.com>",
    "<em_../../escaped@example.com>",
    f"<em_{'0' * 32}/../../x@example.com>",
    f"<em_{'0' * 31}@example.com>",
    f"<em_{'0' * 33}@example.com>",
    f"<em_{'A' * 32}@example.com>",
    f"<em_{'0' * 32}\x00@example.com>",
    f"<em_{'0' * 32}@example.com>\r\nBcc: evil@example.com",
    f"<em_{'0' * 32}@exa/mple.com>",
    f"<em_{'0' * 32}@example.com> ",
    f"em_{'0' * 32}@example.com",
    "<" + "a" * 5000 + "@example.com>",
    "",
    None,
    42,
    ["<x@y>"],
]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_crafted_message_ids_fail_for_good_and_write_nothing(burst_worker, redis_conn, tmp_path):
    outbox = tmp_path / "deep" / "outbox"
    worker = burst_worker(smtp=None, outbox_dir=outbox)
    before = tree(tmp_path)
    job_ids = []
    for crafted in CRAFTED_IDS:
        request = EmailRequest.model_validate(
            {"to": [unique()], "subject": "s", "text": "t"}, context={"email_from": "shop@example.com"}
        )
        job_id = worker.enqueue("email", request)
        rewrite_job_data(redis_conn, job_id, lambda data, crafted=crafted: data.update(message_id=crafted))
        job_ids.append(job_id)

    worker.run()

    for job_id, crafted in zip(job_ids, CRAFTED_IDS, strict=True):
        job = worker.job(job_id)
        assert job["status"] == "failed", (crafted, job)
        (attempt,) = job["attempts"]
        assert attempt["outcome"] == "permanent", crafted
        assert "message_id" in job["error"] and "is invalid" in job["error"], job["error"]
    assert tree(tmp_path) == before
    assert not Path("/tmp/x@y.eml").exists()


def test_the_outbox_file_is_named_from_the_job_id(burst_worker, redis_conn, tmp_path):
    worker = burst_worker(smtp=None, outbox_dir=tmp_path)
    request = EmailRequest.model_validate(
        {"to": [unique()], "subject": "s", "text": "t"}, context={"email_from": "shop@example.com"}
    )
    job_id = worker.enqueue("email", request)
    worker.run()
    assert worker.job(job_id)["status"] == "succeeded"
    assert tree(tmp_path) == {f"{job_id}.eml"}


def test_job_data_that_reaches_headers_without_text_is_checked(burst_worker, redis_conn, tmp_path):
    """date must be a number, content types the API's pattern, addresses valid: else a permanent failure."""
    worker = burst_worker(smtp=None, outbox_dir=tmp_path)
    changes = {
        "date": lambda d: d.update(date="Thu, 01 Jan 1970\r\nBcc: evil@example.com"),
        "date-huge": lambda d: d.update(date=1e300),
        "date-bool": lambda d: d.update(date=True),
        "content_type": lambda d: d["attachments"][0].update(content_type="text/plain\r\nBcc: evil@example.com"),
        "multipart": lambda d: d["attachments"][0].update(content_type="multipart/mixed"),
        "to": lambda d: d.update(to=["evil@example.com\r\nBcc: x@example.com"]),
        "bcc": lambda d: d.update(bcc=["not an address"]),
        "from": lambda d: d.update({"from": "Eve <evil@example.com>\r\nBcc: x@example.com"}),
        "header-name": lambda d: d.update(headers={"Bcc": "x@example.com"}),
        "header-name-crlf": lambda d: d.update(headers={"X-A\r\nBcc": "x@example.com"}),
        "content-header": lambda d: d.update(headers={"Content-Type": "text/html"}),
    }
    job_ids = {}
    for name, change in changes.items():
        request = EmailRequest.model_validate(
            {"to": [unique()], "subject": "s", "text": "t", "attachments": [{"filename": "a.txt", "content": ""}]},
            context={"email_from": "shop@example.com"},
        )
        job_id = worker.enqueue("email", request)
        rewrite_job_data(redis_conn, job_id, change)
        job_ids[name] = job_id

    worker.run()

    for name, job_id in job_ids.items():
        job = worker.job(job_id)
        assert job["status"] == "failed", (name, job)
        assert job["error"].startswith("invalid job data: "), (name, job["error"])
    assert tree(tmp_path) == set()


@pytest.mark.parametrize(
    ("domain", "a_label"), [("bücher.example", "xn--bcher-kva.example"), ("straße.de", "xn--strae-oqa.de")]
)
def test_an_internationalized_sender_domain_is_one_a_label_in_from_and_message_id(
    burst_worker, server, domain, a_label
):
    """IDNA 2008 in both (IDNA 2003, Python's "idna" codec, would make straße.de strasse.de)."""
    _, recorder, smtp = server
    local = f"shop{uuid.uuid4().hex[:8]}"
    to = unique()
    job = send(burst_worker, smtp, to=[to], **{"from": f"Shop <{local}@{domain}>"})

    assert job["status"] == "succeeded", job
    seen = recorder.to(to)
    assert seen.mail_from == f"{local}@{a_label}"
    message = parse(seen.content)
    assert message["From"].addresses[0].addr_spec == f"{local}@{a_label}"
    assert message["Message-ID"] == f"<{job['id']}@{a_label}>"
