"""The Redis memory one job costs, queued and finished, for each channel:

    python -m bench.memory [--jobs 2000]

Starts an embedded Redis (Valkey, as `dispatcher dev` does) on a free port, a webhook receiver and
the outbox, accepts `--jobs` webhooks (1 KB payload) and as many emails (1 KB of text) through the
API's own enqueue code, reads Redis's `used_memory` (and `MEMORY USAGE` of each key of one job), has a
burst worker deliver them all, and reads it again. Prints a Markdown table; the figures are per job.
The baseline is the same Redis before anything was accepted, in the same run.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis

from dispatcher.channels.email import EmailRequest
from dispatcher.channels.webhook import WebhookRequest
from dispatcher.config import Settings
from dispatcher.embedded import start_embedded_redis
from dispatcher.enqueue import enqueue_many
from dispatcher.netguard import NetworkGuard

BATCH = 500


class _Ok(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _used(connection: redis.Redis) -> int:
    return int(connection.info("memory")["used_memory"])


def _keys_of(connection: redis.Redis, job_id: str) -> dict[str, int]:
    return {
        key.decode(): int(connection.memory_usage(key) or 0)
        for key in connection.scan_iter(f"*{job_id}*", count=1000)
    }


def measure(jobs: int) -> list[tuple[str, float, float, dict[str, int], dict[str, int]]]:
    with tempfile.TemporaryDirectory(prefix="dispatcher-memory-") as tmp:
        server = start_embedded_redis(Path(tmp) / "redis", ports=[_free_port()])
        receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
        threading.Thread(target=receiver.serve_forever, daemon=True).start()
        env = {
            "REDIS_URL": server.connection_url,
            "DISPATCHER_API_KEYS": "bench",
            "DISPATCHER_WEBHOOK_SECRET": "whsec_" + "A" * 32,
            "DISPATCHER_OUTBOX_DIR": str(Path(tmp) / "outbox"),
            "DISPATCHER_ALLOWED_NETWORKS": "127.0.0.0/8",
            "DISPATCHER_EMAIL_FROM": "shop@example.com",
            "DISPATCHER_LOG_FORMAT": "text",
        }
        settings = Settings.from_env(env)
        connection = redis.Redis.from_url(server.connection_url)
        guard = {"guard": NetworkGuard(settings.allowed_networks), "email_from": settings.email_from}
        url = f"http://127.0.0.1:{receiver.server_port}/hook"
        requests = {
            "webhook": WebhookRequest.model_validate(
                {"url": url, "event_type": "order.created", "payload": {"text": "x" * 1000}}, context=guard
            ),
            "email": EmailRequest.model_validate(
                {"to": ["ada@example.com"], "subject": "Your order", "text": "x" * 1000}, context=guard
            ),
        }
        rows = []
        try:
            for channel, request in requests.items():
                before = _used(connection)
                ids: list[str] = []
                for start in range(0, jobs, BATCH):
                    ids += enqueue_many(connection, settings, channel, [request] * min(BATCH, jobs - start))
                queued = _used(connection)
                queued_keys = _keys_of(connection, ids[0])
                subprocess.run(
                    [sys.executable, "-m", "workers", "--burst"],
                    env=os.environ | env,
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                finished = _used(connection)
                rows.append(
                    (channel, (queued - before) / jobs, (finished - before) / jobs, queued_keys,
                     _keys_of(connection, ids[0]))
                )
        finally:
            receiver.shutdown()
            server.stop()
    return rows


def describe(keys: dict[str, int]) -> str:
    """`job: 1913, attempts: 528`: each key by the part of its name that says what it is."""
    return ", ".join(f"{key.split(':')[-2] if key.count(':') > 1 else key}: {size}" for key, size in keys.items())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs of each channel (default 2000)")
    args = parser.parse_args()
    rows = measure(args.jobs)
    print(f"Redis memory per job, {args.jobs} jobs of each channel (used_memory before, queued, all delivered):\n")
    print("| channel | queued, bytes/job | finished, bytes/job | keys of one queued job (MEMORY USAGE) | "
          "keys of one finished job |")
    print("| --- | --- | --- | --- | --- |")
    for channel, queued, finished, queued_keys, finished_keys in rows:
        print(f"| {channel} | {queued:,.0f} | {finished:,.0f} | {describe(queued_keys)} | {describe(finished_keys)} |")


if __name__ == "__main__":
    main()
