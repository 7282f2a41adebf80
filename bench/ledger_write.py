"""What the PostgreSQL ledger costs: CPU per `append` (the part on the request path) and batch
write throughput into a real server, beside the SQLite ledger, plus the spill file's rate.

    python bench/ledger_write.py [--records 100000] [--batch 1000] [--url postgresql://...]

Makes a fresh database next to the one `--url` names and drops it afterwards. `append` is timed
with the writer idle (a long flush interval), as on the hot path; a write is one `flush()` of
everything queued, in batches of `--batch` records (one transaction and one COPY each).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.records import Ledger, LedgerRecord
from gateway.ledger.spill import SpillFile, new_batch
from gateway.ledger.sqlite import SqliteLedger

BASE = LedgerRecord(
    ts=1_790_000_000.0,
    request_id="",
    team="search",
    key_id="0123456789ab",
    model="nusantara-base",
    upstream="neosantara",
    route="/v1/responses",
    status=200,
    stream=True,
    cache="miss",
    input_tokens=812,
    cached_tokens=128,
    output_tokens=256,
    reasoning_tokens=32,
    charged_tokens=1068,
    cost_usd=0.000184,
    estimated=False,
    duration_ms=812.5,
    ttft_ms=143.2,
    response_id="",
    attempts=1,
)


def records(n: int) -> list[LedgerRecord]:
    return [
        dataclasses.replace(
            BASE, ts=BASE.ts + i, request_id=f"req-{i:012d}", response_id=f"resp_{i:012d}"
        )
        for i in range(n)
    ]


async def measure(ledger: Ledger, batch: list[LedgerRecord]) -> tuple[float, float, float]:
    """(append CPU ns per record, flush wall seconds, flush CPU seconds of this process)."""
    await ledger.start()
    try:
        cpu = time.process_time_ns()
        for r in batch:
            ledger.append(r)
        append_ns = (time.process_time_ns() - cpu) / len(batch)
        wall, cpu_s = time.perf_counter(), time.process_time()
        await ledger.flush()
        return append_ns, time.perf_counter() - wall, time.process_time() - cpu_s
    finally:
        await ledger.close()


def spill_rate(folder: Path, batch: list[LedgerRecord], size: int) -> float:
    spill = SpillFile.create(folder)
    started = time.perf_counter()
    spill.append([new_batch(batch[i : i + size]) for i in range(0, len(batch), size)])
    elapsed = time.perf_counter() - started
    spill.remove()
    return len(batch) / elapsed


async def main(args: argparse.Namespace) -> None:
    name = f"bench_ledger_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = f"{args.url.rsplit('/', 1)[0]}/{name}"
    batch = records(args.records)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            pg = PostgresLedger(url, folder, 3600.0, max_batch=args.batch, memory_limit=10**9)
            pg_append, pg_wall, pg_cpu = await measure(pg, batch)
            sq = SqliteLedger(folder / "ledger.sqlite3", 3600.0, max_batch=args.batch)
            sq_append, sq_wall, sq_cpu = await measure(sq, batch)
            spilled = spill_rate(folder, batch, args.batch)
    finally:
        admin = await asyncpg.connect(args.url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    n = args.records
    print(f"{n} records, batches of {args.batch}")
    header = ("ledger", "append CPU/record", "write records/s", "write CPU/record")
    print(f"{header[0]:<10} {header[1]:>18} {header[2]:>16} {header[3]:>17}")
    for label, append_ns, wall, cpu in (
        ("postgres", pg_append, pg_wall, pg_cpu),
        ("sqlite", sq_append, sq_wall, sq_cpu),
    ):
        print(f"{label:<10} {append_ns:>15.0f} ns {n / wall:>16,.0f} {cpu / n * 1e6:>14.1f} us")
    print(f"spill file (JSON lines, one fsync): {spilled:,.0f} records/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    asyncio.run(main(parser.parse_args()))
