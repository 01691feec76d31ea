"""Priorities: each one an RQ queue named after the Dispatcher queue (DISPATCHER_QUEUE).

`default` is the Dispatcher queue itself (so jobs queued before priorities existed keep their
place); `high` and `low` add a suffix: `dispatcher-high`, `dispatcher`, `dispatcher-low`. Every
queue of one Dispatcher queue shares its attempt histories, totals and job index (dispatcher.keys
is named by that base name), so the API and `/v1/stats` see all of them as one.
"""

from __future__ import annotations

from typing import Literal, get_args

Priority = Literal["high", "default", "low"]
#: Highest first: the order a worker serves its queues in.
PRIORITIES: tuple[Priority, ...] = get_args(Priority)
#: What a single request gets, and a batch (bulk sends should never hold up one-off messages).
DEFAULT_PRIORITY: Priority = "default"
BATCH_PRIORITY: Priority = "low"
_SUFFIXES = {"high": "-high", "default": "", "low": "-low"}


def queue_name(base: str, priority: Priority) -> str:
    """The RQ queue of `priority` for the Dispatcher queue `base`."""
    return base + _SUFFIXES[priority]


def queue_names(base: str, priorities: tuple[Priority, ...] = PRIORITIES) -> list[str]:
    """The RQ queues of `priorities`, highest priority first."""
    return [queue_name(base, p) for p in PRIORITIES if p in priorities]


def split(name: str) -> tuple[str, Priority]:
    """The Dispatcher queue and priority of an RQ queue name (a name with no suffix is `default`)."""
    for priority in ("high", "low"):
        suffix = _SUFFIXES[priority]
        if name.endswith(suffix) and len(name) > len(suffix):
            return name.removesuffix(suffix), priority  # type: ignore[return-value]
    return name, DEFAULT_PRIORITY


def reserved_suffix(base: str) -> str | None:
    """The priority suffix `base` ends with, which would make its queues ambiguous; None if none."""
    return next((s for s in ("-high", "-low") if base.endswith(s)), None)


def parse(values: list[str] | str) -> tuple[Priority, ...]:
    """Priorities from a list or a comma-separated text (`high,default`), highest first.
    Raises ValueError naming what is not a priority."""
    items = values.split(",") if isinstance(values, str) else [v for value in values for v in value.split(",")]
    chosen = [item.strip() for item in items if item.strip()]
    unknown = [item for item in chosen if item not in PRIORITIES]
    if unknown or not chosen:
        raise ValueError(f"queues are priorities, some of {', '.join(PRIORITIES)}; got {','.join(items)!r}")
    return tuple(p for p in PRIORITIES if p in chosen)
