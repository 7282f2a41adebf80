"""The retry budget: over the last `WINDOW` seconds, retries may be at most `ratio` times the
first attempts plus `MIN_RETRIES`, so that a provider failing everything gets a few more
requests than its clients send, never a multiple. Counted in one-second buckets."""

from __future__ import annotations

import math

WINDOW = 10  # seconds
MIN_RETRIES = 3  # retries always allowed in a window, so a quiet gateway can still retry


class RetryBudget:
    __slots__ = ("_firsts", "_retries", "_seconds", "ratio")

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self._seconds = list(range(WINDOW))  # the second each bucket counts (empty at first)
        self._firsts = [0] * WINDOW
        self._retries = [0] * WINDOW

    def _bucket(self, now: float) -> int:
        second = math.floor(now)
        i = second % WINDOW
        if self._seconds[i] != second:
            self._seconds[i], self._firsts[i], self._retries[i] = second, 0, 0
        return i

    def _sum(self, counts: list[int], now: float) -> int:
        oldest = math.floor(now) - WINDOW + 1
        return sum(c for i, c in enumerate(counts) if self._seconds[i] >= oldest)

    def first(self, now: float) -> None:
        self._firsts[self._bucket(now)] += 1

    def allows_retry(self, now: float) -> bool:
        retries = self._sum(self._retries, now)
        return retries < self.ratio * self._sum(self._firsts, now) + MIN_RETRIES

    def retried(self, now: float) -> None:
        self._retries[self._bucket(now)] += 1
