"""Who made a response: its id -> (team, upstream), in front of the ledger, which has them all.

Requests about a stored response (`/v1/responses/{id}`) go to the upstream that made it, and
only for the team that made it (`gateway.plan.by_owner`). The ledger answers for every
response, but only once its records are written and only for the replicas that share it:
an owner store answers at once. `LocalOwners` keeps the most recent ids of this process;
`RedisOwners` shares them with every replica, so a response made through one replica is
readable through any other at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import orjson
from cachetools import LRUCache

from gateway.redis_link import COMMAND_TIMEOUT, RedisLink, StateUnavailable

Owner = tuple[str, str]  # (team, upstream)

LOCAL_SIZE = 200_000
# a day: the usual time to read a response back is seconds to minutes; the ledger answers
# for older ones, and a day's ids bound what Redis holds (about 100 bytes each)
REDIS_TTL = 86_400
MAX_ID = 256  # longer ids are left to the ledger: no client-chosen string makes a huge key


class OwnerStore(Protocol):
    # False when what `remember` records reaches other processes only in the background:
    # then `settle` waits for it
    immediate: bool

    async def get(self, response_id: str) -> Owner | None:
        """The owner recorded for `response_id`, or None (then ask the ledger)."""
        ...

    def remember(self, response_id: str, owner: Owner) -> None:
        """Record an owner. Never waits: a shared store sends it in the background, ahead of
        anything this process does later."""
        ...

    async def settle(self) -> None:
        """Return once every owner remembered so far can be read by every process sharing
        the store (or after a short bound, if it cannot be sent): a client that learns a
        response id may ask any replica about it at once."""
        ...

    async def close(self) -> None: ...


class LocalOwners:
    """The most recent `size` owners of this process."""

    immediate = True

    def __init__(self, size: int = LOCAL_SIZE) -> None:
        self._owners: LRUCache[str, Owner] = LRUCache(maxsize=size)

    async def get(self, response_id: str) -> Owner | None:
        return self._owners.get(response_id)

    def remember(self, response_id: str, owner: Owner) -> None:
        self._owners[response_id] = owner

    async def settle(self) -> None:
        return None

    async def close(self) -> None:
        self._owners.clear()


class RedisOwners:
    """Owners under ``{prefix}owner:<id>`` for `ttl` seconds, shared by every replica. While
    Redis does not answer, ids are neither found nor recorded here: the ledger answers."""

    immediate = False

    def __init__(self, link: RedisLink, ttl: int = REDIS_TTL) -> None:
        self.link, self.ttl = link, ttl
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._queued = self._sent = 0  # owners remembered, and sent (or given up on)
        self._progress = asyncio.Event()

    def _key(self, response_id: str) -> str:
        return f"{self.link.prefix}owner:{response_id}"

    async def get(self, response_id: str) -> Owner | None:
        if len(response_id) > MAX_ID:
            return None
        try:
            raw = await self.link.run(
                "owner_get", lambda: self.link.client.get(self._key(response_id))
            )
        except StateUnavailable:
            return None
        try:
            team, upstream = orjson.loads(raw) if isinstance(raw, bytes) else (None, None)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None
        if isinstance(team, str) and isinstance(upstream, str):
            return team, upstream
        return None

    def remember(self, response_id: str, owner: Owner) -> None:
        if len(response_id) > MAX_ID:
            return
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())
        self._queue.put_nowait((self._key(response_id), orjson.dumps(owner)))
        self._queued += 1

    async def settle(self) -> None:
        target = self._queued
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(COMMAND_TIMEOUT * 2):
                while self._sent < target:
                    await self._progress.wait()

    async def _write(self) -> None:
        """Send the owners remembered meanwhile, in one round trip."""
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 1024:
                batch.append(self._queue.get_nowait())
            with contextlib.suppress(StateUnavailable):
                async with self.link.client.pipeline(transaction=False) as pipe:
                    for key, value in batch:
                        pipe.set(key, value, ex=self.ttl)
                    await self.link.run("owner_put", pipe.execute)
            for _ in batch:
                self._queue.task_done()
            self._sent += len(batch)
            progress, self._progress = self._progress, asyncio.Event()
            progress.set()

    async def close(self) -> None:
        """Send what is still queued (for at most a second), then stop."""
        if self._writer is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._queue.join()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
