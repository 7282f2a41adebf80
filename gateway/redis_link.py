"""One replica's connection to the shared Redis: clients with short timeouts, and what to do
while Redis does not answer.

Every component that keeps state in Redis (cache entries, flights, response owners) calls it
through `RedisLink.run`, which turns any Redis or socket failure into `StateUnavailable`
and counts it by operation. After a failure the link stays down for `retry_after` seconds:
requests meanwhile skip Redis at once instead of each waiting out a timeout, and the first
call after that tries Redis again, so the gateway recovers by itself when Redis is back.

The budget store keeps a client of its own (`gateway.redis_state.connect`): its failures
decide admission (`state.on_unavailable`), where these only make the cache step aside.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as redis
from redis.asyncio import BlockingConnectionPool
from redis.exceptions import RedisError

from gateway.redis_state import StateUnavailable

__all__ = ["BLOCK_MS", "COMMAND_TIMEOUT", "RedisLink", "StateUnavailable"]

T = TypeVar("T")

CONNECT_TIMEOUT = 0.25  # seconds: a Redis on the same network answers in well under that
COMMAND_TIMEOUT = 0.5
RETRY_AFTER = 1.0  # seconds Redis is skipped after a failure
POOL_SIZE = 32  # connections for commands that do not block
# seconds a command may wait for one of them: a queue there is this replica being busy, not
# Redis being away (each command holds its connection for at most COMMAND_TIMEOUT)
POOL_WAIT = 2.0
BLOCK_MS = 250  # longest a blocking read waits: bounds how late a lost leader is noticed


def _no_count(operation: str) -> None:
    return None


class RedisLink:
    """Clients of one Redis for one key prefix.

    `client` has short timeouts, for everything that must not wait; `blocking` has a read
    timeout above `BLOCK_MS`, for XREAD BLOCK. Neither connects before its first command.
    `on_error(operation)` is told of each failure (the gateway counts
    `gateway_state_errors_total{operation}`).
    """

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        retry_after: float = RETRY_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prefix = prefix
        # a bounded pool: a burst of requests queues for a connection (a command takes well
        # under a millisecond) instead of opening a connection each
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_SIZE,
            timeout=POOL_WAIT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=COMMAND_TIMEOUT,
        )
        self.client: redis.Redis = redis.Redis.from_pool(pool)  # closes the pool with it
        # one connection per flight followed from another replica, each held by XREAD BLOCK
        self.blocking: redis.Redis = redis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=COMMAND_TIMEOUT + BLOCK_MS / 1000,
        )
        self.retry_after = retry_after
        self.clock = clock
        self.on_error: Callable[[str], None] = _no_count
        self._down_until = 0.0

    @property
    def up(self) -> bool:
        """False while Redis is being skipped after a failure."""
        return self.clock() >= self._down_until

    async def run(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, or StateUnavailable when Redis fails it or is being skipped (both are
        counted: each is an operation that went without shared state)."""
        if self.clock() < self._down_until:
            self.on_error(operation)
            raise StateUnavailable(operation)
        try:
            return await call()
        except (RedisError, OSError, TimeoutError) as e:
            self.failed(operation)
            raise StateUnavailable(operation) from e

    def failed(self, operation: str) -> None:
        """Note a failure seen outside `run`: Redis is skipped for `retry_after` seconds."""
        self._down_until = self.clock() + self.retry_after
        self.on_error(operation)

    async def close(self) -> None:
        await self.client.aclose()
        await self.blocking.aclose()
