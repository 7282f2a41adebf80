"""The state that replicas share through Redis (CONTRACT section 9): the cache, single-flight
and response owners, over one `RedisLink` for `state.store` and `state.prefix`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.cache.redis import RedisCacheStore
from gateway.cache.redis_flight import MAX_LOG_BYTES, RedisFlights
from gateway.owners import RedisOwners
from gateway.redis_link import RedisLink
from gateway.settings import Settings


@dataclass(frozen=True, slots=True)
class Shared:
    link: RedisLink
    cache: RedisCacheStore
    flights: RedisFlights
    owners: RedisOwners

    @classmethod
    def build(
        cls, settings: Settings, clock: Callable[[], float], on_error: Callable[[str], None]
    ) -> Shared:
        """Does no I/O: the link connects on its first command. `on_error(operation)` is told
        of each call that Redis did not answer."""
        c, state = settings.cache, settings.state
        link = RedisLink(state.store, state.prefix)
        link.on_error = on_error
        return cls(
            link=link,
            cache=RedisCacheStore(link, c.ttl, c.max_bytes, c.max_entry_bytes, clock),
            # a shared stream may be longer than an entry, but not without bound
            flights=RedisFlights(link, max_log_bytes=max(MAX_LOG_BYTES, c.max_entry_bytes)),
            owners=RedisOwners(link),
        )

    async def close(self) -> None:
        try:
            await self.flights.close()
        finally:
            await self.link.close()
