"""Budget windows and the local store: pure arithmetic, no server."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.budget.local import LocalBudgetStore
from gateway.budget.store import Rejection, Reservation
from gateway.budget.windows import TOTAL_RETRY_AFTER, seconds_until, window_bounds
from gateway.ledger.records import Charge
from gateway.settings import BudgetRule, Team


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


TEAM = Team(
    "t",
    (),
    budgets=(
        BudgetRule("day", tokens=1000),
        BudgetRule("hour", tokens=300),
        BudgetRule("month", usd=1.0),
    ),
)
NOW = ts(2026, 6, 10, 12, 30)


async def test_reserve_is_atomic_across_windows() -> None:
    store = LocalBudgetStore()
    first = await store.reserve(TEAM, 200, 0.1, NOW)
    assert isinstance(first, Reservation)
    # the hour window (300) cannot hold another 200: nothing is reserved anywhere
    second = await store.reserve(TEAM, 200, 0.1, NOW)
    assert isinstance(second, Rejection) and second.window == "hour"
    assert second.retry_after == 1800
    day, hour, month = await store.windows(TEAM, NOW)
    assert (day.reserved, hour.reserved, month.reserved) == (200, 200, 0.1)


async def test_settle_releases_reservation_and_charges_actual() -> None:
    store = LocalBudgetStore()
    r = await store.reserve(TEAM, 250, 0.2, NOW)
    assert isinstance(r, Reservation)
    await store.settle(r, 40, 0.01, NOW + 1)
    day, hour, month = await store.windows(TEAM, NOW + 1)
    assert (day.used, day.reserved, hour.remaining) == (40, 0, 260)
    assert month.used == pytest.approx(0.01) and month.reserved == 0


async def test_usd_window_rejects_with_usd_name() -> None:
    store = LocalBudgetStore()
    got = await store.reserve(TEAM, 10, 1.5, NOW)
    assert isinstance(got, Rejection) and got.window == "month:usd"


async def test_window_rolls_over_exactly_at_boundary() -> None:
    store = LocalBudgetStore()
    end_of_hour = ts(2026, 6, 10, 12, 59, 59) + 0.999
    r = await store.reserve(TEAM, 300, 0, end_of_hour)
    assert isinstance(r, Reservation)
    assert isinstance(await store.reserve(TEAM, 1, 0, end_of_hour), Rejection)
    top = ts(2026, 6, 10, 13)
    # a new hour: the in-flight reservation belonged to the old one
    assert isinstance(await store.reserve(TEAM, 299, 0, top), Reservation)
    await store.settle(r, 100, 0, top)
    day, hour, _ = await store.windows(TEAM, top)
    assert hour.used == 100 and hour.reserved == 299
    assert day.used == 100 and day.reserved == 299


async def test_restore_seeds_current_windows() -> None:
    store = LocalBudgetStore()
    day_start = window_bounds("day", NOW)[0]
    hour_start = window_bounds("hour", NOW)[0]
    month_start = window_bounds("month", NOW)[0]
    charged = {
        day_start: {"t": Charge(700, 0.5)},
        hour_start: {"t": Charge(100, 0.1)},
        month_start: {"t": Charge(900, 0.75)},
    }
    await store.restore([TEAM], charged, NOW)
    day, hour, month = await store.windows(TEAM, NOW)
    assert (day.used, hour.used, month.used) == (700, 100, 0.75)


async def test_team_without_budgets_always_admitted() -> None:
    store = LocalBudgetStore()
    got = await store.reserve(Team("free", ()), 10**9, 10**6, NOW)
    assert isinstance(got, Reservation) and got.windows == ()


async def test_a_request_larger_than_the_whole_window_says_so() -> None:
    store = LocalBudgetStore()
    got = await store.reserve(TEAM, 301, 0.0, NOW)  # the hour window holds 300 in all
    assert isinstance(got, Rejection) and got.window == "hour" and got.limit == 300
    ordinary = await store.reserve(TEAM, 250, 0.0, NOW)
    assert isinstance(ordinary, Reservation)
    full = await store.reserve(TEAM, 100, 0.0, NOW)
    assert isinstance(full, Rejection) and full.limit == 0.0


async def test_counters_follow_the_window_not_the_list_position() -> None:
    store = LocalBudgetStore()
    r = await store.reserve(TEAM, 100, 0.2, NOW)
    assert isinstance(r, Reservation)
    # a reload reorders the budgets and raises the hour limit while the request is in flight
    reloaded = Team(
        "t",
        (),
        budgets=(
            BudgetRule("month", usd=1.0),
            BudgetRule("hour", tokens=500),
            BudgetRule("day", tokens=1000),
        ),
    )
    month, hour, day = await store.windows(reloaded, NOW)
    assert (month.reserved, hour.reserved, day.reserved) == (0.2, 100, 100)
    assert hour.limit == 500
    await store.settle(r, 40, 0.05, NOW + 1)
    month, hour, day = await store.windows(reloaded, NOW + 1)
    assert (hour.used, hour.reserved, day.used, day.reserved) == (40, 0, 40, 0)
    assert month.used == pytest.approx(0.05) and month.reserved == pytest.approx(0)
