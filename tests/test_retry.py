"""When the next attempt happens: backoff with jitter, Retry-After as a floor, and reading Retry-After."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from workers.retry import MAX_RETRY_AFTER, next_delay, parse_retry_after

SAMPLES = 2000


@pytest.mark.parametrize(
    ("backoff", "attempt", "base"),
    [
        pytest.param([10, 300, 1800], 2, 10, id="attempt-2-uses-first"),
        pytest.param([10, 300, 1800], 3, 300, id="attempt-3-uses-second"),
        pytest.param([10, 300, 1800], 4, 1800, id="attempt-4-uses-third"),
        pytest.param([10, 300, 1800], 5, 1800, id="past-the-end-repeats-last"),
        pytest.param([10, 300, 1800], 20, 1800, id="far-past-the-end-repeats-last"),
        pytest.param([60], 2, 60, id="single-value"),
        pytest.param([60], 6, 60, id="single-value-repeats"),
    ],
)
def test_delay_is_the_backoff_value_within_20_percent(backoff, attempt, base):
    delays = [next_delay(backoff, attempt) for _ in range(SAMPLES)]

    assert all(base * 0.8 <= d <= base * 1.2 for d in delays)
    # The jitter really spreads: both sides of the base, and well beyond a rounding error.
    assert min(delays) < base * 0.95
    assert max(delays) > base * 1.05
    assert len(set(delays)) > SAMPLES // 2


def test_zero_backoff_gives_zero():
    assert next_delay([0, 0], 2) == 0
    assert next_delay([0], 9) == 0


def test_empty_backoff_gives_zero():
    assert next_delay([], 2) == 0
    assert next_delay([], 7) == 0


def test_retry_after_is_a_floor():
    delays = [next_delay([10], 2, retry_after=120) for _ in range(100)]

    assert delays == [120] * 100


def test_retry_after_below_the_backoff_does_not_shorten_it():
    delays = [next_delay([100], 2, retry_after=1) for _ in range(SAMPLES)]

    assert all(80 <= d <= 120 for d in delays)
    assert len(set(delays)) > 1


def test_retry_after_applies_with_empty_backoff():
    assert next_delay([], 2, retry_after=30) == 30


@pytest.mark.parametrize("retry_after", [MAX_RETRY_AFTER + 1, 7 * 24 * 3600, 10**12])
def test_retry_after_is_capped_at_one_day(retry_after):
    assert MAX_RETRY_AFTER == 24 * 3600
    assert next_delay([5], 2, retry_after=retry_after) == 24 * 3600


def test_retry_after_cap_does_not_shorten_a_longer_backoff():
    delays = [next_delay([36 * 3600], 2, retry_after=10**9) for _ in range(100)]

    assert all(36 * 3600 * 0.8 <= d <= 36 * 3600 * 1.2 for d in delays)


# --- parse_retry_after -----------------------------------------------------------------------

NOW = datetime(2025, 3, 14, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("120", 120.0), ("0", 0.0), (" 7 ", 7.0), ("86400", 86400.0)],
)
def test_delta_seconds(value, seconds):
    assert parse_retry_after(value, now=NOW) == seconds


def test_http_date_in_the_future():
    value = format_datetime(NOW + timedelta(seconds=120), usegmt=True)

    assert value.endswith("GMT")
    assert parse_retry_after(value, now=NOW) == 120.0


def test_http_date_with_offset():
    value = format_datetime((NOW + timedelta(seconds=90)).astimezone(timezone(timedelta(hours=2))))

    assert value.endswith("+0200")

    assert parse_retry_after(value, now=NOW) == 90.0


def test_http_date_in_the_past_is_zero():
    value = format_datetime(NOW - timedelta(hours=1), usegmt=True)

    assert parse_retry_after(value, now=NOW) == 0.0


@pytest.mark.parametrize(
    "value",
    [
        "soon",
        "12 parsecs",
        "-5",
        "1.5",
        "Mon, 99 Foo 2025 99:99:99 GMT",
        "\x00",
        # A latin-1 header byte that str.isdigit() counts as a digit but float() cannot read.
        pytest.param("\u00b2", id="superscript-two"),
        pytest.param("\u0661\u0662", id="arabic-indic-digits"),
    ],
)
def test_garbage_is_none(value):
    assert parse_retry_after(value, now=NOW) is None


@pytest.mark.parametrize("value", [None, ""])
def test_absent_is_none(value):
    assert parse_retry_after(value, now=NOW) is None
