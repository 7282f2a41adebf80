"""What single-flight through Redis adds to the contract: a leader that goes away ends its
followers' wait within a bounded time, and a huge stream is not kept in Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from forwarder import Forwarder
from servers import REDIS_URL, redis_prefix

from gateway.cache.flight import FlightLike
from gateway.cache.redis_flight import RedisFlights
from gateway.redis_link import RedisLink

pytestmark = pytest.mark.redis

SSE_HEAD = (("content-type", "text/event-stream"),)
LEASE = 0.6


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    async with redis_prefix() as p:
        yield p


@pytest.fixture
async def forwarder() -> AsyncIterator[Forwarder]:
    fwd = Forwarder(6379)
    await fwd.start()
    yield fwd
    await fwd.stop()


async def two_replicas(prefix: str, leader_url: str) -> tuple[RedisFlights, RedisFlights]:
    """A leader replica reaching Redis through `leader_url`, a follower replica directly."""
    return (
        RedisFlights(RedisLink(leader_url, prefix), lease=LEASE),
        RedisFlights(RedisLink(REDIS_URL, prefix), lease=LEASE),
    )


async def close(*replicas: RedisFlights) -> None:
    for r in replicas:
        await r.close()
        await r.link.close()


async def read(flight: FlightLike) -> bytes:
    return b"".join([chunk async for chunk in flight.follow()])


async def test_a_leader_lost_mid_stream_ends_its_followers_with_an_error_event(
    prefix: str, forwarder: Forwarder
) -> None:
    a, b = await two_replicas(prefix, forwarder.url(REDIS_URL))
    try:
        leader, leads = await a.claim("k", True)
        assert leads
        leader.publish_head(200, SSE_HEAD, shared=True)
        leader.publish(b'event: response.created\ndata: {"sequence_number":0}\n\n')
        leader.publish(b'data: {"sequence_number":1,"delta":"hal')  # cut mid-event
        follower, leads = await b.claim("k", True)
        assert not leads and await asyncio.wait_for(follower.wait_head(), 5)
        await asyncio.sleep(0.2)  # what was published reached the log
        t0 = time.monotonic()
        await forwarder.stop()  # the leader's replica is cut off from Redis for good
        got = await asyncio.wait_for(read(follower), 5)
        assert time.monotonic() - t0 < LEASE + 1.5
        assert got.startswith(b'event: response.created\ndata: {"sequence_number":0}\n\n')
        # the cut event is ended, and the error takes the number the cut one never got
        assert got.endswith(b'"sequence_number":1}\n\n')
        assert b'"code":"upstream_stream_interrupted"' in got
        # the leader's own clients never noticed
        leader.publish(b'lo"}\n\n')
        leader.finish(None, None)
        assert await read(leader) == (
            b'event: response.created\ndata: {"sequence_number":0}\n\n'
            b'data: {"sequence_number":1,"delta":"hallo"}\n\n'
        )
        await asyncio.wait_for(a.land("k", leader), 2)  # bounded, with Redis out of reach
    finally:
        await close(a, b)


async def test_a_leader_lost_before_its_head_lets_followers_make_their_own_call(
    prefix: str, forwarder: Forwarder
) -> None:
    a, b = await two_replicas(prefix, forwarder.url(REDIS_URL))
    try:
        _, leads = await a.claim("k", True)
        assert leads
        follower, leads = await b.claim("k", True)
        assert not leads
        await forwarder.stop()
        t0 = time.monotonic()
        assert await asyncio.wait_for(follower.wait_head(), 5) is False
        assert time.monotonic() - t0 < LEASE + 1.5
        # and the next identical request leads: the lost claim ran out
        again, leads = await b.claim("k", True)
        assert leads
        await b.land("k", again)
    finally:
        await close(a, b)


async def test_a_stream_past_the_shared_size_is_not_kept_in_redis(prefix: str) -> None:
    link_a, link_b = RedisLink(REDIS_URL, prefix), RedisLink(REDIS_URL, prefix)
    a = RedisFlights(link_a, max_log_bytes=10_000)
    b = RedisFlights(link_b)
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        leader, _ = await a.claim("k", True)
        leader.publish_head(200, SSE_HEAD, shared=True)
        follower, _ = await b.claim("k", True)
        for n in range(100):
            leader.publish(b"data: " + b"x" * 1000 + str(n).encode() + b"\n\n")
        got = await asyncio.wait_for(read(follower), 5)
        assert b"upstream_stream_interrupted" in got and len(got) < 12_000
        log_bytes = 0
        async for key in raw.scan_iter(match=f"{prefix}*log*"):
            log_bytes += await raw.memory_usage(key) or 0
        assert log_bytes < 40_000
        # the claim is given up: the next identical request leads its own call
        again, leads = await b.claim("k", True)
        assert leads
        leader.finish(None, None)
        await a.land("k", leader)
        await b.land("k", again)
    finally:
        await raw.aclose()
        await close(a, b)
