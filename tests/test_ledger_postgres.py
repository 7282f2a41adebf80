"""PostgresLedger: schema, replicas, outages and spill files, against the real server.

What every ledger does (reports, reads, close and reopen) is in tests/contract. Outages are a
TCP forwarder in front of the server (tests/forwarder.py) that the test stops and starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from contract.ledger_samples import record, wait_until
from forwarder import Forwarder
from servers import postgres_database

from gateway.ledger import queries
from gateway.ledger.columns import NAMES
from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.queries import quote
from gateway.ledger.records import LedgerRecord
from gateway.ledger.spill import PATTERN, Batch, SpillFile, new_batch

pytestmark = pytest.mark.postgres


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with postgres_database() as made:
        yield made


@pytest.fixture
async def forwarder() -> AsyncIterator[Forwarder]:
    fwd = Forwarder()
    await fwd.start()
    yield fwd
    if fwd.running:
        await fwd.stop()


async def stored(url: str, sql: str = "SELECT request_id FROM ledger ORDER BY id") -> list[object]:
    """What the database holds, read past the ledger under test."""
    conn = await asyncpg.connect(url)
    try:
        return [row[0] if len(row) == 1 else tuple(row) for row in await conn.fetch(sql)]
    finally:
        await conn.close()


def spill_files(folder: Path) -> list[Path]:
    return list(folder.glob(PATTERN))


def spill_lines(folder: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in folder.glob(PATTERN))


async def test_schema_has_a_column_per_field_the_indexes_and_batch_ids(
    url: str, tmp_path: Path
) -> None:
    ledger = PostgresLedger(url, tmp_path)
    await ledger.start()
    await ledger.close()

    columns = await stored(
        url,
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_name = 'ledger' ORDER BY ordinal_position",
    )
    indexes = await stored(url, "SELECT indexdef FROM pg_indexes WHERE tablename = 'ledger'")
    assert [c[0] for c in columns] == ["id", *NAMES]  # type: ignore[index]
    types = dict(columns)  # type: ignore[arg-type]
    assert types["ts"] == "double precision" and types["stream"] == "boolean"
    assert types["input_tokens"] == "bigint" and types["team"] == "text"
    assert any("(ts, id)" in str(i) for i in indexes)
    for column in ("team", '"user"', "model"):
        assert any(f"({column}, ts, id)" in str(i) for i in indexes), column
    assert not any(str(i).endswith("(ts)") or "(team, ts)" in str(i) for i in indexes)
    assert any("(response_id)" in str(i) and "WHERE" in str(i) for i in indexes)
    assert await stored(url, "SELECT count(*) FROM ledger_batches") == [0]


async def test_every_field_is_stored_and_awkward_text_is_made_storable(
    url: str, tmp_path: Path
) -> None:
    plain = record(
        0, ttft_ms=None, stream=True, estimated=True, attempts=2, user="u-1", tags='{"env":"prod"}'
    )
    awkward = record(
        1, team="o'brien\"; DROP TABLE ledger; --", model="nul\x00model", key_id="k\ud800"
    )
    ledger = PostgresLedger(url, tmp_path)
    await ledger.start()
    ledger.append(plain)
    ledger.append(awkward)
    await ledger.flush()
    await ledger.close()

    # quoted: bare, `user` is PostgreSQL's session role
    rows = await stored(url, f"SELECT {', '.join(map(quote, NAMES))} FROM ledger ORDER BY id")
    got = [LedgerRecord(*row) for row in rows]  # type: ignore[misc]
    assert got[0] == plain
    assert got[1] == dataclasses.replace(awkward, model="nul\ufffdmodel", key_id="k\ufffd")


async def test_replicas_starting_at_once_create_one_table_and_see_each_others_records(
    url: str, tmp_path: Path
) -> None:
    ledgers = [PostgresLedger(url, tmp_path / str(i)) for i in range(6)]
    try:
        await asyncio.gather(*(ledger.start() for ledger in ledgers))
        for i, ledger in enumerate(ledgers):
            for n in range(10):
                ledger.append(record(n, request_id=f"r{i}-{n}", team=f"team{i % 2}"))
        await asyncio.gather(*(ledger.flush() for ledger in ledgers[1:]))
        # ledgers[0] has not flushed: its own reads still see its queued records
        rows = await ledgers[0].report(None, None, ["team"])
        assert [(r.team, r.requests) for r in rows] == [("team0", 30), ("team1", 30)]
        assert (await ledgers[1].charged_since(0))["team0"].tokens == 3 * sum(
            150 + n for n in range(10)
        )
    finally:
        for ledger in ledgers:
            await ledger.close()
    assert len(set(await stored(url))) == 60


async def test_an_older_table_gains_the_columns_it_lacks(url: str, tmp_path: Path) -> None:
    conn = await asyncpg.connect(url)
    try:  # the table as an earlier version made it
        await conn.execute(queries.create_table("postgres"))
        await conn.execute(
            "ALTER TABLE ledger DROP COLUMN response_id, DROP COLUMN attempts,"
            " DROP COLUMN transport"
        )
        await conn.execute(
            "INSERT INTO ledger (ts, request_id, team, key_id, model, upstream, route, status,"
            " stream, cache, input_tokens, cached_tokens, output_tokens, reasoning_tokens,"
            " charged_tokens, cost_usd, estimated, duration_ms, ttft_ms, saved_tokens)"
            " VALUES (1, 'old', 'search', 'k', 'm', 'u', '/v1/responses', 200, false, '', 1, 0,"
            " 1, 0, 2, 0.5, false, 1, NULL, 0)"
        )
    finally:
        await conn.close()
    ledger = PostgresLedger(url, tmp_path)
    await ledger.start()
    try:
        ledger.append(record(5, response_id="resp_new", attempts=1))
        assert await ledger.owner("resp_new") == ("search", "neosantara")
        charges = await ledger.charged_since(0)
        assert (charges["search"].tokens, charges["search"].requests) == (2 + 155, 1)
    finally:
        await ledger.close()
    assert await stored(url, "SELECT transport FROM ledger ORDER BY id") == ["http", "http"]


async def test_an_outage_spills_and_every_record_lands_once_when_it_ends(
    url: str, tmp_path: Path, forwarder: Forwarder
) -> None:
    ledger = PostgresLedger(forwarder.url(url), tmp_path, 0.05, max_batch=4, memory_limit=10)
    await ledger.start()
    try:
        ledger.append(record(0))
        await ledger.flush()
        await forwarder.stop()

        for n in range(1, 26):
            ledger.append(record(n))
        assert ledger.pending == 25
        # past memory_limit the records move to the spill file, and still count as pending
        assert await wait_until(lambda: spill_lines(tmp_path) >= 10)
        assert ledger.pending == 25
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            await ledger.flush()
        assert ledger.pending == 25

        await forwarder.start()
        assert await wait_until(lambda: ledger.pending == 0)
        assert spill_lines(tmp_path) == 0
        assert spill_files(tmp_path) == []
    finally:
        await ledger.close()
    assert await stored(url) == [f"req-{n}" for n in range(26)]  # once each, in order


async def test_after_a_failed_flush_it_tries_again_within_five_seconds(
    url: str, tmp_path: Path, forwarder: Forwarder
) -> None:
    ledger = PostgresLedger(forwarder.url(url), tmp_path, 60.0, memory_limit=1)
    await ledger.start()
    try:
        await forwarder.stop()
        ledger.append(record(0))
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            await ledger.flush()
        assert await wait_until(lambda: spill_lines(tmp_path) == 1, within=7)
        await forwarder.start()
        # no flush and a 60 s interval: only the retry of an outage writes it
        assert await wait_until(lambda: ledger.pending == 0, within=7)
        assert await stored(url) == ["req-0"]
    finally:
        await ledger.close()


async def test_a_graceful_stop_during_an_outage_keeps_every_record_for_the_next_start(
    url: str, tmp_path: Path, forwarder: Forwarder, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = PostgresLedger(forwarder.url(url), tmp_path, 60.0)
    await ledger.start()
    await forwarder.stop()
    records = [record(n) for n in range(7)]
    records.append(record(7, model="a\x00b", team="it's"))
    for r in records:
        ledger.append(r)
    with caplog.at_level(logging.WARNING, logger="gateway.ledger"):
        await ledger.close()
    assert spill_lines(tmp_path) == 8
    assert "8 records kept in" in caplog.text and "written at the next start" in caplog.text
    assert await stored(url) == []

    again = PostgresLedger(url, tmp_path)
    await again.start()  # takes the spill file over and writes it before anything else
    try:
        assert again.pending == 0
        assert spill_files(tmp_path) == []
    finally:
        await again.close()
    assert await stored(url) == [f"req-{n}" for n in range(8)]
    assert await stored(url, "SELECT model FROM ledger WHERE team = 'it''s'") == ["a\ufffdb"]


def orphan(folder: Path, records: list[LedgerRecord], batch: int) -> Path:
    """A spill file left by a stopped process."""
    spill = SpillFile.create(folder)
    spill.append([new_batch(records[i : i + batch]) for i in range(0, len(records), batch)])
    spill.close()
    return spill.path


async def test_a_crash_between_writing_a_spill_file_and_removing_it_writes_nothing_twice(
    url: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    path = orphan(state, [record(n) for n in range(9)], batch=4)
    kept = tmp_path / "copy.jsonl"
    shutil.copy(path, kept)

    first = PostgresLedger(url, state)
    await first.start()
    await first.close()
    assert not path.exists()
    shutil.copy(kept, path)  # as if the process died before the removal

    second = PostgresLedger(url, state)
    await second.start()
    try:
        assert second.pending == 0
        assert not path.exists()
    finally:
        await second.close()
    assert await stored(url) == [f"req-{n}" for n in range(9)]


async def test_a_torn_or_damaged_spill_line_is_skipped_and_logged(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = orphan(tmp_path, [record(0), record(1)], batch=1)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"not json\n" + lines[1] + lines[1][:40])  # a crash mid-write

    ledger = PostgresLedger(url, tmp_path)
    with caplog.at_level(logging.WARNING, logger="gateway.ledger"):
        await ledger.start()
    await ledger.close()
    assert await stored(url) == ["req-0", "req-1"]
    assert "line 2 is not a whole record" in caplog.text
    assert "line 4 is not a whole record" in caplog.text


async def test_a_spill_file_held_by_a_running_process_is_left_to_it(
    url: str, tmp_path: Path
) -> None:
    live = SpillFile.create(tmp_path)
    live.append([new_batch([record(0)])])
    ledger = PostgresLedger(url, tmp_path)
    await ledger.start()
    try:
        assert ledger.pending == 0
        assert live.path.exists()
        assert await stored(url) == []
    finally:
        await ledger.close()
    live.close()  # that process stops: the next start takes the file over
    again = PostgresLedger(url, tmp_path)
    await again.start()
    await again.close()
    assert await stored(url) == ["req-0"]
    assert not live.path.exists()


async def test_a_spill_write_that_fails_leaves_the_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spill = SpillFile.create(tmp_path)
    spill.append([new_batch([record(0)])])
    size = spill.path.stat().st_size
    real_write = __import__("os").write

    def half(fd: int, data: bytes) -> int:  # a disk that fills up mid-write
        return int(real_write(fd, data[: len(data) // 2]))

    monkeypatch.setattr("gateway.ledger.spill.os.write", half)
    with pytest.raises(OSError, match="short write"):
        spill.append([new_batch([record(1), record(2)])])
    assert spill.path.stat().st_size == size
    monkeypatch.undo()
    spill.append([new_batch([record(3)])])
    spill.close()
    from gateway.ledger.spill import read_batches

    assert [r.request_id for b in read_batches(spill.path) for r in b.records] == [
        "req-0",
        "req-3",
    ]


async def test_start_fails_clearly_when_the_database_is_unreachable(tmp_path: Path) -> None:
    ledger = PostgresLedger("postgresql://postgres@127.0.0.1:9/test", tmp_path, connect_timeout=2)
    with pytest.raises(OSError):
        await ledger.start()
    await ledger.close()  # nothing appended: nothing to keep
    assert spill_files(tmp_path) == []


async def test_a_full_disk_during_an_outage_keeps_the_records_in_memory(
    url: str,
    tmp_path: Path,
    forwarder: Forwarder,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def full(self: SpillFile, batches: object) -> None:
        raise OSError(28, "No space left on device")

    ledger = PostgresLedger(forwarder.url(url), tmp_path, 0.05, memory_limit=2)
    await ledger.start()
    try:
        await forwarder.stop()
        monkeypatch.setattr(SpillFile, "append", full)
        with caplog.at_level(logging.ERROR, logger="gateway.ledger"):
            for n in range(5):
                ledger.append(record(n))
            assert await wait_until(lambda: "spill file not writable" in caplog.text)
        assert ledger.pending == 5 and spill_lines(tmp_path) == 0
        monkeypatch.undo()
        await forwarder.start()
        assert await wait_until(lambda: ledger.pending == 0)
    finally:
        await ledger.close()
    assert await stored(url) == [f"req-{n}" for n in range(5)]


class LostAnswer(PostgresLedger):
    """Its first batch commits, then the connection drops before the answer arrives."""

    lost = False

    async def _write_batch(self, batch: Batch) -> None:
        await super()._write_batch(batch)
        if not self.lost:
            self.lost = True
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle")


async def test_a_batch_whose_commit_answer_was_lost_is_not_written_twice(
    url: str, tmp_path: Path
) -> None:
    ledger = LostAnswer(url, tmp_path, 60.0)
    await ledger.start()
    try:
        for n in range(3):
            ledger.append(record(n))
        with pytest.raises(asyncpg.ConnectionDoesNotExistError):
            await ledger.flush()
        assert ledger.pending == 3  # as far as it knows, nothing was written
        ledger.append(record(3))
        await ledger.flush()  # the same batch again, under its id; then the new one
        assert ledger.pending == 0
    finally:
        await ledger.close()
    assert await stored(url) == [f"req-{n}" for n in range(4)]
    assert await stored(url, "SELECT count(*) FROM ledger_batches") == [2]
