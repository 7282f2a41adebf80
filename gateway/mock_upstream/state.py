"""The mock's options, its per-app state and the request recorder.

Owns: ``MockOptions`` (server-wide behaviour), ``RecordedRequest`` and ``MockState`` (the
bounded log of requests and per-route call counts, under the ``MOCK_STATE`` app key) and
``Runtime`` (per-app constants pre-built from the options, under ``RUNTIME``).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

__all__ = [
    "MOCK_STATE",
    "RUNTIME",
    "MockOptions",
    "MockState",
    "RecordedRequest",
    "Runtime",
]

_MAX_RECORDED = 10_000  # tests shrink it


@dataclass(frozen=True, slots=True)
class MockOptions:
    """Server-wide behaviour; the ``x-mock-*`` request headers override parts of it per request."""

    ttft_ms: float = 0.0  # delay before a stream's first output delta, and before a JSON reply
    tokens_per_s: float = 0.0  # 0 = no pacing; otherwise output deltas are paced at this rate
    models: tuple[str, ...] = ("nusantara-base", "garda-beta-mini", "gpt-4o-mini")
    default_output_tokens: int = 16  # when the request sets no max_output_tokens / max_tokens


@dataclass(slots=True)
class RecordedRequest:
    method: str
    path: str  # path plus query string
    headers: dict[str, str]  # lower-cased header names
    body: bytes


@dataclass(slots=True)
class MockState:
    requests: list[RecordedRequest] = field(default_factory=list)  # last _MAX_RECORDED, in order
    calls: collections.Counter[str] = field(default_factory=collections.Counter)  # "METHOD /path"

    def record(self, recorded: RecordedRequest, call: str) -> None:
        """Append `recorded`, dropping the oldest beyond _MAX_RECORDED, and count `call`."""
        if len(self.requests) >= _MAX_RECORDED:
            del self.requests[: len(self.requests) - _MAX_RECORDED + 1]
        self.requests.append(recorded)
        self.calls[call] += 1


MOCK_STATE: Final[web.AppKey[MockState]] = web.AppKey("mock_state", MockState)


@dataclass(frozen=True, slots=True)
class Runtime:
    """Per-app constants pre-built from the options."""

    options: MockOptions
    models: frozenset[str]
    models_body: bytes
    model_bodies: Mapping[str, bytes]


RUNTIME: Final[web.AppKey[Runtime]] = web.AppKey("mock_runtime", Runtime)
