"""The receiver kit (dispatcher.receiver): verify() against real deliveries and every way of forging one,
the de-duplicator against the real Redis, and that a receiver can import it without Flask or RQ."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook

from dispatcher.receiver import (
    DEFAULT_TTL,
    MAX_ID_LENGTH,
    Deduplicator,
    DuplicateHeader,
    InvalidSecret,
    InvalidTimestamp,
    InvalidWebhookId,
    MissingHeader,
    NoMatchingSignature,
    TimestampTooNew,
    TimestampTooOld,
    VerificationError,
    verify,
)
from tests.conftest import ROOT, WEBHOOK_SECRET, wait_for, wait_until

BODY = b'{"type": "order.created", "timestamp": "2026-11-27T22:03:26.980Z", "data": {"order_id": 1042}}'


def new_secret(size: int = 32) -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(size)).decode()


OTHER_SECRET = new_secret()


def signature(secret: str, webhook_id: str, timestamp: int, body: bytes | str = BODY) -> str:
    """A `v1,<base64>` signature made by the standardwebhooks library, as Dispatcher's worker makes it."""
    return Webhook(secret).sign(webhook_id, datetime.fromtimestamp(timestamp, UTC), body)


def signed(
    body: bytes | str = BODY, secret: str = WEBHOOK_SECRET, *, webhook_id: str = "", timestamp: int | None = None
) -> dict[str, str]:
    webhook_id = webhook_id or "wh_" + secrets.token_hex(16)
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, webhook_id, timestamp, body),
    }


# --- verify: a real delivery ----------------------------------------------------------------------


def test_a_real_delivery_verifies_with_the_configured_secret_only(service, receiver):
    secret = new_secret()
    svc = service(DISPATCHER_WEBHOOK_SECRET=secret)
    svc.start_worker()
    url = receiver.url("ok")
    job_id = svc.post("/v1/webhooks", {"url": url, "event_type": "order.created", "payload": {"order_id": 1042}})

    assert wait_for(svc.client, job_id)["status"] == "succeeded", svc.logs()
    (request,) = receiver.received(url)
    # The headers as a receiver's framework hands them over: in their own capitalisation.
    headers = {name.title(): value for name, value in request.headers.items()}
    verify(request.body, headers, secret)
    verify(request.body.decode(), headers, [OTHER_SECRET, secret])
    assert headers["Webhook-Id"] == job_id
    assert json.loads(request.body)["data"] == {"order_id": 1042}
    with pytest.raises(NoMatchingSignature):
        verify(request.body, headers, WEBHOOK_SECRET)  # the suite's secret, not this service's
    with pytest.raises(NoMatchingSignature):
        verify(request.body.replace(b"1042", b"1043"), headers, secret)


# --- verify: what a forger can try -----------------------------------------------------------------


def test_a_signed_request_verifies_as_bytes_and_as_str():
    headers = signed()
    verify(BODY, headers, WEBHOOK_SECRET)
    verify(BODY.decode(), headers, WEBHOOK_SECRET)
    verify(bytearray(BODY), headers, (WEBHOOK_SECRET,))


@pytest.mark.parametrize(
    "tampered",
    [
        BODY.replace(b"1042", b"1043"),
        BODY + b" ",
        b" " + BODY,
        BODY[:-1],
        json.dumps(json.loads(BODY)).encode().replace(b": ", b":"),  # the same JSON, serialised again
        b"",
    ],
    ids=["value", "trailing-space", "leading-space", "truncated", "reserialised", "empty"],
)
def test_a_tampered_body_is_rejected(tampered):
    with pytest.raises(NoMatchingSignature):
        verify(tampered, signed(), WEBHOOK_SECRET)


def test_a_wrong_secret_is_rejected():
    with pytest.raises(NoMatchingSignature):
        verify(BODY, signed(secret=OTHER_SECRET), WEBHOOK_SECRET)


@pytest.mark.parametrize("name", ["webhook-id", "webhook-timestamp", "webhook-signature"])
@pytest.mark.parametrize("how", ["removed", "empty", "blank"])
def test_a_missing_header_is_rejected(name, how):
    headers = signed()
    if how == "removed":
        del headers[name]
    else:
        headers[name] = "" if how == "empty" else "   "
    with pytest.raises(MissingHeader, match=name):
        verify(BODY, headers, WEBHOOK_SECRET)


@pytest.mark.parametrize("name", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_a_header_given_twice_is_rejected(name):
    """Else a replayed request could carry a second, unsigned webhook-id for the app to de-duplicate on."""
    headers = signed()
    headers[name.upper()] = headers[name]
    with pytest.raises(DuplicateHeader, match=name):
        verify(BODY, headers, WEBHOOK_SECRET)


def _alter(headers: dict[str, str], name: str, value: str) -> dict[str, str]:
    return headers | {name: value}


@pytest.mark.parametrize(
    "alteration",
    [
        lambda h: _alter(h, "webhook-id", h["webhook-id"] + "x"),
        lambda h: _alter(h, "webhook-id", "wh_" + secrets.token_hex(16)),
        lambda h: _alter(h, "webhook-timestamp", str(int(h["webhook-timestamp"]) + 1)),
        lambda h: _alter(h, "webhook-timestamp", str(int(h["webhook-timestamp"]) - 1)),
        # (the first character of the MAC: the last one holds padding bits a change may not reach)
        lambda h: _alter(h, "webhook-signature", "v1," + ("B" if h["webhook-signature"][3] != "B" else "C")
                         + h["webhook-signature"][4:]),
        lambda h: _alter(h, "webhook-signature", h["webhook-signature"][:-4]),
        lambda h: _alter(h, "webhook-signature", h["webhook-signature"] + "A"),
        lambda h: _alter(h, "webhook-signature", h["webhook-signature"].replace("v1,", "v2,")),
        lambda h: _alter(h, "webhook-signature", h["webhook-signature"].replace("v1,", "v1a,")),
        lambda h: _alter(h, "webhook-signature", h["webhook-signature"].replace("v1,", "")),
        lambda h: _alter(h, "webhook-signature", h["webhook-signature"].replace("v1,", "V1,")),
        lambda h: _alter(h, "webhook-signature", h["webhook-signature"].upper()),
        lambda h: _alter(h, "webhook-signature", "v1," + base64.b64encode(b"\0" * 32).decode()),
        lambda h: _alter(h, "webhook-signature", "v1,"),
        lambda h: _alter(h, "webhook-signature", ",".join(["v1", "é" * 44])),
        lambda h: _alter(h, "webhook-signature", " ".join(["v1,x"] * 200)),
    ],
    ids=[
        "id-appended",
        "id-replaced",
        "timestamp-plus-1",
        "timestamp-minus-1",
        "signature-first-char",
        "signature-truncated",
        "signature-extended",
        "signature-v2",
        "signature-v1a",
        "signature-unversioned",
        "signature-uppercase-version",
        "signature-uppercased",
        "signature-zero-mac",
        "signature-empty-mac",
        "signature-non-ascii",
        "signature-many-wrong",
    ],
)
def test_an_altered_header_is_rejected(alteration):
    headers = signed()
    verify(BODY, headers, WEBHOOK_SECRET)  # the original passes: only the alteration fails it
    with pytest.raises(NoMatchingSignature):
        verify(BODY, alteration(headers), WEBHOOK_SECRET)


def test_a_signature_over_the_right_content_with_another_secret_is_rejected_even_among_many():
    headers = signed(secret=OTHER_SECRET)
    with pytest.raises(NoMatchingSignature):
        verify(BODY, headers, [WEBHOOK_SECRET, new_secret(), new_secret(64)])


@pytest.mark.parametrize("offset", [301, 3600, 10**6])
def test_a_stale_timestamp_is_rejected_though_correctly_signed(offset):
    with pytest.raises(TimestampTooOld):
        verify(BODY, signed(timestamp=int(time.time()) - offset), WEBHOOK_SECRET)


@pytest.mark.parametrize("offset", [301, 3600, 10**6])
def test_a_future_timestamp_is_rejected_though_correctly_signed(offset):
    with pytest.raises(TimestampTooNew):
        verify(BODY, signed(timestamp=int(time.time()) + offset), WEBHOOK_SECRET)


def test_timestamps_within_the_tolerance_pass_and_the_tolerance_is_configurable():
    now = int(time.time())
    verify(BODY, signed(timestamp=now - 290), WEBHOOK_SECRET)
    verify(BODY, signed(timestamp=now + 290), WEBHOOK_SECRET)
    verify(BODY, signed(timestamp=now - 3000), WEBHOOK_SECRET, tolerance=3600)
    with pytest.raises(TimestampTooOld):
        verify(BODY, signed(timestamp=now - 20), WEBHOOK_SECRET, tolerance=10)
    with pytest.raises(TimestampTooNew):
        verify(BODY, signed(timestamp=now + 20), WEBHOOK_SECRET, tolerance=10)
    with pytest.raises(ValueError, match="tolerance"):
        verify(BODY, signed(), WEBHOOK_SECRET, tolerance=-1)


@pytest.mark.parametrize(
    "value",
    [
        "now",
        "01700000000",
        "0",
        "1.7e9",
        "1700000000.5",
        "+1700000000",
        "-1",
        " 1700000000x",
        "1_700_000_000",
        "\u0661\u0667" + "\u0660" * 8,  # Arabic-Indic digits, which int() takes
        "9" * 5000,
    ],
)
def test_a_timestamp_that_is_not_whole_unix_seconds_is_rejected(value):
    headers = signed() | {"webhook-timestamp": value}
    with pytest.raises(InvalidTimestamp):
        verify(BODY, headers, WEBHOOK_SECRET)


@pytest.mark.parametrize(
    "webhook_id", ["x" * (MAX_ID_LENGTH + 1), "wh_1\nX-Injected: 1", "wh 1", "wh_é", "wh_\x00"], ids=repr
)
def test_a_hostile_webhook_id_is_rejected_though_correctly_signed(webhook_id):
    with pytest.raises(InvalidWebhookId):
        verify(BODY, signed(webhook_id=webhook_id), WEBHOOK_SECRET)


def test_every_rejection_is_a_verification_error():
    for error in (MissingHeader, DuplicateHeader, InvalidTimestamp, TimestampTooOld, TimestampTooNew):
        assert issubclass(error, VerificationError)
    assert issubclass(NoMatchingSignature, VerificationError)
    assert issubclass(InvalidWebhookId, VerificationError)
    # A misconfigured receiver must answer 5xx (retried), not the 4xx a forgery gets (never retried).
    assert not issubclass(InvalidSecret, VerificationError)


# --- several signatures, several secrets -----------------------------------------------------------


def test_two_signatures_pass_when_only_the_second_matches():
    headers = signed()
    wrong = signature(OTHER_SECRET, headers["webhook-id"], int(headers["webhook-timestamp"]))
    headers["webhook-signature"] = f"{wrong} {headers['webhook-signature']}"
    verify(BODY, headers, WEBHOOK_SECRET)
    with pytest.raises(NoMatchingSignature):
        verify(BODY, headers, new_secret())


def test_signatures_of_a_rotation_pass_with_either_secret_alone():
    """A sender rotating its secret signs with the old and the new one: a receiver on either passes."""
    webhook_id, now = "wh_" + secrets.token_hex(16), int(time.time())
    old, new = signature(WEBHOOK_SECRET, webhook_id, now), signature(OTHER_SECRET, webhook_id, now)
    headers = {"webhook-id": webhook_id, "webhook-timestamp": str(now), "webhook-signature": f"{old} {new}"}
    verify(BODY, headers, WEBHOOK_SECRET)
    verify(BODY, headers, OTHER_SECRET)
    verify(BODY, headers | {"webhook-signature": f"  {new}   {old}  "}, WEBHOOK_SECRET)


@pytest.mark.parametrize("position", [0, 1, 2])
def test_a_list_of_secrets_passes_when_only_one_matches(position):
    given = [new_secret(), new_secret(24), new_secret(64)]
    given[position] = OTHER_SECRET
    verify(BODY, signed(secret=OTHER_SECRET), given)
    verify(BODY, signed(secret=OTHER_SECRET), iter(given))  # any iterable, read once


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "secret",
        "whsec_",
        "WHSEC_" + WEBHOOK_SECRET.removeprefix("whsec_"),
        WEBHOOK_SECRET.removeprefix("whsec_"),  # the base64 without its prefix
        "whsec_not base64!",
        "whsec_" + base64.urlsafe_b64encode(b"\xff" * 30).decode(),  # the URL-safe alphabet
        WEBHOOK_SECRET + "\n",  # read from a file with its line break
        "whsec_" + base64.b64encode(b"k" * 23).decode(),  # too short
        "whsec_" + base64.b64encode(b"k" * 65).decode(),  # too long
        b"whsec_" + WEBHOOK_SECRET.encode(),
        [],
        [WEBHOOK_SECRET, "secret"],  # one bad secret among good ones is still a misconfiguration
        [WEBHOOK_SECRET, None],
    ],
    ids=repr,
)
def test_a_secret_not_of_whsec_form_raises_a_clear_error(bad):
    with pytest.raises(InvalidSecret, match=r"whsec_|bytes|no secret"):
        verify(BODY, signed(), bad)
    with pytest.raises(InvalidSecret):
        verify(BODY, {}, bad)  # checked before the request: a forged one does not hide it


# --- the de-duplicator, against the real Redis ------------------------------------------------------


@pytest.fixture
def dedup(redis_conn):
    """A de-duplicator with a prefix of its own; its keys are removed afterwards (TEST_REDIS_URL is shared)."""
    prefix = f"test-seen-{uuid.uuid4().hex[:8]}:"
    yield Deduplicator(redis_conn, prefix=prefix)
    keys = list(redis_conn.scan_iter(match=prefix + "*"))
    if keys:
        redis_conn.delete(*keys)


def test_the_first_delivery_is_new_and_the_second_a_duplicate(dedup, redis_conn):
    webhook_id = "wh_" + secrets.token_hex(16)
    assert dedup.first_time(webhook_id) is True
    assert dedup.first_time(webhook_id) is False
    assert dedup.first_time(webhook_id) is False
    assert redis_conn.exists(dedup.prefix + webhook_id)


def test_distinct_ids_are_independent(dedup):
    first, second = "wh_" + secrets.token_hex(16), "wh_" + secrets.token_hex(16)
    assert dedup.first_time(first) is True
    assert dedup.first_time(second) is True
    assert dedup.first_time(first) is False
    assert dedup.first_time(second) is False
    other = Deduplicator(dedup.client, prefix=dedup.prefix + "other:")
    try:
        assert other.first_time(first) is True  # another prefix, another memory
    finally:
        other.forget(first)


def test_an_id_is_remembered_for_the_default_ttl(dedup, redis_conn):
    webhook_id = "wh_" + secrets.token_hex(16)
    dedup.first_time(webhook_id)
    assert DEFAULT_TTL - 5 <= redis_conn.ttl(dedup.prefix + webhook_id) <= DEFAULT_TTL
    assert DEFAULT_TTL >= 2 * 24 * 3600  # beyond the default retry schedule's ~33 h, jitter included
    dedup.first_time(webhook_id)  # a duplicate does not extend it
    assert redis_conn.ttl(dedup.prefix + webhook_id) <= DEFAULT_TTL


def test_the_key_expires_after_the_ttl(dedup, redis_conn):
    short = Deduplicator(redis_conn, prefix=dedup.prefix, ttl=1)
    webhook_id = "wh_" + secrets.token_hex(16)
    assert short.first_time(webhook_id) is True
    assert 0 < redis_conn.pttl(dedup.prefix + webhook_id) <= 1000
    assert short.first_time(webhook_id) is False
    wait_until(lambda: not redis_conn.exists(dedup.prefix + webhook_id), 10, "the seen key did not expire")
    assert short.first_time(webhook_id) is True


def test_forget_lets_the_next_delivery_through(dedup):
    webhook_id = "wh_" + secrets.token_hex(16)
    assert dedup.first_time(webhook_id) is True
    dedup.forget(webhook_id)
    assert dedup.first_time(webhook_id) is True
    assert dedup.first_time(webhook_id) is False


def test_once_forgets_the_id_only_when_its_first_handling_raises(dedup):
    handled, failing = "wh_" + secrets.token_hex(16), "wh_" + secrets.token_hex(16)
    with dedup.once(handled) as first:
        assert first is True
    with pytest.raises(RuntimeError), dedup.once(failing) as first:
        assert first is True
        raise RuntimeError("the handler failed")

    assert dedup.first_time(handled) is False  # handled: its next delivery is a duplicate
    with dedup.once(failing) as first:  # the retry of the failure is handled
        assert first is True
    with pytest.raises(RuntimeError), dedup.once(failing) as first:
        assert first is False  # a duplicate that raises leaves the first one's mark alone
        raise RuntimeError("the duplicate's handler failed")
    assert dedup.first_time(failing) is False


def test_concurrent_deliveries_of_one_id_get_one_first_time(dedup):
    webhook_id = "wh_" + secrets.token_hex(16)
    results: list[bool] = []
    barrier = threading.Barrier(16)

    def deliver() -> None:
        barrier.wait()
        results.append(dedup.first_time(webhook_id))

    threads = [threading.Thread(target=deliver) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 15 + [True]


@pytest.mark.parametrize(
    "hostile",
    ["", "x" * (MAX_ID_LENGTH + 1), "x" * 10_000_000, "wh_1\r\nSET pwned 1", "wh_1\n", "wh 1", "wh_\x00", "wh_é"],
    ids=lambda value: repr(value[:20]) + f"-{len(value)}",
)
def test_a_hostile_id_is_refused_and_writes_nothing(dedup, redis_conn, hostile):
    with pytest.raises(InvalidWebhookId):
        dedup.first_time(hostile)
    with pytest.raises(InvalidWebhookId):
        dedup.forget(hostile)
    assert list(redis_conn.scan_iter(match=dedup.prefix + "*")) == []


def test_the_longest_id_accepted_is_max_id_length(dedup):
    assert dedup.first_time("x" * MAX_ID_LENGTH) is True


def test_a_ttl_below_one_second_is_refused(redis_conn):
    with pytest.raises(ValueError, match="ttl"):
        Deduplicator(redis_conn, ttl=0)


# --- imports: a receiver has no Flask, RQ or pydantic -----------------------------------------------

_BLOCKER = """
import importlib.abc, sys

BLOCKED = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed here")
        return None

sys.meta_path.insert(0, Block())
for name in BLOCKED:
    assert name not in sys.modules, name
"""

_USE = """
import json, time
from datetime import UTC, datetime
from standardwebhooks import Webhook

secret, body = sys.argv[2], b'{"type": "order.created"}'
now = int(time.time())
headers = {
    "Webhook-Id": "wh_1",
    "Webhook-Timestamp": str(now),
    "Webhook-Signature": Webhook(secret).sign("wh_1", datetime.fromtimestamp(now, UTC), body),
}
receiver.verify(body, headers, secret)
try:
    receiver.verify(body + b" ", headers, secret)
except receiver.NoMatchingSignature:
    pass
else:
    raise SystemExit("a tampered body passed")
if len(sys.argv) > 3:
    import redis

    seen = receiver.Deduplicator(redis.Redis.from_url(sys.argv[3]), prefix=sys.argv[4])
    assert seen.first_time("wh_1") is True
    assert seen.first_time("wh_1") is False
    seen.forget("wh_1")
loaded = sorted({name.split(".")[0] for name in sys.modules})
print(json.dumps(loaded))
"""


def _run_receiver(code: str, blocked: list[str], *args: str, cwd=ROOT) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", _BLOCKER + code + _USE, ",".join(blocked), WEBHOOK_SECRET, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_blocker_blocks():
    """The proofs below mean something: with flask blocked, importing it fails."""
    result = subprocess.run(
        [sys.executable, "-c", _BLOCKER + "import flask", "flask"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "flask is not installed here" in result.stderr


def test_dispatcher_receiver_imports_and_works_without_flask_rq_or_pydantic(redis_url):
    blocked = ["flask", "rq", "pydantic", "werkzeug", "rq_dashboard", "workers"]
    prefix = f"test-seen-{uuid.uuid4().hex[:8]}:"
    loaded = _run_receiver("import dispatcher.receiver as receiver\n", blocked, redis_url, prefix)
    assert not set(loaded) & {"flask", "rq", "pydantic", "werkzeug", "jinja2", "click", "gevent"}, loaded
    assert "redis" in loaded  # the de-duplicator did run


def test_verify_works_without_redis_either():
    blocked = ["flask", "rq", "pydantic", "werkzeug", "redis"]
    loaded = _run_receiver("import dispatcher.receiver as receiver\n", blocked)
    assert "redis" not in loaded


def test_the_module_works_copied_alone_into_an_app(tmp_path):
    """README: a receiver may copy receiver.py into its app; it needs only standardwebhooks."""
    (tmp_path / "webhook_receiver.py").write_bytes((ROOT / "dispatcher" / "receiver.py").read_bytes())
    blocked = ["dispatcher", "workers", "flask", "rq", "pydantic", "werkzeug", "redis"]
    loaded = _run_receiver("import webhook_receiver as receiver\n", blocked, cwd=tmp_path)
    assert "dispatcher" not in loaded


# --- the README's receiver ---------------------------------------------------------------------------


def readme_receiver_example() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Receiving webhooks")
    block = text[start:].split("```python\n", 1)[1].split("```", 1)[0]
    assert "Deduplicator" in block and "verify(" in block, block
    return block


def test_the_readme_receiver_example_handles_a_real_delivery_once(service, redis_url, redis_conn, monkeypatch):
    from werkzeug.serving import make_server

    from tests.conftest import free_port

    secret = new_secret()
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("WEBHOOK_SECRETS", f"{OTHER_SECRET} {secret}")  # rotating: either passes
    namespace: dict = {"__name__": "readme_receiver"}
    exec(compile(readme_receiver_example(), "README.md", "exec"), namespace)
    handled: list[dict] = []
    failing = {"once": True}

    def handle(event: dict) -> None:
        if event["data"].get("fail") and failing.pop("once", False):
            raise RuntimeError("the app's handler failed")
        handled.append(event)

    namespace["handle"] = handle
    app = namespace["app"]
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ids: list[str] = []
    try:
        svc = service(DISPATCHER_WEBHOOK_SECRET=secret)
        svc.start_worker()
        url = f"http://127.0.0.1:{server.server_port}/webhooks"
        ids.append(svc.post("/v1/webhooks", {"url": url, "event_type": "order.created", "payload": {"n": 1}}))
        job = wait_for(svc.client, ids[-1])
        assert job["status"] == "succeeded", (job, svc.logs())
        assert [event["data"] for event in handled] == [{"n": 1}]

        # Its handler failing once: a 500, retried by Dispatcher, and handled on the retry (not taken for a duplicate).
        body = {"url": url, "event_type": "order.created", "payload": {"fail": True}, "retry": {"backoff": [0.2]}}
        ids.append(svc.post("/v1/webhooks", body))
        job = wait_for(svc.client, ids[-1])
        assert job["status"] == "succeeded", (job, svc.logs())
        assert [attempt["status_code"] for attempt in job["attempts"]] == [500, 204]
        assert [event["data"] for event in handled] == [{"n": 1}, {"fail": True}]
    finally:
        server.shutdown()

    client = app.test_client()
    duplicate_body = json.dumps({"type": "order.created", "data": {"n": 1}}).encode()
    duplicate = signed(duplicate_body, secret, webhook_id=ids[0])
    response = client.post("/webhooks", data=duplicate_body, headers=duplicate, content_type="application/json")
    assert response.status_code < 300  # acknowledged, so Dispatcher stops retrying
    assert len(handled) == 2  # but not handled again

    fresh = signed(duplicate_body, secret)
    assert (
        client.post("/webhooks", data=duplicate_body, headers=fresh, content_type="application/json").status_code < 300
    )
    assert len(handled) == 3
    ids.append(fresh["webhook-id"])

    for forged in (
        signed(duplicate_body, new_secret()),  # a secret the receiver does not know
        signed(duplicate_body, secret, timestamp=int(time.time()) - 3600),  # a stale replay
        {k: v for k, v in signed(duplicate_body, secret).items() if k != "webhook-signature"},
    ):
        response = client.post("/webhooks", data=duplicate_body, headers=forged, content_type="application/json")
        assert response.status_code == 401, response.get_data()
    response = client.post(
        "/webhooks", data=duplicate_body + b" ", headers=signed(duplicate_body, secret), content_type="application/json"
    )
    assert response.status_code == 401
    assert len(handled) == 3
    redis_conn.delete(*(namespace["seen"].key(webhook_id) for webhook_id in ids))
