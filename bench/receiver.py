"""A webhook receiver in its own process: asyncio, keep-alive, an optional delay, one log line per request.

    python -m bench.receiver --port 8081 --log arrivals.log

Every POST is answered `200 {"ok":true}`; `?delay=<seconds>` in the URL makes it answer after that
long (the slow receiver), without holding up other connections. Each request appends one line,
`<arrival unix time> <path> <webhook-id or -> <requests in flight>`, to the log, written as the
request arrives, so the benchmark sees deliveries while they happen and can match a webhook-id
to the moment the API accepted it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from urllib.parse import parse_qs, urlsplit

RESPONSE_BODY = b'{"ok":true}'
MAX_HEAD = 64 * 1024


class Receiver:
    def __init__(self, log_path: str) -> None:
        # Line-buffered: one write per request, visible to the benchmark at once.
        self.log = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self.in_flight = 0

    def close(self) -> None:
        self.log.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self.one_request(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection is to be closed."""
        head = await reader.readuntil(b"\r\n\r\n")
        arrived = time.time()
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            await reader.readexactly(int(headers.get("content-length", "0")))
        parts = urlsplit(target)
        delay = float(parse_qs(parts.query).get("delay", ["0"])[0])
        self.in_flight += 1
        self.log.write(f"{arrived:.6f} {parts.path} {headers.get('webhook-id', '-')} {self.in_flight}\n")
        try:
            if delay > 0:
                await asyncio.sleep(delay)
        finally:
            self.in_flight -= 1
        close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(RESPONSE_BODY)}\r\n".encode()
            + (b"connection: close\r\n" if close else b"")
            + b"\r\n"
            + RESPONSE_BODY
        )
        await writer.drain()
        return not close and method != ""


async def serve(host: str, port: int, log_path: str) -> None:
    receiver = Receiver(log_path)
    server = await asyncio.start_server(receiver.handle, host, port, backlog=1024, limit=MAX_HEAD)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    receiver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True, help="file to append one line per request to")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.log))


if __name__ == "__main__":
    main()
