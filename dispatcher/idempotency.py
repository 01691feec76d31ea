"""Idempotency keys: a POST that carries `Idempotency-Key` is accepted once per key and API key.

A request with a key leaves a record in Redis, written by the same script that writes its jobs
(dispatcher.rqstore), so the record exists exactly when the jobs do: there is no "in progress" state
for a concurrent twin to see. The record holds the request's fingerprint (a hash of its method, path
and body as canonical JSON) and its job ids, for IDEMPOTENCY_TTL. A later request with the same key
and API key answers the earlier ids with 200 if its fingerprint is the same, 409 otherwise; only an
accepted request leaves a record, so after a 4xx or 503 the key is still free.

Other POSTs (retry, replay, a stored template, a suppression) change more than one script can
write, so they hold the key instead (`Claim.hold`): a marker set only if the key is free, while the
request runs; a twin arriving meanwhile gets 409 `idempotency_in_progress`. The answer replaces the
marker (`Claim.keep`); a refused request releases the key (`Claim.release`). Should the process die
between the work and the record, the marker expires after HOLD_TTL and the key is free again.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.commands.core import Script

from dispatcher.errors import AlreadyAccepted, APIError
from dispatcher.keys import Keys

#: The request header that carries the key.
HEADER = "Idempotency-Key"
#: How long a key is remembered after the request that first used it was accepted: 24 h.
IDEMPOTENCY_TTL = 24 * 3600
#: Longest a request may hold its key (Claim.hold) without answering: beyond any request's time.
HOLD_TTL = 600
MAX_KEY_LENGTH = 255
#: Visible ASCII but the comma, which servers and proxies put between the values of a header given
#: twice: a key holding one could not be told from two keys. (The document's pattern too.)
KEY_PATTERN = f"^[\\u0021-\\u002b\\u002d-\\u007e]{{1,{MAX_KEY_LENGTH}}}$"
_KEY = re.compile(KEY_PATTERN)


@dataclass(frozen=True)
class Claim:
    """One request's claim on an idempotency key: the Redis key of the record and the request's fingerprint."""

    record_key: str
    fingerprint: str
    #: Tells this request's hold on the key from another's.
    token: str = field(default_factory=lambda: secrets.token_hex(16))

    def record(self, job_ids: list[str], group_id: str | None = None) -> str:
        """The record an accepted request leaves: its fingerprint, job ids and the id of the group
        they make if it names itself (an event: dispatcher.batches.Group)."""
        group = {} if group_id is None else {"group": group_id}
        return json.dumps({"fingerprint": self.fingerprint, "ids": job_ids, **group})

    def check(self, connection: redis.Redis) -> None:
        """Raise AlreadyAccepted if a request with this key was accepted already.

        Lets a repeat skip validation (and its DNS lookups): a repeat is answered as the first
        request was, even if a host no longer resolves. The enqueue script checks again atomically.
        """
        record = connection.get(self.record_key)
        if record is not None:
            raise AlreadyAccepted(record)  # type: ignore[arg-type]  # responses are not decoded

    def earlier_ids(self, record: bytes) -> list[str]:
        """The job ids an earlier request with this key made; APIError 409 if its request was another."""
        ids = self._earlier(record).get("ids")
        if not isinstance(ids, list):
            raise _conflict()
        return [str(job_id) for job_id in ids]

    def earlier_group(self, record: bytes) -> str | None:
        """The group id the earlier request with this key made (see `record`)."""
        group = self._earlier(record).get("group")
        return group if isinstance(group, str) else None

    # --- requests that do more than enqueue --------------------------------------------------

    def hold(self, connection: redis.Redis) -> None:
        """Hold the key while the request runs; AlreadyAccepted, with what holds it, if it is not free."""
        while not connection.set(self.record_key, self._marker(), nx=True, ex=HOLD_TTL):
            record = connection.get(self.record_key)
            if record is not None:  # (None: it expired since; try again)
                raise AlreadyAccepted(record)  # type: ignore[arg-type]  # responses are not decoded

    def keep(self, connection: redis.Redis, answer: str, location: str | None) -> None:
        """Replace the hold with the request's answer (a JSON text), for IDEMPOTENCY_TTL."""
        record = {"fingerprint": self.fingerprint, "answer": answer, "location": location}
        connection.set(self.record_key, json.dumps(record), ex=IDEMPOTENCY_TTL)

    def release(self, connection: redis.Redis) -> None:
        """Free the key after a refused request, if this request still holds it."""
        _RELEASE(keys=[self.record_key], args=[self._marker()], client=connection)

    def _marker(self) -> str:
        return json.dumps({"fingerprint": self.fingerprint, "running": self.token})

    def earlier_answer(self, record: bytes) -> tuple[str, str | None]:
        """The answer (JSON text) and Location of the earlier request with this key; APIError 409 if
        that request was another, or if it is still running."""
        earlier = self._earlier(record)
        if "running" in earlier:
            raise APIError(
                409,
                "idempotency_in_progress",
                f"a request with this {HEADER} is still running; ask again once it has answered",
                [{"field": HEADER, "problem": "in use by a request that has not answered yet"}],
            )
        answer, location = earlier.get("answer"), earlier.get("location")
        if not isinstance(answer, str) or not isinstance(location, str | None):
            raise _conflict()
        return answer, location

    def _earlier(self, record: bytes) -> dict[str, Any]:
        """The earlier request's record, if its fingerprint is this request's; else APIError 409."""
        try:
            earlier = json.loads(record)
        except (ValueError, TypeError):
            earlier = None  # not ours (written by hand?): it cannot prove a match
        if not isinstance(earlier, dict) or earlier.get("fingerprint") != self.fingerprint:
            raise _conflict()
        return earlier


def _conflict() -> APIError:
    return APIError(
        409,
        "idempotency_conflict",
        f"this {HEADER} was used within the last {IDEMPOTENCY_TTL // 3600} h for another request; "
        "use a new key for a new request",
        [{"field": HEADER, "problem": "already used for a request with another method, path or body"}],
    )


#: DEL the key if it still holds this request's marker (ARGV[1]).
_RELEASE = Script(
    None,  # type: ignore[arg-type]  # called with an explicit client
    b"""
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
""",
)


def claim(value: str | None, api_key: str, method: str, path: str, body: Any, keys: Keys) -> Claim | None:
    """The claim of a request whose `Idempotency-Key` header is `value` (None: no header); APIError
    422 naming the header when the value is not a key."""
    if value is None:
        return None
    if not _KEY.fullmatch(value):
        raise APIError(
            422,
            "validation_error",
            f"invalid {HEADER} header",
            [
                {
                    "field": HEADER,
                    "problem": f"must be 1 to {MAX_KEY_LENGTH} visible ASCII characters, without spaces or commas",
                }
            ],
        )
    # Keys are scoped per API key; Redis holds a hash of the API key, never the key itself.
    client = hashlib.sha256(api_key.encode()).hexdigest()[:32]
    return Claim(keys.idempotency(client, value), fingerprint(method, path, body))


def fingerprint(method: str, path: str, body: Any) -> str:
    """A hash of the request: the same for the same JSON, whatever its key order and spacing."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(f"{method} {path}\n".encode())
    digest.update(canonical.encode())
    return digest.hexdigest()
