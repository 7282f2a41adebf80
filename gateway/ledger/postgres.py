"""The shared ledger backend: one PostgreSQL table that every replica appends to in batches."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from gateway.ledger import pg_schema, queries
from gateway.ledger.columns import NAMES, Dialect, postgres_row
from gateway.ledger.records import LedgerRecord
from gateway.ledger.spill import Batch, SpillFile, new_batch, orphans, read_batches
from gateway.ledger.sql_reads import SqlReads

logger = logging.getLogger("gateway.ledger")

_T = TypeVar("_T")

RETRY_INTERVAL = 5.0  # seconds: the longest wait between attempts while the database is down
_MARK_BATCH = (
    f"INSERT INTO {pg_schema.BATCHES} (id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING TRUE"
)


class PostgresLedger(SqlReads):
    """Ledger in a PostgreSQL table shared by every replica, with a spill file for outages.

    `append` only queues the record in memory. A background task writes the queue every
    `flush_interval` seconds (or as soon as `max_batch` records wait), one transaction per
    batch of at most `max_batch` records, with binary COPY. Each batch is written with its id
    into `ledger_batches` in the same transaction, so a batch written twice (its commit
    happened but the answer was lost; a crash between writing a spill file and removing it)
    is recognised and skipped: every record lands exactly once.

    While the database is unreachable (or refuses a write) the records stay queued and the
    task tries again every `flush_interval`, at least every RETRY_INTERVAL seconds. Once more
    than `memory_limit` records wait in memory, they all move to this process's spill file
    under `spill_dir` (fsynced), so memory holds at most `memory_limit` records plus what is
    appended within one retry interval. Spill files are written before the memory queue, oldest
    first, at start and whenever the database answers again; spill files left by stopped
    processes sharing `spill_dir` are taken over then too. A graceful `close` with the
    database down moves every queued record to the spill file; the next start writes them.

    Durability: a kill -9 loses the records still in memory (at most `flush_interval` of
    them while the database answers, at most `memory_limit` plus one retry interval of them
    while it does not); spilled records survive it. Reads flush first: they see every record
    appended here and what other processes wrote, and raise while the database is down.
    """

    dialect: Dialect = "postgres"

    def __init__(
        self,
        url: str,
        spill_dir: Path,
        flush_interval: float = 0.5,
        *,
        max_batch: int = 1000,
        memory_limit: int = 10_000,
        connect_timeout: float = 5.0,
        command_timeout: float = 30.0,
    ) -> None:
        if flush_interval <= 0:
            raise ValueError("flush_interval must be positive")
        if max_batch < 1 or memory_limit < 1:
            raise ValueError("max_batch and memory_limit must be at least 1")
        self._url = url
        self._spill_dir = spill_dir
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._memory_limit = memory_limit
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._queue: deque[LedgerRecord] = deque()  # appended, not yet in a batch; oldest first
        self._inflight: Batch | None = None  # the batch being written: retried under its id
        self._spills: list[SpillFile] = []  # oldest first; `_own` last when it exists
        self._own: SpillFile | None = None
        self._pool: asyncpg.Pool | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-spill")
        self._lock = asyncio.Lock()  # one writer at a time: batches keep their order
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._down_since: float | None = None

    @property
    def pending(self) -> int:
        """Records not yet in the database: queued in memory and in spill files."""
        inflight = len(self._inflight.records) if self._inflight else 0
        return len(self._queue) + inflight + sum(s.count for s in self._spills)

    def _in_memory(self) -> int:
        return len(self._queue) + (len(self._inflight.records) if self._inflight else 0)

    async def start(self) -> None:
        """Connect, create the tables if absent, take over orphan spill files and write them,
        then start the background writer. Raises if the database cannot be reached: budgets
        are rebuilt from the ledger at start, which needs it."""
        if self._closed:
            raise RuntimeError("ledger is closed")
        if self._task is not None:
            return
        self._pool = await asyncpg.create_pool(
            self._url,
            min_size=1,
            max_size=2,
            timeout=self._connect_timeout,
            command_timeout=self._command_timeout,
        )
        try:
            async with self._pool.acquire() as conn:
                await pg_schema.ensure(conn)
        except BaseException:
            pool, self._pool = self._pool, None
            pool.terminate()
            raise
        await self._adopt_orphans()
        with contextlib.suppress(Exception):  # logged; the background task tries again
            await self._write(None)
        self._task = asyncio.get_running_loop().create_task(
            self._write_periodically(), name="ledger-postgres-writer"
        )

    def append(self, record: LedgerRecord) -> None:
        """Queue one record; it is written within the bound in the class docstring."""
        if self._closed:
            raise RuntimeError("ledger is closed")
        self._queue.append(record)
        if len(self._queue) >= self._max_batch:
            self._wakeup.set()

    async def flush(self) -> None:
        """Write spill files and every record appended so far; raises if a write fails (the
        records stay queued, or spilled, for the next attempt)."""
        if self._pool is None:
            raise RuntimeError("ledger is not started")
        await self._write(self._in_memory())

    async def close(self) -> None:
        """Write everything and release the database. With the database unreachable every
        queued record goes to the spill file instead (logged); raises only if that fails too,
        when the records are lost. `append` raises afterwards."""
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        try:
            if self._task is not None:
                await self._task
            try:
                if self._pool is None:
                    raise RuntimeError("ledger was never started")
                await self._write(None)
            except Exception as e:
                await self._spill_memory()
                if self.pending:
                    logger.warning(
                        "ledger database unreachable at stop (%s): %d records kept in %s;"
                        " they are written at the next start",
                        _reason(e),
                        self.pending,
                        ", ".join(str(s.path) for s in self._spills),
                    )
        except Exception:
            logger.exception("ledger stopped with %d records not saved", self._in_memory())
            raise
        finally:
            await self._release()

    async def _read(self, query: queries.Query) -> list[Any]:
        await self.flush()
        assert self._pool is not None  # flush raised otherwise
        async with self._pool.acquire() as conn:
            rows: list[Any] = await conn.fetch(query.sql, *query.params)
        return rows

    async def _write_periodically(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not self._closed:
            down = self._down_since is not None
            interval = min(self._flush_interval, RETRY_INTERVAL) if down else self._flush_interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(last + interval):
                    while True:
                        await self._wakeup.wait()
                        self._wakeup.clear()
                        # while down a full batch does not hasten the retry: only close does
                        if self._closed or not down:
                            break
            if self._closed:
                return
            last = loop.time()
            try:
                if down:
                    await self._adopt_orphans()  # a replica that stopped meanwhile left some
                await self._write(self._in_memory())
            except Exception:
                if self._in_memory() >= self._memory_limit:
                    # logged; the records stay in memory, the writer goes on
                    with contextlib.suppress(Exception):
                        await self._spill_memory()

    async def _write(self, limit: int | None) -> None:
        """Write the spill files, then queued batches until `limit` records (None: all).
        A failure marks the database down (logged once), a success marks it up again."""
        async with self._lock:
            try:
                await self._write_spills()
                await self._write_memory(limit)
            except Exception as e:
                self._went_down(e)
                raise
            self._came_back()

    async def _write_spills(self) -> None:
        """Each spill file, oldest first, batch by batch; removed once all are written."""
        while self._spills:
            spill = self._spills[0]
            batches = await self._io(read_batches, spill.path)
            spill.count = sum(len(b.records) for b in batches)
            for batch in batches:
                await self._write_batch(batch)
                spill.count -= len(batch.records)
            await self._io(spill.remove)
            self._spills.pop(0)
            if spill is self._own:
                self._own = None

    async def _write_memory(self, limit: int | None) -> None:
        """The batch in flight (under its id), then new batches from the queue."""
        written = 0
        while limit is None or written < limit:
            if self._inflight is None:
                if not self._queue:
                    return
                take = min(self._max_batch, len(self._queue))
                self._inflight = new_batch([self._queue.popleft() for _ in range(take)])
            await self._write_batch(self._inflight)
            written += len(self._inflight.records)
            self._inflight = None

    async def _write_batch(self, batch: Batch) -> None:
        """One transaction: the batch's id, then its records unless the id was there."""
        assert self._pool is not None
        rows = [postgres_row(r) for r in batch.records]
        async with self._pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(_MARK_BATCH, batch.id):
                await conn.copy_records_to_table(queries.TABLE, records=rows, columns=NAMES)

    async def _spill_memory(self) -> None:
        """Move every record in memory to this process's spill file, as batches (the one
        being written keeps its id). Raises (OSError: a full or read-only disk) if the file
        cannot take them; they then stay in memory."""
        async with self._lock:
            count = len(self._queue)
            queued = list(islice(self._queue, count))
            batches = [self._inflight] if self._inflight else []
            batches += [
                new_batch(queued[i : i + self._max_batch]) for i in range(0, count, self._max_batch)
            ]
            if not batches:
                return
            try:
                if self._own is None:
                    self._own = await self._io(SpillFile.create, self._spill_dir)
                    self._spills.append(self._own)
                await self._io(self._own.append, batches)
            except Exception:
                logger.exception(
                    "ledger spill file not writable; %d records kept in memory", self.pending
                )
                raise
            # in one step with the count, so `pending` never counts a record twice
            self._own.count += sum(len(b.records) for b in batches)
            for _ in range(count):
                self._queue.popleft()
            self._inflight = None

    async def _adopt_orphans(self) -> None:
        own = self._own.path if self._own else None
        found = await self._io(orphans, self._spill_dir, own)
        if found:
            logger.info(
                "ledger: %d records in spill files left by a stopped gateway; writing them",
                sum(s.count for s in found),
            )
        # older than anything this process spilled since it started
        self._spills[:0] = found

    def _went_down(self, error: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._wakeup.set()  # the writer switches to retrying at once
            logger.error(
                "ledger database write failed (%s); %d records kept, retrying every %.1fs",
                _reason(error),
                self.pending,
                min(self._flush_interval, RETRY_INTERVAL),
            )

    def _came_back(self) -> None:
        if self._down_since is not None:
            logger.warning(
                "ledger database writable again after %.1fs; records written",
                time.monotonic() - self._down_since,
            )
            self._down_since = None

    async def _io(self, func: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    async def _release(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self._connect_timeout)
            except Exception:  # a dead server may hang or fail a polite close
                pool.terminate()
        for spill in self._spills:
            spill.close()  # the files stay, for the next start
        self._executor.shutdown(wait=True)


def _reason(error: BaseException) -> str:
    """An error's class and message for a log line; asyncpg's never carry the password."""
    return f"{type(error).__name__}: {error}"
