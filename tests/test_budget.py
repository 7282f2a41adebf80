"""Budget windows: pure calendar arithmetic. What every store does is in tests/contract."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.budget.windows import TOTAL_RETRY_AFTER, seconds_until, window_bounds


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


@pytest.mark.parametrize(
    ("per", "now", "start", "end"),
    [
        ("minute", ts(2026, 3, 1, 10, 5, 59), ts(2026, 3, 1, 10, 5), ts(2026, 3, 1, 10, 6)),
        ("hour", ts(2026, 3, 1, 10, 5, 59), ts(2026, 3, 1, 10), ts(2026, 3, 1, 11)),
        ("day", ts(2026, 12, 31, 23, 59, 59), ts(2026, 12, 31), ts(2027, 1, 1)),
        ("week", ts(2026, 11, 22, 12), ts(2026, 11, 16), ts(2026, 11, 23)),  # Sunday -> Monday
        ("month", ts(2026, 12, 15), ts(2026, 12, 1), ts(2027, 1, 1)),
        ("month", ts(2028, 2, 29, 5), ts(2028, 2, 1), ts(2028, 3, 1)),
    ],
)
def test_window_bounds(per: str, now: float, start: float, end: float) -> None:
    assert window_bounds(per, now) == (start, end)


def test_total_window_never_resets() -> None:
    start, end = window_bounds("total", 1e9)
    assert start == 0.0 and seconds_until(end, 1e9) == TOTAL_RETRY_AFTER


def test_a_request_over_a_whole_budget_is_told_in_whole_tokens_or_rounded_usd() -> None:
    from gateway import errors

    usd = errors.budget_exceeded("ads", "day:usd", 60, 4.96e-05, 2e-05).message
    assert "reserves 0.000050 USD" in usd and "budget of 0.000020 USD" in usd
    assert "e-0" not in usd
    tokens = errors.budget_exceeded("ads", "day", 60, 1200.0, 1000.0).message
    assert "reserves 1200 tokens" in tokens and "budget of 1000 tokens" in tokens


def at(*args: int) -> float:
    """A timestamp with microseconds: datetime(y, m, d, h, min, s, us) in UTC."""
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


@pytest.mark.parametrize(
    ("per", "now", "start", "end"),
    [
        # nothing on the hour: every field below the window's unit must be cleared
        (
            "minute",
            at(2026, 3, 1, 10, 5, 59, 250_000),
            ts(2026, 3, 1, 10, 5),
            ts(2026, 3, 1, 10, 6),
        ),
        ("hour", at(2026, 3, 1, 10, 37, 12, 999_999), ts(2026, 3, 1, 10), ts(2026, 3, 1, 11)),
        ("day", at(2026, 3, 1, 10, 37, 12, 500_000), ts(2026, 3, 1), ts(2026, 3, 2)),
        # Wednesday 00:37:12.5 -> Monday 00:00
        ("week", at(2026, 11, 18, 0, 37, 12, 500_000), ts(2026, 11, 16), ts(2026, 11, 23)),
        ("week", at(2026, 11, 16, 0, 0, 0, 1), ts(2026, 11, 16), ts(2026, 11, 23)),  # Monday
        ("month", at(2026, 4, 30, 23, 37, 12, 500_000), ts(2026, 4, 1), ts(2026, 5, 1)),
        ("month", at(2026, 1, 1, 0, 37, 0, 1), ts(2026, 1, 1), ts(2026, 2, 1)),
    ],
)
def test_window_starts_at_the_unit_to_the_microsecond(
    per: str, now: float, start: float, end: float
) -> None:
    assert window_bounds(per, now) == (start, end)


def test_windows_are_utc_whatever_the_host_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    now = ts(2026, 3, 1, 22, 30)  # already 2 March in Jakarta
    monkeypatch.setenv("TZ", "Asia/Jakarta")
    time.tzset()
    try:
        assert window_bounds("day", now) == (ts(2026, 3, 1), ts(2026, 3, 2))
        assert window_bounds("hour", now) == (ts(2026, 3, 1, 22), ts(2026, 3, 1, 23))
    finally:
        monkeypatch.undo()
        time.tzset()


def test_an_unknown_window_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown window 'fortnight'"):
        window_bounds("fortnight", 0.0)


@pytest.mark.parametrize(
    ("end", "now", "wait"),
    [
        (100.0, 0.0, 100),
        (100.0, 0.5, 100),  # 99.5 s: rounded up, never early
        (100.0, 99.0, 1),
        (100.0, 99.9, 1),  # under a second: still one
        (100.0, 100.0, 1),  # the window just ended: clients still wait one second
        (100.0, 250.0, 1),
    ],
)
def test_seconds_until_rounds_up_and_is_at_least_one(end: float, now: float, wait: int) -> None:
    assert seconds_until(end, now) == wait


PERIODS = st.sampled_from(["minute", "hour", "day", "week", "month"])
INSTANTS = st.floats(min_value=0, max_value=4102444800)  # 1970 to 2100


@settings(max_examples=200, deadline=None)
@given(PERIODS, INSTANTS)
def test_a_window_contains_its_start_and_not_its_end(per: str, now: float) -> None:
    start, end = window_bounds(per, now)
    assert start <= now < end
    assert window_bounds(per, start) == (start, end)
    assert window_bounds(per, end)[0] == end  # the next window starts where this one ends
    assert window_bounds(per, math.nextafter(end, 0))[1] == end
    assert start % 60 == 0  # every window starts on a whole minute


def test_half_a_microsecond_before_the_end_is_still_inside_the_window() -> None:
    # fromtimestamp rounds 119.9999996 up to 120.000000: the next minute's start
    assert window_bounds("minute", 119.9999996) == (60.0, 120.0)
    assert window_bounds("day", 86399.9999996) == (0.0, 86400.0)
