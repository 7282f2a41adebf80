"""The per-request fault and timing knobs: the ``x-mock-*`` request headers.

Owns: parsing the headers, the per-stream knobs (``StreamKnobs``: delays, pacing, cuts,
CRLF, comments, hold-open, ``[DONE]``, error events), the terminal status a reply should
take, and the middleware that records every request and then applies the faults that
pre-empt any handler (``x-mock-first-byte-delay-ms``, ``x-mock-status``, ``x-mock-echo-key``).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.mock_upstream.replies import error
from gateway.mock_upstream.state import MOCK_STATE, MockOptions, RecordedRequest

__all__ = [
    "TRUTHY",
    "StreamKnobs",
    "header_int",
    "record_and_faults",
    "response_status",
    "stream_knobs",
    "ttft_s",
]

TRUTHY: Final = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True, slots=True)
class StreamKnobs:
    ttft_s: float
    tokens_per_s: float
    cut_after: int | None
    crlf: bool
    comments: bool
    hold_open_s: float
    done: bool
    error_event: str | None  # "flat" | "nested"


def header_int(request: web.Request, name: str) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def _header_float(request: web.Request, name: str) -> float | None:
    value = request.headers.get(name)
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _header_flag(request: web.Request, name: str) -> bool:
    value = request.headers.get(name)
    return value is not None and value.strip().lower() in TRUTHY


def ttft_s(request: web.Request, options: MockOptions) -> float:
    ttft_ms = _header_float(request, "x-mock-ttft-ms")
    return max(options.ttft_ms if ttft_ms is None else ttft_ms, 0.0) / 1000


def stream_knobs(request: web.Request, options: MockOptions) -> StreamKnobs:
    tps = _header_float(request, "x-mock-tokens-per-s")
    hold_ms = _header_float(request, "x-mock-hold-open-ms") or 0.0
    error_event = (request.headers.get("x-mock-error-event") or "").strip().lower()
    return StreamKnobs(
        ttft_s=ttft_s(request, options),
        tokens_per_s=max(options.tokens_per_s if tps is None else tps, 0.0),
        cut_after=header_int(request, "x-mock-cut-after"),
        crlf=_header_flag(request, "x-mock-crlf"),
        comments=_header_flag(request, "x-mock-comments"),
        hold_open_s=max(hold_ms, 0.0) / 1000,
        done=_header_flag(request, "x-mock-done"),
        error_event=error_event if error_event in ("flat", "nested") else None,
    )


def response_status(request: web.Request) -> str:
    value = (request.headers.get("x-mock-response-status") or "").strip().lower()
    return value if value in ("incomplete", "failed") else "completed"


@web.middleware
async def record_and_faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record every request, then apply the faults that pre-empt any handler."""
    state = request.app[MOCK_STATE]
    headers = {k.lower(): v for k, v in request.headers.items()}
    recorded = RecordedRequest(request.method, request.path_qs, headers, await request.read())
    state.record(recorded, f"{request.method} {request.path}")

    if (delay_ms := _header_float(request, "x-mock-first-byte-delay-ms")) and delay_ms > 0:
        await asyncio.sleep(delay_ms / 1000)
    status = header_int(request, "x-mock-status")
    if status is not None and 400 <= status <= 599:
        etype = "server_error" if status >= 500 else "invalid_request_error"
        extra = {"retry-after": "1"} if status == 429 else None
        return error(status, f"Mock error {status} (x-mock-status).", etype, "mock_error", extra)
    if _header_flag(request, "x-mock-echo-key"):
        auth = headers.get("authorization", "")
        key = auth[7:] if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
        return error(401, f"Incorrect API key provided: {key}", code="invalid_api_key")
    return await handler(request)
