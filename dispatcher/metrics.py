"""GET /metrics: Prometheus metrics of the whole deployment, read from Redis at every scrape.

Nothing is counted in the web process's memory: workers run on any number of machines and the web
in several gunicorn processes, so every figure comes from Redis when Prometheus asks, and each
process answers the same. Queue depths and live workers are what GET /readyz reads; registry sizes
come from RQ's registries (dispatcher.rqstore); attempt counts and durations from the tallies the
workers keep (dispatcher.tallies); sending rates from their shared schedules (dispatcher.ratelimit).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from dispatcher import ratelimit, rqstore
from dispatcher.channels import KINDS
from dispatcher.errors import APIError
from dispatcher.priorities import split
from dispatcher.runtime import Runtime
from dispatcher.tallies import DURATION_BUCKETS, Tallies

metrics = Blueprint("metrics", __name__)
_EXTENSION = "dispatcher.metrics"
_LE = [*(floatToGoString(bound) for bound in DURATION_BUCKETS), "+Inf"]


class DeliveryCollector(Collector):
    """The deployment's delivery figures, read from Redis in a few round trips per scrape."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        queues = rt.status.queues
        ready = rt.status.readiness()["queues"]
        with rt.connection.pipeline(transaction=False) as pipe:
            per_queue = rqstore.read_registry_sizes(pipe, queues)
            pipe.hgetall(rt.keys.tallies)
            *sizes, raw_tallies = pipe.execute()
        labels = ["queue", "priority"]
        queued = GaugeMetricFamily("dispatcher_queued_jobs", "Jobs waiting in the queue for a worker.", labels=labels)
        scheduled = GaugeMetricFamily(
            "dispatcher_scheduled_jobs", "Jobs waiting for a retry (RQ's scheduled registry).", labels=labels
        )
        in_flight = GaugeMetricFamily(
            "dispatcher_in_flight_jobs",
            "Jobs a worker has started: delivering, or held for a busy host (RQ's started registry).",
            labels=labels,
        )
        failed = GaugeMetricFamily(
            "dispatcher_failed_jobs", "Jobs failed for good and still kept (RQ's failed registry).", labels=labels
        )
        workers = GaugeMetricFamily(
            "dispatcher_live_workers", "Workers alive that serve the queue (as GET /readyz counts them).", labels=labels
        )
        for i, queue in enumerate(queues):
            names = [queue.name, split(queue.name)[1]]
            n_scheduled, n_started, n_failed = sizes[i * per_queue : (i + 1) * per_queue]
            queued.add_metric(names, ready[names[1]]["queued"])
            workers.add_metric(names, ready[names[1]]["workers"])
            scheduled.add_metric(names, n_scheduled)
            in_flight.add_metric(names, n_started)
            failed.add_metric(names, n_failed)
        yield from (queued, scheduled, in_flight, failed, workers)

        tallies = Tallies.parse(raw_tallies, KINDS)
        attempts = CounterMetricFamily(
            "dispatcher_delivery_attempts",
            "Delivery attempts finished, by channel, priority and outcome (succeeded, retryable, permanent).",
            labels=["channel", "priority", "outcome"],
        )
        for (kind, priority, outcome), value in tallies.attempts.items():
            attempts.add_metric([kind, priority, outcome], value)
        durations = HistogramMetricFamily(
            "dispatcher_attempt_duration_seconds",
            "How long delivery attempts took, by channel and outcome.",
            labels=["channel", "outcome"],
        )
        for (kind, outcome), histogram in tallies.durations.items():
            buckets = list(zip(_LE, histogram.buckets, strict=True))
            durations.add_metric([kind, outcome], buckets, histogram.seconds)
        yield from (attempts, durations)

        rates = ratelimit.shared_rates(rt.connection, rt.keys, ratelimit.configured(rt.settings))
        if rates:
            rate = GaugeMetricFamily(
                "dispatcher_send_rate",
                "Messages per second a rate-limited channel may send now: its configured rate, lowered while "
                "the receiver answers that we send too fast.",
                labels=["channel"],
            )
            for kind, shared in rates.items():
                rate.add_metric([kind], shared.current())
            yield rate


def init_app(app: Flask) -> None:
    """Serve GET /metrics from `app`, with the collector reading through its Runtime's connection.

    A registry of its own, not prometheus_client's global one: its default collectors describe the
    one process that happens to answer, and figures that change with the process would mislead.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DeliveryCollector(app.extensions["dispatcher"]))
    app.extensions[_EXTENSION] = registry
    app.register_blueprint(metrics)


@metrics.get("/metrics")
def scrape() -> Response:
    """The metrics in Prometheus's text format (or OpenMetrics, if the scraper asks for it)."""
    _authorize(current_app.extensions["dispatcher"].settings.metrics_key)
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(current_app.extensions[_EXTENSION]), content_type=content_type)


def _authorize(key: str | None) -> None:
    """With DISPATCHER_METRICS_KEY set, require it as a bearer token; raise APIError 401 otherwise."""
    if key is None:
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "unauthorized", "send Authorization: Bearer <metrics key>")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "unauthorized", "the metrics key is not valid")
