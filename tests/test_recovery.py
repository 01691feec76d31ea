"""Recovery (issue #12, item 7): `POST /v1/applications/<app>/endpoints/<id>/recover` delivers again,
to one endpoint, the events of a window whose delivery to it failed, in the same job (same
`webhook-id`, same history). Real Redis, real workers, real HTTP receivers."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from dispatcher.client import Client, Conflict, NotFound
from dispatcher.idempotency import HEADER
from tests.conftest import API_KEY, AUTH, Service, wait_for
from tests.test_endpoints import new_application, new_endpoint, publish

ONCE = {"max_attempts": 1}


def _deliveries(response) -> dict[str, str]:
    """A publish answer's deliveries: endpoint id -> job id."""
    assert response.status_code == 202, response.get_json()
    return {d["endpoint"]: d["id"] for d in response.get_json()["deliveries"]}


def _recover(svc: Service, app: str, endpoint: str, headers: dict | None = None, **body):
    body = {name: value.isoformat() if isinstance(value, datetime) else value for name, value in body.items()}
    path = f"/v1/applications/{app}/endpoints/{endpoint}/recover"
    return svc.client.post(path, json=body, headers=AUTH | (headers or {}))


def _status(svc: Service, job_id: str) -> dict:
    return svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()


def _fields(response, status: int = 422) -> list[str]:
    assert response.status_code == status, response.get_json()
    return [detail["field"] for detail in response.get_json()["error"]["details"]]


def _now() -> datetime:
    time.sleep(0.01)  # acceptance times on either side of it differ
    moment = datetime.now(UTC)
    time.sleep(0.01)
    return moment


def _failed_deliveries(svc: Service, app: str, endpoint: str, count: int) -> list[str]:
    """Publish `count` events and wait until each one's delivery to `endpoint` has failed for good."""
    ids = [_deliveries(publish(svc, app, payload={"n": n}))[endpoint] for n in range(count)]
    for job_id in ids:
        assert wait_for(svc.client, job_id)["status"] == "failed", svc.logs()
    return ids


# --- the acceptance test ---------------------------------------------------------------------


#: Failing endpoints' circuit breakers would hold their deliveries (tests/test_endpoint_health.py);
#: recovery is about deliveries that failed, so the breaker stays out of the way here.
NO_BREAKER = {"DISPATCHER_BREAKER_FAILURES": "1000"}


def test_a_recovery_window(service, receiver):
    """A receiver down for a while: the failed deliveries of the events accepted in the window are
    delivered once more, with their webhook-id, and nothing else is: not before the window, not one
    that succeeded, not one still scheduled, not a canceled one, not another endpoint's."""
    svc = service(**NO_BREAKER)
    svc.start_worker()
    app = new_application(svc)
    # Down for the first five requests, then up again.
    url = receiver.url("fail/5/500")
    other_url = receiver.url("status/500")
    down = new_endpoint(svc, app, url, retry=ONCE)["id"]
    other = new_endpoint(svc, app, other_url, retry=ONCE)["id"]

    before = [_deliveries(publish(svc, app, payload={"n": n})) for n in range(2)]
    since = _now()
    inside = [_deliveries(publish(svc, app, payload={"n": n})) for n in range(2, 5)]
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    scheduled = _deliveries(publish(svc, app, payload={"n": "scheduled"}, send_at=later))
    canceled = _deliveries(publish(svc, app, payload={"n": "canceled"}, send_at=later))
    assert svc.client.delete(f"/v1/jobs/{canceled[down]}", headers=AUTH).status_code == 200
    for deliveries in before + inside:
        for job_id in deliveries.values():
            assert wait_for(svc.client, job_id)["status"] == "failed", svc.logs()
    # The receiver is up again: the next event's delivery succeeds.
    succeeded = _deliveries(publish(svc, app, payload={"n": "up"}))
    assert wait_for(svc.client, succeeded[down])["status"] == "succeeded", svc.logs()
    assert wait_for(svc.client, succeeded[other])["status"] == "failed", svc.logs()
    other_received = len(receiver.received(other_url))

    response = _recover(svc, app, down, since=since)

    assert response.status_code == 202, response.get_json()
    recovered = [deliveries[down] for deliveries in inside]
    assert response.get_json() == {"requeued": 3, "ids": recovered, "remaining": 0}
    for job_id in recovered:
        job = wait_for(svc.client, job_id)
        assert job["status"] == "succeeded", job
        assert [a["status_code"] for a in job["attempts"]] == [500, 200]  # one history, two series
    time.sleep(1)  # room for a wrong delivery to arrive
    sent = [r.headers["webhook-id"] for r in receiver.received(url)]
    once = [d[down] for d in before] + [succeeded[down]]
    assert sorted(sent) == sorted(once + 2 * recovered)
    assert all(sent.count(job_id) == 2 for job_id in recovered)
    assert [r.status for r in receiver.received(url) if r.headers["webhook-id"] in recovered][-3:] == [200] * 3
    assert _status(svc, scheduled[down])["status"] == "scheduled"
    assert _status(svc, canceled[down])["status"] == "canceled"
    assert all(_status(svc, d[down])["status"] == "failed" for d in before)
    assert len(receiver.received(other_url)) == other_received
    assert all(_status(svc, d[other])["status"] == "failed" for d in inside)


def test_until_ends_the_window_and_a_delivery_on_its_way_is_left_alone(service, receiver):
    svc = service(**NO_BREAKER)
    svc.start_worker()
    app = new_application(svc)
    endpoint = new_endpoint(svc, app, receiver.url("status/500"), retry=ONCE)["id"]
    since = _now()
    first = _failed_deliveries(svc, app, endpoint, 2)
    until = _now()
    _failed_deliveries(svc, app, endpoint, 1)
    svc.stop_all()
    waiting = _deliveries(publish(svc, app))[endpoint]  # queued: no worker takes it

    response = _recover(svc, app, endpoint, since=since, until=until)

    assert response.status_code == 202, response.get_json()
    assert response.get_json() == {"requeued": 2, "ids": first, "remaining": 0}
    assert _status(svc, waiting)["status"] == "queued"
    assert [_status(svc, job_id)["status"] for job_id in first] == ["queued", "queued"]


def test_the_limit_takes_the_oldest_events_and_counts_what_remains(service, receiver):
    svc = service(**NO_BREAKER)
    svc.start_worker()
    app = new_application(svc)
    endpoint = new_endpoint(svc, app, receiver.url("status/500"), retry=ONCE)["id"]
    since = _now()
    failed = _failed_deliveries(svc, app, endpoint, 3)
    svc.stop_all()  # the requeued stay queued: a second call sees only the one left

    first = _recover(svc, app, endpoint, since=since, limit=2)
    second = _recover(svc, app, endpoint, since=since, limit=2)
    third = _recover(svc, app, endpoint, since=since, limit=2)

    assert first.status_code == 202, first.get_json()
    assert first.get_json() == {"requeued": 2, "ids": failed[:2], "remaining": 1}
    assert second.get_json() == {"requeued": 1, "ids": failed[2:], "remaining": 0}
    assert third.get_json() == {"requeued": 0, "ids": [], "remaining": 0}


def test_a_disabled_endpoint_is_refused_until_enabled(service, receiver):
    svc = service(**NO_BREAKER)
    svc.start_worker()
    app = new_application(svc)
    endpoint = new_endpoint(svc, app, receiver.url("status/500"), retry=ONCE)["id"]
    since = _now()
    (failed,) = _failed_deliveries(svc, app, endpoint, 1)
    svc.stop_all()
    path = f"/v1/applications/{app}/endpoints/{endpoint}"
    assert svc.client.patch(path, json={"disabled": True}, headers=AUTH).status_code == 200

    refused = _recover(svc, app, endpoint, since=since)

    assert refused.status_code == 409, refused.get_json()
    error = refused.get_json()["error"]
    assert error["code"] == "conflict" and "disabled" in error["message"], error
    assert _status(svc, failed)["status"] == "failed"
    assert svc.client.patch(path, json={"disabled": False}, headers=AUTH).status_code == 200
    assert _recover(svc, app, endpoint, since=since).get_json()["ids"] == [failed]


def test_an_idempotent_repeat_answers_the_first_answer_and_requeues_nothing(service, receiver):
    svc = service(**NO_BREAKER)
    svc.start_worker()
    app = new_application(svc)
    endpoint = new_endpoint(svc, app, receiver.url("status/500"), retry=ONCE)["id"]
    since = _now()
    (failed,) = _failed_deliveries(svc, app, endpoint, 1)
    key = {HEADER: uuid.uuid4().hex}

    first = _recover(svc, app, endpoint, key, since=since)
    assert first.status_code == 202, first.get_json()
    assert wait_for(svc.client, failed, lambda job: len(job["attempts"]) == 2 and job["status"] == "failed")
    repeat = _recover(svc, app, endpoint, key, since=since)
    time.sleep(0.5)
    unkeyed = _recover(svc, app, endpoint, since=since)  # what the repeat would have done without the key

    assert first.get_json() == {"requeued": 1, "ids": [failed], "remaining": 0}
    assert repeat.status_code == 200 and repeat.get_json() == first.get_json()
    assert unkeyed.status_code == 202 and unkeyed.get_json()["ids"] == [failed]
    other = _recover(svc, app, endpoint, key, since=since, limit=5)
    assert other.status_code == 409 and other.get_json()["error"]["code"] == "idempotency_conflict", other.get_json()


# --- refusals --------------------------------------------------------------------------------


@pytest.fixture
def registered(service, receiver):
    """A service without workers, an application and one endpoint of it."""
    svc = service(**NO_BREAKER)
    app = new_application(svc)
    return svc, app, new_endpoint(svc, app, receiver.url())["id"]


NOW = datetime.now(UTC)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "since"),
        ({"until": NOW.isoformat()}, "since"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-12-04T18:00:00"}, "since"),  # no offset
        ({"since": "2026-12-04 18:00:00Z"}, "since"),  # not RFC 3339
        ({"since": 1764871200}, "since"),
        ({"since": NOW.isoformat(), "until": "tomorrow"}, "until"),
        ({"since": NOW.isoformat(), "until": (NOW - timedelta(hours=1)).isoformat()}, "until"),
        ({"since": NOW.isoformat(), "until": NOW.isoformat()}, "until"),
        ({"since": (NOW + timedelta(hours=1)).isoformat()}, "since"),  # until defaults to now
        ({"since": (NOW - timedelta(days=30, seconds=1)).isoformat(), "until": NOW.isoformat()}, "since"),
        ({"since": (NOW - timedelta(days=31)).isoformat()}, "since"),
        ({"since": NOW.isoformat(), "until": (NOW + timedelta(days=31)).isoformat()}, "since"),
        ({"since": (NOW - timedelta(hours=1)).isoformat(), "limit": 0}, "limit"),
        ({"since": (NOW - timedelta(hours=1)).isoformat(), "limit": 10_001}, "limit"),
        ({"since": (NOW - timedelta(hours=1)).isoformat(), "limit": "5"}, "limit"),
        ({"since": (NOW - timedelta(hours=1)).isoformat(), "limit": 1.5}, "limit"),
        ({"since": (NOW - timedelta(hours=1)).isoformat(), "kind": "webhook"}, "kind"),
    ],
)
def test_a_bad_window_or_limit_is_refused_naming_the_field(registered, body, field):
    svc, app, endpoint = registered

    response = _recover(svc, app, endpoint, **body)

    assert _fields(response) == [field]


def test_the_widest_window_and_the_limits_bounds_are_taken(registered):
    svc, app, endpoint = registered
    until = datetime.now(UTC)

    for body in (
        {"since": until - timedelta(days=30), "until": until},
        {"since": until - timedelta(hours=1), "limit": 1},
        {"since": until - timedelta(hours=1), "limit": 10_000},
    ):
        response = _recover(svc, app, endpoint, **body)
        assert response.status_code == 202, (body, response.get_json())
        assert response.get_json() == {"requeued": 0, "ids": [], "remaining": 0}


def test_an_unknown_application_or_endpoint_is_404_before_the_body_is_judged(registered, service, receiver):
    svc, app, endpoint = registered
    elsewhere = new_application(svc, "Globex")
    foreign = new_endpoint(svc, elsewhere, receiver.url())["id"]
    since = datetime.now(UTC) - timedelta(hours=1)

    for path_app, path_endpoint, named in (
        ("app_nope", endpoint, "application"),
        (app, "ep_nope", "endpoint"),
        (app, foreign, "endpoint"),  # another application's
    ):
        for body in ({"since": since}, {"since": "bad"}):
            response = _recover(svc, path_app, path_endpoint, **body)
            assert response.status_code == 404, response.get_json()
            assert response.get_json()["error"]["message"].startswith(f"no {named} with id"), response.get_json()


# --- the client ------------------------------------------------------------------------------


def test_the_client_recovers_and_raises_the_apis_refusals(service, serve, receiver):
    svc = service(**NO_BREAKER)
    svc.start_worker()
    client = Client(serve(svc.settings), API_KEY, backoff=0.01)
    app = new_application(svc)
    endpoint = new_endpoint(svc, app, receiver.url("status/500"), retry=ONCE)["id"]
    since = _now()
    (failed,) = _failed_deliveries(svc, app, endpoint, 1)
    svc.stop_all()
    key = uuid.uuid4().hex

    answer = client.recover(app, endpoint, since, until=datetime.now(UTC), idempotency_key=key)
    again = client.recover(app, endpoint, since, limit=1)

    assert answer == {"requeued": 1, "ids": [failed], "remaining": 0}
    assert again == {"requeued": 0, "ids": [], "remaining": 0}  # it is queued now, not failed
    with pytest.raises(NotFound):
        client.recover(app, "ep_nope", since)
    svc.client.patch(f"/v1/applications/{app}/endpoints/{endpoint}", json={"disabled": True}, headers=AUTH)
    with pytest.raises(Conflict):
        client.recover(app, endpoint, since.isoformat())


# --- the command line ------------------------------------------------------------------------


def test_dispatcher_recover_acts_as_the_api_does(service, receiver):
    from tests.conftest import process_env
    from tests.test_cli import run

    svc = service(**NO_BREAKER)
    svc.start_worker()
    env = process_env(svc.env)
    app = new_application(svc)
    endpoint = new_endpoint(svc, app, receiver.url("status/500"), retry=ONCE)["id"]
    since = _now()
    failed = _failed_deliveries(svc, app, endpoint, 2)
    svc.stop_all()

    done = run(env, "recover", endpoint, "--since", since.isoformat(), "--limit", "1")

    assert (done.returncode, done.stdout, done.stderr) == (0, f"{failed[0]}\n", "1 requeued, 1 remaining\n")
    assert [_status(svc, job_id)["status"] for job_id in failed] == ["queued", "failed"]
    missing = run(env, "recover", "ep_nope", "--since", since.isoformat())
    assert missing.returncode == 1 and missing.stderr.startswith("dispatcher recover: no endpoint ep_nope"), missing
    svc.client.patch(f"/v1/applications/{app}/endpoints/{endpoint}", json={"disabled": True}, headers=AUTH)
    disabled = run(env, "recover", endpoint, "--since", since.isoformat())
    assert disabled.returncode == 1 and "is disabled" in disabled.stderr, disabled
    assert _status(svc, failed[1])["status"] == "failed"
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    for args, option in ((["--since", future], "--since"), (["--since", "yesterday"], "--since"), ([], "--since")):
        bad = run(env, "recover", endpoint, *args)
        assert bad.returncode == 2 and option in bad.stderr, bad.stderr
