"""Build the MIME message for an email job. Bcc recipients never appear in it."""

from __future__ import annotations

import base64
from email.message import EmailMessage
from email.utils import formatdate


def build_message(data: dict) -> EmailMessage:
    """The message as sent: stable Message-ID and Date, multipart/alternative for text+html, attachments."""
    msg = EmailMessage()
    msg["From"] = data["from"]
    msg["To"] = ", ".join(data["to"])
    if data.get("cc"):
        msg["Cc"] = ", ".join(data["cc"])
    if data.get("reply_to"):
        msg["Reply-To"] = data["reply_to"]
    msg["Subject"] = data["subject"]
    msg["Date"] = formatdate(data["date"], usegmt=True)
    msg["Message-ID"] = data["message_id"]
    for name, value in data.get("headers", {}).items():
        msg[name] = value
    text, html = data.get("text"), data.get("html")
    if text is not None:
        msg.set_content(text)
        if html is not None:
            msg.add_alternative(html, subtype="html")
    else:
        msg.set_content(html, subtype="html")
    for attachment in data.get("attachments", []):
        maintype, _, subtype = attachment["content_type"].partition("/")
        msg.add_attachment(
            base64.b64decode(attachment["content"]),
            maintype=maintype,
            subtype=subtype,
            filename=attachment["filename"],
        )
    return msg


def envelope(data: dict) -> tuple[str, list[str]]:
    """The SMTP envelope: the sender's bare address and every recipient, Bcc included."""
    sender = data["from"]
    if "<" in sender:
        sender = sender[sender.rindex("<") + 1 : sender.rindex(">")]
    return sender, [*data["to"], *data.get("cc", []), *data.get("bcc", [])]
