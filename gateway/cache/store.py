"""The cache store protocol and the in-process store (cachetools, bounded by TTL and bytes)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cachetools import TTLCache

from gateway.cache.entry import CacheEntry


@dataclass(frozen=True, slots=True)
class StoreStats:
    entries: int
    bytes: int


class CacheStore(Protocol):
    """Cached answers by cache key (`gateway.cache.key`), bounded by age and bytes.

    A store is built with `ttl` (seconds), `max_bytes` and `max_entry_bytes`, and with the
    clock it measures age by: the gateway's, which also stamps `CacheEntry.created_at`, so an
    entry's `age` header never passes `ttl`. The size of an entry is `CacheEntry.size`.
    """

    async def get(self, key: str) -> CacheEntry | None:
        """The entry stored under `key`, equal to what was put (the body byte for byte), or
        None when there is none or it was stored `ttl` seconds ago or more."""
        ...

    async def put(self, key: str, entry: CacheEntry) -> bool:
        """Store `entry` under `key`, replacing what was there; False (and nothing stored)
        when the entry is larger than `max_entry_bytes` or `max_bytes`. To make room the
        store evicts other entries (which ones is the store's choice), so that the entries
        it holds never add up to more than `max_bytes`."""
        ...

    async def purge(self, team: str | None = None) -> int:
        """Remove the entries stored by `team` (`CacheEntry.team`), or every entry when
        `team` is None; returns how many live (unexpired) entries were removed."""
        ...

    async def stats(self) -> StoreStats:
        """How many live entries the store holds, and their total size in bytes."""
        ...

    async def close(self) -> None:
        """Release what the store holds (memory, connections); it is not used afterwards."""
        ...


class MemoryCacheStore:
    """Entries expire `ttl` seconds after they were stored; least recently used go first
    when the total size would pass `max_bytes`. Entries above `max_entry_bytes` are refused."""

    def __init__(
        self,
        ttl: float,
        max_bytes: int,
        max_entry_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self._cache: TTLCache[str, CacheEntry] = TTLCache(
            maxsize=max_bytes, ttl=ttl, timer=clock, getsizeof=lambda e: e.size
        )

    async def get(self, key: str) -> CacheEntry | None:
        return self._cache.get(key)

    async def put(self, key: str, entry: CacheEntry) -> bool:
        if entry.size > self.max_entry_bytes:
            return False
        self._cache[key] = entry
        return True

    async def purge(self, team: str | None = None) -> int:
        self._cache.expire()
        if team is None:
            n = len(self._cache)
            self._cache.clear()
            return n
        doomed = [k for k, e in self._cache.items() if e.team == team]
        for k in doomed:
            self._cache.pop(k, None)
        return len(doomed)

    async def stats(self) -> StoreStats:
        self._cache.expire()
        return StoreStats(len(self._cache), int(self._cache.currsize))

    async def close(self) -> None:
        self._cache.clear()
