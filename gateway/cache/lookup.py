"""The cache step of a cacheable request: bypass, a stored answer, an identical request in
flight to join, or a new flight to lead. Counts every lookup once: a hit or a coalesced
answer here, a miss or a bypass when its call is admitted (`CacheCounters.count`), so a
request the budget refuses, which makes no call, counts as no lookup."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.cache.entry import CacheEntry
from gateway.cache.flight import FlightLike, FlightRegistry
from gateway.cache.key import cache_key
from gateway.cache.store import CacheStore
from gateway.redis_link import StateUnavailable
from gateway.settings import Cache
from gateway.telemetry.metrics import Metrics


class CacheCounters:
    __slots__ = ("bypass", "coalesced", "hits", "misses")

    def __init__(self) -> None:
        self.hits = self.misses = self.coalesced = self.bypass = 0

    def count(self, result: str, metrics: Metrics) -> None:
        if result == "hit":
            self.hits += 1
        elif result == "miss":
            self.misses += 1
        elif result == "coalesced":
            self.coalesced += 1
        else:
            self.bypass += 1
        metrics.cache_lookups.labels(result).inc()


@dataclass(frozen=True, slots=True)
class Lookup:
    result: str  # hit | miss | bypass | coalesced
    store_key: str | None = None  # store the answer under this key
    entry: CacheEntry | None = None  # a stored answer, or a JSON flight's shared result
    follow: FlightLike | None = None  # a streamed flight to follow (holds a reader place)
    lead: FlightLike | None = None  # a new flight this request leads: land it when done


async def lookup(
    settings: Cache,
    store: CacheStore,
    flights: FlightRegistry,
    counters: CacheCounters,
    metrics: Metrics,
    *,
    team: str,
    upstream: str,
    body: Any,
    top: dict[str, Any],
    stream: bool,
    cache_control: str,
) -> Lookup:
    cc = cache_control.lower()
    if not settings.enabled or top.get("background") is True or "no-store" in cc:
        return Lookup("bypass")
    scope = "shared" if settings.scope == "shared" else f"team:{team}"
    key = cache_key(scope, upstream, body)
    if "no-cache" in cc:  # look nothing up, but store the answer
        return Lookup("bypass", key)
    try:
        entry = await store.get(key)
        if entry is not None and entry.stream == stream:
            counters.count("hit", metrics)
            return Lookup("hit", entry=entry)
        flight, leads = await flights.claim(key, stream)
    except StateUnavailable:  # shared state is down: the request goes on without the cache
        return Lookup("bypass")
    if leads:
        return Lookup("miss", key, lead=flight)
    flight.readers += 1
    try:
        if flight.stream:
            if await flight.wait_head():
                counters.count("coalesced", metrics)
                flight.readers += 1  # the follower's place, given up when it has followed
                return Lookup("coalesced", follow=flight)
        else:
            shared = await flight.wait_done()
            if shared is not None:
                counters.count("coalesced", metrics)
                return Lookup("coalesced", entry=shared)
    finally:
        flight.readers -= 1
    # the leader's answer cannot be shared: make our own call, storing what it gets
    return Lookup("miss", key)
