"""Load generators: a fixed-rate API client (latency) and a keep-alive hammer (receiver ceilings)."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import threading
import time
from dataclasses import dataclass


@dataclass
class Accepted:
    due: float  # perf_counter time the request was scheduled for
    late: float  # seconds it was sent after that (the generator falling behind)
    sent_at: float  # unix time the request was sent
    accepted_at: float  # unix time the 202 was read
    status: int
    job_id: str | None


def fixed_rate(
    port: int, path: str, body: bytes, headers: dict[str, str], rate: float, seconds: float, threads: int = 16
) -> list[Accepted]:
    """POST `body` at `rate` requests/s for `seconds`, open loop: each request has its due time, so a slow
    answer does not hold back the ones after it (up to `threads` at once)."""
    total = int(rate * seconds)
    start = time.perf_counter() + 0.05
    results: list[Accepted | None] = [None] * total
    claim = itertools.count()
    lock = threading.Lock()

    def run() -> None:
        connection: http.client.HTTPConnection | None = None
        while True:
            with lock:
                i = next(claim)
            if i >= total:
                break
            due = start + i / rate
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            late = time.perf_counter() - due
            sent_at = time.time()
            status, job_id = 0, None
            try:
                if connection is None:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                connection.request("POST", path, body, headers)
                response = connection.getresponse()
                raw = response.read()
                status = response.status
                if status == 202:
                    job_id = json.loads(raw)["id"]
                if response.will_close:
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException):
                if connection is not None:
                    connection.close()
                connection = None
            results[i] = Accepted(due, late, sent_at, time.time(), status, job_id)
        if connection is not None:
            connection.close()

    workers = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return [r for r in results if r is not None]


async def _hammer(port: int, path: str, body: bytes, connections: int, seconds: float) -> int:
    request = (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    done = 0
    deadline = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                done += 1
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return done


def hammer(port: int, path: str, body: bytes, connections: int, seconds: float) -> float:
    """Requests/s a receiver answers to `connections` kept-alive connections, each sending its next request
    as soon as the previous one is answered."""
    started = time.perf_counter()
    done = asyncio.run(_hammer(port, path, body, connections, seconds))
    return done / (time.perf_counter() - started)


def _smtp_client(port: int, seconds: float, connections: int) -> int:
    """One client process: `connections` threads, each sending mails over its own kept-open SMTP connection."""
    import smtplib
    from email.message import EmailMessage

    message = EmailMessage()
    message["From"] = "shop@example.com"
    message["To"] = "bench-ceiling@example.com"
    message["Subject"] = "Your order #1042"
    message.set_content("Thanks for your order.\n" * 20)
    message.add_alternative("<p>Thanks for your order.</p>" * 20, subtype="html")
    deadline = time.perf_counter() + seconds
    sent = [0] * connections

    def run(index: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            while time.perf_counter() < deadline:
                smtp.send_message(message)
                sent[index] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(sent)


def smtp_hammer(port: int, seconds: float, processes: int = 2, connections: int = 4) -> float:
    """Mails/s an SMTP server accepts from `processes` client processes with `connections` connections each."""
    import multiprocessing

    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        sent = pool.starmap(_smtp_client, [(port, seconds, connections)] * processes)
    # Spawning the clients takes a moment; count from when they could have started sending.
    return sum(sent) / min(seconds, time.perf_counter() - started)
