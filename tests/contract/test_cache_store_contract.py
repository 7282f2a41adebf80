"""The CacheStore contract (gateway/cache/store.py), held against every implementation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Protocol

import pytest
from servers import REDIS_URL, redis_prefix

from gateway.cache.entry import CacheEntry
from gateway.cache.redis import RedisCacheStore
from gateway.cache.store import CacheStore, MemoryCacheStore, StoreStats
from gateway.redis_link import RedisLink
from gateway.usage import Usage


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_790_000_000.0

    def __call__(self) -> float:
        return self.t


@asynccontextmanager
async def memory_store(
    ttl: float, max_bytes: int, max_entry_bytes: int, clock: Callable[[], float]
) -> AsyncIterator[CacheStore]:
    store = MemoryCacheStore(ttl, max_bytes, max_entry_bytes, clock)
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def redis_store(
    ttl: float, max_bytes: int, max_entry_bytes: int, clock: Callable[[], float]
) -> AsyncIterator[CacheStore]:
    async with redis_prefix() as prefix:
        link = RedisLink(REDIS_URL, prefix)
        try:
            yield RedisCacheStore(link, ttl, max_bytes, max_entry_bytes, clock)
        finally:
            await link.close()


# (ttl, max_bytes, max_entry_bytes, clock) -> a fresh, empty store. The store measures age by
# the clock it is given (the tests move it), as the gateway's own clock stamps entries.
StoreFactory = Callable[
    [float, int, int, Callable[[], float]], AbstractAsyncContextManager[CacheStore]
]

# the one place an implementation joins this suite (see tests/contract/__init__.py)
IMPLEMENTATIONS = [
    pytest.param(memory_store, id="memory"),
    pytest.param(redis_store, id="redis", marks=pytest.mark.redis),
]


class MakeStore(Protocol):
    def __call__(
        self, ttl: float = 600, max_bytes: int = 100_000, max_entry_bytes: int = 50_000
    ) -> Awaitable[CacheStore]: ...


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=IMPLEMENTATIONS)
async def make_store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[MakeStore]:
    factory: StoreFactory = request.param
    async with AsyncExitStack() as stack:

        async def make(
            ttl: float = 600, max_bytes: int = 100_000, max_entry_bytes: int = 50_000
        ) -> CacheStore:
            return await stack.enter_async_context(factory(ttl, max_bytes, max_entry_bytes, clock))

        yield make


def entry(
    body: bytes = b'{"id":"resp_1","status":"completed"}',
    team: str = "a",
    *,
    stream: bool = False,
    usage: Usage | None = None,
    created: float = 1_790_000_000.0,
) -> CacheEntry:
    ctype = "text/event-stream" if stream else "application/json"
    return CacheEntry(
        200,
        (("content-type", ctype), ("x-upstream-request-id", "req_9")),
        body,
        stream,
        team,
        "m",
        Usage(1, 2, 3) if usage is None else usage,
        created,
    )


def sized(size: int, team: str = "a") -> CacheEntry:
    """An entry whose `size` is exactly `size`."""
    base = entry(b"", team)
    return entry(b"x" * (size - base.size), team)


async def test_a_json_entry_comes_back_as_stored(make_store: MakeStore) -> None:
    store = await make_store()
    stored = entry(usage=Usage(10, 5, 15, 2, 1))
    assert await store.get("k") is None
    assert await store.put("k", stored)
    got = await store.get("k")
    assert got == stored and got is not None and got.body == stored.body
    assert await store.get("other") is None


async def test_a_stream_entry_comes_back_byte_for_byte(make_store: MakeStore) -> None:
    store = await make_store()
    sse = (
        b'event: response.created\r\ndata: {"type":"response.created"}\r\n\r\n'
        b'data: {"delta":"caf\xc3\xa9 \xe2\x80\x94 \xff\x00"}\n\n'  # not even valid UTF-8
        b"event: response.completed\ndata: {}\n\n"
    )
    stored = entry(sse, stream=True)
    assert await store.put("s", stored)
    got = await store.get("s")
    assert got is not None and got.body == sse and got.stream
    assert got == stored


async def test_put_replaces_what_a_key_held(make_store: MakeStore) -> None:
    store = await make_store()
    await store.put("k", entry(b"first"))
    await store.put("k", entry(b"second", usage=Usage(0, 0, 0)))
    got = await store.get("k")
    assert got is not None and got.body == b"second"
    stats = await store.stats()
    assert stats == StoreStats(1, entry(b"second").size)


async def test_an_entry_expires_ttl_seconds_after_it_was_stored(
    make_store: MakeStore, clock: FakeClock
) -> None:
    store = await make_store(ttl=60)
    await store.put("k", entry())
    clock.t += 30
    await store.put("later", entry(team="b"))
    clock.t += 29.9
    assert await store.get("k") is not None
    clock.t += 0.2
    assert await store.get("k") is None
    assert await store.get("later") is not None
    assert await store.stats() == StoreStats(1, entry(team="b").size)
    clock.t += 30
    assert await store.get("later") is None
    assert (await store.stats()).entries == 0


async def test_the_store_never_holds_more_than_max_bytes(make_store: MakeStore) -> None:
    store = await make_store(max_bytes=5000, max_entry_bytes=2000)
    for n in range(20):
        assert await store.put(f"k{n}", sized(1000 + 37 * n))
        stats = await store.stats()
        assert stats.bytes <= 5000
        assert await store.get(f"k{n}") is not None  # the newest entry is kept
    assert 1 <= stats.entries < 20
    held = [e for e in [await store.get(f"k{n}") for n in range(20)] if e is not None]
    assert stats == StoreStats(len(held), sum(e.size for e in held))


async def test_an_entry_larger_than_max_entry_bytes_is_refused(make_store: MakeStore) -> None:
    store = await make_store(max_bytes=10_000, max_entry_bytes=1000)
    assert not await store.put("big", sized(1001))
    assert await store.get("big") is None
    assert await store.stats() == StoreStats(0, 0)
    assert await store.put("edge", sized(1000))
    assert await store.get("edge") == sized(1000)


async def test_an_entry_larger_than_the_whole_store_is_refused(make_store: MakeStore) -> None:
    store = await make_store(max_bytes=1000, max_entry_bytes=5000)
    await store.put("small", sized(400))
    assert not await store.put("big", sized(1001))
    assert await store.get("small") is not None  # nothing evicted for it


async def test_purge_by_team_and_all(make_store: MakeStore) -> None:
    store = await make_store()
    for key, team in (("a1", "a"), ("a2", "a"), ("b1", "b"), ("c1", "c")):
        await store.put(key, entry(team=team))
    assert await store.purge("a") == 2
    assert await store.get("a1") is None and await store.get("a2") is None
    assert await store.get("b1") is not None
    assert await store.purge("nobody") == 0
    assert await store.purge() == 2
    assert await store.get("b1") is None and await store.get("c1") is None
    assert await store.stats() == StoreStats(0, 0)
    assert await store.put("again", entry())  # a purged store still stores


async def test_purge_counts_only_live_entries(make_store: MakeStore, clock: FakeClock) -> None:
    store = await make_store(ttl=60)
    await store.put("old", entry())
    clock.t += 40
    await store.put("new", entry())
    clock.t += 30
    assert await store.purge("a") == 1


async def test_stats_count_entries_and_their_bytes(make_store: MakeStore) -> None:
    store = await make_store()
    assert await store.stats() == StoreStats(0, 0)
    a, b = entry(b"a" * 100), entry(b"b" * 300, team="b", stream=True)
    await store.put("a", a)
    await store.put("b", b)
    assert await store.stats() == StoreStats(2, a.size + b.size)
