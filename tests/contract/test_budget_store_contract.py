"""The BudgetStore contract (gateway/budget/store.py), held against every implementation."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import pytest
from servers import REDIS_URL, redis_prefix

from contract import implementations, in_process
from gateway.budget.local import LocalBudgetStore
from gateway.budget.redis import RedisBudgetStore
from gateway.budget.store import BudgetStore, Rejection, Reservation
from gateway.budget.windows import window_bounds
from gateway.ledger.records import Charge
from gateway.redis_state import connect
from gateway.settings import BudgetRule, Team


async def empty_ledger(since: float) -> Mapping[str, Charge]:
    return {}


@asynccontextmanager
async def redis_store() -> AsyncIterator[RedisBudgetStore]:
    """A Redis store on a fresh prefix, over a ledger with no records."""
    async with redis_prefix() as prefix:
        made = RedisBudgetStore(connect(REDIS_URL), prefix, empty_ledger)
        try:
            yield made
        finally:
            await made.close()


# the one place an implementation joins this suite (see tests/contract/__init__.py)
store = implementations(
    "store",
    pytest.param(in_process(LocalBudgetStore), id="local"),
    pytest.param(redis_store, id="redis", marks=pytest.mark.redis),
)


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


KEY = "sha256:" + "0" * 64


def team(*budgets: BudgetRule) -> Team:
    return Team(name="t", keys=(KEY,), budgets=budgets)


TEAM = team(
    BudgetRule(per="day", tokens=1000),
    BudgetRule(per="hour", tokens=300),
    BudgetRule(per="month", usd=1.0),
)
NOW = ts(2026, 6, 10, 12, 30)


async def reserved(store: BudgetStore, tokens: int, usd: float, now: float = NOW) -> Reservation:
    got = await store.reserve(TEAM, tokens, usd, now)
    assert isinstance(got, Reservation), got
    return got


async def refused(store: BudgetStore, tokens: int, usd: float, now: float = NOW) -> Rejection:
    got = await store.reserve(TEAM, tokens, usd, now)
    assert isinstance(got, Rejection), got
    return got


async def test_reserve_is_atomic_across_windows(store: BudgetStore) -> None:
    first = await reserved(store, 200, 0.1)
    assert first.team == "t" and (first.tokens, first.usd) == (200, 0.1)
    assert {(per, unit) for per, unit, _ in first.windows} == {
        ("day", "tokens"),
        ("hour", "tokens"),
        ("month", "usd"),
    }
    # the hour window (300) cannot hold another 200: nothing is reserved anywhere
    second = await refused(store, 200, 0.1)
    assert second.window == "hour" and second.retry_after == 1800 and second.limit == 0.0
    day, hour, month = await store.windows(TEAM, NOW)
    assert (day.reserved, hour.reserved, month.reserved) == (200, 200, pytest.approx(0.1))


async def test_a_usd_window_refuses_by_its_usd_name(store: BudgetStore) -> None:
    await reserved(store, 10, 0.75)
    got = await refused(store, 10, 0.5)
    month_end = window_bounds("month", NOW)[1]
    assert got.window == "month:usd" and got.retry_after == int(month_end - NOW)
    assert got.limit == 0.0  # the request alone would fit: a reset makes room
    day, hour, month = await store.windows(TEAM, NOW)
    assert (day.reserved, hour.reserved, month.reserved) == (10, 10, 0.75)


async def test_retry_after_waits_for_every_refusing_window(store: BudgetStore) -> None:
    day_start, day_end = window_bounds("day", NOW)
    hour_start = window_bounds("hour", NOW)[0]
    await store.restore([TEAM], {day_start: {"t": Charge(950, 0)}, hour_start: {}}, NOW)
    # the hour alone (0 used of 300) would admit 100; the day (950 of 1000) cannot
    got = await refused(store, 100, 0.0)
    assert got.window == "day" and got.retry_after == int(day_end - NOW)
    await store.restore(
        [TEAM], {day_start: {"t": Charge(950, 0)}, hour_start: {"t": Charge(250, 0)}}, NOW
    )
    both = await refused(store, 100, 0.0)
    assert both.retry_after == int(day_end - NOW)  # not the hour's 1800: the day still refuses


async def test_a_request_larger_than_the_whole_window_says_so(store: BudgetStore) -> None:
    got = await refused(store, 301, 0.0)  # the hour window holds 300 in all
    assert got.window == "hour" and got.limit == 300
    dear = await refused(store, 1, 1.5)
    assert dear.window == "month:usd" and dear.limit == 1.0
    await reserved(store, 250, 0.0)
    full = await refused(store, 100, 0.0)
    assert full.limit == 0.0  # 100 fits in an empty hour: a reset will make room
    assert [w.reserved for w in await store.windows(TEAM, NOW)] == [250, 250, 0]


async def test_a_team_without_budgets_is_always_admitted(store: BudgetStore) -> None:
    got = await store.reserve(Team(name="free", keys=(KEY,)), 10**9, 10**6, NOW)
    assert isinstance(got, Reservation) and got.windows == ()
    await store.settle(got, 10**9, 10**6, NOW + 1)
    assert await store.windows(Team(name="free", keys=(KEY,)), NOW + 1) == []


async def test_settle_replaces_the_reservation_by_a_smaller_real_cost(store: BudgetStore) -> None:
    r = await reserved(store, 250, 0.2)
    await store.settle(r, 40, 0.01, NOW + 1)
    day, hour, month = await store.windows(TEAM, NOW + 1)
    assert (day.used, day.reserved, hour.used, hour.reserved, hour.remaining) == (40, 0, 40, 0, 260)
    assert month.used == pytest.approx(0.01) and month.reserved == pytest.approx(0)


async def test_settle_charges_a_real_cost_above_the_reservation(store: BudgetStore) -> None:
    r = await reserved(store, 100, 0.1)
    await store.settle(r, 400, 0.3, NOW + 1)
    day, hour, month = await store.windows(TEAM, NOW + 1)
    assert (day.used, hour.used, hour.reserved) == (400, 400, 0)
    assert hour.remaining == 0  # past the limit: the overshoot is spent, not hidden
    assert month.used == pytest.approx(0.3)
    got = await refused(store, 1, 0.0, NOW + 2)
    assert got.window == "hour"


async def test_settle_releases_only_its_own_reservation(store: BudgetStore) -> None:
    a = await reserved(store, 100, 0.1)
    await reserved(store, 50, 0.2)
    # until it is settled, a reservation keeps holding, however long the request takes
    assert [w.reserved for w in await store.windows(TEAM, NOW + 1500)] == [
        150,
        150,
        pytest.approx(0.3),
    ]
    await store.settle(a, 70, 0.05, NOW + 1600)
    day, hour, month = await store.windows(TEAM, NOW + 1600)
    assert (day.used, day.reserved, hour.used, hour.reserved) == (70, 50, 70, 50)
    assert (month.used, month.reserved) == (pytest.approx(0.05), pytest.approx(0.2))


async def test_concurrent_reserves_never_pass_a_limit(store: BudgetStore) -> None:
    got = await asyncio.gather(*(store.reserve(TEAM, 7, 0.0, NOW) for _ in range(100)))
    admitted = [r for r in got if isinstance(r, Reservation)]
    refusals = [r for r in got if isinstance(r, Rejection)]
    assert len(admitted) == 300 // 7 and len(refusals) == 100 - 300 // 7
    assert {r.window for r in refusals} == {"hour"}
    hour = (await store.windows(TEAM, NOW))[1]
    assert hour.reserved == 7 * len(admitted) <= hour.limit
    await asyncio.gather(*(store.settle(r, 5, 0.0, NOW + 1) for r in admitted))
    day, hour, _ = await store.windows(TEAM, NOW + 1)
    assert (hour.used, hour.reserved, day.used, day.reserved) == (5 * 42, 0, 5 * 42, 0)


async def test_concurrent_reserves_and_settles_keep_exact_counts(store: BudgetStore) -> None:
    async def one(i: int) -> None:
        r = await store.reserve(TEAM, 5, 0.001, NOW + i / 1000)  # 60 x 5: the hour's 300
        assert isinstance(r, Reservation)
        await asyncio.sleep(0)
        await store.settle(r, i % 3, 0.0, NOW + i / 1000)

    await asyncio.gather(*(one(i) for i in range(60)))
    day, hour, month = await store.windows(TEAM, NOW + 1)
    assert (day.used, hour.used) == (sum(i % 3 for i in range(60)),) * 2
    assert (day.reserved, hour.reserved, month.used) == (0, 0, 0)
    assert month.reserved == pytest.approx(0)


async def test_windows_report_each_period_in_team_order(store: BudgetStore) -> None:
    await reserved(store, 30, 0.25)
    states = await store.windows(TEAM, NOW)
    assert [(w.per, w.unit, w.limit) for w in states] == [
        ("day", "tokens", 1000),
        ("hour", "tokens", 300),
        ("month", "usd", 1.0),
    ]
    for w in states:
        assert (w.start, w.end) == window_bounds(w.per, NOW)
        assert w.used == 0
    assert [w.remaining for w in states] == [970, 270, 0.75]


async def test_a_total_window_never_rolls_over(store: BudgetStore) -> None:
    forever = team(BudgetRule(per="total", tokens=100))
    r = await store.reserve(forever, 60, 0.0, NOW)
    assert isinstance(r, Reservation)
    await store.settle(r, 60, 0.0, NOW + 86400 * 400)
    (total,) = await store.windows(forever, NOW + 86400 * 800)
    assert (total.used, total.start, total.end) == (60, 0.0, float("inf"))
    got = await store.reserve(forever, 50, 0.0, NOW + 86400 * 800)
    assert isinstance(got, Rejection) and got.window == "total"


async def test_window_rolls_over_exactly_at_boundary(store: BudgetStore) -> None:
    end_of_hour = ts(2026, 6, 10, 12, 59, 59) + 0.999
    r = await reserved(store, 300, 0, end_of_hour)
    await refused(store, 1, 0, end_of_hour)
    top = ts(2026, 6, 10, 13)
    # a new hour: the in-flight reservation belonged to the old one
    await reserved(store, 299, 0, top)
    await store.settle(r, 100, 0, top)
    day, hour, _ = await store.windows(TEAM, top)
    assert (hour.start, hour.used, hour.reserved) == (top, 100, 299)
    assert (day.used, day.reserved) == (100, 299)


async def test_restore_seeds_current_windows_from_ledger_charges(store: BudgetStore) -> None:
    day_start = window_bounds("day", NOW)[0]
    hour_start = window_bounds("hour", NOW)[0]
    month_start = window_bounds("month", NOW)[0]
    charged = {
        day_start: {"t": Charge(700, 0.5), "other": Charge(5, 0.0)},
        hour_start: {"t": Charge(100, 0.1)},
        month_start: {"t": Charge(900, 0.75)},
        hour_start - 3600: {"t": Charge(10_000, 9.0)},  # an hour that has ended
    }
    await store.restore([TEAM], charged, NOW)
    day, hour, month = await store.windows(TEAM, NOW)
    assert (day.used, hour.used, month.used) == (700, 100, 0.75)
    await reserved(store, 200, 0.25)
    await refused(store, 1, 0.0)


async def test_restore_sets_used_and_keeps_what_is_reserved(store: BudgetStore) -> None:
    r = await reserved(store, 50, 0.1)
    await store.settle(r, 50, 0.1, NOW)
    await reserved(store, 20, 0.0)
    day_start = window_bounds("day", NOW)[0]
    await store.restore([TEAM], {day_start: {"t": Charge(600, 0.0)}}, NOW)
    day, hour, month = await store.windows(TEAM, NOW)
    # set, not added; a window the ledger has no charge for starts from zero
    assert (day.used, hour.used, month.used) == (600, 0, 0)
    assert (day.reserved, hour.reserved) == (20, 20)


async def test_a_reload_that_edits_budgets_still_settles_earlier_reservations(
    store: BudgetStore,
) -> None:
    r = await reserved(store, 100, 0.2)
    # a reload reorders the budgets and raises the hour limit while the request is in flight
    reloaded = team(
        BudgetRule(per="month", usd=1.0),
        BudgetRule(per="hour", tokens=500),
        BudgetRule(per="day", tokens=1000),
    )
    month, hour, day = await store.windows(reloaded, NOW)
    assert (month.reserved, hour.reserved, day.reserved) == (0.2, 100, 100)
    assert hour.limit == 500
    await store.settle(r, 40, 0.05, NOW + 1)
    month, hour, day = await store.windows(reloaded, NOW + 1)
    assert (hour.used, hour.reserved, day.used, day.reserved) == (40, 0, 40, 0)
    assert month.used == pytest.approx(0.05) and month.reserved == pytest.approx(0)


async def test_a_reload_that_removes_or_adds_a_window_still_settles(store: BudgetStore) -> None:
    r = await reserved(store, 100, 0.2)
    reloaded = team(BudgetRule(per="day", tokens=1000), BudgetRule(per="week", tokens=5000))
    await store.settle(r, 40, 0.05, NOW + 1)
    day, week = await store.windows(reloaded, NOW + 1)
    assert (day.used, day.reserved) == (40, 0)
    assert (week.used, week.reserved) == (0, 0)  # added after the reservation: not charged
    again = await store.reserve(reloaded, 960, 0.0, NOW + 2)
    assert isinstance(again, Reservation)
    assert {per for per, _, _ in again.windows} == {"day", "week"}


async def test_a_request_of_exactly_the_whole_limit_fits_an_empty_window(
    store: BudgetStore,
) -> None:
    r = await reserved(store, 300, 0.0)  # the hour holds 300 in all
    assert [w.reserved for w in await store.windows(TEAM, NOW)] == [300, 300, 0]
    await store.settle(r, 0, 0.0, NOW)
    await reserved(store, 1, 0.0)
    # now it does not fit, but a reset will make room: not "larger than the whole window"
    got = await refused(store, 300, 0.0)
    assert (got.team, got.window, got.retry_after, got.limit) == ("t", "hour", 1800, 0.0)


async def test_a_request_larger_than_the_window_is_told_when_it_resets(store: BudgetStore) -> None:
    got = await refused(store, 301, 0.0)
    assert (got.team, got.window, got.retry_after, got.limit) == ("t", "hour", 1800, 300)


async def test_windows_refusing_with_the_same_wait_name_the_first_in_team_order(
    store: BudgetStore,
) -> None:
    both = team(BudgetRule(per="day", tokens=100), BudgetRule(per="day", usd=0.5))
    first = await store.reserve(both, 80, 0.4, NOW)
    assert isinstance(first, Reservation)
    got = await store.reserve(both, 80, 0.4, NOW)
    day_end = window_bounds("day", NOW)[1]
    assert got == Rejection("t", "day", int(day_end - NOW))


async def test_a_reload_that_changes_a_limit_counts_the_new_limit_at_once(
    store: BudgetStore,
) -> None:
    await reserved(store, 200, 0.0)  # of the hour's 300
    raised = team(BudgetRule(per="hour", tokens=500))
    assert isinstance(await store.reserve(raised, 250, 0.0, NOW), Reservation)
    lowered = team(BudgetRule(per="hour", tokens=460))
    got = await store.reserve(lowered, 20, 0.0, NOW)  # 450 held: 20 more passes 460
    assert isinstance(got, Rejection) and got.window == "hour"
    (hour,) = await store.windows(lowered, NOW)
    assert (hour.limit, hour.reserved) == (460, 450)


async def test_settle_skips_a_window_it_never_counted_and_settles_the_others(
    store: BudgetStore,
) -> None:
    r = await reserved(store, 100, 0.2)
    unknown = dataclasses.replace(r, windows=(("week", "tokens", 0.0), *r.windows))
    await store.settle(unknown, 40, 0.05, NOW + 1)
    day, hour, month = await store.windows(TEAM, NOW + 1)
    assert (day.used, day.reserved, hour.used, hour.reserved) == (40, 0, 40, 0)
    assert month.used == pytest.approx(0.05)


async def test_two_requests_just_before_a_window_ends_share_that_window(
    store: BudgetStore,
) -> None:
    instant = ts(2026, 6, 10, 13) - 4e-7  # fromtimestamp would round it up to 13:00
    await reserved(store, 300, 0.0, instant)
    got = await refused(store, 300, 0.0, instant)
    assert got.window == "hour" and got.retry_after == 1


RATED = team(BudgetRule(per="minute", requests=3), BudgetRule(per="hour", tokens=300))


async def test_a_requests_window_counts_each_admitted_request(store: BudgetStore) -> None:
    held = [await store.reserve(RATED, 10, 0.0, NOW) for _ in range(3)]
    assert all(isinstance(r, Reservation) and r.requests == 1 for r in held)
    minute, hour = await store.windows(RATED, NOW)
    assert (minute.unit, minute.limit, minute.reserved, minute.remaining) == ("requests", 3, 3, 0)
    assert hour.reserved == 30  # the other units count tokens as ever
    got = await store.reserve(RATED, 10, 0.0, NOW)
    minute_end = window_bounds("minute", NOW)[1]
    assert got == Rejection("t", "minute:requests", int(minute_end - NOW))
    # a retry's extra hold is no request: it holds tokens, and no request
    more = await store.reserve(RATED, 10, 0.0, NOW, requests=0)
    assert isinstance(more, Reservation) and more.requests == 0
    assert [w.reserved for w in await store.windows(RATED, NOW)] == [3, 40]
    for r in held:
        assert isinstance(r, Reservation)
        await store.settle(r, 5, 0.0, NOW + 1)  # counts what it held: one request
    await store.settle(more, 0, 0.0, NOW + 1)
    minute, hour = await store.windows(RATED, NOW + 1)
    assert (minute.used, minute.reserved, hour.used, hour.reserved) == (3, 0, 15, 0)
    await refused_by(store, RATED, "minute:requests", NOW + 2)
    # the next minute admits again
    assert isinstance(await store.reserve(RATED, 10, 0.0, NOW + 60), Reservation)


async def refused_by(store: BudgetStore, t: Team, window: str, now: float) -> None:
    got = await store.reserve(t, 1, 0.0, now)
    assert isinstance(got, Rejection) and got.window == window, got


async def test_settle_counts_the_requests_it_is_told(store: BudgetStore) -> None:
    r = await store.reserve(RATED, 10, 0.0, NOW)
    assert isinstance(r, Reservation)
    await store.settle(r, 0, 0.0, NOW, requests=0)  # admitted, yet no upstream call was made
    minute, _ = await store.windows(RATED, NOW)
    assert (minute.used, minute.reserved) == (0, 0)
    r = await store.reserve(RATED, 10, 0.0, NOW)
    assert isinstance(r, Reservation)
    await store.settle(r, 0, 0.0, NOW, requests=2)
    minute, _ = await store.windows(RATED, NOW)
    assert (minute.used, minute.reserved) == (2, 0)


async def test_restore_seeds_requests_windows_from_the_ledger(store: BudgetStore) -> None:
    start = window_bounds("minute", NOW)[0]
    await store.restore([RATED], {start: {"t": Charge(100, 0.5, requests=2)}}, NOW)
    minute, hour = await store.windows(RATED, NOW)
    assert (minute.used, hour.used) == (2, 0)
    assert isinstance(await store.reserve(RATED, 1, 0.0, NOW), Reservation)
    await refused_by(store, RATED, "minute:requests", NOW)


async def test_a_usd_window_keeps_sums_of_small_costs_exact(store: BudgetStore) -> None:
    dollar = team(BudgetRule(per="day", usd=1.0))
    for _ in range(1000):
        r = await store.reserve(dollar, 1, 0.000_001, NOW)  # 10 tokens at 0.10 per million
        assert isinstance(r, Reservation)
        await store.settle(r, 1, 0.000_001, NOW)
    (day,) = await store.windows(dollar, NOW)
    assert day.used == pytest.approx(0.001, abs=1e-12) and day.reserved == pytest.approx(0)


async def test_the_store_answers(store: BudgetStore) -> None:
    assert await store.reachable()
