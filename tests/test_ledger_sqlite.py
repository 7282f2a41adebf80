"""SqliteLedger: schema, batching, reports, durability across close and kill -9, retries."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.ledger.records import LedgerRecord, ReportRow
from gateway.ledger.sqlite import SqliteLedger

REPO_ROOT = Path(__file__).resolve().parents[1]
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
    """Two teams, two models, three UTC days, hits, estimates and failures."""
    return [
        record(0, ts=DAY1 + 10),
        record(1, ts=DAY1 + 86399.5, model="nusantara-pro", cost_usd=0.5),
        record(2, ts=DAY2, team="ads", estimated=True, ttft_ms=None, stream=True),
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
        record(4, ts=DAY2 + 7200, model="nusantara-pro", status=502, estimated=True),
        record(5, ts=DAY3 + 1, team="ads", model="nusantara-pro", cost_usd=0.25),
    ]


def expected_report(records: Iterable[LedgerRecord], by: Sequence[str]) -> list[ReportRow]:
    """An independent in-Python aggregation to compare the SQL against."""
    groups: dict[tuple[str, str, str], list[LedgerRecord]] = {}
    for r in records:
        day = datetime.fromtimestamp(r.ts, UTC).strftime("%Y-%m-%d")
        values = {"team": r.team, "model": r.model, "day": day}
        key = tuple(values[k] if k in by else "" for k in ("team", "model", "day"))
        groups.setdefault(key, []).append(r)  # type: ignore[arg-type]
    rows = [
        ReportRow(
            team=team,
            model=model,
            day=day,
            requests=len(rs),
            input_tokens=sum(r.input_tokens for r in rs),
            cached_tokens=sum(r.cached_tokens for r in rs),
            output_tokens=sum(r.output_tokens for r in rs),
            reasoning_tokens=sum(r.reasoning_tokens for r in rs),
            cost_usd=sum(r.cost_usd for r in rs),
            saved_tokens=sum(r.saved_tokens for r in rs),
            estimated_requests=sum(1 for r in rs if r.estimated),
        )
        for (team, model, day), rs in groups.items()
    ]
    return sorted(rows, key=lambda row: tuple(getattr(row, k) for k in by))


def assert_rows_equal(actual: list[ReportRow], expected: list[ReportRow]) -> None:
    assert [dataclasses.replace(r, cost_usd=0.0) for r in actual] == [
        dataclasses.replace(r, cost_usd=0.0) for r in expected
    ]
    for a, e in zip(actual, expected, strict=True):
        assert math.isclose(a.cost_usd, e.cost_usd, rel_tol=1e-12, abs_tol=1e-15)


def disk_request_ids(path: Path) -> list[str]:
    """What another process would see on disk, bypassing the ledger under test."""
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT request_id FROM ledger ORDER BY id")]
    finally:
        conn.close()


async def wait_until(condition: Callable[[], bool], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


async def test_schema_has_one_column_per_record_field_indexes_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "ledger.db"
    ledger = SqliteLedger(path)
    await ledger.start()
    await ledger.close()

    conn = sqlite3.connect(path)
    try:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(ledger)")]
        indexes = {
            row[1]: [col[2] for col in conn.execute(f"PRAGMA index_info({row[1]})")]
            for row in conn.execute("PRAGMA index_list(ledger)")
        }
        journal_mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()
    assert columns == ["id", *(f.name for f in dataclasses.fields(LedgerRecord))]
    assert ["ts"] in indexes.values()
    assert ["team", "ts"] in indexes.values()
    assert journal_mode == "wal"


async def test_every_field_is_stored_as_written(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    records = [record(0), record(1, ttft_ms=None, stream=True, estimated=True, saved_tokens=7)]
    ledger = SqliteLedger(path)
    await ledger.start()
    for r in records:
        ledger.append(r)
    await ledger.flush()

    conn = sqlite3.connect(path)
    try:
        names = [f.name for f in dataclasses.fields(LedgerRecord)]
        rows = conn.execute(f"SELECT {', '.join(names)} FROM ledger ORDER BY id").fetchall()
    finally:
        conn.close()
    await ledger.close()
    # SQLite has no booleans: they come back as 0/1, which compare equal to False/True.
    stored = [dict(zip(names, row, strict=True)) for row in rows]
    assert stored == [dataclasses.asdict(r) for r in records]
    assert [(row["stream"], row["estimated"]) for row in stored] == [(0, 0), (1, 1)]


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
    ],
)
async def test_report_groups_by_each_key_and_combination(
    tmp_path: Path, by: tuple[str, ...]
) -> None:
    records = mixed_records()
    ledger = SqliteLedger(tmp_path / "ledger.db")
    await ledger.start()
    for r in records:
        ledger.append(r)
    rows = await ledger.report(None, None, by)
    await ledger.close()

    assert_rows_equal(rows, expected_report(records, by))
    assert sum(row.requests for row in rows) == len(records)
    for row in rows:
        for key in ("team", "model", "day"):
            assert (getattr(row, key) != "") == (key in by)


async def test_report_by_team_and_day_literal(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.db")
    await ledger.start()
    for r in mixed_records():
        ledger.append(r)
    rows = await ledger.report(None, None, ["team", "day"])
    await ledger.close()

    summary = [(r.team, r.day, r.requests, r.saved_tokens, r.estimated_requests) for r in rows]
    assert summary == [
        ("ads", "2025-03-02", 2, 155, 1),
        ("ads", "2025-03-03", 1, 0, 0),
        ("search", "2025-03-01", 2, 0, 0),
        ("search", "2025-03-02", 1, 0, 1),
    ]
    assert rows[0].input_tokens == 102
    assert math.isclose(rows[1].cost_usd, 0.25)


async def test_report_time_range_is_half_open(tmp_path: Path) -> None:
    records = mixed_records()
    ledger = SqliteLedger(tmp_path / "ledger.db")
    await ledger.start()
    for r in records:
        ledger.append(r)

    since_day2 = await ledger.report(DAY2, None, ())
    until_day2 = await ledger.report(None, DAY2, ())
    only_day2 = await ledger.report(DAY2, DAY3, ("day",))
    empty = await ledger.report(DAY3 + 10, None, ())
    empty_grouped = await ledger.report(DAY3 + 10, None, ("team",))
    await ledger.close()

    assert_rows_equal(since_day2, expected_report([r for r in records if r.ts >= DAY2], ()))
    assert_rows_equal(until_day2, expected_report([r for r in records if r.ts < DAY2], ()))
    assert [(r.day, r.requests) for r in only_day2] == [("2025-03-02", 3)]
    assert empty == []
    assert empty_grouped == []


async def test_report_rejects_unknown_group_keys(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.db")
    await ledger.start()
    try:
        with pytest.raises(ValueError, match="unknown group key 'user'"):
            await ledger.report(None, None, ("team", "user"))
        with pytest.raises(ValueError):
            await ledger.report(None, None, ("ts; DROP TABLE ledger",))
    finally:
        await ledger.close()


async def test_charged_since_sums_per_team_including_buffered_records(tmp_path: Path) -> None:
    records = mixed_records()
    # A long interval keeps the records in the buffer: charged_since must see them anyway.
    ledger = SqliteLedger(tmp_path / "ledger.db", flush_interval=60)
    await ledger.start()
    for r in records:
        ledger.append(r)
    assert ledger.pending == len(records)

    charges = await ledger.charged_since(DAY2)
    everything = await ledger.charged_since(0)
    nothing = await ledger.charged_since(DAY3 + 10)
    await ledger.close()

    assert {team: c.tokens for team, c in charges.items()} == {
        "ads": 152 + 0 + 155,
        "search": 154,
    }
    assert math.isclose(charges["ads"].usd, 0.000125 + 0.0 + 0.25)
    assert math.isclose(charges["search"].usd, 0.000125)
    assert everything["search"].tokens == 150 + 151 + 154
    assert nothing == {}


async def test_close_flushes_everything_and_a_new_ledger_sees_it(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = SqliteLedger(path, flush_interval=60, max_batch=7)
    await ledger.start()
    for n in range(100):
        ledger.append(record(n))
    await ledger.close()
    with pytest.raises(RuntimeError, match="closed"):
        ledger.append(record(100))
    with pytest.raises(RuntimeError, match="closed"):
        await ledger.report(None, None, ())

    reopened = SqliteLedger(path)
    await reopened.start()
    rows = await reopened.report(None, None, ())
    reopened.append(record(100))
    await reopened.close()

    assert [r.requests for r in rows] == [100]
    assert disk_request_ids(path) == [f"req-{n}" for n in range(101)]


async def test_background_flusher_writes_without_explicit_flush(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = SqliteLedger(path, flush_interval=0.05)
    await ledger.start()
    try:
        for n in range(20):
            ledger.append(record(n))
        assert await wait_until(lambda: len(disk_request_ids(path)) == 20)
        assert ledger.pending == 0
    finally:
        await ledger.close()


async def test_a_full_batch_is_written_before_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    # The interval is far longer than the test may take: only max_batch can trigger writes.
    ledger = SqliteLedger(path, flush_interval=3600, max_batch=10)
    await ledger.start()
    try:
        for n in range(25):
            ledger.append(record(n))
        assert await wait_until(lambda: len(disk_request_ids(path)) >= 20)
        assert disk_request_ids(path) == [f"req-{n}" for n in range(len(disk_request_ids(path)))]
    finally:
        await ledger.close()
    assert len(disk_request_ids(path)) == 25


class FlakyLedger(SqliteLedger):
    """Fails its first `failures` batch writes half-way through their transaction."""

    def __init__(self, path: Path, failures: int, flush_interval: float) -> None:
        super().__init__(path, flush_interval=flush_interval)
        self.failures = failures
        self.attempts = 0

    def _write_rows(self, conn: sqlite3.Connection, rows: list[tuple[object, ...]]) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            # A NOT NULL violation on the last row: the earlier rows of the batch are already
            # inserted when it fails, so this also proves the transaction is rolled back.
            super()._write_rows(conn, [*rows[:-1], (None,) * len(rows[-1])])
            raise AssertionError("the broken batch was accepted")
        super()._write_rows(conn, rows)


async def test_failed_flush_raises_keeps_records_and_the_retry_writes_them_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.db"
    ledger = FlakyLedger(path, failures=2, flush_interval=3600)
    await ledger.start()
    for n in range(10):
        ledger.append(record(n))

    for _ in range(2):
        with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
            await ledger.flush()
        assert ledger.pending == 10
        assert disk_request_ids(path) == []

    ledger.append(record(10))
    await ledger.flush()
    assert ledger.pending == 0
    await ledger.close()
    assert disk_request_ids(path) == [f"req-{n}" for n in range(11)]


async def test_background_write_failure_is_logged_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ledger.db"
    ledger = FlakyLedger(path, failures=3, flush_interval=0.05)
    await ledger.start()
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.ledger"):
            for n in range(30):
                ledger.append(record(n))
            assert await wait_until(lambda: len(disk_request_ids(path)) == 30)
    finally:
        await ledger.close()
    assert ledger.attempts >= 4
    failures = [r for r in caplog.records if r.name == "gateway.ledger"]
    assert len(failures) == 3
    assert "kept for retry" in failures[0].getMessage()
    assert disk_request_ids(path) == [f"req-{n}" for n in range(30)]


class SlowLedger(SqliteLedger):
    """Holds each batch write on its thread until the test releases it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, flush_interval=3600)
        self.entered = threading.Event()
        self.release = threading.Event()

    def _write_rows(self, conn: sqlite3.Connection, rows: list[tuple[object, ...]]) -> None:
        self.entered.set()
        self.release.wait(timeout=10)
        super()._write_rows(conn, rows)


async def test_a_cancelled_flush_neither_loses_nor_duplicates_its_batch(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = SlowLedger(path)
    await ledger.start()
    for n in range(5):
        ledger.append(record(n))
    flush = asyncio.get_running_loop().create_task(ledger.flush())
    assert await wait_until(ledger.entered.is_set)
    flush.cancel()
    await asyncio.sleep(0.05)
    ledger.release.set()
    with pytest.raises(asyncio.CancelledError):
        await flush

    await ledger.close()
    assert disk_request_ids(path) == [f"req-{n}" for n in range(5)]


CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from gateway.ledger.records import LedgerRecord
    from gateway.ledger.sqlite import SqliteLedger

    async def main() -> None:
        # max_batch out of reach: only the interval may trigger writes here.
        ledger = SqliteLedger(Path(sys.argv[1]), flush_interval=0.2, max_batch=10**9)
        await ledger.start()
        with open(sys.argv[2], "w") as out:
            n = 0
            while True:
                ledger.append(LedgerRecord(
                    ts=time.time(), request_id=f"req-{n}", team="t", key_id="k", model="m",
                    upstream="u", route="/v1/responses", status=200, stream=False,
                    cache="miss", input_tokens=1, cached_tokens=0, output_tokens=1,
                    reasoning_tokens=0, charged_tokens=2, cost_usd=0.0, estimated=False,
                    duration_ms=1.0, ttft_ms=None,
                ))
                n += 1
                out.write(f"{n} {time.time()}\\n")
                out.flush()
                await asyncio.sleep(0.002)

    asyncio.run(main())
    """
)


def read_progress(path: Path) -> list[tuple[int, float]]:
    """(records appended, wall time) lines the child wrote; a torn last line is skipped."""
    samples = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            samples.append((int(parts[0]), float(parts[1])))
    return samples


def test_kill_9_loses_at_most_the_last_flush_interval(tmp_path: Path) -> None:
    flush_interval, slack = 0.2, 0.3
    db, progress = tmp_path / "ledger.db", tmp_path / "progress.txt"
    progress.touch()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), str(progress)],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        # Let it run for several flush intervals' worth of appends before the kill.
        while time.monotonic() < deadline and child.poll() is None:
            samples = read_progress(progress)
            if samples and samples[-1][1] - samples[0][1] > 6 * flush_interval:
                break
            time.sleep(0.05)
        assert child.poll() is None, child.communicate()[1].decode()
        killed_at = time.time()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL

    samples = read_progress(progress)
    last_appended = samples[-1][0]
    must_be_on_disk = max(
        (n for n, at in samples if at <= killed_at - (flush_interval + slack)), default=0
    )
    on_disk = disk_request_ids(db)

    assert must_be_on_disk > 0
    assert len(on_disk) >= must_be_on_disk
    # The child may have appended one record it had not reported yet when it died.
    assert len(on_disk) <= last_appended + 1
    # Only a tail is lost: what is on disk is exactly the first records, in order.
    assert on_disk == [f"req-{n}" for n in range(len(on_disk))]


async def test_owner_of_a_response_and_migration_of_an_older_database(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(db)
    columns = [f.name for f in dataclasses.fields(LedgerRecord) if f.name != "response_id"]
    conn.execute(
        f"CREATE TABLE ledger (id INTEGER PRIMARY KEY AUTOINCREMENT, {', '.join(columns)})"
    )
    conn.commit()
    conn.close()
    ledger = SqliteLedger(db)
    await ledger.start()
    try:
        base = record(1, team="a", upstream="up1")
        ledger.append(dataclasses.replace(base, response_id="resp_1"))
        ledger.append(dataclasses.replace(base, team="b", response_id="resp_1"))  # a later GET
        ledger.append(dataclasses.replace(base, team="b", upstream="up2", response_id="resp_2"))
        assert await ledger.owner("resp_1") == ("a", "up1")
        assert await ledger.owner("resp_2") == ("b", "up2")
        assert await ledger.owner("resp_3") is None and await ledger.owner("") is None
    finally:
        await ledger.close()
