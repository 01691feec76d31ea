"""Name resolution at acceptance: one time bound per request, lookups concurrent, shared and cached.

Slow DNS cannot be arranged for the system resolver here, so the app's guard gets a resolver that
stands in for it (the only replaced part); the app, its routes, models and guard are the real ones.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from dispatcher.app import create_app
from dispatcher.netguard import DNS_FAILURE_CACHE_SECONDS, NetworkGuard
from tests.conftest import AUTH

DNS_TIMEOUT = 1.0
#: The answer comes within the bound plus this (a generous margin for a noisy 2-core machine).
MARGIN = 1.5
WEBHOOK = {"event_type": "order.created", "payload": {"order": 1}}


class FakeDns:
    """Stands in for getaddrinfo: every name takes `delay` seconds, then resolves to `address`, or
    fails when its first label is "nx"; counts the calls per name. `release()` ends every wait."""

    def __init__(self, delay: float, address: str = "10.0.0.1") -> None:
        self.delay = delay
        self.address = address
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.released = threading.Event()

    def __call__(self, host: str, port: object, *args: object, **kwargs: object) -> list[tuple]:
        with self.lock:
            self.calls[host] += 1
        self.released.wait(self.delay)
        if host.startswith("nx"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (self.address, 0))]

    def release(self) -> None:
        self.released.set()


@pytest.fixture
def dns_app(settings) -> Iterator:
    """Factory: an app built by create_app whose runtime's guard resolves with a FakeDns."""
    fakes: list[FakeDns] = []

    def make(delay: float, dns_timeout: float = DNS_TIMEOUT, address: str = "10.0.0.1"):
        fake = FakeDns(delay, address)
        fakes.append(fake)
        app = create_app(dataclasses.replace(settings, allowed_networks=(), dns_timeout=dns_timeout))
        runtime = app.extensions["dispatcher"]
        app.extensions["dispatcher"] = dataclasses.replace(
            runtime, guard=NetworkGuard(runtime.settings.allowed_networks, dns_timeout, resolver=fake)
        )
        return app, fake

    yield make
    for fake in fakes:
        fake.release()


def batch(hosts: list[str]) -> dict:
    return {"items": [WEBHOOK | {"url": f"https://{host}/hook"} for host in hosts]}


def post(app, path: str, body: dict) -> tuple[float, int, dict]:
    started = time.monotonic()
    response = app.test_client().post(path, json=body, headers=AUTH)
    return time.monotonic() - started, response.status_code, response.get_json()


def problems(answer: dict) -> dict[str, str]:
    return {d["field"]: d["problem"] for d in answer["error"]["details"]}


def test_concurrent_batches_of_slow_hosts_get_a_json_422_within_the_bound(dns_app):
    app, _ = dns_app(delay=30)
    results: dict[int, tuple[float, int, dict]] = {}

    def run(n: int) -> None:
        results[n] = post(app, "/v1/webhooks/batch", batch([f"slow{i}.batch{n}.example" for i in range(50)]))

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DNS_TIMEOUT + 10)

    assert sorted(results) == [0, 1, 2, 3]
    for n, (elapsed, status, answer) in results.items():
        assert status == 422, answer
        assert answer["error"]["code"] == "validation_error"
        assert problems(answer) == {
            f"items.{i}.url": f"host 'slow{i}.batch{n}.example' did not resolve within 1 s" for i in range(50)
        }
        assert elapsed < DNS_TIMEOUT + MARGIN, elapsed


def test_a_single_slow_host_is_named_on_url_within_the_bound(dns_app):
    app, _ = dns_app(delay=30)

    elapsed, status, answer = post(app, "/v1/webhooks", WEBHOOK | {"url": "https://slow.example/hook"})

    assert status == 422
    assert problems(answer) == {"url": "host 'slow.example' did not resolve within 1 s"}
    assert elapsed < DNS_TIMEOUT + MARGIN


def test_a_batch_of_distinct_hosts_resolves_them_concurrently(dns_app):
    lookup = 0.3
    app, fake = dns_app(delay=lookup, dns_timeout=10)
    hosts = [f"h{i}.example" for i in range(100)]

    elapsed, status, answer = post(app, "/v1/webhooks/batch", batch(hosts))

    # Every host resolved (to a private address): none timed out, each was judged.
    assert status == 422
    assert len(problems(answer)) == 100
    assert all("10.0.0.1 is not a public address" in p for p in problems(answer).values())
    assert fake.calls == Counter(hosts)
    assert elapsed < 10 * lookup, f"{elapsed:.2f} s for 100 lookups of {lookup} s each"


def test_a_failed_lookup_is_not_repeated_within_its_cache_time(dns_app):
    app, fake = dns_app(delay=0)

    answers = [post(app, "/v1/webhooks", WEBHOOK | {"url": "https://nx.example/hook"}) for _ in range(3)]
    answers.append(post(app, "/v1/webhooks/batch", batch(["nx.example"] * 20)))

    for _, status, answer in answers:
        assert status == 422
        assert all(
            p.startswith("destination refused: host 'nx.example' does not resolve") for p in problems(answer).values()
        )
    assert fake.calls == Counter({"nx.example": 1})


def test_a_failed_lookup_is_asked_again_after_its_cache_time(dns_app, monkeypatch):
    app, fake = dns_app(delay=0)
    post(app, "/v1/webhooks", WEBHOOK | {"url": "https://nx.example/hook"})
    real_monotonic = time.monotonic
    later = DNS_FAILURE_CACHE_SECONDS + 0.1
    monkeypatch.setattr(time, "monotonic", lambda: real_monotonic() + later)  # the clock, not our code

    post(app, "/v1/webhooks", WEBHOOK | {"url": "https://nx.example/hook"})

    assert fake.calls == Counter({"nx.example": 2})


def test_a_good_answer_is_cached(dns_app):
    app, fake = dns_app(delay=0)

    for _ in range(3):
        assert post(app, "/v1/webhooks", WEBHOOK | {"url": "https://ok.example/hook"})[1] == 422

    assert fake.calls == Counter({"ok.example": 1})


def test_requests_for_one_slow_host_share_its_lookup(dns_app):
    app, fake = dns_app(delay=0.5, dns_timeout=5)
    results: list[tuple[float, int, dict]] = []

    def run() -> None:
        results.append(post(app, "/v1/webhooks", WEBHOOK | {"url": "https://shared.example/hook"}))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert [status for _, status, _ in results] == [422] * 4
    assert all("10.0.0.1 is not a public address" in problems(answer)["url"] for _, _, answer in results)
    assert fake.calls == Counter({"shared.example": 1})


def test_a_lookup_that_outlives_its_request_is_cached_for_the_next(dns_app):
    app, fake = dns_app(delay=1.5)

    first = post(app, "/v1/webhooks", WEBHOOK | {"url": "https://late.example/hook"})
    time.sleep(1.0)  # the lookup finishes in the background
    second = post(app, "/v1/webhooks", WEBHOOK | {"url": "https://late.example/hook"})

    assert problems(first[2]) == {"url": "host 'late.example' did not resolve within 1 s"}
    assert "10.0.0.1 is not a public address" in problems(second[2])["url"]
    assert fake.calls == Counter({"late.example": 1})


def test_no_lookup_thread_exists_before_the_first_lookup(settings):
    before = {t.name for t in threading.enumerate()}
    app = create_app(dataclasses.replace(settings, allowed_networks=()))
    app.test_client().get("/healthz")

    assert not [t.name for t in threading.enumerate() if t.name.startswith("dns") and t.name not in before]
