"""The ledger contract (LedgerWriter and ReportReader in gateway/ledger/records.py), held
against every implementation."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Protocol

import pytest
from servers import postgres_database

from contract.ledger_samples import (
    DAY1,
    DAY2,
    DAY3,
    assert_rows_equal,
    expected_report,
    mixed_records,
    record,
    wait_until,
)
from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.records import Ledger
from gateway.ledger.sqlite import SqliteLedger

# A ledger over one storage, not yet started, flushing every `flush_interval` seconds. A
# factory takes the test's tmp_path, makes a fresh, empty storage and yields one of these:
# the tests open several ledgers over it, one after another or at once, as processes do.
NewLedger = Callable[[float], Ledger]


@asynccontextmanager
async def sqlite_storage(tmp_path: Path) -> AsyncIterator[NewLedger]:
    path = tmp_path / "ledger.sqlite3"
    yield lambda flush_interval: SqliteLedger(path, flush_interval)


@asynccontextmanager
async def postgres_storage(tmp_path: Path) -> AsyncIterator[NewLedger]:
    async with postgres_database() as url:
        yield lambda flush_interval: PostgresLedger(url, tmp_path / "state", flush_interval)


# the one place an implementation joins this suite (see tests/contract/__init__.py)
IMPLEMENTATIONS = [
    pytest.param(sqlite_storage, id="sqlite"),
    pytest.param(postgres_storage, id="postgres", marks=pytest.mark.postgres),
]


class OpenLedger(Protocol):
    def __call__(self, flush_interval: float = 60.0) -> Awaitable[Ledger]:
        """A started ledger over the test's storage, closed at the end of the test. The
        default interval is longer than any test: only flush, close and reads write."""
        ...


# named apart from their fixtures, so that other suites over the same ledgers import them
@pytest.fixture(name="open_ledger", params=IMPLEMENTATIONS)
async def open_ledger_fixture(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[OpenLedger]:
    storage: Callable[[Path], AbstractAsyncContextManager[NewLedger]] = request.param
    async with storage(tmp_path) as new, AsyncExitStack() as opened:

        async def open_(flush_interval: float = 60.0) -> Ledger:
            ledger = new(flush_interval)
            opened.push_async_callback(ledger.close)  # idempotent: a test may close it first
            await ledger.start()
            return ledger

        yield open_


@pytest.fixture(name="ledger")
async def ledger_fixture(open_ledger: OpenLedger) -> Ledger:
    return await open_ledger()


@pytest.mark.parametrize(
    "by",
    [
        (),
        ("team",),
        ("model",),
        ("day",),
        ("team", "model"),
        ("model", "team"),
        ("day", "team"),
        ("team", "model", "day"),
        ("user",),
        ("tag:env",),
        ("tag:feature", "tag:env"),
        ("team", "user"),
        ("user", "tag:env", "model", "day"),
        ("tag:absent",),
    ],
)
async def test_report_groups_by_each_key_and_combination(
    ledger: Ledger, by: tuple[str, ...]
) -> None:
    records = mixed_records()
    for r in records:
        ledger.append(r)
    rows = await ledger.report(None, None, by)

    assert_rows_equal(rows, expected_report(records, by))
    assert sum(row.requests for row in rows) == len(records)
    for row in rows:
        for key in ("team", "model", "day"):
            assert (getattr(row, key) != "") == (key in by)
        assert [k for k, _ in row.tags] == [k[4:] for k in by if k.startswith("tag:")]


async def test_report_by_user_and_tag_literal(ledger: Ledger) -> None:
    for r in mixed_records():
        ledger.append(r)
    by_user = await ledger.report(None, None, ["user"])
    by_env = await ledger.report(None, None, ["tag:env", "team"])

    assert [(r.user, r.requests) for r in by_user] == [("", 3), ("alice", 2), ("bob", 1)]
    assert [(r.group("tag:env"), r.team, r.requests) for r in by_env] == [
        ("", "ads", 2),
        ("", "search", 1),
        ("dev", "search", 1),
        ("prod", "ads", 1),
        ("prod", "search", 1),
    ]


async def test_tag_values_group_exactly_whatever_their_text(ledger: Ledger) -> None:
    odd = ["'; DROP TABLE ledger; --", 'quo"te', "back\\slash", "Zoë 🙂", "%_", "a,b"]
    for n, value in enumerate(odd):
        ledger.append(record(n, tags=json.dumps({"k": value}, separators=(",", ":"))))
    rows = await ledger.report(None, None, ["tag:k"])
    assert [(r.group("tag:k"), r.requests) for r in rows] == sorted((v, 1) for v in odd)


async def test_report_by_team_and_day_literal(ledger: Ledger) -> None:
    for r in mixed_records():
        ledger.append(r)
    rows = await ledger.report(None, None, ["team", "day"])

    summary = [(r.team, r.day, r.requests, r.saved_tokens, r.estimated_requests) for r in rows]
    assert summary == [
        ("ads", "2025-03-02", 2, 155, 1),
        ("ads", "2025-03-03", 1, 0, 0),
        ("search", "2025-03-01", 2, 0, 0),
        ("search", "2025-03-02", 1, 0, 1),
    ]
    assert rows[0].input_tokens == 102
    assert math.isclose(rows[1].cost_usd, 0.25)


async def test_report_time_range_is_half_open(ledger: Ledger) -> None:
    records = mixed_records()
    for r in records:
        ledger.append(r)

    since_day2 = await ledger.report(DAY2, None, ())
    until_day2 = await ledger.report(None, DAY2, ())
    only_day2 = await ledger.report(DAY2, DAY3, ("day",))

    assert_rows_equal(since_day2, expected_report([r for r in records if r.ts >= DAY2], ()))
    assert_rows_equal(until_day2, expected_report([r for r in records if r.ts < DAY2], ()))
    assert [(r.day, r.requests) for r in only_day2] == [("2025-03-02", 3)]
    assert await ledger.report(DAY3 + 10, None, ()) == []
    assert await ledger.report(DAY3 + 10, None, ("team",)) == []


async def test_an_empty_ledger_reports_no_rows(ledger: Ledger) -> None:
    assert await ledger.report(None, None, ()) == []
    assert await ledger.report(None, None, ("team", "day")) == []
    assert await ledger.charged_since(0) == {}


async def test_report_rejects_unknown_group_keys(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="unknown group key 'key_id'"):
        await ledger.report(None, None, ("team", "key_id"))
    for bad in ("ts; DROP TABLE ledger", "tag:", "tag:Env", "tag:a') --", 'tag:a"', "tag:x y"):
        with pytest.raises(ValueError):
            await ledger.report(None, None, (bad,))
    with pytest.raises(ValueError, match="at most 10"):
        await ledger.report(None, None, [f"tag:k{i}" for i in range(11)])


async def test_charged_since_sums_per_team_including_queued_records(ledger: Ledger) -> None:
    records = mixed_records()
    for r in records:
        ledger.append(r)
    assert ledger.pending == len(records)  # nothing written yet: reads must see them anyway

    charges = await ledger.charged_since(DAY2)
    everything = await ledger.charged_since(0)
    nothing = await ledger.charged_since(DAY3 + 10)

    assert {team: c.tokens for team, c in charges.items()} == {
        "ads": 152 + 0 + 155,
        "search": 154,
    }
    assert math.isclose(charges["ads"].usd, 0.000125 + 0.0 + 0.25)
    assert math.isclose(charges["search"].usd, 0.000125)
    assert everything["search"].tokens == 150 + 151 + 154
    assert nothing == {}


async def test_charged_since_counts_requests_that_called_an_upstream_for_a_model(
    ledger: Ledger,
) -> None:
    ledger.append(record(0, attempts=1))
    ledger.append(record(1, attempts=3, status=502))  # failed after retries: still a request
    ledger.append(record(2, attempts=0, cache="hit"))  # answered from the cache
    ledger.append(record(3, attempts=1, model=""))  # no model named
    ledger.append(record(4, attempts=2, team="ads"))
    ledger.append(record(5, attempts=0, team="ads", status=429))  # refused before any call
    ledger.append(record(6, attempts=1, ts=DAY1 - 1))  # before `since`

    charges = await ledger.charged_since(DAY1)

    assert {team: c.requests for team, c in charges.items()} == {"search": 2, "ads": 1}
    assert (await ledger.charged_since(DAY1 - 1))["search"].requests == 3
    assert charges["search"].tokens == 150 + 151 + 152 + 153


async def test_owner_is_the_team_and_upstream_that_created_a_response(ledger: Ledger) -> None:
    base = record(1, team="a", upstream="up1")
    ledger.append(dataclasses.replace(base, response_id="resp_1"))
    ledger.append(dataclasses.replace(base, team="b", response_id="resp_1"))  # a later GET
    ledger.append(dataclasses.replace(base, team="b", upstream="up2", response_id="resp_2"))
    ledger.append(record(2))  # creates no response
    assert await ledger.owner("resp_1") == ("a", "up1")
    assert await ledger.owner("resp_2") == ("b", "up2")
    assert await ledger.owner("resp_3") is None
    assert await ledger.owner("") is None


async def test_append_returns_at_once_and_flush_writes(
    ledger: Ledger, open_ledger: OpenLedger
) -> None:
    assert not inspect.iscoroutinefunction(ledger.append)
    assert ledger.append(record(0)) is None  # not a coroutine someone forgot to await
    flush = asyncio.ensure_future(ledger.flush())
    await asyncio.sleep(0)
    for n in range(1, 200):  # while a write is under way
        assert ledger.append(record(n)) is None
    await flush
    await ledger.flush()
    assert ledger.pending == 0
    other = await open_ledger()  # another process over the same storage
    assert [r.requests for r in await other.report(None, None, ())] == [200]


async def test_records_are_written_without_an_explicit_flush(open_ledger: OpenLedger) -> None:
    writer = await open_ledger(flush_interval=0.05)
    reader = await open_ledger()
    for n in range(20):
        writer.append(record(n))

    for _ in range(500):  # 10 s at most
        rows = await reader.report(None, None, ())
        if rows:
            break
        await asyncio.sleep(0.02)
    assert [r.requests for r in rows] == [20]
    assert await wait_until(lambda: writer.pending == 0)


async def test_close_writes_everything_and_a_reopened_ledger_sees_it(
    open_ledger: OpenLedger,
) -> None:
    ledger = await open_ledger()
    for n in range(1000):
        ledger.append(record(n))
    await ledger.close()
    await ledger.close()  # a second close does nothing
    with pytest.raises(RuntimeError, match="closed"):
        ledger.append(record(1000))

    reopened = await open_ledger()
    rows = await reopened.report(None, None, ())
    assert [r.requests for r in rows] == [1000]
    assert (await reopened.charged_since(0))["search"].tokens == sum(150 + n for n in range(1000))
    reopened.append(record(1000))
    await reopened.close()
    again = await open_ledger()
    assert [r.requests for r in await again.report(None, None, ())] == [1001]
