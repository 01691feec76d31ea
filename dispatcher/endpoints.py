"""Registered receivers: applications (the sender's customers), their endpoints and the endpoints'
signing secrets, in Redis, one registry per Dispatcher queue.

Three hashes and a set per application (dispatcher.keys) hold it: applications by id, endpoints by
id (each naming its application), each application's endpoint ids, and the secrets by endpoint id.
The secrets live apart from the endpoints so that nothing that shows an endpoint can show them: the
API answers a secret once, when it is made, and workers read them at delivery (never job data).

An endpoint has one current secret; rotating it makes a new one current and keeps the old one for
a grace period, during which every delivery is signed with both (the Standard Webhooks signature
header holds several). Changes to one endpoint go through WATCH/MULTI, so two at once never lose one.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Annotated, Any

import redis
from pydantic import ConfigDict, Field, StrictBool, StringConstraints, with_config
from redis.commands.core import Script
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

from dispatcher import rqstore
from dispatcher.capped import add_capped
from dispatcher.channels.webhook import EventType, WebhookHeaders, WebhookUrl
from dispatcher.history import Timestamp, isoformat
from dispatcher.keys import Keys
from dispatcher.models import JSON_NUMBER, EmailAddress, RequestModel, RetryPolicy, SafeStr

#: The channel of an endpoint's deliveries: each is a webhook job (dispatcher.channels.webhook).
DELIVERY_CHANNEL = "webhook"
APPLICATION_PREFIX = "app_"
ENDPOINT_PREFIX = "ep_"
#: Applications one Dispatcher queue holds, and endpoints one application: an event fans out to at
#: most that many, in one atomic enqueue.
MAX_APPLICATIONS = 10_000
MAX_ENDPOINTS = 500
#: Rotation: how long the old secret keeps signing by default, and at most.
DEFAULT_GRACE = 24 * 3600
MAX_GRACE = 7 * 24 * 3600
#: Bytes of a new signing secret (the Standard Webhooks spec: 24 to 64).
SECRET_BYTES = 32
#: Deliveries per second an endpoint may be limited to, at most.
MAX_RATE = 10_000

#: Why an ordered endpoint's delivery waits (shown on the job as its `held` reason).
WAITING_TURN = "waiting for the delivery ahead of it on an ordered endpoint"

Name = Annotated[SafeStr, StringConstraints(min_length=1, max_length=256)]
Description = Annotated[SafeStr, StringConstraints(max_length=1024)]


class ApplicationRequest(RequestModel):
    """POST /v1/applications and PATCH /v1/applications/<id>."""

    name: Name


class EndpointRequest(RequestModel):
    """POST /v1/applications/<app>/endpoints: a receiver of the application's events."""

    url: WebhookUrl
    description: Description = ""
    event_types: list[EventType] = Field(
        default_factory=list, max_length=100, description="the event types it receives; empty: all of them"
    )
    headers: WebhookHeaders = Field(default_factory=dict)
    owner_email: EmailAddress | None = Field(default=None, description="told by email of every change of health")
    retry: RetryPolicy | None = None
    rate_limit: Annotated[float, Field(gt=0, le=MAX_RATE), JSON_NUMBER] | None = Field(
        default=None, description="deliveries per second, shared by every worker; none: no limit"
    )
    ordered: StrictBool = Field(
        default=False, description="deliver in acceptance order, one at a time per ordering_key"
    )
    disabled: StrictBool = False


class EndpointPatch(RequestModel):
    """PATCH .../endpoints/<id>: the fields given replace the endpoint's; null clears a nullable one."""

    url: WebhookUrl = Field(default=None)  # type: ignore[assignment]
    description: Description = Field(default=None)  # type: ignore[assignment]
    event_types: list[EventType] = Field(default=None, max_length=100)  # type: ignore[arg-type]
    headers: WebhookHeaders = Field(default=None)  # type: ignore[arg-type]
    owner_email: EmailAddress | None = None
    retry: RetryPolicy | None = None
    rate_limit: Annotated[float, Field(gt=0, le=MAX_RATE), JSON_NUMBER] | None = None
    ordered: StrictBool = Field(default=None)  # type: ignore[assignment]
    disabled: StrictBool = Field(default=None)  # type: ignore[assignment]


class RotateRequest(RequestModel):
    grace_period: Annotated[int, Field(ge=0, le=MAX_GRACE), JSON_NUMBER] = Field(
        default=DEFAULT_GRACE, description="seconds the old secret keeps signing beside the new one"
    )


@with_config(ConfigDict(extra="forbid"))
class Application(TypedDict):
    id: str
    name: str
    created_at: Timestamp
    updated_at: Timestamp


@with_config(ConfigDict(extra="forbid"))
class Endpoint(TypedDict):
    id: str
    application: str
    url: str
    description: str
    event_types: list[str]
    headers: dict[str, str]
    owner_email: str | None
    retry: dict[str, Any] | None
    rate_limit: float | None
    ordered: bool
    disabled: bool
    created_at: Timestamp
    updated_at: Timestamp


@with_config(ConfigDict(extra="forbid"))
class NewSecret(TypedDict):
    """A secret as the API answers it, once."""

    secret: str
    #: Until when the secret it replaced keeps signing (rotation), or None.
    previous_expires_at: Timestamp | None


class RegistryFull(Exception):
    """MAX_APPLICATIONS or MAX_ENDPOINTS reached; the message says which."""


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


class Registry:
    """Applications, endpoints and secrets of one Dispatcher queue."""

    def __init__(self, connection: redis.Redis, keys: Keys) -> None:
        self.connection = connection
        self.keys = keys

    # --- applications ------------------------------------------------------------------------

    def create_application(self, name: str) -> Application:
        now = isoformat(datetime.now(UTC))
        record = Application(id=APPLICATION_PREFIX + secrets.token_hex(12), name=name, created_at=now, updated_at=now)
        if not add_capped(self.connection, self.keys.applications, record["id"], json.dumps(record), MAX_APPLICATIONS):
            raise RegistryFull(f"at most {MAX_APPLICATIONS:,} applications; delete some first")
        return record

    def application(self, application_id: str) -> Application | None:
        raw = self.connection.hget(self.keys.applications, application_id)
        return None if raw is None else json.loads(raw)  # type: ignore[arg-type]

    def applications(self) -> list[Application]:
        records = [json.loads(raw) for raw in self.connection.hvals(self.keys.applications)]  # type: ignore[union-attr]
        return sorted(records, key=lambda record: (record["created_at"], record["id"]))

    def rename_application(self, application_id: str, name: str) -> Application | None:
        return self._change(self.keys.applications, application_id, lambda record: record | {"name": name})

    def delete_application(self, application_id: str) -> bool:
        """Delete an application with its endpoints and their secrets; False if there is none."""
        keys = [self.keys.applications, self.keys.application_endpoints(application_id), self.keys.endpoints,
                self.keys.endpoint_secrets]
        endpoint_ids = [raw.decode() for raw in self.connection.smembers(keys[1])]  # type: ignore[union-attr]
        deleted = bool(_DELETE_APPLICATION(keys=keys, args=[application_id], client=self.connection))
        with self.connection.pipeline(transaction=False) as pipe:
            self._forget_health(pipe, endpoint_ids)
            pipe.execute()
        return deleted

    # --- endpoints ---------------------------------------------------------------------------

    def create_endpoint(self, application_id: str, fields: dict[str, Any]) -> tuple[Endpoint, str] | None:
        """A new endpoint of the application and its first secret; None if there is no such application."""
        now = isoformat(datetime.now(UTC))
        endpoint_id = ENDPOINT_PREFIX + secrets.token_hex(12)
        record = Endpoint(
            id=endpoint_id, application=application_id, **fields, created_at=now, updated_at=now  # type: ignore[typeddict-item]
        )
        secret = new_secret()
        added = _ADD_ENDPOINT(
            keys=[
                self.keys.applications,
                self.keys.application_endpoints(application_id),
                self.keys.endpoints,
                self.keys.endpoint_secrets,
            ],
            args=[application_id, endpoint_id, json.dumps(record), _secrets_record([(secret, None)]), MAX_ENDPOINTS],
            client=self.connection,
        )
        if added == 0:
            return None
        if added < 0:
            raise RegistryFull(f"an application may have at most {MAX_ENDPOINTS} endpoints; delete some first")
        return record, secret

    def endpoint(self, application_id: str, endpoint_id: str) -> Endpoint | None:
        record = self.endpoint_by_id(endpoint_id)
        return record if record is not None and record["application"] == application_id else None

    def endpoint_by_id(self, endpoint_id: str) -> Endpoint | None:
        raw = self.connection.hget(self.keys.endpoints, endpoint_id)
        return None if raw is None else json.loads(raw)  # type: ignore[arg-type]

    def endpoints(self, application_id: str) -> list[Endpoint] | None:
        """The application's endpoints, oldest first; None if there is no such application."""
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hexists(self.keys.applications, application_id)
            pipe.smembers(self.keys.application_endpoints(application_id))
            exists, ids = pipe.execute()
        if not exists:
            return None
        raws = self.connection.hmget(self.keys.endpoints, sorted(ids)) if ids else []
        records = [json.loads(raw) for raw in raws if raw is not None]  # type: ignore[union-attr]
        return sorted(records, key=lambda record: (record["created_at"], record["id"]))

    def subscribed(self, application_id: str, event_type: str) -> list[Endpoint]:
        """The application's enabled endpoints that receive `event_type`, oldest first."""
        return [
            endpoint
            for endpoint in self.endpoints(application_id) or []
            if not endpoint["disabled"] and (not endpoint["event_types"] or event_type in endpoint["event_types"])
        ]

    def change_endpoint(self, application_id: str, endpoint_id: str, fields: dict[str, Any]) -> Endpoint | None:
        def change(record: dict) -> dict | None:
            return record | fields if record["application"] == application_id else None

        return self._change(self.keys.endpoints, endpoint_id, change)  # type: ignore[return-value]

    def delete_endpoint(self, application_id: str, endpoint_id: str) -> bool:
        if self.endpoint(application_id, endpoint_id) is None:
            return False
        with self.connection.pipeline() as pipe:
            pipe.hdel(self.keys.endpoints, endpoint_id)
            pipe.hdel(self.keys.endpoint_secrets, endpoint_id)
            pipe.srem(self.keys.application_endpoints(application_id), endpoint_id)
            self._forget_health(pipe, [endpoint_id])
            pipe.execute()
        return True

    def _forget_health(self, pipe: redis.client.Pipeline, endpoint_ids: Iterable[str]) -> None:
        """Queue the deletion of deleted endpoints' health (dispatcher.health)."""
        for endpoint_id in endpoint_ids:
            pipe.delete(
                self.keys.endpoint_health(endpoint_id),
                self.keys.endpoint_changes(endpoint_id),
                self.keys.endpoint_probe(endpoint_id),
            )

    # --- secrets -----------------------------------------------------------------------------

    def rotate_secret(self, application_id: str, endpoint_id: str, grace: int) -> NewSecret | None:
        """Make a new current secret; the current one keeps signing for `grace` seconds (older ones
        stop now). None if there is no such endpoint."""
        if self.endpoint(application_id, endpoint_id) is None:
            return None
        secret, until = new_secret(), time.time() + grace

        def rotate(entries: list[dict]) -> list[dict]:
            kept = [{"secret": entries[0]["secret"], "until": until}] if entries and grace else []
            return [{"secret": secret, "until": None}, *kept]

        if self._change(self.keys.endpoint_secrets, endpoint_id, rotate, touch=False) is None:
            return None
        expires = isoformat(datetime.fromtimestamp(until, UTC)) if grace else None
        return NewSecret(secret=secret, previous_expires_at=expires)

    def delivery_config(self, endpoint_id: str) -> tuple[Endpoint | None, list[str], bool]:
        """The endpoint, the secrets a delivery to it is signed with now, newest first, and whether
        its circuit breaker is open (dispatcher.health), in one round trip; (None, [], False) if it
        was deleted."""
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hget(self.keys.endpoints, endpoint_id)
            pipe.hget(self.keys.endpoint_secrets, endpoint_id)
            pipe.hget(self.keys.endpoint_health(endpoint_id), "state")
            record, raw_secrets, breaker = pipe.execute()
        if record is None or raw_secrets is None:
            return None, [], False
        now = time.time()
        live = [entry["secret"] for entry in json.loads(raw_secrets) if entry["until"] is None or entry["until"] > now]
        return json.loads(record), live, breaker == b"open"

    # --- one record at a time ----------------------------------------------------------------

    def _change(
        self, key: str, field: str, change: Callable[[Any], Any | None], touch: bool = True
    ) -> Any | None:
        """Replace the JSON under `key`'s `field` with `change(it)`, unless that is None (or there is
        none), with WATCH so that a change at the same time is never lost."""
        with self.connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hget(key, field)
                    if raw is None:
                        return None
                    changed = change(json.loads(raw))
                    if changed is None:
                        return None
                    if touch:
                        changed["updated_at"] = isoformat(datetime.now(UTC))
                    pipe.multi()
                    pipe.hset(key, field, json.dumps(changed))
                    pipe.execute()
                    return changed
                except redis.WatchError:
                    continue


def ordered_list(keys: Keys, endpoint_id: str, payload: dict) -> str:
    """The list of an ordered endpoint's deliveries a delivery's job joined (workers.endpoints)."""
    ordering_key = payload.get("ordering_key")
    return keys.ordered(endpoint_id, ordering_key if isinstance(ordering_key, str) else None)


def release_ordered(connection: redis.Redis, keys: Keys, job_id: str, payload: dict) -> None:
    """An ordered delivery that will not be sent (canceled) leaves its list, and the next one
    starts if it waits for its turn."""
    endpoint_id = payload.get("endpoint")
    if payload.get("ordered") and isinstance(endpoint_id, str):
        rqstore.order_advance(connection, ordered_list(keys, endpoint_id, payload), keys.wake, WAITING_TURN, job_id)


def _secrets_record(entries: Iterable[tuple[str, float | None]]) -> str:
    return json.dumps([{"secret": secret, "until": until} for secret, until in entries])


#: Delete application ARGV[1] and its endpoints with their secrets, in one step (an endpoint added
#: meanwhile would be left without its application): 1, or 0 if there was no such application.
_DELETE_APPLICATION = Script(
    None,  # type: ignore[arg-type]  # called with an explicit client
    b"""
local ids = redis.call('SMEMBERS', KEYS[2])
for i = 1, #ids, 1000 do
  local slice = {unpack(ids, i, math.min(i + 999, #ids))}
  redis.call('HDEL', KEYS[3], unpack(slice))
  redis.call('HDEL', KEYS[4], unpack(slice))
end
redis.call('DEL', KEYS[2])
return redis.call('HDEL', KEYS[1], ARGV[1])
""",
)

#: A new endpoint (ARGV[2], its record ARGV[3], its secrets ARGV[4]) of application ARGV[1]:
#: 1; 0 if there is no such application; -1 if it has ARGV[5] endpoints already.
_ADD_ENDPOINT = Script(
    None,  # type: ignore[arg-type]  # called with an explicit client
    b"""
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[5]) then return -1 end
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[4], ARGV[2], ARGV[4])
return 1
""",
)
