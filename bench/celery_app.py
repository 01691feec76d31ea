"""The Celery baseline: Redis broker, the same POST with a kept-alive `requests.Session` per process.

The benchmark starts `celery -A bench.celery_app worker` with BENCH_CELERY_BROKER (the Redis URL)
and BENCH_CELERY_READY (a file written once the worker consumes) in the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

import requests
from celery import Celery
from celery.signals import worker_ready

app = Celery("bench", broker=os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_ignore_result=True,  # no result backend: the RQ baselines keep results, Celery needs none here
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_session = requests.Session()


@app.task(name="bench.post_webhook")
def post_webhook(url: str, body: str) -> int:
    response = _session.post(url, data=body.encode(), headers={"content-type": "application/json"}, timeout=15)
    response.raise_for_status()
    return response.status_code


@worker_ready.connect
def _announce_ready(**_: object) -> None:
    path = os.environ.get("BENCH_CELERY_READY")
    if path:
        Path(path).write_text("ready\n")
