"""Budget windows: pure calendar arithmetic. What every store does is in tests/contract."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

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
