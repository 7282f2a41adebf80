"""Single-flight: identical requests in flight share one upstream call.

The leader publishes the response head, each chunk as it arrives, and the end. A streamed
follower replays what was published so far and then follows live; it reads at its own pace,
so a slow or vanished follower never holds up the leader or the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from gateway.cache.entry import CacheEntry
from gateway.usage import Usage


class Flight:
    __slots__ = (
        "_changed",
        "chunks",
        "done",
        "entry",
        "headers",
        "readers",
        "shared",
        "status",
        "stream",
        "usage",
    )

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.status = 0
        self.headers: tuple[tuple[str, str], ...] = ()
        self.shared: bool | None = None  # None until the leader knows whether it can share
        self.chunks: list[bytes] = []
        self.done = False
        self.entry: CacheEntry | None = None  # the cacheable result, when there is one
        self.usage: Usage | None = None
        self.readers = 0  # clients reading this flight now, its leader's included
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    def publish_head(self, status: int, headers: tuple[tuple[str, str], ...], shared: bool) -> None:
        self.status, self.headers, self.shared = status, headers, shared
        self._notify()

    def publish(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self._notify()

    def finish(self, entry: CacheEntry | None, usage: Usage | None) -> None:
        """The leader is done. A JSON flight is shared only when its result is cacheable."""
        self.entry, self.usage = entry, usage
        if self.shared is None or not self.stream:
            self.shared = entry is not None
        self.done = True
        self._notify()

    async def wait_head(self) -> bool:
        """For streams: wait until the leader has a response head; True when it is shared."""
        while self.shared is None:
            await self._changed.wait()
        return self.shared

    async def wait_done(self) -> CacheEntry | None:
        while not self.done:
            await self._changed.wait()
        return self.entry if self.shared else None

    async def follow(self) -> AsyncIterator[bytes]:
        i = 0
        while True:
            changed = self._changed
            while i < len(self.chunks):
                yield self.chunks[i]
                i += 1
            if self.done:
                return
            await changed.wait()


class Flights:
    """The flights in progress, by cache key."""

    __slots__ = ("_flights",)

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def peek(self, key: str) -> Flight | None:
        flight = self._flights.get(key)
        return flight if flight is not None and not flight.done else None

    def open(self, key: str, stream: bool) -> Flight:
        """Start a flight; the caller leads it and must `land` it when done."""
        flight = Flight(stream)
        self._flights[key] = flight
        return flight

    def land(self, key: str, flight: Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    def __len__(self) -> int:
        return len(self._flights)
