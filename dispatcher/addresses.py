"""Email address checks: syntax only (no DNS), no header injection."""

from __future__ import annotations

import functools
import re
from email.headerregistry import Address

from email_validator import EmailNotValidError, validate_email

#: A backslash pair inside a quoted-string (RFC 5322 quoted-pair).
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
#: CR, LF, NUL and every other character str.splitlines() breaks at, as the email package does.
LINE_BREAKS = "\r\n\0\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


class AddressError(ValueError):
    """An address is not a valid mailbox."""


def validate_address(value: str) -> str:
    """Return the normalized addr-spec `local@domain`; raise AddressError when invalid."""
    return _validated(value)[0]


def wire_address(value: str) -> str:
    """The addr-spec as it goes into SMTP and headers: an internationalized domain as its A-label
    (IDNA), so that only a non-ASCII local part needs SMTPUTF8; raise AddressError when invalid."""
    return _validated(value)[1]


@functools.lru_cache(maxsize=4096)  # a worker sees the same senders and recipients again and again
def _validated(value: str) -> tuple[str, str]:
    if any(c in value for c in LINE_BREAKS):
        raise AddressError("must not contain CR, LF, NUL or another line break")
    try:
        # Syntax only: test_environment also lets the special-use `.test` domain through, as the
        # OpenAPI document's `email` format does (email_validator still refuses .local, .invalid...).
        result = validate_email(value, check_deliverability=False, test_environment=True)
    except EmailNotValidError as exc:
        raise AddressError(str(exc)) from None
    return result.normalized, f"{result.local_part}@{result.ascii_domain}"


def split_mailbox(value: str) -> tuple[str, str]:
    """`addr` or `Display Name <addr>` as (display name, addr), the name unquoted; syntax only.

    The name is text, checked by nobody here: the API refuses line breaks in it (parse_mailbox),
    the worker encodes whatever it holds (workers.headers).
    """
    value = value.strip()
    if not value.endswith(">") or "<" not in value:
        return "", value
    # The address is what the last `<` opens (an address holds no `<`); the name may hold anything.
    name, _, addr = value[:-1].rpartition("<")
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = _QUOTED_PAIR.sub(r"\1", name[1:-1])
    return name, addr


def format_mailbox(display_name: str, addr_spec: str) -> str:
    """`"Display Name" <addr>` (the name always quoted, so split_mailbox gives it back exactly), or `addr`."""
    if not display_name:
        return addr_spec
    return '"' + display_name.replace("\\", "\\\\").replace('"', '\\"') + f'" <{addr_spec}>'


def parse_mailbox(value: str) -> Address:
    """Parse `addr` or `Display Name <addr>` into an Address; raise AddressError when invalid."""
    if any(c in value for c in LINE_BREAKS):
        raise AddressError("must not contain CR, LF, NUL or another line break")
    name, addr = split_mailbox(value)
    if any(c in name for c in '<>"'):
        raise AddressError(f"{value!r} has an invalid display name")
    normalized = validate_address(addr)
    local, _, domain = normalized.rpartition("@")
    return Address(display_name=name, username=local, domain=domain)
