"""A forwarder to the test Redis that a test stops and starts: Redis going away and back."""

from __future__ import annotations

from conftest import free_port
from forwarder import Forwarder


class RedisProxy(Forwarder):
    """Forwards 127.0.0.1:`port` (chosen now, so a URL exists before it listens) to Redis while
    started; `stop` closes the listener and every connection through it, as a Redis that died
    would."""

    def __init__(self) -> None:
        super().__init__(6379, free_port())

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"
