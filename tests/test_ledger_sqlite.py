"""SqliteLedger: schema, batching, durability across kill -9, retries, migration.

What every ledger does (reports, reads, close and reopen) is in tests/contract."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from contract.ledger_samples import record, wait_until

from gateway.ledger.records import LedgerRecord
from gateway.ledger.sqlite import SqliteLedger

REPO_ROOT = Path(__file__).resolve().parents[1]


def disk_request_ids(path: Path) -> list[str]:
    """What another process would see on disk, bypassing the ledger under test."""
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT request_id FROM ledger ORDER BY id")]
    finally:
        conn.close()


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
    assert ["ts", "id"] in indexes.values()
    for column in ("team", "user", "model"):
        assert [column, "ts", "id"] in indexes.values()
    assert ["request_id"] in indexes.values()
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


async def test_close_writes_a_buffer_of_many_batches_in_order(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = SqliteLedger(path, flush_interval=60, max_batch=7)
    await ledger.start()
    for n in range(100):
        ledger.append(record(n))
    await ledger.close()
    assert disk_request_ids(path) == [f"req-{n}" for n in range(100)]


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


async def test_an_older_database_gains_the_response_column(tmp_path: Path) -> None:
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
        ledger.append(dataclasses.replace(record(1, team="a", upstream="up1"), response_id="r1"))
        assert await ledger.owner("r1") == ("a", "up1")
    finally:
        await ledger.close()
