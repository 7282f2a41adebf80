"""The local ledger backend: an append-only SQLite table written in batches off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway.ledger import queries
from gateway.ledger.columns import NAMES, Dialect, sqlite_row
from gateway.ledger.records import LedgerRecord
from gateway.ledger.sql_reads import SqlReads

logger = logging.getLogger("gateway.ledger")

_T = TypeVar("_T")

_INSERT = (
    f"INSERT INTO {queries.TABLE} ({', '.join(map(queries.quote, NAMES))})"
    f" VALUES ({', '.join('?' for _ in NAMES)})"
)


class SqliteLedger(SqlReads):
    """Ledger in one SQLite file (WAL, synchronous=NORMAL), for a single host.

    `append` only puts the record in an in-memory buffer. A background task (see `start`)
    commits the buffer every `flush_interval` seconds, or as soon as `max_batch` records
    wait, one transaction per batch of at most `max_batch` records. All SQLite work runs on
    one dedicated thread, so the event loop never waits on the disk.

    Durability bound: a record appended more than `flush_interval` seconds plus the duration
    of one batch write ago is committed. So if the process is killed (kill -9, OOM) it loses
    at most the records of its last `flush_interval` (plus the write in progress); a graceful
    `close()` loses none. Committed data survives a process crash; with synchronous=NORMAL a
    power loss or OS crash may additionally roll back the last commits.

    A failed write keeps its records buffered (in memory, so they accumulate while the disk
    is broken); they are retried at the next flush, and the failure is logged on the
    `gateway.ledger` logger. `append` must be called from the event loop's thread.
    """

    dialect: Dialect = "sqlite"

    def __init__(self, path: Path, flush_interval: float = 0.5, max_batch: int = 500) -> None:
        if flush_interval <= 0:
            raise ValueError("flush_interval must be positive")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._path = path
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        # Records not yet committed, oldest first. Only `_write_pending` removes from the front
        # (after a commit), `append` only adds at the end, so a batch can stay in the buffer
        # while it is being written and nothing is lost if the write fails.
        self._buffer: list[LedgerRecord] = []
        self._appended = 0  # records ever appended
        self._committed = 0  # records ever committed
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        self._conn: sqlite3.Connection | None = None  # used on the executor's thread only
        self._write_lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._executor_down = False

    @property
    def pending(self) -> int:
        """Records appended but not yet committed."""
        return self._appended - self._committed

    async def start(self) -> None:
        """Open (or create) the database and start the background flusher."""
        if self._closed:
            raise RuntimeError("ledger is closed")
        if self._task is not None:
            return
        await self._run(self._connection)
        self._task = asyncio.get_running_loop().create_task(
            self._flush_periodically(), name="ledger-sqlite-flusher"
        )

    def append(self, record: LedgerRecord) -> None:
        """Buffer one record; it is committed within the bound in the class docstring."""
        if self._closed:
            raise RuntimeError("ledger is closed")
        self._buffer.append(record)
        self._appended += 1
        if self.pending >= self._max_batch:
            self._wakeup.set()

    async def flush(self) -> None:
        """Commit every record appended so far; raises if a write fails (records stay buffered)."""
        await self._write_pending(self._appended)

    async def close(self) -> None:
        """Flush, stop the flusher and release the database. `append` raises afterwards."""
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        try:
            if self._task is not None:
                await self._task
            await self._write_pending(self._appended)
        except Exception:
            logger.exception("ledger closed with %d records not written", self.pending)
            raise
        finally:
            try:
                await self._run(self._close_connection)
            finally:
                self._executor_down = True
                self._executor.shutdown(wait=True)

    async def _read(self, query: queries.Query) -> list[tuple[Any, ...]]:
        await self.flush()
        return await self._run(self._query, query.sql, query.params)

    async def _flush_periodically(self) -> None:
        loop = asyncio.get_running_loop()
        # Ticks are spaced from the start of each write, not its end, so a record waits at
        # most one interval for its write to begin.
        next_tick = loop.time() + self._flush_interval
        while not self._closed:
            try:
                async with asyncio.timeout_at(next_tick):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            if self._closed:
                return
            self._wakeup.clear()
            next_tick = loop.time() + self._flush_interval
            try:
                await self._write_pending(self._appended)
            except Exception:
                # The records stay buffered. Wait for the next tick even if a full batch
                # keeps signalling, so a broken disk is not retried in a tight loop.
                logger.exception(
                    "ledger write failed; %d records kept for retry in %.2fs",
                    self.pending,
                    max(0.0, next_tick - loop.time()),
                )
                await asyncio.sleep(max(0.0, next_tick - loop.time()))

    async def _write_pending(self, target: int) -> None:
        """Commit buffered records, one batch per transaction, until `target` are committed."""
        async with self._write_lock:
            while self._committed < target and self._buffer:
                batch = self._buffer[: self._max_batch]
                write = asyncio.get_running_loop().run_in_executor(
                    self._executor, self._insert, batch
                )
                try:
                    await asyncio.shield(write)
                except asyncio.CancelledError:
                    # The thread finishes the write anyway: account for its outcome so the
                    # batch is neither written twice nor dropped.
                    await asyncio.wait([write])
                    if write.exception() is None:
                        self._mark_committed(len(batch))
                    raise
                self._mark_committed(len(batch))

    def _mark_committed(self, count: int) -> None:
        del self._buffer[:count]
        self._committed += count

    async def _run(self, func: Callable[..., _T], *args: object) -> _T:
        if self._executor_down:
            raise RuntimeError("ledger is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    # Everything below runs on the executor's single thread.

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: `_insert` opens its transactions explicitly.
            conn = sqlite3.connect(self._path, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(queries.create_table("sqlite"))
                have = [row[1] for row in conn.execute("PRAGMA table_info(ledger)")]
                for statement in [*queries.add_columns("sqlite", have), *queries.INDEXES]:
                    conn.execute(statement)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _insert(self, batch: list[LedgerRecord]) -> None:
        self._write_rows(self._connection(), [sqlite_row(record) for record in batch])

    def _write_rows(self, conn: sqlite3.Connection, rows: list[tuple[object, ...]]) -> None:
        """Insert `rows` in one transaction (a seam: tests override it to inject failures)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                # Keep the original error; a failed rollback leaves nothing committed either.
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def _query(self, sql: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
        # Any: SQLite columns are dynamically typed; callers convert each value explicitly.
        rows: list[tuple[Any, ...]] = self._connection().execute(sql, params).fetchall()
        return rows

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
