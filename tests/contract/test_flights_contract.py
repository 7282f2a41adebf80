"""The single-flight contract (FlightRegistry and FlightLike in gateway/cache/flight.py), held
against every implementation."""

from __future__ import annotations

import asyncio

import pytest

from contract import implementations, in_process
from gateway.cache.entry import CacheEntry
from gateway.cache.flight import FlightLike, FlightRegistry, Flights
from gateway.usage import Usage

# the one place an implementation joins this suite (see tests/contract/__init__.py)
flights = implementations("flights", pytest.param(in_process(Flights), id="local"))


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
    assert await flight.wait_head()
    return [chunk async for chunk in flight.follow()]


async def settle_loop() -> None:
    """Let every task that can run, run."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_open_peek_land(flights: FlightRegistry) -> None:
    assert flights.peek("k") is None and len(flights) == 0
    leader = flights.open("k", stream=True)
    assert flights.peek("k") is leader and flights.peek("other") is None
    assert len(flights) == 1
    assert leader.stream and not leader.done and leader.readers == 0
    flights.land("k", leader)
    assert flights.peek("k") is None and len(flights) == 0


async def test_a_finished_flight_cannot_be_joined(flights: FlightRegistry) -> None:
    leader = flights.open("k", stream=False)
    leader.finish(entry(), Usage(1, 2, 3))
    assert leader.done
    assert flights.peek("k") is None  # not yet landed, but over: a newcomer leads anew
    flights.land("k", leader)


async def test_landing_a_stale_flight_keeps_the_newer_one(flights: FlightRegistry) -> None:
    old = flights.open("k", stream=False)
    new = flights.open("k", stream=False)
    assert flights.peek("k") is new
    old.finish(None, None)
    flights.land("k", old)
    assert flights.peek("k") is new
    flights.land("k", new)
    assert flights.peek("k") is None


async def test_the_head_and_the_end_are_published(flights: FlightRegistry) -> None:
    leader = flights.open("k", stream=True)
    assert leader.status == 0 and leader.usage is None
    leader.publish_head(200, SSE_HEAD, shared=True)
    assert (leader.status, leader.headers) == (200, SSE_HEAD)
    leader.finish(None, Usage(3, 4, 7))
    assert leader.done and leader.usage == Usage(3, 4, 7)
    flights.land("k", leader)


async def test_a_late_follower_gets_every_chunk_from_the_first(flights: FlightRegistry) -> None:
    leader = flights.open("k", stream=True)
    leader.publish_head(200, SSE_HEAD, shared=True)
    early = asyncio.ensure_future(read_all(leader))
    leader.publish(CHUNKS[0])
    leader.publish(CHUNKS[1])
    await settle_loop()
    joined = flights.peek("k")
    assert joined is leader
    late = asyncio.ensure_future(read_all(joined))
    await settle_loop()
    for chunk in CHUNKS[2:]:
        leader.publish(chunk)
        await settle_loop()
    leader.finish(None, Usage(1, 1, 2))
    flights.land("k", leader)
    assert await early == CHUNKS
    assert await late == CHUNKS
    # one that arrives after the end (it held the flight) still misses nothing
    assert await read_all(leader) == CHUNKS


async def test_many_followers_each_get_the_whole_stream(flights: FlightRegistry) -> None:
    leader = flights.open("k", stream=True)
    leader.publish_head(200, SSE_HEAD, shared=True)
    chunks = [f"data: {n}\n\n".encode() for n in range(200)]
    followers = []
    for n, chunk in enumerate(chunks):
        if n % 10 == 0:
            followers.append(asyncio.ensure_future(read_all(leader)))
        leader.publish(chunk)
        if n % 7 == 0:
            await asyncio.sleep(0)
    leader.finish(None, None)
    flights.land("k", leader)
    results = await asyncio.gather(*followers)
    assert len(results) == 20
    assert all(got == chunks for got in results)


async def test_a_slow_follower_never_holds_up_the_leader(flights: FlightRegistry) -> None:
    leader = flights.open("k", stream=True)
    leader.publish_head(200, SSE_HEAD, shared=True)
    release = asyncio.Event()
    slow_got: list[bytes] = []

    async def slow() -> None:
        async for chunk in leader.follow():
            slow_got.append(chunk)
            await release.wait()  # a client that stopped reading

    slow_task = asyncio.ensure_future(slow())
    fast = asyncio.ensure_future(read_all(leader))
    await settle_loop()
    chunks = [b"x" * 1000 + str(n).encode() for n in range(500)]
    for chunk in chunks:
        leader.publish(chunk)  # returns at once: nothing to await
    leader.finish(None, None)
    flights.land("k", leader)
    assert await asyncio.wait_for(fast, 5) == chunks
    assert len(slow_got) <= 1
    release.set()
    await asyncio.wait_for(slow_task, 5)
    assert slow_got == chunks


async def test_a_follower_that_goes_away_leaves_the_others(flights: FlightRegistry) -> None:
    leader = flights.open("k", stream=True)
    leader.publish_head(200, SSE_HEAD, shared=True)
    gone = asyncio.ensure_future(read_all(leader))
    stays = asyncio.ensure_future(read_all(leader))
    leader.publish(CHUNKS[0])
    await settle_loop()
    gone.cancel()
    for chunk in CHUNKS[1:]:
        leader.publish(chunk)
    leader.finish(None, None)
    flights.land("k", leader)
    assert await stays == CHUNKS
    assert gone.cancelled()


@pytest.mark.parametrize(
    ("head", "shared"),
    [((200, True), True), ((429, False), False), (None, False)],
    ids=["shared-head", "unshared-head", "no-head"],
)
async def test_wait_head_and_wait_done_tell_a_stream_follower_what_to_do(
    flights: FlightRegistry, head: tuple[int, bool] | None, shared: bool
) -> None:
    leader = flights.open("k", stream=True)
    waiter = asyncio.ensure_future(leader.wait_head())
    done = asyncio.ensure_future(leader.wait_done())
    await settle_loop()
    assert not waiter.done() and not done.done()
    recorded = None  # with no head, the leader failed before the upstream answered
    if head is not None:
        status, shares = head
        leader.publish_head(status, SSE_HEAD, shared=shares)
        assert await waiter is shared  # as soon as the head is out, not at the end
        await settle_loop()
        assert not done.done()
        for chunk in CHUNKS:
            leader.publish(chunk)
        # an unshared head keeps the flight unshared, even with an entry at the end
        recorded = entry(b"".join(CHUNKS), stream=True)
    leader.finish(recorded, None)
    assert await waiter is shared
    assert await done == (recorded if shared else None)
    flights.land("k", leader)


async def test_a_json_flight_is_shared_only_when_cacheable(flights: FlightRegistry) -> None:
    failed = flights.open("k", stream=False)
    waiter = asyncio.ensure_future(failed.wait_done())
    await settle_loop()
    assert not waiter.done()
    failed.finish(None, None)
    assert await waiter is None  # each follower makes its own call
    flights.land("k", failed)

    ok = flights.open("k", stream=False)
    waiter = asyncio.ensure_future(ok.wait_done())
    await settle_loop()
    cached = entry(b'{"id":"resp_1"}')
    ok.finish(cached, cached.usage)
    assert await waiter == cached
    assert await ok.wait_done() == cached  # asked again, after the end
    flights.land("k", ok)


async def test_readers_is_a_counter_the_pipeline_keeps(flights: FlightRegistry) -> None:
    leader = flights.open("k", stream=True)
    leader.readers += 1
    joined = flights.peek("k")
    assert joined is not None
    joined.readers += 2
    joined.readers -= 1
    assert leader.readers == 2
    leader.finish(None, None)
    flights.land("k", leader)
