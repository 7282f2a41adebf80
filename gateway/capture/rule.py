"""Which requests are captured: decided once, at admission, from the policy's settings."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

from gateway.capture.tap import CaptureTap
from gateway.routing import GlobSet
from gateway.settings import Capture


class CaptureRule:
    """`capture` settings, compiled. `admit` costs one glob match and one random draw."""

    __slots__ = ("_draw", "_ratio", "_teams", "cap", "enabled", "errors")

    def __init__(self, cfg: Capture, draw: Callable[[], float] = random.random) -> None:
        self.enabled, self.errors, self.cap = cfg.enabled, cfg.errors, cfg.max_body_bytes
        self._ratio = cfg.sample_ratio
        self._teams = GlobSet(cfg.teams)
        self._draw = draw  # not a secret: the cheap generator is enough

    def admit(
        self, team: str, method: str, target: str, headers: Mapping[str, str]
    ) -> CaptureTap | None:
        """A tap for a request that may be captured: drawn by the sample ratio, or kept in
        case it fails (`errors`). None, and nothing held, for every other request."""
        if not self.enabled or not self._teams(team):
            return None
        sampled = self._ratio > 0.0 and (self._ratio >= 1.0 or self._draw() < self._ratio)
        if not sampled and not self.errors:
            return None
        return CaptureTap(sampled, self.cap, method, target, headers)
