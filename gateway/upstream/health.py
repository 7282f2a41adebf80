"""Health of upstreams and of their keys: which a request may use now, and what each answer
does to them. In memory, per replica: every replica keeps its own view.

A key or an upstream is `healthy`, `resting` until a time (a 429 with `retry-after`: that key
only, at most 300 s) or `ejected` until a time, for a `reason`: `auth` (a 401 or 403 from the
upstream: that key only, at once) or `failures` (`eject_after` failures in a row: connect
errors, timeouts, 5xx). Each ejection in a row lasts twice the one before (`eject_for`, at most
300 s); when it is up, one trial request decides: a success makes it healthy again, a failure
ejects it again. Times are on a monotonic clock (a wall clock set back would keep a key out
for as long); /admin/upstreams shows them in unix seconds.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

MAX_EJECTION = 300.0  # seconds
TRIAL_TIME = 30.0  # a trial that has not ended by then (its request was cancelled) gives way
RECENT = 60.0  # seconds of requests shown in /admin/upstreams
_RECENT_KEPT = 1000  # at most this many remembered per key or upstream


def _nobody(upstream: str, reason: str) -> None:
    """No one is told of an ejection until `Health.on_ejection` is set."""


def key_id(key: str) -> str:
    """A key as it may be shown: the first 12 hex of its SHA-256 (useless to an attacker)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(slots=True)
class Standing:
    """One key's or one upstream's health."""

    state: str = "healthy"  # healthy | resting | ejected
    reason: str = ""  # why ejected: auth | failures
    until: float = 0.0
    failures: int = 0  # in a row
    ejections: int = 0  # in a row: how long the next one lasts
    trial: float = 0.0  # its time is up and one request finds out, until this time
    recent: deque[tuple[float, bool]] = field(default_factory=lambda: deque(maxlen=_RECENT_KEPT))

    def usable(self, now: float) -> bool:
        if self.state == "healthy":
            return True
        if now < self.until:
            return False
        return self.state == "resting" or now >= self.trial  # ejected: one trial at a time

    def shown(self, now: float, wall: float) -> dict[str, object]:
        """As /admin/upstreams shows it; `now` on the health clock, `wall` in unix seconds."""
        recent = [ok for t, ok in self.recent if now - t <= RECENT]
        errors = sum(1 for ok in recent if not ok)
        out: dict[str, object] = {"state": self.state}
        if self.state != "healthy":
            out["until"] = round(wall + (self.until - now), 3)
        if self.state == "ejected":
            out["reason"] = self.reason
        out["recent_requests"] = len(recent)
        out["error_ratio"] = round(errors / len(recent), 4) if recent else 0.0
        return out


class Health:
    """The health of every upstream and key this replica knows, by name and key id."""

    def __init__(self, eject_after: int, eject_for: float, clock: Callable[[], float]) -> None:
        self.eject_after, self.eject_for, self.clock = eject_after, eject_for, clock
        self.upstreams: dict[str, Standing] = {}
        self.keys: dict[tuple[str, str], Standing] = {}
        self.on_ejection: Callable[[str, str], None] = _nobody

    def configure(
        self,
        eject_after: int,
        eject_for: float,
        known: Iterable[tuple[str, Iterable[str]]],
        changed: Iterable[str] = (),
    ) -> None:
        """New settings: keep the standing of the upstreams and keys still configured, except
        for upstreams whose settings `changed` (a new address is a new upstream)."""
        self.eject_after, self.eject_for = eject_after, eject_for
        fresh = set(changed)
        names: set[str] = set()
        keys: set[tuple[str, str]] = set()
        for name, ids in known:
            if name not in fresh:
                names.add(name)
                keys.update((name, k) for k in ids)
        self.upstreams = {n: s for n, s in self.upstreams.items() if n in names}
        self.keys = {k: s for k, s in self.keys.items() if k in keys}

    def upstream(self, name: str) -> Standing:
        s = self.upstreams.get(name)
        if s is None:
            s = self.upstreams[name] = Standing()
        return s

    def key(self, upstream: str, kid: str) -> Standing:
        s = self.keys.get((upstream, kid))
        if s is None:
            s = self.keys[upstream, kid] = Standing()
        return s

    def usable(self, upstream: str, kid: str, now: float) -> bool:
        up, key = self.upstreams.get(upstream), self.keys.get((upstream, kid))
        # nearly always both are healthy (or unknown yet): two lookups, no call
        return (up is None or up.state == "healthy" or up.usable(now)) and (
            key is None or key.state == "healthy" or key.usable(now)
        )

    def begin(self, upstream: str, kid: str, now: float) -> None:
        """A request goes to this key: if a standing's time is up, this is its trial."""
        for s in (self.upstreams.get(upstream), self.keys.get((upstream, kid))):
            if s is None or s.state == "healthy":
                continue
            if s.state == "ejected" and now >= s.until:
                s.trial = now + TRIAL_TIME
            elif s.state == "resting" and now >= s.until:
                s.state, s.until = "healthy", 0.0

    def succeeded(self, upstream: str, kid: str) -> None:
        now = self.clock()
        for s in (self.upstream(upstream), self.key(upstream, kid)):
            s.recent.append((now, True))
            s.state, s.reason, s.until = "healthy", "", 0.0
            s.failures = s.ejections = 0
            s.trial = 0.0

    def failed(self, upstream: str, kid: str) -> None:
        """A connect error, a timeout or a 5xx: counts against the key and the upstream."""
        now = self.clock()
        for s, is_key in ((self.upstream(upstream), False), (self.key(upstream, kid), True)):
            s.recent.append((now, False))
            s.failures += 1
            if (s.state == "ejected" and s.trial) or (
                s.state == "healthy" and s.failures >= self.eject_after
            ):
                self._eject(upstream if is_key else "", s, "failures", now)

    def refused(self, upstream: str, kid: str) -> None:
        """A 401 or 403: the key is out at once; the upstream stays in service. A key already
        out (used because every key is) stays out as it was."""
        now = self.clock()
        s = self.key(upstream, kid)
        s.recent.append((now, False))
        if s.state != "ejected" or s.trial:
            self._eject(upstream, s, "auth", now)

    def rest(self, upstream: str, kid: str, seconds: float) -> None:
        """A 429: the key rests for `seconds` (its `retry-after`, at most MAX_EJECTION)."""
        now = self.clock()
        s = self.key(upstream, kid)
        s.recent.append((now, False))
        if s.state != "ejected" and seconds > 0:
            s.state, s.until = "resting", max(s.until, now + min(seconds, MAX_EJECTION))

    def answered(self, upstream: str) -> None:
        """The upstream answered (a 401, 403 or 429 of one key): it is up."""
        s = self.upstream(upstream)
        if s.state == "ejected" and s.trial:  # its trial went through
            s.state, s.reason, s.until, s.trial = "healthy", "", 0.0, 0.0
            s.ejections = 0
        s.failures = 0

    def _eject(self, key_of: str, s: Standing, reason: str, now: float) -> None:
        """Eject `s`; `key_of` names the upstream when `s` is one of its keys (counted)."""
        s.ejections += 1
        s.state, s.reason, s.trial = "ejected", reason, 0.0
        # doubling, capped; the exponent too, so that no streak overflows a float
        s.until = now + min(MAX_EJECTION, self.eject_for * 2 ** min(s.ejections - 1, 30))
        s.failures = 0
        if key_of:
            self.on_ejection(key_of, reason)

    def healthy(self, upstream: str, now: float) -> bool:
        """Whether the upstream takes requests now (for the `gateway_upstream_healthy` gauge)."""
        return self.upstream(upstream).usable(now)
