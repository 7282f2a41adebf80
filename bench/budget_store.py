"""What budgets in Redis cost the gateway: CPU and wall time per reserve + settle pair, on the
local store and on the Redis store, in one process (the gateway's side only: Redis's own CPU
is not in it).

    python bench/budget_store.py [--pairs 20000] [--concurrency 1 32] [--redis redis://...]

A team with three windows (tokens per day, USD per month, requests per minute), each pair a
reserve and its settle, run by `--concurrency` coroutines at once; the `+h` rows also read
the windows once per pair, as an answer's `x-gateway-budget-*` headers do. Target: Redis
adds at most 0.3 ms of CPU (user + system: the loopback TCP stack is the system part) per
request (one pair) over the local store. A measurement, not a test: it prints, it never
fails. The keys it writes are under a fresh prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import secrets
import sys
import time
from collections.abc import Mapping

import redis.asyncio as redis

from gateway.budget.local import LocalBudgetStore
from gateway.budget.redis import RedisBudgetStore
from gateway.budget.store import BudgetStore, Reservation
from gateway.ledger.records import Charge
from gateway.redis_state import connect
from gateway.settings import BudgetRule, Team

TARGET_MS = 0.3
TEAM = Team(
    name="bench",
    keys=("sha256:" + "0" * 64,),
    budgets=(
        BudgetRule(per="day", tokens=10**15),
        BudgetRule(per="month", usd=10**6),
        BudgetRule(per="minute", requests=10**9),
    ),
)


async def no_records(since: float) -> Mapping[str, Charge]:
    return {}


def cpu_times() -> tuple[float, float]:
    """This process's user and system CPU seconds so far."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime, used.ru_stime


async def pairs(
    store: BudgetStore, n: int, concurrency: int, headers: bool = False
) -> tuple[float, float, float]:
    """User CPU, system CPU and wall seconds for `n` reserve + settle pairs over
    `concurrency` workers; with `headers`, each also reads the windows, as the budget
    headers of an answer do."""
    now = time.time()

    async def worker(count: int) -> None:
        for _ in range(count):
            r = await store.reserve(TEAM, 120, 0.000_05, now)
            assert isinstance(r, Reservation)
            if headers:
                await store.windows(TEAM, now)
            await store.settle(r, 80, 0.000_03, now)

    await worker(50)  # warm: scripts loaded, connections open, counters seeded
    share = [n // concurrency + (i < n % concurrency) for i in range(concurrency)]
    (user, system), wall = cpu_times(), time.perf_counter()
    await asyncio.gather(*(worker(k) for k in share))
    user_after, system_after = cpu_times()
    return user_after - user, system_after - system, time.perf_counter() - wall


async def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = p.parse_args(argv)
    prefix = f"gwbench_{secrets.token_hex(6)}:"
    store = RedisBudgetStore(connect(args.redis), prefix, no_records)
    print(f"{args.pairs} reserve+settle pairs, team with 3 windows; Redis at {args.redis}")
    print(
        f"{'store':7} {'conc':>5} {'cpu us/pair':>12} {'(user':>7} {'+ sys)':>7}"
        f" {'wall us/pair':>13} {'pairs/s':>9}"
    )
    try:
        for concurrency in args.concurrency:
            cpu_of = {}
            runs = (
                ("local", LocalBudgetStore(), False),
                ("redis", store, False),
                ("local+h", LocalBudgetStore(), True),
                ("redis+h", store, True),
            )
            for name, made, headers in runs:
                user, system, wall = await pairs(made, args.pairs, concurrency, headers)
                per = 1e6 / args.pairs  # microseconds per pair
                cpu_of[name] = (user + system) * per / 1000
                print(
                    f"{name:7} {concurrency:>5} {(user + system) * per:>12.1f}"
                    f" {user * per:>7.1f} {system * per:>7.1f}"
                    f" {wall * per:>13.1f} {args.pairs / wall:>9.0f}"
                )
            for what, a, b in (("pair", "redis", "local"), ("+headers", "redis+h", "local+h")):
                extra = cpu_of[a] - cpu_of[b]
                met = "met" if extra <= TARGET_MS else "MISSED"
                print(f"  {what}: redis adds {extra:.3f} ms CPU (target <= {TARGET_MS}): {met}")
    finally:
        await store.close()
        client = redis.Redis.from_url(args.redis)
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


if __name__ == "__main__":
    try:
        import uvloop  # the event loop `gateway serve` runs on

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(sys.argv[1:]))
