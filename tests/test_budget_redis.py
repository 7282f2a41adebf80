"""The Redis budget store beyond the BudgetStore contract: what sharing a server adds.

Many stores on one prefix (replicas), Redis losing its data, hostile team names in keys, key
expiry, and Redis not answering and coming back. Against the real server on 127.0.0.1:6379;
each test works under its own prefix and deletes only that prefix's keys.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from datetime import UTC, datetime

import pytest
import redis.asyncio as redis
from redis_proxy import RedisProxy
from servers import REDIS_URL, redis_prefix

from gateway.budget.redis import GRACE, RedisBudgetStore
from gateway.budget.store import Rejection, Reservation
from gateway.budget.windows import window_bounds
from gateway.ledger.records import Charge
from gateway.redis_state import SOCKET_TIMEOUT, StateUnavailable, connect, team_tag
from gateway.settings import BudgetRule, Team

pytestmark = pytest.mark.redis

KEY = "sha256:" + "0" * 64
NOW = datetime(2026, 6, 10, 12, 30, tzinfo=UTC).timestamp()
DAY = window_bounds("day", NOW)[0]
HOUR = window_bounds("hour", NOW)[0]


def team(name: str = "t", *budgets: BudgetRule) -> Team:
    return Team(name=name, keys=(KEY,), budgets=budgets or (BudgetRule(per="hour", tokens=300),))


TEAM = team(
    "t",
    BudgetRule(per="day", tokens=1000),
    BudgetRule(per="hour", tokens=300),
    BudgetRule(per="month", usd=1.0),
    BudgetRule(per="minute", requests=50),
)


class Ledger:
    """A ledger whose charges the test sets, counting how often it is read."""

    def __init__(self, delay: float = 0.0) -> None:
        self.charges: dict[float, dict[str, Charge]] = {}
        self.reads = 0
        self.delay = delay

    async def charged_since(self, since: float) -> Mapping[str, Charge]:
        self.reads += 1
        await asyncio.sleep(self.delay)
        return dict(self.charges.get(since, {}))


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    async with redis_prefix() as p:
        yield p


@pytest.fixture
async def raw() -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def stores() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


def make(
    stack: AsyncExitStack, prefix: str, ledger: Ledger, url: str = REDIS_URL
) -> RedisBudgetStore:
    store = RedisBudgetStore(connect(url), prefix, ledger.charged_since)
    stack.push_async_callback(store.close)
    return store


async def wipe(raw: redis.Redis, prefix: str) -> None:
    """What FLUSHALL does to this test's keys, and to nobody else's."""
    keys = [k async for k in raw.scan_iter(match=f"{prefix}*", count=500)]
    if keys:
        await raw.delete(*keys)


async def test_stores_on_one_prefix_never_admit_past_a_limit_together(
    prefix: str, stores: AsyncExitStack
) -> None:
    ledger = Ledger()
    replicas = [make(stores, prefix, ledger) for _ in range(4)]
    got = await asyncio.gather(*(replicas[i % 4].reserve(TEAM, 7, 0.0, NOW) for i in range(200)))
    admitted = [r for r in got if isinstance(r, Reservation)]
    assert len(admitted) == 300 // 7  # the hour's 300 tokens, held by all four together
    assert {r.window for r in got if isinstance(r, Rejection)} == {"hour"}
    for store in replicas:
        day, hour, _, minute = await store.windows(TEAM, NOW)
        assert (hour.reserved, day.reserved, minute.reserved) == (7 * 42, 7 * 42, 42)
    await asyncio.gather(
        *(replicas[i % 4].settle(r, 5, 0.0, NOW + 1) for i, r in enumerate(admitted))
    )
    day, hour, _, minute = await replicas[0].windows(TEAM, NOW + 1)
    assert (hour.used, hour.reserved, day.used, minute.used, minute.reserved) == (
        210,
        0,
        210,
        42,
        0,
    )


# one replica: waits for the common start instant, then reserves 7 tokens 100 times at once
REPLICA = """
import asyncio, sys, time
from gateway.budget.redis import RedisBudgetStore
from gateway.budget.store import Reservation
from gateway.redis_state import connect
from gateway.settings import BudgetRule, Team

url, prefix, start, now = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
team = Team(name="t", keys=("sha256:" + "0" * 64,), budgets=(BudgetRule(per="hour", tokens=300),))

async def empty(since):
    return {}

async def main():
    store = RedisBudgetStore(connect(url), prefix, empty)
    await store.reachable()  # connected before the start
    await asyncio.sleep(max(0.0, start - time.time()))
    got = await asyncio.gather(*(store.reserve(team, 7, 0.0, now) for _ in range(100)))
    print(sum(isinstance(r, Reservation) for r in got))
    await store.close()

asyncio.run(main())
"""


async def test_processes_on_one_prefix_never_admit_past_a_limit_together(prefix: str) -> None:
    start = time.time() + 2.0  # every process is up by then
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            REPLICA,
            REDIS_URL,
            prefix,
            str(start),
            str(NOW),
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(3)
    ]
    admitted = [int((await p.communicate())[0]) for p in procs]
    assert sum(admitted) == 300 // 7, admitted  # one hour's 300 tokens, 7 at a time


async def test_a_counter_redis_lost_is_rebuilt_from_the_ledger(
    prefix: str, stores: AsyncExitStack, raw: redis.Redis
) -> None:
    ledger = Ledger()
    store = make(stores, prefix, ledger)
    r = await store.reserve(TEAM, 100, 0.25, NOW)
    assert isinstance(r, Reservation)
    await store.settle(r, 80, 0.2, NOW)
    # what the ledger holds by now: this request, and others'
    minute = window_bounds("minute", NOW)[0]
    ledger.charges = {
        DAY: {"t": Charge(900, 0.5, 9)},
        HOUR: {"t": Charge(250, 0.3, 3)},
        window_bounds("month", NOW)[0]: {"t": Charge(950, 0.75, 10)},
        minute: {"t": Charge(80, 0.2, 1)},
    }
    await wipe(raw, prefix)
    day, hour, month, mins = await store.windows(TEAM, NOW)
    assert (day.used, hour.used, month.used, mins.used) == (900, 250, 0.75, 1)
    got = await store.reserve(TEAM, 60, 0.0, NOW)  # 250 + 60 passes the hour's 300
    assert isinstance(got, Rejection) and got.window == "hour"


async def test_a_hold_lost_with_redis_never_releases_one_made_after(
    prefix: str, stores: AsyncExitStack, raw: redis.Redis
) -> None:
    store = make(stores, prefix, Ledger())
    before = await store.reserve(TEAM, 200, 0.0, NOW)
    assert isinstance(before, Reservation)
    await wipe(raw, prefix)
    after = await store.reserve(TEAM, 50, 0.0, NOW)
    assert isinstance(after, Reservation) and after.epoch != before.epoch
    await store.settle(before, 10, 0.0, NOW)
    day, hour, _, _ = await store.windows(TEAM, NOW)
    # the lost hold of 200 is not taken out of the 50 held since, nor below 0
    assert (hour.reserved, day.reserved) == (50, 50)
    assert (hour.used, day.used) == (10, 10)
    await store.settle(after, 50, 0.0, NOW)
    day, hour, _, _ = await store.windows(TEAM, NOW)
    assert (hour.reserved, hour.used) == (0, 60)


async def test_many_replicas_rebuild_a_lost_counter_once(
    prefix: str, stores: AsyncExitStack, raw: redis.Redis
) -> None:
    ledgers = [Ledger(delay=0.2) for _ in range(3)]
    for ledger in ledgers:
        ledger.charges = {HOUR: {"t": Charge(100, 0.0, 1)}}
    replicas = [make(stores, prefix, ledger) for ledger in ledgers]
    got = await asyncio.gather(*(replicas[i % 3].reserve(TEAM, 10, 0.0, NOW) for i in range(15)))
    assert all(isinstance(r, Reservation) for r in got)
    # every missing counter (day, hour, month, minute) is read once in all: one seed
    assert sum(ledger.reads for ledger in ledgers) == 4
    _, hour, _, _ = await replicas[1].windows(TEAM, NOW)
    assert (hour.used, hour.reserved) == (100, 150)
    await wipe(raw, prefix)
    await asyncio.gather(*(replicas[i % 3].windows(TEAM, NOW) for i in range(9)))
    assert sum(ledger.reads for ledger in ledgers) == 8


HOSTILE = ["t", "t}", "{t}", "t:hour:tokens:0", "a b", "ü→✓", "", "%", "%25", "t\udcff", "}{"]


async def test_hostile_team_names_keep_to_their_own_keys_and_slot(
    prefix: str, stores: AsyncExitStack, raw: redis.Redis
) -> None:
    store = make(stores, prefix, Ledger())
    for i, name in enumerate(HOSTILE):
        got = await store.reserve(team(name), 10 + i, 0.0, NOW)
        assert isinstance(got, Reservation), name
    for i, name in enumerate(HOSTILE):
        (hour,) = await store.windows(team(name), NOW)
        assert hour.reserved == 10 + i, name
    tags: dict[str, set[str]] = {}
    async for key in raw.scan_iter(match=f"{prefix}*", count=500):
        text = key.decode("utf-8", "surrogateescape")
        assert text.startswith(f"{prefix}budget:")
        # the hash tag Redis Cluster hashes: from the first { to the first } after it
        tag = re.match(r"[^{]*\{([^}]*)\}", text)
        assert tag is not None and tag.group(1), text
        tags.setdefault(tag.group(1), set()).add(text)
    assert len(tags) == len(HOSTILE)  # one slot per team, no two teams in one
    assert len({team_tag(n) for n in HOSTILE}) == len(HOSTILE)
    assert all(len(keys) == 2 for keys in tags.values())  # epoch and the hour's counter


async def test_window_counters_expire_after_their_period(
    prefix: str, stores: AsyncExitStack, raw: redis.Redis
) -> None:
    store = make(stores, prefix, Ledger())
    forever = team("t", BudgetRule(per="minute", tokens=100), BudgetRule(per="total", usd=5.0))
    assert isinstance(await store.reserve(forever, 10, 0.5, NOW), Reservation)
    ttls = {
        key.decode().split("}:", 1)[1].split(":")[0]: await raw.pttl(key)
        async for key in raw.scan_iter(match=f"{prefix}*", count=500)
    }
    minute_end = window_bounds("minute", NOW)[1]
    expected = (minute_end - NOW + GRACE) * 1000
    assert expected - 5000 < ttls["minute"] <= expected
    assert ttls["total"] == -1  # never expires
    assert ttls["epoch"] == -1  # the team's epoch outlives every counter


async def test_usd_is_held_in_whole_nano_dollars(
    prefix: str, stores: AsyncExitStack, raw: redis.Redis
) -> None:
    store = make(stores, prefix, Ledger())
    dear = team("t", BudgetRule(per="day", usd=20_000_000.0))  # 2e16 nano-dollars: past 2^53
    r = await store.reserve(dear, 1, 12_345_678.5, NOW)
    assert isinstance(r, Reservation)
    (key,) = [k async for k in raw.scan_iter(match=f"{prefix}*:day:usd:*")]
    assert await raw.hget(key, "reserved") == b"12345678500000000"  # every digit kept
    await store.settle(r, 1, 0.000_000_025, NOW)  # one cached token at 0.025 per million
    assert await raw.hmget(key, "used", "reserved") == [b"25", b"0"]
    assert isinstance(await store.reserve(dear, 1, 19_999_999.5, NOW), Reservation)
    assert isinstance(await store.reserve(dear, 1, 0.5, NOW), Rejection)  # 25 nano-dollars over
    assert isinstance(await store.reserve(dear, 1, 0.499_999_9, NOW), Reservation)
    assert await raw.hget(key, "reserved") == b"19999999999999900"


async def test_a_redis_that_does_not_answer_raises_state_unavailable(
    prefix: str, stores: AsyncExitStack
) -> None:
    proxy = RedisProxy()  # nothing listens on its port yet
    seen: list[str] = []
    store = make(stores, prefix, Ledger(), proxy.redis_url)
    store.on_error = seen.append
    with pytest.raises(StateUnavailable):
        await store.reserve(TEAM, 10, 0.0, NOW)
    with pytest.raises(StateUnavailable):
        await store.windows(TEAM, NOW)
    assert not await store.reachable()
    assert seen == ["budget_reserve", "budget_windows", "ping"]
    await proxy.start()  # Redis is back: no restart of the store needed
    try:
        assert await store.reachable()
        assert isinstance(await store.reserve(TEAM, 10, 0.0, NOW), Reservation)
    finally:
        await proxy.stop()


async def test_after_redis_was_away_counters_are_set_from_the_ledger(
    prefix: str, stores: AsyncExitStack
) -> None:
    proxy = RedisProxy()
    await proxy.start()
    ledger = Ledger()
    store = make(stores, prefix, ledger, proxy.redis_url)
    other = make(stores, prefix, Ledger())  # a replica that never lost Redis
    held = await store.reserve(TEAM, 100, 0.1, NOW)
    assert isinstance(held, Reservation)
    await proxy.stop()
    with pytest.raises(StateUnavailable):
        await store.settle(held, 40, 0.05, NOW)
    with pytest.raises(StateUnavailable):  # admitted unchecked by the gateway, under admit
        await store.reserve(TEAM, 100, 0.1, NOW)
    # meanwhile the ledger recorded both requests
    ledger.charges = {
        s: {"t": Charge(120, 0.15, 2)}
        for s in (DAY, HOUR, window_bounds("month", NOW)[0], window_bounds("minute", NOW)[0])
    }
    day, hour, month, minute = await other.windows(TEAM, NOW)
    assert (hour.used, hour.reserved, minute.reserved) == (0, 100, 1)  # as Redis last knew
    await proxy.start()
    try:
        again = await store.reserve(TEAM, 10, 0.0, NOW)
        assert isinstance(again, Reservation)
        day, hour, month, minute = await other.windows(TEAM, NOW)
        # spending from the ledger; the unsettled hold released; the new one held
        assert (day.used, hour.used, month.used, minute.used) == (120, 120, 0.15, 2)
        assert (hour.reserved, month.reserved, minute.reserved) == (10, 0, 1)
    finally:
        await proxy.stop()


async def test_a_redis_that_hangs_counts_as_away_within_the_socket_timeout(
    prefix: str, stores: AsyncExitStack
) -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):  # reads every command, answers none
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        seen: list[str] = []
        store = make(stores, prefix, Ledger(), f"redis://127.0.0.1:{port}/0")
        store.on_error = seen.append
        started = time.monotonic()
        with pytest.raises(StateUnavailable):
            await store.reserve(TEAM, 10, 0.0, NOW)
        assert time.monotonic() - started < 2 * SOCKET_TIMEOUT + 0.5
        assert seen == ["budget_reserve"]
    finally:
        server.close()


async def test_a_seeder_that_died_holding_the_lock_delays_the_seed_only_until_it_expires(
    prefix: str, stores: AsyncExitStack, raw: redis.Redis
) -> None:
    ledger = Ledger()
    ledger.charges = {HOUR: {"t": Charge(100, 0.0, 1)}}
    store = make(stores, prefix, ledger)
    # another replica took the team's seed lock and died before seeding
    await raw.set(f"{prefix}budget:{team_tag('t')}:seed", "theirs", px=400)
    started = time.monotonic()
    got = await store.reserve(TEAM, 10, 0.0, NOW)
    assert isinstance(got, Reservation)
    assert 0.3 < time.monotonic() - started < 3  # waited for the lock, then seeded itself
    _, hour, _, _ = await store.windows(TEAM, NOW)
    assert (hour.used, hour.reserved) == (100, 10)


async def test_a_replica_that_missed_settles_corrects_the_counters_unasked(
    prefix: str, stores: AsyncExitStack
) -> None:
    """A settle Redis did not answer, on a replica that then gets no request: once Redis is
    back the replica itself releases the hold and raises the counters to the ledger's."""
    proxy = RedisProxy()
    await proxy.start()
    ledger = Ledger()
    store = RedisBudgetStore(
        connect(proxy.redis_url), prefix, ledger.charged_since, clock=lambda: NOW
    )
    stores.push_async_callback(store.close)
    other = make(stores, prefix, Ledger())
    held = await store.reserve(TEAM, 100, 0.1, NOW)
    assert isinstance(held, Reservation)
    await proxy.stop()
    with pytest.raises(StateUnavailable):
        await store.settle(held, 40, 0.05, NOW)
    # the request's record reaches the ledger; Redis comes back; no request follows
    ledger.charges = {
        s: {"t": Charge(40, 0.05, 1)}
        for s in (DAY, HOUR, window_bounds("month", NOW)[0], window_bounds("minute", NOW)[0])
    }
    await proxy.start()
    try:
        async with asyncio.timeout(10):
            while (await other.windows(TEAM, NOW))[1].reserved:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        day, hour, month, minute = await other.windows(TEAM, NOW)
        assert (day.used, hour.used, month.used, minute.used) == (40, 40, 0.05, 1)
        assert (day.reserved, hour.reserved, minute.reserved) == (0, 0, 0)
    finally:
        await proxy.stop()
