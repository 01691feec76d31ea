"""Job functions of the baselines: what a team would write with plain RQ and `requests` or `smtplib`.

They do the same work as Dispatcher's delivery minus its extras (no signature, no attempt
history, no retry policy): one POST of the same ~1 KB JSON body, or one email of the same
content. Only baseline workers import this module (it needs the `bench` extra: requests).
"""

from __future__ import annotations

import smtplib
from email.message import EmailMessage

import requests

#: Kept alive for the life of a SimpleWorker process (a forking `rq worker` gets a new one per job).
_session = requests.Session()
TIMEOUT = 15


def post_webhook(url: str, body: str) -> int:
    """Plain `requests.post`: a new connection per job, as the forking `rq worker` would have anyway."""
    response = requests.post(url, data=body.encode(), headers={"content-type": "application/json"}, timeout=TIMEOUT)
    response.raise_for_status()
    return response.status_code


def post_webhook_session(url: str, body: str) -> int:
    """The same POST through the process's kept-alive `requests.Session`."""
    response = _session.post(url, data=body.encode(), headers={"content-type": "application/json"}, timeout=TIMEOUT)
    response.raise_for_status()
    return response.status_code


def send_email(host: str, port: int, mail: dict) -> int:
    """Build the MIME message and send it over a new SMTP connection."""
    message = EmailMessage()
    message["From"] = mail["from"]
    message["To"] = ", ".join(mail["to"])
    message["Subject"] = mail["subject"]
    message.set_content(mail["text"])
    message.add_alternative(mail["html"], subtype="html")
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        smtp.send_message(message)
    return 250
