"""Calendar windows in UTC. Pure."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

TOTAL_RETRY_AFTER = 365 * 86400  # a `total` window never resets; tell clients not to wait


def window_bounds(per: str, now: float) -> tuple[float, float]:
    """[start, end) of the calendar window `per` that contains `now` (unix seconds)."""
    if per == "total":
        return 0.0, math.inf
    # Every window starts on a whole second, so the one holding `now` holds its whole second.
    # Not `now` itself: fromtimestamp rounds to the nearest microsecond, and half a microsecond
    # before a window ends that is the next window's start.
    t = datetime.fromtimestamp(math.floor(now), UTC)
    if per == "minute":
        start = t.replace(second=0)
        end = start + timedelta(minutes=1)
    elif per == "hour":
        start = t.replace(minute=0, second=0)
        end = start + timedelta(hours=1)
    elif per == "day":
        start = t.replace(hour=0, minute=0, second=0)
        end = start + timedelta(days=1)
    elif per == "week":  # ISO weeks: Monday 00:00 UTC
        start = (t - timedelta(days=t.weekday())).replace(hour=0, minute=0, second=0)
        end = start + timedelta(days=7)
    elif per == "month":
        start = t.replace(day=1, hour=0, minute=0, second=0)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
    else:
        raise ValueError(f"unknown window {per!r}")
    return start.timestamp(), end.timestamp()


def seconds_until(end: float, now: float) -> int:
    """Whole seconds until `end`, at least 1 (what retry-after and reset headers carry)."""
    if math.isinf(end):
        return TOTAL_RETRY_AFTER
    return max(1, math.ceil(end - now))
