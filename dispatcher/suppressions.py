"""The suppression list: addresses no mail goes to any more, one list per Dispatcher queue.

A permanent refusal of a recipient at RCPT (a hard bounce) adds the address
(workers.channels.email), and so can an operator (`POST /v1/suppressions`); a worker leaves the
listed recipients out of every message's envelope. Two keys (dispatcher.keys) hold it: a hash,
address -> its record as JSON (why and when it was added), which a worker reads with one HMGET
per message; and a sorted set of the same addresses, all scored 0, so that the API can list them
in address order a page at a time, each page starting after the last address of the one before
(ZRANGEBYLEX), however the list changes in between. Both are written together, in MULTI/EXEC.

Addresses are compared as `normalize` writes them: as the API validates them (the domain in
lower case, an internationalized one in its Unicode form whatever form it came in) and then the
whole address in lower case. RFC 5321 lets a server tell `Ada@` from `ada@`, but next to none do,
and a list meant to stop mail to a dead mailbox should rather catch one address too many.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Literal, cast

import redis
from pydantic import ConfigDict, with_config
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

from dispatcher.addresses import validate_address
from dispatcher.history import Timestamp, isoformat
from dispatcher.keys import Keys

#: How much of a server's refusal a record keeps.
MAX_SMTP_MESSAGE = 200
#: The longest address there is (RFC 5321's 256-octet path less its brackets; email_validator's
#: limit): what a query or a path naming one may hold, well inside the request line's 4 KB.
MAX_ADDRESS = 254

Reason = Literal["bounce", "manual"]


@with_config(ConfigDict(extra="forbid"))
class Suppression(TypedDict):
    """One address on the suppression list, as the API shows it."""

    address: str
    #: `bounce`: a mail server refused it for good; `manual`: added by hand.
    reason: Reason
    added_at: Timestamp | None
    #: For a bounce: the server's reply code and the start of its text, and the job it refused.
    smtp_code: int | None
    smtp_message: str | None
    job_id: str | None


def normalize(address: str) -> str:
    """The list's form of `address` (see the module's docstring); AddressError when it is no address."""
    return validate_address(address).lower()


def bounce(address: str, code: int, message: str, job_id: str) -> Suppression:
    """A record of a hard bounce, added now. The server's text is kept printable (a space for each line
    break or control character): `dispatcher suppressions list` prints it to a terminal."""
    text = "".join(c if c.isprintable() else " " for c in message[:MAX_SMTP_MESSAGE])
    return _record(address, "bounce", code, text, job_id)


def manual(address: str) -> Suppression:
    """A record of an address added by hand, now."""
    return _record(address, "manual", None, None, None)


def _record(address: str, reason: Reason, code: int | None, message: str | None, job_id: str | None) -> Suppression:
    return Suppression(
        address=normalize(address),
        reason=reason,
        added_at=isoformat(datetime.now(UTC)),
        smtp_code=code,
        smtp_message=message,
        job_id=job_id,
    )


class SuppressionList:
    """Reads and writes one Dispatcher queue's suppression list. Addresses given to it must be valid."""

    def __init__(self, connection: redis.Redis, keys: Keys) -> None:
        self.connection = connection
        self.keys = keys

    def find(self, addresses: Iterable[str]) -> dict[str, Suppression]:
        """The listed ones among `addresses`, by the address as given: one HMGET."""
        given = list(dict.fromkeys(addresses))
        if not given:
            return {}
        normalized = [normalize(address) for address in given]
        raw = cast(list[bytes | None], self.connection.hmget(self.keys.suppressed, normalized))
        return {
            address: _parse(key, value)
            for address, key, value in zip(given, normalized, raw, strict=True)
            if value is not None
        }

    def get(self, address: str) -> Suppression | None:
        return self.find([address]).get(address)

    def add(self, records: Iterable[Suppression]) -> list[tuple[Suppression, bool]]:
        """Add each record's address unless it is listed already, whose first record then stays;
        each address's record as listed now, and whether it is new."""
        records = list(records)
        if not records:
            return []
        with self.connection.pipeline(transaction=True) as pipe:
            for record in records:
                address = record["address"]
                pipe.hsetnx(self.keys.suppressed, address, json.dumps(_stored(record), separators=(",", ":")))
                pipe.zadd(self.keys.suppressed_index, {address: 0})
                pipe.hget(self.keys.suppressed, address)
            replies = pipe.execute()
        return [
            (_parse(record["address"], replies[3 * i + 2]), bool(replies[3 * i])) for i, record in enumerate(records)
        ]

    def remove(self, address: str) -> bool:
        """Take `address` off the list; False if it was not on it."""
        key = normalize(address)
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.hdel(self.keys.suppressed, key)
            pipe.zrem(self.keys.suppressed_index, key)
            removed, _ = pipe.execute()
        return bool(removed)

    def page(self, after: str | None, limit: int) -> tuple[list[Suppression], str | None]:
        """Up to `limit` records in address order, starting after `after`; and the `after` of the
        next page, None when this is the last."""
        start = "-" if after is None else "(" + after
        keys = cast(
            list[bytes],
            self.connection.zrangebylex(self.keys.suppressed_index, start, "+", start=0, num=limit + 1),
        )
        more = len(keys) > limit
        keys = keys[:limit]
        if not keys:
            return [], None
        raw = cast(list[bytes | None], self.connection.hmget(self.keys.suppressed, keys))
        records = [_parse(key.decode(errors="replace"), value) for key, value in zip(keys, raw, strict=True) if value]
        return records, keys[-1].decode(errors="replace") if more else None


def _stored(record: Suppression) -> dict:
    """The record as stored: the address is the hash field already."""
    return {name: value for name, value in record.items() if name != "address"}


def _parse(address: str, raw: bytes) -> Suppression:
    """A stored record; one that is not ours (Redis is writable by others) still suppresses the address,
    and shows as added by hand, at an unknown time."""
    try:
        stored = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        stored = None
    if not isinstance(stored, Mapping):
        stored = {}

    def get(name: str, kind: type) -> object:
        value = stored.get(name)
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    reason: Reason = "bounce" if stored.get("reason") == "bounce" else "manual"
    return Suppression(
        address=address,
        reason=reason,
        added_at=cast(str | None, get("added_at", str)),
        smtp_code=cast(int | None, get("smtp_code", int)),
        smtp_message=cast(str | None, get("smtp_message", str)),
        job_id=cast(str | None, get("job_id", str)),
    )
