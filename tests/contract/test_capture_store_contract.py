"""Every capture store (SQLite in the ledger's file, PostgreSQL in the ledger's database)
passes the same suite: writes, reads by request id, retention, and a second writer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import orjson
import pytest
from servers import postgres_database

from gateway.capture.draft import Row
from gateway.capture.postgres import PostgresCaptures
from gateway.capture.sqlite import SqliteCaptures
from gateway.capture.store import CaptureStore

Opener = Callable[[], CaptureStore]


@asynccontextmanager
async def sqlite_stores(tmp_path: Path) -> AsyncIterator[Opener]:
    yield lambda: SqliteCaptures(tmp_path / "ledger.sqlite3")


@asynccontextmanager
async def postgres_stores(tmp_path: Path) -> AsyncIterator[Opener]:
    async with postgres_database() as url:
        yield lambda: PostgresCaptures(url)


@pytest.fixture(
    params=[
        pytest.param(sqlite_stores, id="sqlite"),
        pytest.param(postgres_stores, id="postgres", marks=pytest.mark.postgres),
    ]
)
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    stores: Callable[[Path], AbstractAsyncContextManager[Opener]] = request.param
    async with stores(tmp_path) as open_:
        yield open_


def row(request_id: str, ts: float, note: str = "") -> Row:
    doc = {"request_id": request_id, "ts": ts, "note": note}
    return request_id, ts, "alpha", "sampled", orjson.dumps(doc).decode()


async def test_a_written_capture_is_read_back_by_request_id(opener: Opener) -> None:
    store = opener()
    await store.start()
    try:
        await store.write([row("req-1", 100.0, "one"), row("req-2", 101.0, "two")])
        assert await store.capture("req-2") == {"request_id": "req-2", "ts": 101.0, "note": "two"}
        assert await store.capture("req-3") is None
    finally:
        await store.close()


async def test_the_newest_capture_of_a_repeated_request_id_is_read(opener: Opener) -> None:
    store = opener()
    await store.start()
    try:
        await store.write([row("req-1", 100.0, "first")])
        await store.write([row("req-1", 200.0, "second")])
        found = await store.capture("req-1")
        assert found is not None and found["note"] == "second"
    finally:
        await store.close()


async def test_captured_says_which_request_ids_have_a_capture(opener: Opener) -> None:
    store = opener()
    await store.start()
    try:
        await store.write([row(f"req-{i}", 100.0 + i) for i in range(0, 1200, 2)])
        asked = [f"req-{i}" for i in range(1200)]  # more than one query's worth of ids
        assert await store.captured(asked) == {f"req-{i}" for i in range(0, 1200, 2)}
        assert await store.captured([]) == frozenset()
    finally:
        await store.close()


async def test_purge_deletes_only_captures_older_than_the_bound(opener: Opener) -> None:
    store = opener()
    await store.start()
    try:
        await store.write([row("old", 100.0), row("edge", 200.0), row("new", 300.0)])
        assert await store.purge(200.0) == 1
        assert await store.capture("old") is None
        assert await store.capture("edge") is not None
        assert await store.capture("new") is not None
    finally:
        await store.close()


async def test_another_store_on_the_same_database_sees_the_captures(opener: Opener) -> None:
    # two replicas (PostgreSQL), or a restart (SQLite): what one wrote, the other reads
    first, second = opener(), opener()
    await first.start()
    await second.start()
    try:
        await first.write([row("req-1", 100.0, "shared")])
        found = await second.capture("req-1")
        assert found is not None and found["note"] == "shared"
    finally:
        await first.close()
        await second.close()
