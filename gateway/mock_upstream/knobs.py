"""The per-request fault and timing knobs: the ``x-mock-*`` request headers.

Owns: parsing the headers, the per-stream knobs (``StreamKnobs``: delays, pacing, cuts,
CRLF, comments, hold-open, ``[DONE]``, error events), the terminal status a reply should
take, and the middleware that records every request and then applies the faults that
pre-empt any handler (``x-mock-first-byte-delay-ms``, the stateful faults that
``faults.Faults`` picks, ``x-mock-status``, ``x-mock-echo-key``), carrying out a fault: an
error reply, a reset or close before any answer byte, or a cut after the first bytes.
The ``/mock/`` control routes are neither recorded nor faulted.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import struct
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.mock_upstream.faults import FAIL_FIRST, Fault, Refused, request_key
from gateway.mock_upstream.replies import error
from gateway.mock_upstream.state import MOCK_STATE, MockOptions, RecordedRequest

__all__ = [
    "CUT_AFTER",
    "TRUTHY",
    "StreamKnobs",
    "header_int",
    "record_and_faults",
    "response_status",
    "stream_knobs",
    "ttft_s",
]

TRUTHY: Final = frozenset({"1", "true", "yes", "on"})
# A cut fault's point for the stream writer, when the request set no x-mock-cut-after.
CUT_AFTER: Final[web.RequestKey[int]] = web.RequestKey("mock_cut_after", int)
_RST_LINGER: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST


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


def _cut_after(request: web.Request) -> int | None:
    cut_after = header_int(request, "x-mock-cut-after")
    return request.get(CUT_AFTER) if cut_after is None else cut_after


def stream_knobs(request: web.Request, options: MockOptions) -> StreamKnobs:
    tps = _header_float(request, "x-mock-tokens-per-s")
    hold_ms = _header_float(request, "x-mock-hold-open-ms") or 0.0
    error_event = (request.headers.get("x-mock-error-event") or "").strip().lower()
    return StreamKnobs(
        ttft_s=ttft_s(request, options),
        tokens_per_s=max(options.tokens_per_s if tps is None else tps, 0.0),
        cut_after=_cut_after(request),
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
    if request.path.startswith("/mock/"):  # the control routes
        return await handler(request)
    state = request.app[MOCK_STATE]
    headers = {k.lower(): v for k, v in request.headers.items()}
    recorded = RecordedRequest(request.method, request.path_qs, headers, await request.read())
    state.record(recorded, f"{request.method} {request.path}")

    if (delay_ms := _header_float(request, "x-mock-first-byte-delay-ms")) and delay_ms > 0:
        await asyncio.sleep(delay_ms / 1000)
    if state.faults.armed or FAIL_FIRST in headers:
        try:
            fault = state.faults.decide(request.path, headers)
        except ValueError as e:
            return error(400, f"{FAIL_FIRST}: {e}", code="mock_bad_fault")
        if fault is not None:
            return await _carry_out(request, handler, fault)
    status = header_int(request, "x-mock-status")
    if status is not None and 400 <= status <= 599:
        etype = "server_error" if status >= 500 else "invalid_request_error"
        extra = {"retry-after": "1"} if status == 429 else None
        return error(status, f"Mock error {status} (x-mock-status).", etype, "mock_error", extra)
    if _header_flag(request, "x-mock-echo-key"):
        key = request_key(headers) or ""
        return error(401, f"Incorrect API key provided: {key}", code="invalid_api_key")
    return await handler(request)


async def _carry_out(
    request: web.Request, handler: Handler, fault: Fault | Refused
) -> web.StreamResponse:
    if isinstance(fault, Refused):
        return error(401, fault.message, code=fault.code)
    if isinstance(fault.status, int):
        status = fault.status
        etype = "server_error" if status >= 500 else "invalid_request_error"
        code = "rate_limit_exceeded" if status == 429 else "mock_fault"
        extra = None if fault.retry_after is None else {"retry-after": str(fault.retry_after)}
        return error(status, f"Mock fault {status}.", etype, code, extra)
    if fault.status == "cut":
        request[CUT_AFTER] = fault.cut_after  # the stream writer cuts there
        response = await handler(request)
        if isinstance(response, web.Response) and not response.prepared:
            return await _cut_body(request, response)
        return response
    return _drop(request, rst=fault.status == "reset")


def _drop(request: web.Request, *, rst: bool) -> web.StreamResponse:
    """Close the connection before any answer byte: with an RST, or with a FIN."""
    transport = request.transport
    if transport is not None:
        if rst:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
            transport.abort()
        else:
            transport.close()
    response = web.Response(status=500)  # never sent: writing it fails, and aiohttp lets go
    response.force_close()
    return response


async def _cut_body(request: web.Request, response: web.Response) -> web.StreamResponse:
    """Send a JSON answer's status line, headers (its full length) and first half, then close."""
    body = response.body if isinstance(response.body, bytes) else b""
    partial = web.StreamResponse(status=response.status, headers=response.headers)
    partial.content_length = len(body)
    partial.force_close()
    with contextlib.suppress(ConnectionResetError):
        await partial.prepare(request)
        await partial.write(body[: len(body) // 2])
    if request.transport is not None:
        request.transport.close()
    return partial
