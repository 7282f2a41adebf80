"""Ledger records to write in tests, and an independent aggregation to check reports by."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime

from gateway.ledger.records import LedgerRecord, ReportRow

DAY1 = datetime(2025, 3, 1, tzinfo=UTC).timestamp()
DAY2 = datetime(2025, 3, 2, tzinfo=UTC).timestamp()
DAY3 = datetime(2025, 3, 3, tzinfo=UTC).timestamp()


def record(n: int, **overrides: object) -> LedgerRecord:
    base = LedgerRecord(
        ts=DAY1 + n,
        request_id=f"req-{n}",
        team="search",
        key_id="k1",
        model="nusantara-base",
        upstream="neosantara",
        route="/v1/responses",
        status=200,
        stream=False,
        cache="miss",
        input_tokens=100 + n,
        cached_tokens=10,
        output_tokens=50,
        reasoning_tokens=5,
        charged_tokens=150 + n,
        cost_usd=0.000125,
        estimated=False,
        duration_ms=12.5,
        ttft_ms=3.0,
        saved_tokens=0,
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def mixed_records() -> list[LedgerRecord]:
    """Two teams, two models, three UTC days, hits, estimates and failures; users and tags on
    some records, none on others."""
    return [
        record(0, ts=DAY1 + 10, user="alice", tags='{"env":"prod","feature":"search"}'),
        record(1, ts=DAY1 + 86399.5, model="nusantara-pro", cost_usd=0.5, tags='{"env":"dev"}'),
        record(
            2,
            ts=DAY2,
            team="ads",
            estimated=True,
            ttft_ms=None,
            stream=True,
            user="bob",
            tags='{"env":"prod"}',
        ),
        record(
            3,
            ts=DAY2 + 3600,
            team="ads",
            cache="hit",
            input_tokens=0,
            cached_tokens=0,
            output_tokens=0,
            reasoning_tokens=0,
            charged_tokens=0,
            cost_usd=0.0,
            saved_tokens=155,
        ),
        record(4, ts=DAY2 + 7200, model="nusantara-pro", status=502, estimated=True, user="alice"),
        record(5, ts=DAY3 + 1, team="ads", model="nusantara-pro", cost_usd=0.25),
    ]


def expected_report(records: Iterable[LedgerRecord], by: Sequence[str]) -> list[ReportRow]:
    """An independent in-Python aggregation to compare the SQL against."""
    groups: dict[tuple[str, ...], list[LedgerRecord]] = {}
    tag_keys = [k.removeprefix("tag:") for k in by if k.startswith("tag:")]
    for r in records:
        day = datetime.fromtimestamp(r.ts, UTC).strftime("%Y-%m-%d")
        values = {"team": r.team, "model": r.model, "day": day, "user": r.user}
        tags = json.loads(r.tags) if r.tags else {}
        key = tuple(values[k] if k in by else "" for k in ("team", "model", "day", "user"))
        key += tuple(tags.get(k, "") for k in tag_keys)
        groups.setdefault(key, []).append(r)
    rows = [
        ReportRow(
            team=key[0],
            model=key[1],
            day=key[2],
            user=key[3],
            tags=tuple(zip(tag_keys, key[4:], strict=True)),
            requests=len(rs),
            input_tokens=sum(r.input_tokens for r in rs),
            cached_tokens=sum(r.cached_tokens for r in rs),
            output_tokens=sum(r.output_tokens for r in rs),
            reasoning_tokens=sum(r.reasoning_tokens for r in rs),
            cost_usd=sum(r.cost_usd for r in rs),
            saved_tokens=sum(r.saved_tokens for r in rs),
            estimated_requests=sum(1 for r in rs if r.estimated),
        )
        for key, rs in groups.items()
    ]
    return sorted(rows, key=lambda row: tuple(row.group(k) for k in by))


def assert_rows_equal(actual: list[ReportRow], expected: list[ReportRow]) -> None:
    assert [dataclasses.replace(r, cost_usd=0.0) for r in actual] == [
        dataclasses.replace(r, cost_usd=0.0) for r in expected
    ]
    for a, e in zip(actual, expected, strict=True):
        assert math.isclose(a.cost_usd, e.cost_usd, rel_tol=1e-12, abs_tol=1e-15)


async def wait_until(condition: Callable[[], bool], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()
