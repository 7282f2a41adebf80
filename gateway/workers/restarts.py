"""How often the supervisor replaces a worker that died: a bounded rate, with growing pauses."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

__all__ = ["RestartBudget"]


class RestartBudget:
    """At most `limit` restarts within any `window` seconds, over all workers together.

    `next_delay()` records a restart and says how long to wait before it: nothing for the
    first in the window, then 0.5 s doubling with each further one (at most `max_delay`), so
    a worker that dies at start does not spin. It returns None once the limit is reached: the
    workers are crash-looping, and the supervisor stops rather than hide it.
    """

    __slots__ = ("_clock", "_limit", "_max_delay", "_recent", "_window")

    def __init__(
        self,
        limit: int = 5,
        window: float = 60.0,
        max_delay: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit, self._window, self._max_delay, self._clock = limit, window, max_delay, clock
        self._recent: deque[float] = deque()

    def next_delay(self) -> float | None:
        now = self._clock()
        while self._recent and now - self._recent[0] >= self._window:
            self._recent.popleft()
        if len(self._recent) >= self._limit:
            return None
        earlier = len(self._recent)
        self._recent.append(now)
        return 0.0 if earlier == 0 else min(self._max_delay, 0.5 * 2 ** (earlier - 1))
