"""The single-flight contract (FlightRegistry and FlightLike in gateway/cache/flight.py), held
against every implementation. Followers are claimed from the registry, as the pipeline claims
them: with Redis, `redis-remote` makes every follower read the leader's log, as a follower on
another replica does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from servers import REDIS_URL, redis_prefix

from contract import implementations, in_process
from gateway.cache.entry import CacheEntry
from gateway.cache.flight import FlightLike, FlightRegistry, Flights
from gateway.cache.redis_flight import RedisFlights
from gateway.redis_link import RedisLink
from gateway.usage import Usage


def redis_flights(join_local: bool = True) -> object:
    @asynccontextmanager
    async def factory() -> AsyncIterator[RedisFlights]:
        async with redis_prefix() as prefix:
            link = RedisLink(REDIS_URL, prefix)
            flights = RedisFlights(link, join_local=join_local)
            try:
                yield flights
            finally:
                await flights.close()
                await link.close()

    return factory


# the one place an implementation joins this suite (see tests/contract/__init__.py)
flights = implementations(
    "flights",
    pytest.param(in_process(Flights), id="local"),
    pytest.param(redis_flights(), id="redis", marks=pytest.mark.redis),
    pytest.param(redis_flights(join_local=False), id="redis-remote", marks=pytest.mark.redis),
)


SSE_HEAD = (("content-type", "text/event-stream"),)
CHUNKS = [
    b"event: response.created\ndata: {}\n\n",
    b'data: {"delta":"caf\xc3',  # a chunk may cut a character, or an event, anywhere
    b'\xa9 \xff"}\n\n',
    b"",
    b"event: response.completed\r\ndata: {}\r\n\r\n",
]


def entry(body: bytes = b"{}", stream: bool = False) -> CacheEntry:
    return CacheEntry(200, (), body, stream, "a", "m", Usage(1, 2, 3), 0.0)


async def read_all(flight: FlightLike) -> list[bytes]:
    assert await asyncio.wait_for(flight.wait_head(), 5)
    return [chunk async for chunk in flight.follow()]


async def lead(flights: FlightRegistry, key: str = "k", stream: bool = True) -> FlightLike:
    flight, leads = await flights.claim(key, stream)
    assert leads
    return flight


async def join(flights: FlightRegistry, key: str = "k", stream: bool = True) -> FlightLike:
    flight, leads = await flights.claim(key, stream)
    assert not leads
    return flight


async def settle_loop() -> None:
    """Let every task that can run, run."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_claim_leads_once_then_joins_until_landed(flights: FlightRegistry) -> None:
    assert len(flights) == 0
    leader = await lead(flights)
    assert leader.stream and not leader.done
    assert len(flights) == 1
    joined = await join(flights)
    assert joined.stream
    other = await lead(flights, "other", stream=False)
    assert not other.stream
    await flights.land("other", other)
    leader.finish(None, None)
    await flights.land("k", leader)
    assert len(flights) == 0
    # landed, and its end seen where it was followed: a newcomer leads anew (until then,
    # another process may still hand the ended flight's result to a newcomer)
    await asyncio.wait_for(joined.wait_done(), 5)
    again = await lead(flights)
    await flights.land("k", again)


async def test_identical_claims_at_once_have_one_leader(flights: FlightRegistry) -> None:
    claims = await asyncio.gather(*(flights.claim("k", True) for _ in range(20)))
    assert sum(leads for _, leads in claims) == 1
    (leader,) = [f for f, leads in claims if leads]
    leader.finish(None, None)
    await flights.land("k", leader)


async def test_landing_an_unfinished_flight_ends_it_unshared(flights: FlightRegistry) -> None:
    leader = await lead(flights, stream=False)
    follower = await join(flights, stream=False)
    await flights.land("k", leader)
    assert leader.done
    assert await asyncio.wait_for(follower.wait_done(), 5) is None  # its own call, then


async def test_the_head_and_the_end_are_published(flights: FlightRegistry) -> None:
    leader = await lead(flights)
    follower = await join(flights)
    assert leader.status == 0 and leader.usage is None
    leader.publish_head(200, SSE_HEAD, shared=True)
    assert (leader.status, leader.headers) == (200, SSE_HEAD)
    leader.finish(None, Usage(3, 4, 7))
    assert leader.done and leader.usage == Usage(3, 4, 7)
    assert await asyncio.wait_for(follower.wait_head(), 5)
    assert (follower.status, follower.headers) == (200, SSE_HEAD)
    await asyncio.wait_for(follower.wait_done(), 5)
    assert follower.done and follower.usage == Usage(3, 4, 7)
    await flights.land("k", leader)


async def test_a_late_follower_gets_every_chunk_from_the_first(flights: FlightRegistry) -> None:
    leader = await lead(flights)
    leader.publish_head(200, SSE_HEAD, shared=True)
    early = asyncio.ensure_future(read_all(await join(flights)))
    leader.publish(CHUNKS[0])
    leader.publish(CHUNKS[1])
    await asyncio.sleep(0.05)
    late = asyncio.ensure_future(read_all(await join(flights)))
    await settle_loop()
    for chunk in CHUNKS[2:]:
        leader.publish(chunk)
        await settle_loop()
    leader.finish(None, Usage(1, 1, 2))
    got_early, got_late = await asyncio.wait_for(asyncio.gather(early, late), 5)
    assert b"".join(got_early) == b"".join(got_late) == b"".join(CHUNKS)
    assert await read_all(leader) == CHUNKS  # after the end, still from the first
    await flights.land("k", leader)


async def test_many_followers_each_get_the_whole_stream(flights: FlightRegistry) -> None:
    leader = await lead(flights)
    leader.publish_head(200, SSE_HEAD, shared=True)
    chunks = [f"data: {n}\n\n".encode() for n in range(200)]
    followers = []
    for n, chunk in enumerate(chunks):
        if n % 10 == 0:
            followers.append(asyncio.ensure_future(read_all(await join(flights))))
        leader.publish(chunk)
        if n % 7 == 0:
            await asyncio.sleep(0)
    leader.finish(None, None)
    results = await asyncio.wait_for(asyncio.gather(*followers), 10)
    await flights.land("k", leader)
    assert len(results) == 20
    assert all(b"".join(got) == b"".join(chunks) for got in results)


async def test_a_slow_follower_never_holds_up_the_leader(flights: FlightRegistry) -> None:
    leader = await lead(flights)
    leader.publish_head(200, SSE_HEAD, shared=True)
    release = asyncio.Event()
    slow_got: list[bytes] = []
    slow_flight = await join(flights)

    async def slow() -> None:
        assert await slow_flight.wait_head()
        async for chunk in slow_flight.follow():
            slow_got.append(chunk)
            await release.wait()  # a client that stopped reading

    slow_task = asyncio.ensure_future(slow())
    fast = asyncio.ensure_future(read_all(await join(flights)))
    await settle_loop()
    chunks = [b"x" * 1000 + str(n).encode() for n in range(500)]
    for chunk in chunks:
        leader.publish(chunk)  # returns at once: nothing to await
    leader.finish(None, None)
    assert b"".join(await asyncio.wait_for(fast, 5)) == b"".join(chunks)
    assert len(slow_got) <= 1
    release.set()
    await asyncio.wait_for(slow_task, 5)
    assert b"".join(slow_got) == b"".join(chunks)
    await flights.land("k", leader)


async def test_a_follower_that_goes_away_leaves_the_others(flights: FlightRegistry) -> None:
    leader = await lead(flights)
    leader.publish_head(200, SSE_HEAD, shared=True)
    gone = asyncio.ensure_future(read_all(await join(flights)))
    stays = asyncio.ensure_future(read_all(await join(flights)))
    leader.publish(CHUNKS[0])
    await asyncio.sleep(0.05)
    gone.cancel()
    for chunk in CHUNKS[1:]:
        leader.publish(chunk)
    leader.finish(None, None)
    assert b"".join(await asyncio.wait_for(stays, 5)) == b"".join(CHUNKS)
    assert gone.cancelled()
    await flights.land("k", leader)


@pytest.mark.parametrize(
    ("head", "shared"),
    [((200, True), True), ((429, False), False), (None, False)],
    ids=["shared-head", "unshared-head", "no-head"],
)
async def test_wait_head_and_wait_done_tell_a_stream_follower_what_to_do(
    flights: FlightRegistry, head: tuple[int, bool] | None, shared: bool
) -> None:
    leader = await lead(flights)
    follower = await join(flights)
    waiter = asyncio.ensure_future(follower.wait_head())
    done = asyncio.ensure_future(follower.wait_done())
    await asyncio.sleep(0.05)
    assert not waiter.done() and not done.done()
    recorded = None  # with no head, the leader failed before the upstream answered
    if head is not None:
        status, shares = head
        leader.publish_head(status, SSE_HEAD, shared=shares)
        assert await asyncio.wait_for(waiter, 5) is shared  # as soon as the head is out
        await asyncio.sleep(0.05)
        assert not done.done()
        for chunk in CHUNKS:
            leader.publish(chunk)
        # an unshared head keeps the flight unshared, even with an entry at the end
        recorded = entry(b"".join(CHUNKS), stream=True)
    leader.finish(recorded, None)
    assert await asyncio.wait_for(waiter, 5) is shared
    assert await asyncio.wait_for(done, 5) == (recorded if shared else None)
    await flights.land("k", leader)


async def test_a_json_flight_is_shared_only_when_cacheable(flights: FlightRegistry) -> None:
    failed = await lead(flights, stream=False)
    waiter = asyncio.ensure_future((await join(flights, stream=False)).wait_done())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    failed.finish(None, None)
    assert await asyncio.wait_for(waiter, 5) is None  # each follower makes its own call
    await flights.land("k", failed)

    ok = await lead(flights, stream=False)
    follower = await join(flights, stream=False)
    waiter = asyncio.ensure_future(follower.wait_done())
    await asyncio.sleep(0.05)
    cached = entry(b'{"id":"resp_1"}')
    ok.finish(cached, cached.usage)
    assert await asyncio.wait_for(waiter, 5) == cached
    assert await follower.wait_done() == cached  # asked again, after the end
    assert follower.usage == cached.usage
    await flights.land("k", ok)


async def test_readers_is_a_counter_the_pipeline_keeps(flights: FlightRegistry) -> None:
    leader = await lead(flights)
    before = leader.readers
    leader.readers += 1
    leader.readers += 2
    leader.readers -= 1
    assert leader.readers == before + 2
    joined = await join(flights)
    joined.readers += 1
    assert joined.readers >= 1
    leader.finish(None, None)
    await flights.land("k", leader)
