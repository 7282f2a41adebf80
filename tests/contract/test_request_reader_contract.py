"""The RequestReader contract (gateway/ledger/records.py), held against every ledger: filters,
newest-first order, pages that neither miss nor repeat a record while new ones arrive."""

from __future__ import annotations

import dataclasses
import json

import pytest

from contract.ledger_samples import DAY1, DAY2, DAY3, mixed_records, record
from contract.test_ledger_contract import ledger_fixture, open_ledger_fixture  # noqa: F401
from gateway.ledger.records import Ledger, LedgerRecord
from gateway.ledger.search import Cursor, RequestFilter, make_filter


def newest_first(records: list[LedgerRecord]) -> list[str]:
    # appended in this order, so write order breaks ties of ts
    order = sorted(enumerate(records), key=lambda p: (p[1].ts, p[0]), reverse=True)
    return [r.request_id for _, r in order]


async def ids(ledger: Ledger, where: RequestFilter, limit: int = 500) -> list[str]:
    page = await ledger.requests(where, limit, None)
    return [f.record.request_id for f in page.found]


@pytest.mark.parametrize(
    ("where", "keep"),
    [
        (RequestFilter(), lambda r: True),
        (RequestFilter(team="ads"), lambda r: r.team == "ads"),
        (RequestFilter(model="nusantara-pro"), lambda r: r.model == "nusantara-pro"),
        (RequestFilter(user="alice"), lambda r: r.user == "alice"),
        (make_filter(status="5xx"), lambda r: 500 <= r.status < 600),
        (make_filter(status="502"), lambda r: r.status == 502),
        (make_filter(status="2xx", team="search"), lambda r: r.status < 300 and r.team == "search"),
        (make_filter(tags=["env:prod"]), lambda r: '"env":"prod"' in r.tags),
        (make_filter(tags=["env:prod", "feature:search"]), lambda r: "feature" in r.tags),
        (make_filter(tags=["env:prod"], user="bob"), lambda r: r.user == "bob"),
        (make_filter(tags=["nope:x"]), lambda r: False),
        (RequestFilter(since=DAY2, until=DAY3), lambda r: DAY2 <= r.ts < DAY3),
        (RequestFilter(team="nobody"), lambda r: False),
    ],
)
async def test_filters_select_exactly_the_matching_records_newest_first(
    ledger: Ledger,
    where: RequestFilter,
    keep: object,
) -> None:
    records = mixed_records()
    for r in records:
        ledger.append(r)  # queued, not yet written: reads see them
    expected = newest_first([r for r in records if keep(r)])  # type: ignore[operator]
    assert await ids(ledger, where) == expected
    page = await ledger.requests(where, 500, None)
    assert page.next_cursor is None
    assert [f.record for f in page.found] == [
        next(r for r in records if r.request_id == i) for i in expected
    ]


async def test_a_tag_filter_matches_values_exactly_whatever_their_text(
    ledger: Ledger,
) -> None:
    odd = ["'; DROP TABLE ledger; --", 'quo"te', "back\\slash", "Zoë 🙂", "%", "_", "a b"]
    for n, value in enumerate(odd):
        ledger.append(record(n, tags=json.dumps({"k": value}, separators=(",", ":"))))
    ledger.append(record(99, tags='{"k2":"%","a.b-c_d":"x"}'))
    assert await ids(ledger, RequestFilter(tags=(("a.b-c_d", "x"),))) == ["req-99"]
    for n, value in enumerate(odd):
        assert await ids(ledger, RequestFilter(tags=(("k", value),))) == [f"req-{n}"]
    assert await ids(ledger, RequestFilter(tags=(("k", "%_"),))) == []
    assert await ids(ledger, RequestFilter(user="' OR 1=1 --")) == []
    assert len(await ids(ledger, RequestFilter())) == len(odd) + 1  # the table is still there


async def test_pages_walk_every_record_once_while_new_ones_arrive(
    ledger: Ledger,
) -> None:
    # ties of ts: order within one instant is write order
    first = [record(n, ts=DAY1 + n // 3) for n in range(23)]
    for r in first:
        ledger.append(r)
    seen: list[str] = []
    cursor: Cursor | None = None
    pages = 0
    while True:
        page = await ledger.requests(RequestFilter(), 5, cursor)
        assert len(page.found) <= 5
        seen += [f.record.request_id for f in page.found]
        pages += 1
        # new requests finish meanwhile: newer than the walk's start, never in it
        ledger.append(record(100 + pages, ts=DAY2 + pages))
        if page.next_cursor is None:
            break
        cursor = Cursor.decode(page.next_cursor)
    assert seen == newest_first(first)
    assert pages == 5
    # a fresh walk sees them
    assert (await ids(ledger, RequestFilter(), 1)) == [f"req-{100 + pages}"]


async def test_a_full_last_page_has_no_cursor_to_an_empty_one(
    ledger: Ledger,
) -> None:
    for n in range(4):
        ledger.append(record(n))
    page = await ledger.requests(RequestFilter(), 4, None)
    assert len(page.found) == 4 and page.next_cursor is None
    page = await ledger.requests(RequestFilter(), 3, None)
    assert page.next_cursor is not None
    rest = await ledger.requests(RequestFilter(), 3, Cursor.decode(page.next_cursor))
    assert [f.record.request_id for f in rest.found] == ["req-0"] and rest.next_cursor is None


async def test_a_forged_cursor_only_says_where_to_resume(ledger: Ledger) -> None:
    for n in range(5):
        ledger.append(record(n))
    far = await ledger.requests(RequestFilter(), 10, Cursor(1e300, 2**63 - 1))
    assert len(far.found) == 5
    past = await ledger.requests(RequestFilter(), 10, Cursor(-1e300, 0))
    assert past.found == []
    middle = await ledger.requests(RequestFilter(), 10, Cursor(DAY1 + 2, 10**9))
    assert [f.record.request_id for f in middle.found] == ["req-2", "req-1", "req-0"]


async def test_one_request_by_id(ledger: Ledger) -> None:
    ledger.append(record(1, request_id="req-a", status=500))
    ledger.append(record(2, request_id="req-a", status=200, user="u"))  # an id sent twice
    ledger.append(record(3, request_id="req-b"))
    found = await ledger.request("req-a")
    assert found is not None and found.record == record(2, request_id="req-a", status=200, user="u")
    assert await ledger.request("req-c") is None
    assert await ledger.request("' OR '1'='1") is None


async def test_every_field_reads_back_as_written(ledger: Ledger) -> None:
    written = dataclasses.replace(
        record(7, ttft_ms=None, stream=True, estimated=True, attempts=2),
        user="Zoë",
        tags='{"env":"prod"}',
        replay_of="req-1",
        transport="websocket",
    )
    ledger.append(written)
    found = await ledger.request("req-7")
    assert found is not None and found.record == written
