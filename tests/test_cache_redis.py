"""What the Redis cache store adds to the contract: one bound and one index for every replica,
names that cannot reach into other keys, and values that are only ever data."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from servers import REDIS_URL, redis_prefix

from gateway.cache.entry import CacheEntry
from gateway.cache.redis import RedisCacheStore
from gateway.cache.store import StoreStats
from gateway.redis_link import RedisLink
from gateway.usage import Usage

pytestmark = pytest.mark.redis


def entry(body: bytes = b"{}", team: str = "a") -> CacheEntry:
    return CacheEntry(
        200, (("content-type", "application/json"),), body, False, team, "m", Usage(1, 2, 3), 0.0
    )


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    async with redis_prefix() as p:
        yield p


@pytest.fixture
async def raw() -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


async def test_two_replicas_share_entries_and_one_byte_bound(prefix: str) -> None:
    now = [1_790_000_000.0]
    links = [RedisLink(REDIS_URL, prefix), RedisLink(REDIS_URL, prefix)]
    try:
        a, b = (RedisCacheStore(link, 60, 3000, 2000, lambda: now[0]) for link in links)
        for n in range(10):
            store = a if n % 2 else b
            assert await store.put(f"k{n}", entry(b"x" * 800))
            now[0] += 1
            assert (await a.stats()).bytes <= 3000
        assert await b.get("k9") == entry(b"x" * 800)  # stored through a, read through b
        assert await a.get("k0") is None  # the oldest went first
        assert await a.stats() == await b.stats()
    finally:
        for link in links:
            await link.close()


async def test_expired_bytes_leave_the_counter(prefix: str) -> None:
    now = [1_790_000_000.0]
    link = RedisLink(REDIS_URL, prefix)
    try:
        store = RedisCacheStore(link, 10, 10_000, 5_000, lambda: now[0])
        await store.put("old", entry(b"o" * 4000))
        now[0] += 11
        assert await store.stats() == StoreStats(0, 0)
        # a later put is not refused room by bytes that expired
        await store.put("a", entry(b"a" * 4000))
        await store.put("b", entry(b"b" * 4000))
        assert (await store.stats()).entries == 2
    finally:
        await link.close()


@pytest.mark.parametrize(
    "team", ["a:b", "}{cache}:t:", "*", "t\x00\xff", "Ünïcødé", " ", "a" * 300]
)
async def test_hostile_team_names_and_keys_stay_apart(prefix: str, team: str) -> None:
    link = RedisLink(REDIS_URL, prefix)
    try:
        store = RedisCacheStore(link, 60, 100_000, 50_000)
        await store.put("innocent", entry(team="a"))
        await store.put(team, entry(b"mine", team=team))  # the name as a key, too
        await store.put("*" + team, entry(b"star", team=team))
        assert await store.purge(team) == 2
        assert await store.get("innocent") == entry(team="a")
        assert await store.stats() == StoreStats(1, entry(team="a").size)
    finally:
        await link.close()


async def test_keys_stay_under_the_prefix(prefix: str, raw: redis.Redis) -> None:
    link = RedisLink(REDIS_URL, prefix)
    try:
        store = RedisCacheStore(link, 60, 100_000, 50_000)
        await store.put("k", entry(team="x"))
        keys = [k async for k in raw.scan_iter(match=f"{prefix}*")]
        assert keys and all(k.startswith(prefix.encode()) for k in keys)
        ttl = await raw.pttl(f"{prefix}{{cache}}:e:k")
        assert 0 < ttl <= 60_000  # Redis frees the value on its own, too
    finally:
        await link.close()


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x00" * 3,
        b"cos\nsystem\n(S'echo pwned'\ntR.",  # a pickle: data, never run
        b"\x00" * 8 + b"\xff\xff\xff\xff",
        b"\x00" * 8 + b"\x00\x00\x00\x02[]",
    ],
)
async def test_a_value_that_is_not_an_entry_is_a_miss(
    prefix: str, raw: redis.Redis, value: bytes
) -> None:
    link = RedisLink(REDIS_URL, prefix)
    try:
        store = RedisCacheStore(link, 60, 100_000, 50_000)
        await raw.set(f"{prefix}{{cache}}:e:k", value)
        assert await store.get("k") is None
    finally:
        await link.close()


async def test_a_huge_entry_is_refused_before_it_reaches_redis(
    prefix: str, raw: redis.Redis
) -> None:
    link = RedisLink(REDIS_URL, prefix)
    try:
        store = RedisCacheStore(link, 60, 10_000_000, 1_000_000)
        assert not await store.put("big", entry(b"x" * 2_000_000))
        assert [k async for k in raw.scan_iter(match=f"{prefix}*")] == []
    finally:
        await link.close()
