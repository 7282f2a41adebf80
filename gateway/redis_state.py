"""The Redis server that replicas share state through: its client, its failures, key names.

Every Redis-backed store builds its client with `connect` (short timeouts: a Redis that does
not answer must cost a request milliseconds, not the default seconds), turns a Redis that
does not answer into `StateUnavailable` with `answering`, and names a team's keys with
`team_tag`, so all of one team's keys share one Redis Cluster slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import quote

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["StateUnavailable", "answering", "connect", "team_tag"]

# connecting and each command: Redis answers in well under a millisecond when it is well
SOCKET_TIMEOUT = 0.5

# what "Redis does not answer" looks like: refused, reset or timed out connections, and a
# server that cannot serve writes yet (loading its data, a replica, out of memory, failing over)
_UNAVAILABLE = (
    RedisConnectionError,  # BusyLoadingError and MaxConnectionsError included
    RedisTimeoutError,
    BusyLoadingError,
    ReadOnlyError,
    MasterDownError,
    ClusterDownError,
    TryAgainError,
    OutOfMemoryError,
    OSError,
    asyncio.TimeoutError,
)


class StateUnavailable(Exception):
    """The shared state server (Redis) did not answer `operation`; nothing is known to have
    changed there. The gateway answers 503 `state_unavailable` or goes on without it, as
    `state.on_unavailable` says."""

    def __init__(self, operation: str) -> None:
        super().__init__(f"the shared state store did not answer ({operation})")
        self.operation = operation


def connect(url: str) -> redis.Redis:
    """A client for `url` (redis:// or rediss://) with short timeouts and one immediate retry
    on a new connection (a connection Redis closed by restarting fails once; the retry on a
    fresh one succeeds). Connects lazily, on the first command; reconnects by itself."""
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        retry=Retry(NoBackoff(), 1),
        retry_on_timeout=False,  # a timed-out write may have happened: never send it twice
    )


@contextmanager
def answering(operation: str, on_error: Callable[[str], None]) -> Iterator[None]:
    """Turn Redis not answering inside the block into StateUnavailable(operation), after
    telling `on_error` (which counts `gateway_state_errors_total{operation}`)."""
    try:
        yield
    except _UNAVAILABLE as e:
        on_error(operation)
        raise StateUnavailable(operation) from e


def team_tag(team: str) -> str:
    """`{<escaped team>}`: a Redis Cluster hash tag that is a team's name, escaped so that no
    name can end the tag early, hold a `:` separator, or equal another name's escape.

    Percent-encoding of the UTF-8 bytes (lone surrogates kept by `surrogatepass`) with only
    `A-Za-z0-9_.-~` left as they are: injective, and free of `{`, `}`, `:` and `%` on its own.
    The empty name, whose tag `{}` Redis Cluster would ignore, is written `%`, which no
    non-empty name's escape equals.
    """
    return "{" + (quote(team, safe="", errors="surrogatepass") or "%") + "}"
