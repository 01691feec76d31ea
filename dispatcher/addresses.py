"""Email address checks: syntax only (no DNS), no header injection."""

from __future__ import annotations

import re
from email.headerregistry import Address

from email_validator import EmailNotValidError, validate_email

#: `Display Name <local@domain>`; the name may be quoted.
_NAME_ADDR = re.compile(r"(?P<name>[^<>]*)<(?P<addr>[^<>]+)>")
#: CR, LF, NUL and every other character str.splitlines() breaks at, as the email package does.
LINE_BREAKS = "\r\n\0\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


class AddressError(ValueError):
    """An address is not a valid mailbox."""


def validate_address(value: str) -> str:
    """Return the normalized addr-spec `local@domain`; raise AddressError when invalid."""
    if any(c in value for c in LINE_BREAKS):
        raise AddressError("must not contain CR, LF, NUL or another line break")
    try:
        result = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise AddressError(str(exc)) from None
    return result.normalized


def parse_mailbox(value: str) -> Address:
    """Parse `addr` or `Display Name <addr>` into an Address; raise AddressError when invalid."""
    if any(c in value for c in LINE_BREAKS):
        raise AddressError("must not contain CR, LF, NUL or another line break")
    match = _NAME_ADDR.fullmatch(value.strip())
    if match:
        name, addr = match["name"].strip(), match["addr"]
        if len(name) >= 2 and name[0] == name[-1] == '"':
            name = name[1:-1].replace('\\"', '"')
        if any(c in name for c in '<>"'):
            raise AddressError(f"{value!r} has an invalid display name")
    else:
        name, addr = "", value.strip()
    normalized = validate_address(addr)
    local, _, domain = normalized.rpartition("@")
    return Address(display_name=name, username=local, domain=domain)
