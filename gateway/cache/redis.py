"""The cache store in Redis, shared by every replica that names the same Redis and prefix.

Layout, every key under ``{prefix}{cache}:``:

- ``e:<cache key>``: the entry: 8 bytes of the time it was stored (big-endian double, by the
  gateway's clock), then `CacheEntry.to_bytes` (orjson for the head, the body's raw bytes).
  Never pickle: whatever Redis holds is data, and a value that does not decode is a miss.
  It carries a Redis TTL of `ttl`, so Redis frees it even if no replica ever sweeps.
- ``idx``: a sorted set of the cache keys by the time they were stored;
  ``size`` and ``team``: hashes of each key's `CacheEntry.size` and team;
  ``t:<team as hex>``: a set per team, for `purge(team)`; ``bytes``: the total size.

Bound: a Lua script puts an entry in one atomic step over all replicas: it first drops the
entries stored `ttl` seconds ago or more (they are the oldest in ``idx``: every entry has
the same TTL, so the time it was stored says when it expires, and its bytes leave the
counter then even though Redis expired the value on its own), then evicts the oldest until
the new entry fits in `max_bytes`. Oldest first rather than least recently used: LRU would
turn every hit into a write, contended by every replica, and with one TTL for all the
oldest entry is also the next to expire. An entry that Redis itself drops (memory pressure)
leaves the counter at the latest `ttl` seconds later, when the sweep reaches it.

Redis Cluster: every key shares the hash tag ``{cache}``, so the whole cache sits in one
slot: the byte bound and the team index are exact only if one script can touch all of them
at once. (The scripts name the entry and team keys they derive from that tag themselves;
they live in the same slot.) A cache too large for one node would need one bound per tag.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

import orjson

from gateway.cache.entry import CacheEntry
from gateway.cache.store import StoreStats
from gateway.redis_link import RedisLink

_STAMP = struct.Struct(">d")
SWEEP = 1000  # expired entries a put drops at most; stats and purge drop them all
PURGE_BATCH = 500  # entries removed per script run: Redis is never blocked for long

_COMMON = """
local idx, sizes, teams, total = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local base = ARGV[1]
local function drop(k)
  local s = tonumber(redis.call('HGET', sizes, k) or '0')
  local t = redis.call('HGET', teams, k)
  redis.call('ZREM', idx, k)
  redis.call('HDEL', sizes, k)
  redis.call('HDEL', teams, k)
  if t then redis.call('SREM', base .. 't:' .. t, k) end
  redis.call('DEL', base .. 'e:' .. k)
  if redis.call('ZCARD', idx) == 0 then
    redis.call('SET', total, 0)
  else
    redis.call('DECRBY', total, s)
  end
end
local function sweep(cutoff, limit)
  local old = redis.call('ZRANGEBYSCORE', idx, '-inf', cutoff, 'LIMIT', 0, limit)
  for _, k in ipairs(old) do drop(k) end
  return #old
end
local function sweep_all(cutoff)
  while sweep(cutoff, 1000) == 1000 do end
end
"""

# ARGV: base, now, ttl, key, value, size, team, max_bytes, px
_PUT = (
    _COMMON
    + """
local now, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
local key, size, team = ARGV[4], tonumber(ARGV[6]), ARGV[7]
sweep(now - ttl, tonumber(ARGV[10]))
if redis.call('ZSCORE', idx, key) then drop(key) end
local used = tonumber(redis.call('GET', total) or '0')
local max = tonumber(ARGV[8])
while used + size > max do
  local oldest = redis.call('ZRANGE', idx, 0, 0)
  if #oldest == 0 then
    used = 0
    break
  end
  drop(oldest[1])
  used = tonumber(redis.call('GET', total) or '0')
end
redis.call('SET', base .. 'e:' .. key, ARGV[5], 'PX', ARGV[9])
redis.call('ZADD', idx, now, key)
redis.call('HSET', sizes, key, size)
redis.call('HSET', teams, key, team)
redis.call('SADD', base .. 't:' .. team, key)
redis.call('SET', total, used + size)
return 1
"""
)

# ARGV: base, now, ttl, team ('' for all), batch -> entries removed (live ones)
_PURGE = (
    _COMMON
    + """
sweep_all(tonumber(ARGV[2]) - tonumber(ARGV[3]))
local batch = tonumber(ARGV[5])
local doomed
if ARGV[4] == '' then
  doomed = redis.call('ZRANGE', idx, 0, batch - 1)
else
  doomed = redis.call('SRANDMEMBER', base .. 't:' .. ARGV[4], batch)
end
for _, k in ipairs(doomed) do drop(k) end
return #doomed
"""
)

# ARGV: base, now, ttl -> {entries, bytes}
_STATS = (
    _COMMON
    + """
sweep_all(tonumber(ARGV[2]) - tonumber(ARGV[3]))
return {redis.call('ZCARD', idx), tonumber(redis.call('GET', total) or '0')}
"""
)


def _team(team: str) -> str:
    """A team's name as it appears in a key: hex, so no name can reach into another key."""
    return team.encode().hex()


def encode(stored_at: float, entry: CacheEntry) -> bytes:
    return _STAMP.pack(stored_at) + entry.to_bytes()


def decode(raw: bytes) -> tuple[float, CacheEntry] | None:
    """The time an entry was stored and the entry; None for bytes that are not one."""
    try:
        (stored_at,) = _STAMP.unpack_from(raw)
        return stored_at, CacheEntry.from_bytes(raw[_STAMP.size :])
    except (struct.error, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class RedisCacheStore:
    """`CacheStore` in Redis (see the module docstring for the layout and the bound)."""

    def __init__(
        self,
        link: RedisLink,
        ttl: float,
        max_bytes: int,
        max_entry_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.link, self.ttl, self.max_bytes, self.clock = link, ttl, max_bytes, clock
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        base = self._base = f"{link.prefix}{{cache}}:"
        self._keys = [base + "idx", base + "size", base + "team", base + "bytes"]
        client = link.client
        self._put = client.register_script(_PUT)
        self._purge = client.register_script(_PURGE)
        self._stats = client.register_script(_STATS)

    async def get(self, key: str) -> CacheEntry | None:
        raw = await self.link.run(
            "cache_get", lambda: self.link.client.get(self._base + "e:" + key)
        )
        if not isinstance(raw, bytes):
            return None
        found = decode(raw)
        if found is None or self.clock() - found[0] >= self.ttl:
            return None
        return found[1]

    async def put(self, key: str, entry: CacheEntry) -> bool:
        size = entry.size
        if size > self.max_entry_bytes:
            return False
        now = self.clock()
        args: list[str | bytes | int] = [
            self._base,
            repr(now),
            repr(self.ttl),
            key,
            encode(now, entry),
            size,
            _team(entry.team),
            self.max_bytes,
            max(1, int(self.ttl * 1000)),
            SWEEP,
        ]
        await self.link.run("cache_put", lambda: self._put(keys=self._keys, args=args))
        return True

    async def purge(self, team: str | None = None) -> int:
        args = [self._base, repr(self.clock()), repr(self.ttl), "" if team is None else _team(team)]
        removed = 0
        while True:
            n = int(
                await self.link.run(
                    "cache_purge", lambda: self._purge(keys=self._keys, args=[*args, PURGE_BATCH])
                )
            )
            removed += n
            if n < PURGE_BATCH:
                return removed

    async def stats(self) -> StoreStats:
        args = [self._base, repr(self.clock()), repr(self.ttl)]
        entries, size = await self.link.run(
            "cache_stats", lambda: self._stats(keys=self._keys, args=args)
        )
        return StoreStats(int(entries), int(size))

    async def close(self) -> None:
        """The link is the backends' to close: the flights and owners share it."""
        return None
