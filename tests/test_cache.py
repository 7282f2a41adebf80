"""Cache keys, the memory store's bounds, entry encoding and single-flight. No server."""

from __future__ import annotations

import asyncio

from gateway.cache.entry import CacheEntry
from gateway.cache.flight import Flight, Flights
from gateway.cache.key import cache_key, canonical_json
from gateway.cache.store import MemoryCacheStore
from gateway.usage import Usage


def entry(body: bytes = b"{}", team: str = "a", created: float = 0.0) -> CacheEntry:
    return CacheEntry(
        200,
        (("content-type", "application/json"),),
        body,
        False,
        team,
        "m",
        Usage(1, 2, 3),
        created,
    )


def test_key_is_canonical_and_scoped() -> None:
    a = {"model": "m", "input": [{"role": "user", "content": "x"}], "temperature": 0.5}
    b = {"temperature": 0.5, "input": [{"content": "x", "role": "user"}], "model": "m"}
    assert canonical_json(a) == canonical_json(b)
    assert b" " not in canonical_json(a)
    assert cache_key("team:x", "up", a) == cache_key("team:x", "up", b)
    assert cache_key("team:x", "up", a) != cache_key("team:y", "up", a)
    assert cache_key("team:x", "up", a) != cache_key("team:x", "other", a)
    assert cache_key("t", "u", {**a, "stream": True}) != cache_key("t", "u", a)


def test_entry_roundtrip() -> None:
    e = CacheEntry(
        200,
        (("content-type", "text/event-stream"),),
        b"event: x\r\ndata: y\r\n\r\n",
        True,
        "team",
        "model",
        Usage(5, 6, 11, 1, 2),
        123.5,
    )
    assert CacheEntry.from_bytes(e.to_bytes()) == e


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def test_ttl_expiry() -> None:
    clock = FakeClock()
    store = MemoryCacheStore(ttl=60, max_bytes=10_000, max_entry_bytes=5_000, clock=clock)
    await store.put("k", entry())
    clock.t += 59.9
    assert await store.get("k") is not None
    clock.t += 0.2
    assert await store.get("k") is None
    assert (await store.stats()).entries == 0


async def test_byte_bound_evicts_least_recently_used() -> None:
    store = MemoryCacheStore(
        ttl=600, max_bytes=3 * (1000 + 250), max_entry_bytes=2000, clock=FakeClock()
    )
    for k in ("a", "b", "c"):
        assert await store.put(k, entry(b"x" * 1000))
    assert await store.get("a") is not None  # a is now the most recently used
    await store.put("d", entry(b"x" * 1000))
    assert await store.get("b") is None
    assert all([await store.get(k) for k in ("a", "c", "d")])
    assert (await store.stats()).bytes <= 3 * 1250


async def test_entry_cap_and_purge_by_team() -> None:
    store = MemoryCacheStore(ttl=600, max_bytes=100_000, max_entry_bytes=500, clock=FakeClock())
    assert not await store.put("big", entry(b"x" * 600))
    await store.put("a1", entry(team="a"))
    await store.put("b1", entry(team="b"))
    assert await store.purge("a") == 1
    assert await store.get("a1") is None and await store.get("b1") is not None
    assert await store.purge() == 1


async def test_flight_followers_replay_from_start_then_live() -> None:
    flights = Flights()
    leader = flights.open("k", stream=True)
    assert flights.peek("k") is leader
    leader.publish_head(200, (), shared=True)
    leader.publish(b"one")

    async def follow() -> list[bytes]:
        assert await leader.wait_head()
        return [c async for c in leader.follow()]

    task = asyncio.ensure_future(follow())
    await asyncio.sleep(0)
    leader.publish(b"two")
    await asyncio.sleep(0)
    leader.publish(b"three")
    leader.finish(None, Usage(1, 1, 2))
    flights.land("k", leader)
    assert await task == [b"one", b"two", b"three"]
    assert flights.peek("k") is None


async def test_json_flight_shared_only_when_cacheable() -> None:
    f = Flight(stream=False)
    waiter = asyncio.ensure_future(f.wait_done())
    await asyncio.sleep(0)
    f.finish(None, None)
    assert await waiter is None
    g = Flight(stream=False)
    e = entry()
    waiter = asyncio.ensure_future(g.wait_done())
    await asyncio.sleep(0)
    g.finish(e, e.usage)
    assert await waiter is e
