"""Captures in the ledger's SQLite file: a `captures` table, written on a thread of its own."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from gateway.capture.draft import Row
from gateway.capture.store import TABLE

_T = TypeVar("_T")

_CREATE = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (id INTEGER PRIMARY KEY, request_id TEXT NOT NULL,"
    " ts REAL NOT NULL, team TEXT NOT NULL, reason TEXT NOT NULL, doc TEXT NOT NULL)"
)
_INDEXES = (
    f"CREATE INDEX IF NOT EXISTS {TABLE}_request_id ON {TABLE} (request_id)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_ts ON {TABLE} (ts)",
)
_IDS_PER_QUERY = 500
_INSERT = f"INSERT INTO {TABLE} (request_id, ts, team, reason, doc) VALUES (?, ?, ?, ?, ?)"


class SqliteCaptures:
    """A connection of its own to the ledger's file (WAL lets both write in turn); every call
    runs on one dedicated thread, so the event loop never waits on the disk."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capture-sqlite")
        self._conn: sqlite3.Connection | None = None  # the executor's thread only

    async def start(self) -> None:
        await self._run(self._connection)

    async def close(self) -> None:
        try:
            await self._run(self._close)
        finally:
            self._executor.shutdown(wait=True)

    async def write(self, rows: Sequence[Row]) -> None:
        await self._run(self._insert, list(rows))

    async def purge(self, before: float) -> int:
        return await self._run(self._delete, before)

    async def capture(self, request_id: str) -> dict[str, Any] | None:
        doc = await self._run(self._read, request_id)
        return orjson.loads(doc) if doc is not None else None

    async def captured(self, request_ids: Sequence[str]) -> frozenset[str]:
        return await self._run(self._which, list(request_ids)) if request_ids else frozenset()

    async def _run(self, func: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self._path, isolation_level=None, timeout=10.0)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                for statement in (_CREATE, *_INDEXES):
                    conn.execute(statement)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _insert(self, rows: list[Row]) -> None:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _delete(self, before: float) -> int:
        return self._connection().execute(f"DELETE FROM {TABLE} WHERE ts < ?", (before,)).rowcount

    def _read(self, request_id: str) -> str | None:
        row = (
            self._connection()
            .execute(
                f"SELECT doc FROM {TABLE} WHERE request_id = ? ORDER BY id DESC LIMIT 1",
                (request_id,),
            )
            .fetchone()
        )
        return str(row[0]) if row is not None else None

    def _which(self, request_ids: list[str]) -> frozenset[str]:
        found: set[str] = set()
        conn = self._connection()
        for i in range(0, len(request_ids), _IDS_PER_QUERY):  # SQLite caps bound parameters
            part = request_ids[i : i + _IDS_PER_QUERY]
            marks = ", ".join("?" for _ in part)
            sql = f"SELECT DISTINCT request_id FROM {TABLE} WHERE request_id IN ({marks})"
            found.update(str(r[0]) for r in conn.execute(sql, part))
        return frozenset(found)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
