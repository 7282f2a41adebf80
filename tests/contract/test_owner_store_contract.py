"""The OwnerStore contract (gateway/owners.py), held against every implementation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as redis
from servers import REDIS_URL, redis_prefix

from contract import implementations, in_process
from gateway.owners import LocalOwners, OwnerStore, RedisOwners
from gateway.redis_link import RedisLink


@asynccontextmanager
async def redis_owners() -> AsyncIterator[RedisOwners]:
    async with redis_prefix() as prefix:
        link = RedisLink(REDIS_URL, prefix)
        owners = RedisOwners(link)
        try:
            yield owners
        finally:
            await owners.close()
            await link.close()


# the one place an implementation joins this suite (see tests/contract/__init__.py)
owners = implementations(
    "owners",
    pytest.param(in_process(LocalOwners), id="local"),
    pytest.param(redis_owners, id="redis", marks=pytest.mark.redis),
)


async def soon(
    owners: OwnerStore, rid: str, reader: OwnerStore | None = None
) -> tuple[str, str] | None:
    """What `get` answers (through `reader`, or `owners`) once `owners` has settled."""
    await owners.settle()
    return await (reader or owners).get(rid)


async def test_an_owner_is_found_once_remembered(owners: OwnerStore) -> None:
    assert await owners.get("resp_1") is None
    owners.remember("resp_1", ("alpha", "mock"))
    assert await soon(owners, "resp_1") == ("alpha", "mock")
    assert await owners.get("resp_2") is None


async def test_remembering_again_replaces(owners: OwnerStore) -> None:
    owners.remember("resp_1", ("alpha", "mock"))
    owners.remember("resp_1", ("beta", "other"))
    assert await soon(owners, "resp_1") == ("beta", "other")


@pytest.mark.parametrize("rid", ["resp_*", "resp_?", "a:b", "owner:x", "ü\x00\xff", "{x}"])
async def test_ids_are_taken_literally(owners: OwnerStore, rid: str) -> None:
    owners.remember(rid, ("alpha", "mock"))
    owners.remember("resp_other", ("beta", "mock"))
    assert await soon(owners, rid) == ("alpha", "mock")
    assert await owners.get("resp_x") is None


async def test_many_owners_at_once(owners: OwnerStore) -> None:
    for n in range(500):
        owners.remember(f"resp_{n}", (f"team{n % 7}", "mock"))
    await owners.settle()
    got = await asyncio.gather(*(owners.get(f"resp_{n}") for n in range(500)))
    assert got == [(f"team{n % 7}", "mock") for n in range(500)]


@pytest.mark.redis
async def test_redis_owners_are_shared_and_expire() -> None:
    async with redis_prefix() as prefix:
        links = [RedisLink(REDIS_URL, prefix), RedisLink(REDIS_URL, prefix)]
        a, b = RedisOwners(links[0], ttl=60), RedisOwners(links[1])
        raw = redis.Redis.from_url(REDIS_URL)
        try:
            a.remember("resp_1", ("alpha", "mock"))
            a.remember("x" * 1000, ("alpha", "mock"))  # no huge keys: the ledger answers
            assert await soon(a, "resp_1", b) == ("alpha", "mock")
            assert 0 < await raw.ttl(f"{prefix}owner:resp_1") <= 60
            assert await b.get("x" * 1000) is None
            await raw.set(f"{prefix}owner:resp_2", b"not json")
            await raw.set(f"{prefix}owner:resp_3", b'["alpha", 3]')
            assert await b.get("resp_2") is None and await b.get("resp_3") is None
            assert [k async for k in raw.scan_iter(match=f"{prefix}owner:x*")] == []
        finally:
            await raw.aclose()
            for store in (a, b):
                await store.close()
            for link in links:
                await link.close()


@pytest.mark.redis
async def test_redis_owners_answer_none_while_redis_is_down() -> None:
    link = RedisLink("redis://127.0.0.1:1/0", "gw:")
    owners = RedisOwners(link)
    try:
        owners.remember("resp_1", ("alpha", "mock"))  # dropped, never raised
        await asyncio.wait_for(owners.settle(), 2)  # bounded
        assert await owners.get("resp_1") is None  # the ledger answers instead
    finally:
        await owners.close()
        await link.close()
