"""Single-flight: identical requests in flight share one upstream call.

The leader publishes the response head, each chunk as it arrives, and the end. A streamed
follower replays what was published so far and then follows live; it reads at its own pace,
so a slow or vanished follower never holds up the leader or the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from gateway.cache.entry import CacheEntry
from gateway.usage import Usage


class FlightLike(Protocol):
    """One upstream call that identical requests share, as the pipeline uses it.

    The leader publishes, in this order: the response head (`publish_head`, for a stream),
    each chunk (`publish`), the end (`finish`). Followers wait for the head or the end and
    read what was published. No publishing method waits: a follower that reads slowly, or
    not at all, never holds up the leader or the other followers; a flight shared between
    processes queues what it must send.
    """

    readers: int  # clients reading the flight in this process, its leader's included

    @property
    def stream(self) -> bool:
        """Whether the request asked for a stream (followers replay the SSE bytes)."""
        ...

    @property
    def status(self) -> int:
        """The upstream's HTTP status, once the head is published (0 before)."""
        ...

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """The response headers published with the head."""
        ...

    @property
    def usage(self) -> Usage | None:
        """The usage the leader reported at its end."""
        ...

    @property
    def done(self) -> bool:
        """True once the leader has finished."""
        ...

    def publish_head(self, status: int, headers: tuple[tuple[str, str], ...], shared: bool) -> None:
        """The leader has a response head; `shared` says whether followers may use it (for a
        stream: whether they may follow it live)."""
        ...

    def publish(self, chunk: bytes) -> None:
        """Append one chunk of the response body; followers get every chunk, in order."""
        ...

    def finish(self, entry: CacheEntry | None, usage: Usage | None) -> None:
        """The leader is done; `entry` is its cacheable result, if it has one. A JSON flight,
        and a stream that never published a head, is shared only when `entry` is set."""
        ...

    async def wait_head(self) -> bool:
        """For streams: wait until the flight is known to be shared or not (a published head,
        or the end); True when followers may follow it."""
        ...

    async def wait_done(self) -> CacheEntry | None:
        """Wait for the end: the leader's entry when the flight is shared, else None (the
        follower then makes its own call)."""
        ...

    def follow(self) -> AsyncIterator[bytes]:
        """Every chunk published, from the first, byte for byte and in order, then each new
        one as it comes, until the end. A follower joining late, even after the end, misses
        nothing; each reads at its own pace."""
        ...


class FlightRegistry(Protocol):
    """The flights in progress, by cache key."""

    async def claim(self, key: str, stream: bool) -> tuple[FlightLike, bool]:
        """The flight a request with `key` joins, and False; or, when no flight under `key`
        is open and unfinished, a new one that the caller leads, and True. One step: of
        identical requests arriving at once (at any process sharing the registry), exactly
        one leads. A leader must `land` its flight when done."""
        ...

    async def land(self, key: str, flight: FlightLike) -> None:
        """The leader is done with `flight` (finished or not: an unfinished one is finished
        unshared); a claim of `key` made afterwards leads anew."""
        ...

    def __len__(self) -> int:
        """Flights led here and not yet landed."""
        ...


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
    """The flights in progress in this process, by cache key."""

    __slots__ = ("_flights",)

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    async def claim(self, key: str, stream: bool) -> tuple[Flight, bool]:
        flight = self._flights.get(key)
        if flight is not None and not flight.done:
            return flight, False
        flight = self._flights[key] = Flight(stream)
        return flight, True

    async def land(self, key: str, flight: FlightLike) -> None:
        if not flight.done:
            flight.finish(None, None)
        if self._flights.get(key) is flight:
            del self._flights[key]

    def __len__(self) -> int:
        return len(self._flights)
