"""Captures in the ledger's PostgreSQL database, so every replica sees every capture."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

from gateway.capture.draft import Row
from gateway.capture.store import TABLE

_CREATE = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (id BIGSERIAL PRIMARY KEY, request_id TEXT NOT NULL,"
    " ts DOUBLE PRECISION NOT NULL, team TEXT NOT NULL, reason TEXT NOT NULL, doc TEXT NOT NULL)"
)
_INDEXES = (
    f"CREATE INDEX IF NOT EXISTS {TABLE}_request_id ON {TABLE} (request_id)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_ts ON {TABLE} (ts)",
)
_INSERT = f"INSERT INTO {TABLE} (request_id, ts, team, reason, doc) VALUES ($1, $2, $3, $4, $5)"


class PostgresCaptures:
    """A small pool of its own on the ledger's database. A database that is down fails the
    batch (the writer counts it dropped): captures are never spilled or retried, they are
    debugging data and must not grow memory while the database is away. Started lazily, so
    the gateway starts while the database is down (the ledger decides whether it may)."""

    def __init__(self, url: str, command_timeout: float = 10.0) -> None:
        self._url = url
        self._timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()  # one pool, however many callers find none

    async def start(self) -> None:
        await self._ready()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def write(self, rows: Sequence[Row]) -> None:
        pool = await self._ready()
        async with pool.acquire() as conn, conn.transaction():
            await conn.executemany(_INSERT, rows)

    async def purge(self, before: float) -> int:
        pool = await self._ready()
        done = await pool.execute(f"DELETE FROM {TABLE} WHERE ts < $1", before)
        return int(str(done).rsplit(" ", 1)[-1])

    async def capture(self, request_id: str) -> dict[str, Any] | None:
        pool = await self._ready()
        doc = await pool.fetchval(
            f"SELECT doc FROM {TABLE} WHERE request_id = $1 ORDER BY id DESC LIMIT 1", request_id
        )
        return orjson.loads(doc) if doc is not None else None

    async def captured(self, request_ids: Sequence[str]) -> frozenset[str]:
        if not request_ids:
            return frozenset()
        pool = await self._ready()
        rows = await pool.fetch(
            f"SELECT DISTINCT request_id FROM {TABLE} WHERE request_id = ANY($1::text[])",
            list(request_ids),
        )
        return frozenset(str(r[0]) for r in rows)

    async def _ready(self) -> asyncpg.Pool:
        async with self._opening:
            return self._pool or await self._open()

    async def _open(self) -> asyncpg.Pool:
        pool = await asyncpg.create_pool(
            self._url, min_size=0, max_size=2, timeout=5.0, command_timeout=self._timeout
        )
        try:
            async with pool.acquire() as conn:
                for statement in (_CREATE, *_INDEXES):
                    # replicas starting together race on IF NOT EXISTS: one wins
                    with contextlib.suppress(asyncpg.UniqueViolationError):
                        await conn.execute(statement)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        return pool
