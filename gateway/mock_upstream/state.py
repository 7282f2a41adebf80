"""The mock's options, its per-app state and the request recorder.

Owns: ``MockOptions`` (server-wide behaviour), ``RecordedRequest`` and ``MockState`` (the
bounded log of requests, per-route call counts, the upstream keys used and the stateful
``Faults``, under the ``MOCK_STATE`` app key) and ``Runtime`` (per-app constants pre-built from
the options, under ``RUNTIME``).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from gateway.mock_upstream.faults import Faults, parse_fault, request_key

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
    refused_keys: tuple[str, ...] = ()  # upstream keys answered with 401 invalid_api_key
    required_keys: tuple[str, ...] = ()  # when set, every other key (or none) gets that 401
    fail_ratio: float = 0.0  # this fraction of requests, evenly spread, gets `fail_status`
    fail_status: str = "503"  # KIND[:ARG]: 400-599[:retry-after s], reset, close, cut[:events]

    def __post_init__(self) -> None:
        if not 0 <= self.fail_ratio <= 1:
            raise ValueError(f"fail_ratio must be between 0 and 1, not {self.fail_ratio}")
        parse_fault(self.fail_status)  # ValueError when malformed

    def faults(self) -> Faults:
        """Fresh fault state for an app serving these options."""
        return Faults(
            self.refused_keys, self.required_keys, self.fail_ratio, parse_fault(self.fail_status)
        )


@dataclass(slots=True)
class RecordedRequest:
    method: str
    path: str  # path plus query string
    headers: dict[str, str]  # lower-cased header names
    body: bytes

    @property
    def key(self) -> str | None:
        """The upstream key it carried (Authorization bearer, else x-api-key), or None."""
        return request_key(self.headers)


@dataclass(slots=True)
class MockState:
    requests: list[RecordedRequest] = field(default_factory=list)  # last _MAX_RECORDED, in order
    calls: collections.Counter[str] = field(default_factory=collections.Counter)  # "METHOD /path"
    faults: Faults = field(default_factory=Faults)  # create_mock_app sets one from the options
    # WebSocket messages as received, the last _MAX_RECORDED, in order
    websocket_messages: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=_MAX_RECORDED)
    )

    def record(self, recorded: RecordedRequest, call: str) -> None:
        """Append `recorded`, dropping the oldest beyond _MAX_RECORDED, and count `call`."""
        if len(self.requests) >= _MAX_RECORDED:
            del self.requests[: len(self.requests) - _MAX_RECORDED + 1]
        self.requests.append(recorded)
        self.calls[call] += 1

    def keys_used(self) -> list[str | None]:
        """The upstream key of each recorded request, in order (None: it carried none)."""
        return [recorded.key for recorded in self.requests]

    def key_counts(self) -> collections.Counter[str | None]:
        """How many recorded requests carried each upstream key."""
        return collections.Counter(self.keys_used())


MOCK_STATE: Final[web.AppKey[MockState]] = web.AppKey("mock_state", MockState)


@dataclass(frozen=True, slots=True)
class Runtime:
    """Per-app constants pre-built from the options."""

    options: MockOptions
    models: frozenset[str]
    models_body: bytes
    model_bodies: Mapping[str, bytes]


RUNTIME: Final[web.AppKey[Runtime]] = web.AppKey("mock_runtime", Runtime)
