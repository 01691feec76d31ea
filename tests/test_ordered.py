"""Ordered endpoints (issue #12, item 6): the deliveries of one ordering key reach an ordered
endpoint in acceptance order, one at a time; a failing head holds the ones behind it while it is
retried, and lets them go once it fails for good or is canceled. Real workers, real receivers.

The receiver's /event/<token> scenario answers what each event's payload asks (conftest).
"""

from __future__ import annotations

import itertools
import json
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta

from tests.conftest import AUTH, ReceivedRequest, Service, wait_until
from tests.test_endpoints import event, new_application, new_endpoint, publish

FAST_RETRY = {"max_attempts": 5, "backoff": [0.2, 0.2, 0.2, 0.2]}


def data(request: ReceivedRequest) -> dict:
    """The event's payload a request carried."""
    return json.loads(request.body)["data"]


def accepted(svc: Service, app: str, payload: dict, **fields) -> str:
    """Publish an event; its one delivery's job id."""
    response = publish(svc, app, payload=payload, **fields)
    assert response.status_code == 202, response.get_json()
    (delivery,) = response.get_json()["deliveries"]
    return str(delivery["id"])


def job(svc: Service, job_id: str) -> dict:
    response = svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def statuses(svc: Service, job_ids: list[str]) -> list[str]:
    return [job(svc, job_id)["status"] for job_id in job_ids]


def all_settled(svc: Service, job_ids: list[str], timeout: float = 60) -> None:
    wait_until(
        lambda: all(status in ("succeeded", "failed", "canceled") for status in statuses(svc, job_ids)),
        timeout,
        f"not all settled: {statuses(svc, job_ids)}",
    )


def assert_one_at_a_time(requests: list[ReceivedRequest]) -> None:
    """No two requests overlapped: each arrived after the one before it was answered."""
    ordered = sorted(requests, key=lambda r: r.received_at)
    for before, after in itertools.pairwise(ordered):
        assert before.answered_at is not None
        assert after.received_at >= before.answered_at, (data(before), data(after))


def in_flight_at_once(requests: list[ReceivedRequest]) -> int:
    """The most requests the receiver was answering at one moment."""
    starts = [r.received_at for r in requests]
    return max(sum(r.received_at <= at < (r.answered_at or 0) for r in requests) for at in starts)


def succeeded_in_order(requests: list[ReceivedRequest]) -> list[int]:
    """The `n` of each successfully received payload, in the order they arrived."""
    return [data(r)["n"] for r in sorted(requests, key=lambda r: r.received_at) if r.status_ok]


def test_ordering_is_held_under_3_worker_processes_with_retries(service, receiver):
    """The issue's acceptance test: 15 events on 3 ordering keys, published quickly, some failing
    (a retryable 500) before they are accepted, delivered by three worker processes. (The circuit
    breaker, which a run of failures across the keys could open, is kept out of it.)"""
    svc = service(DISPATCHER_BREAKER_FAILURES="1000")
    app = new_application(svc)
    url = receiver.url("event")
    new_endpoint(svc, app, url, ordered=True, retry=FAST_RETRY)
    keys = ["customer-a", "customer-b", "customer-c"]
    jobs = []
    for n in range(15):
        # Every third event is refused once, every seventh twice, before it is accepted.
        fail_first = 2 if n % 7 == 3 else 1 if n % 3 == 1 else 0
        payload = {"n": n, "key": keys[n % 3], "fail_first": fail_first}
        jobs.append(accepted(svc, app, payload, ordering_key=keys[n % 3]))
    for _ in range(3):
        svc.start_worker()

    all_settled(svc, jobs, timeout=120)
    assert statuses(svc, jobs) == ["succeeded"] * 15, svc.logs()
    requests = receiver.received(url)
    by_key: dict[str, list[ReceivedRequest]] = defaultdict(list)
    for request in requests:
        by_key[data(request)["key"]].append(request)
    assert sorted(by_key) == keys
    for key, received in by_key.items():
        expected = [n for n in range(15) if keys[n % 3] == key]
        assert succeeded_in_order(received) == expected, key
        assert_one_at_a_time(received)
    assert sum(not r.status_ok for r in requests) == sum(2 if n % 7 == 3 else n % 3 == 1 for n in range(15))
    # The keys went side by side: one key's requests are not all before or after another's.
    spans = [(min(r.received_at for r in rs), max(r.received_at for r in rs)) for rs in by_key.values()]
    assert max(start for start, _ in spans) < min(end for _, end in spans)


def test_an_unordered_endpoint_of_the_same_application_keeps_full_concurrency(service, receiver):
    svc = service()
    app = new_application(svc)
    ordered_url, unordered_url = receiver.url("slow/0.5"), receiver.url("slow/0.5")
    new_endpoint(svc, app, ordered_url, ordered=True)
    new_endpoint(svc, app, unordered_url)
    events = [publish(svc, app, payload={"n": n}).get_json()["id"] for n in range(6)]
    svc.start_worker()

    wait_until(lambda: all(event(svc, e)["percent_done"] == 100 for e in events), 30, "not all settled")
    unordered = sorted(receiver.received(unordered_url), key=lambda r: r.received_at)
    ordered = receiver.received(ordered_url)
    assert len(unordered) == len(ordered) == 6
    # Unordered: several in flight together, done well under the 3 s they would take one at a time
    # (the per-host share of delivery slots, which the ordered endpoint's deliveries use too, caps it).
    assert in_flight_at_once(unordered) >= 3
    assert unordered[-1].answered_at - unordered[0].received_at < 2.0
    # Ordered: one at a time, in acceptance order.
    assert_one_at_a_time(ordered)
    assert [data(r)["n"] for r in sorted(ordered, key=lambda r: r.received_at)] == list(range(6))


def test_a_failing_head_holds_the_rest_while_retried_and_lets_them_go_once_it_fails_for_good(service, receiver):
    svc = service()
    app = new_application(svc)
    url = receiver.url("event")
    new_endpoint(svc, app, url, ordered=True, retry={"max_attempts": 3, "backoff": [0.5, 0.5]})
    head = accepted(svc, app, {"n": 0, "answer": 500})
    rest = [accepted(svc, app, {"n": n}) for n in range(1, 4)]
    svc.start_worker()

    all_settled(svc, [head, *rest])
    assert statuses(svc, [head, *rest]) == ["failed", "succeeded", "succeeded", "succeeded"]
    received = sorted(receiver.received(url), key=lambda r: r.received_at)
    assert [(data(r)["n"], r.status) for r in received] == [(0, 500), (0, 500), (0, 500), (1, 200), (2, 200), (3, 200)]
    assert_one_at_a_time(received)
    # Held without an attempt: the first behind the head was tried once, when its turn came.
    assert len(job(svc, rest[0])["attempts"]) == 1
    # ...and promptly: woken when the head failed, not at its next look (30 s later).
    assert received[3].received_at - received[2].answered_at < 5


def test_a_canceled_head_does_not_block_the_rest(service, receiver):
    svc = service()
    app = new_application(svc)
    url = receiver.url("event")
    new_endpoint(svc, app, url, ordered=True)
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    head = accepted(svc, app, {"n": 0}, send_at=later)  # accepted first: the others wait for it
    rest = [accepted(svc, app, {"n": n}) for n in range(1, 4)]
    svc.start_worker()

    wait_until(lambda: job(svc, rest[0])["held"] is not None, 20, "the delivery behind the head was not held")
    view = job(svc, rest[0])
    assert view["status"] == "scheduled" and view["attempts"] == []
    assert view["held"] == "waiting for the delivery ahead of it on an ordered endpoint"
    time.sleep(1)
    assert receiver.received(url) == []

    canceled_at = time.time()
    assert svc.client.delete(f"/v1/jobs/{head}", headers=AUTH).status_code == 200
    all_settled(svc, rest)
    received = sorted(receiver.received(url), key=lambda r: r.received_at)
    assert [data(r)["n"] for r in received] == [1, 2, 3]
    assert received[0].received_at - canceled_at < 5  # woken by the cancel, not the 30 s safety net
    assert job(svc, head)["status"] == "canceled"


def test_different_ordering_keys_do_not_block_each_other(service, receiver):
    svc = service()
    app = new_application(svc)
    url = receiver.url("event")
    new_endpoint(svc, app, url, ordered=True, retry={"max_attempts": 2, "backoff": [3]})
    a = [accepted(svc, app, {"n": 0, "key": "a", "fail_first": 1}, ordering_key="a")]
    a += [accepted(svc, app, {"n": n, "key": "a"}, ordering_key="a") for n in (1, 2)]
    b = [accepted(svc, app, {"n": n, "key": "b"}, ordering_key="b") for n in (3, 4, 5)]
    svc.start_worker()

    all_settled(svc, a + b)
    assert statuses(svc, a + b) == ["succeeded"] * 6
    received = sorted(receiver.received(url), key=lambda r: r.received_at)
    keyed = [(data(r)["key"], data(r)["n"], r.status) for r in received]
    first_a_retry = keyed.index(("a", 0, 200))
    # While a's head waited out its backoff, all of b went.
    assert {(k, n) for k, n, _ in keyed[:first_a_retry]} == {("a", 0), ("b", 3), ("b", 4), ("b", 5)}
    assert [n for k, n, _ in keyed if k == "b"] == [3, 4, 5]
    assert [n for k, n, status in keyed if k == "a" and status == 200] == [0, 1, 2]


def test_events_without_an_ordering_key_are_one_sequence(service, receiver):
    svc = service()
    app = new_application(svc)
    url = receiver.url("event")
    new_endpoint(svc, app, url, ordered=True, retry={"max_attempts": 2, "backoff": [1]})
    jobs = [accepted(svc, app, {"n": 0, "fail_first": 1})] + [accepted(svc, app, {"n": n}) for n in range(1, 6)]
    svc.start_worker()

    all_settled(svc, jobs)
    assert statuses(svc, jobs) == ["succeeded"] * 6
    received = sorted(receiver.received(url), key=lambda r: r.received_at)
    assert [(data(r)["n"], r.status) for r in received] == [(0, 500), *[(n, 200) for n in range(6)]]
    assert_one_at_a_time(received)


def test_an_ordered_endpoints_deliveries_of_one_key_share_one_list_in_acceptance_order(service, receiver, redis_conn):
    """What the publish writes: the job ids in the list of their (endpoint, key), the key hashed."""
    svc = service()
    app = new_application(svc)
    ordered = new_endpoint(svc, app, receiver.url(), ordered=True)
    new_endpoint(svc, app, receiver.url())
    ids = [
        [d["id"] for d in publish(svc, app, payload={"n": n}, ordering_key="k:1").get_json()["deliveries"]]
        for n in range(3)
    ]
    other = [d["id"] for d in publish(svc, app, payload={"n": 9}).get_json()["deliveries"]]

    lists = sorted(key.decode() for key in redis_conn.keys(f"dispatcher:{svc.settings.queue_name}:ordered:*"))
    assert len(lists) == 2 and all(key.split(":")[-2] == ordered["id"] for key in lists)
    assert not any("k:1" in key for key in lists)  # the ordering key is user input: hashed
    by_list = {key: [raw.decode() for raw in redis_conn.lrange(key, 0, -1)] for key in lists}
    assert sorted(by_list.values()) == sorted([[first for first, _ in ids], [other[0]]])
    assert all(redis_conn.ttl(key) > svc.settings.failure_ttl for key in lists)
