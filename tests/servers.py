"""The machine's Redis and PostgreSQL, for tests of the backends that use them.

Each test gets its own Redis key prefix or its own PostgreSQL database and removes it after
itself. Tests marked `redis` or `postgres` skip, with the reason, when that server does not
answer on 127.0.0.1; nothing else skips.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("GATEWAY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def answers(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port (within half a second)."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def redis_missing() -> str:
    """Why Redis tests cannot run here, or "" when they can."""
    return "" if answers("127.0.0.1", 6379) else "no Redis server answers on 127.0.0.1:6379"


def postgres_missing() -> str:
    """Why PostgreSQL tests cannot run here, or "" when they can."""
    return "" if answers("127.0.0.1", 5432) else "no PostgreSQL server answers on 127.0.0.1:5432"


def unique(kind: str) -> str:
    """A name no other test uses: a Redis prefix or a database name."""
    return f"gwtest_{kind}_{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def redis_prefix() -> AsyncIterator[str]:
    """A fresh key prefix (`gwtest_...:`); every key under it is deleted afterwards."""
    import redis.asyncio as redis

    prefix = unique("r") + ":"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = [key async for key in client.scan_iter(match=f"*{prefix}*", count=500)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """A fresh, empty database; yields its URL and drops it afterwards."""
    import asyncpg

    name = unique("pg")
    admin = await asyncpg.connect(POSTGRES_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = POSTGRES_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        admin = await asyncpg.connect(POSTGRES_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
