"""The PostgreSQL ledger's tables, created or brought up to date at start.

`ledger` holds the records (one column per `LedgerRecord` field, see `columns`);
`ledger_batches` holds the id of every batch written, in the same transaction as its
records, so a batch written again (after a lost acknowledgement, or from a spill file whose
removal a crash prevented) is recognised and skipped.

Replicas that start at once each run `ensure` under one transaction-level advisory lock: the
first creates, the others then find everything in place. Columns a newer version added are
added to an older table, so both versions can write it during a rolling upgrade.
"""

from __future__ import annotations

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from gateway.ledger import queries

# pg_advisory_xact_lock key: "gw-ledgr" as a 64-bit integer, shared by every replica
LOCK_KEY = int.from_bytes(b"gw-ledgr", "big") - 2**63
BATCHES = "ledger_batches"
# a batch id older than this is forgotten: a spill file that waited longer than this after a
# crash between its write and its removal would be written twice
BATCH_MEMORY_DAYS = 30


async def ensure(conn: asyncpg.Connection | PoolConnectionProxy) -> None:
    """Create the tables and indexes if absent and add missing columns, as one transaction
    under the advisory lock; forget batch ids older than BATCH_MEMORY_DAYS."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        await conn.execute(queries.create_table("postgres"))
        have = await conn.fetch(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = $1",
            queries.TABLE,
        )
        # ALTER TABLE locks the table even when the column exists: only for missing ones
        for statement in queries.add_columns("postgres", (row[0] for row in have)):
            await conn.execute(statement)
        for statement in queries.INDEXES:
            await conn.execute(statement)
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {BATCHES} ("
            " id UUID PRIMARY KEY, written_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
    await conn.execute(
        f"DELETE FROM {BATCHES} WHERE written_at < now() - make_interval(days => $1)",
        BATCH_MEMORY_DAYS,
    )
