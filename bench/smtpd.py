"""An aiosmtpd SMTP server in its own process that accepts every mail and logs its arrival.

    python -m bench.smtpd --port 8025 --log mails.log

Each accepted message appends `<arrival unix time> <first recipient> <Message-ID or -> 0` to the log.
"""

from __future__ import annotations

import argparse
import re
import signal
import threading
import time

from aiosmtpd.controller import Controller

_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(\S+)", re.IGNORECASE | re.MULTILINE)


class RecordingHandler:
    def __init__(self, log_path: str) -> None:
        self.log = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed in main()

    async def handle_DATA(self, server, session, envelope) -> str:  # type: ignore[no-untyped-def]
        content = envelope.original_content or b""
        match = _MESSAGE_ID.search(content[:8192])
        message_id = match.group(1).decode("ascii", "replace") if match else "-"
        rcpt = envelope.rcpt_tos[0] if envelope.rcpt_tos else "-"
        self.log.write(f"{time.time():.6f} {rcpt} {message_id} 0\n")
        return "250 Message accepted for delivery"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    handler = RecordingHandler(args.log)
    controller = Controller(handler, hostname=args.host, port=args.port, server_hostname="bench.localhost")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    controller.start()
    try:
        stop.wait()
    finally:
        controller.stop()
        handler.log.close()


if __name__ == "__main__":
    main()
