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
    async def get(self, key: str) -> CacheEntry | None: ...

    async def put(self, key: str, entry: CacheEntry) -> bool: ...

    async def purge(self, team: str | None = None) -> int: ...

    async def stats(self) -> StoreStats: ...

    async def close(self) -> None: ...


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
