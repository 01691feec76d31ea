"""Idempotency keys: a POST that carries `Idempotency-Key` is accepted once per key and API key.

A request with a key leaves a record in Redis, written by the same script that writes its jobs
(dispatcher.rqstore), so the record exists exactly when the jobs do: there is no "in progress" state
for a concurrent twin to see. The record holds the request's fingerprint (a hash of its method, path
and body as canonical JSON) and its job ids, for IDEMPOTENCY_TTL. A later request with the same key
and API key answers the earlier ids with 200 if its fingerprint is the same, 409 otherwise; only an
accepted request leaves a record, so after a 4xx or 503 the key is still free.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import redis

from dispatcher.errors import AlreadyAccepted, APIError
from dispatcher.keys import Keys

#: The request header that carries the key.
HEADER = "Idempotency-Key"
#: How long a key is remembered after the request that first used it was accepted: 24 h.
IDEMPOTENCY_TTL = 24 * 3600
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

    def record(self, job_ids: list[str]) -> str:
        """The record an accepted request leaves: its fingerprint and job ids."""
        return json.dumps({"fingerprint": self.fingerprint, "ids": job_ids})

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
        try:
            earlier = json.loads(record)
            fingerprint, ids = earlier["fingerprint"], earlier["ids"]
        except (ValueError, TypeError, KeyError):
            fingerprint, ids = None, None  # not ours (written by hand?): it cannot prove a match
        if fingerprint != self.fingerprint or not isinstance(ids, list):
            raise APIError(
                409,
                "idempotency_conflict",
                f"this {HEADER} was used within the last {IDEMPOTENCY_TTL // 3600} h for another request; "
                "use a new key for a new request",
                [{"field": HEADER, "problem": "already used for a request with another method, path or body"}],
            )
        return [str(job_id) for job_id in ids]


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
