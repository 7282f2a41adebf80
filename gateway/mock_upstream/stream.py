"""Server-sent events: framing and the paced stream writer.

Owns: one SSE event's bytes, the mid-stream error payload (flat or nested), the ``[DONE]``
sentinel, and ``pump``, which writes pre-rendered frames one per write with the stream knobs
applied (time to first token, pacing, keep-alive comments, CRLF, a cut, holding the stream open).
"""

from __future__ import annotations

import asyncio
from types import MappingProxyType
from typing import Any, Final

import orjson
from aiohttp import web

from gateway.mock_upstream.knobs import StreamKnobs

__all__ = ["DONE", "error_payload", "pump", "sse"]

DONE: Final = b"data: [DONE]\n\n"
_KEEPALIVE: Final = b": keep-alive\n\n"
_SSE_HEADERS: Final = MappingProxyType(
    {"content-type": "text/event-stream", "cache-control": "no-cache"}
)


def sse(event: str, payload: dict[str, Any]) -> bytes:
    return b"".join((b"event: ", event.encode(), b"\ndata: ", orjson.dumps(payload), b"\n\n"))


def error_payload(kind: str, seq: int | None) -> dict[str, Any]:
    detail: dict[str, Any] = {"code": "server_error", "message": "boom", "param": None}
    payload: dict[str, Any] = (
        {"type": "error", **detail}
        if kind == "flat"
        else {"type": "error", "error": {"type": "server_error", **detail}}
    )
    if seq is not None:
        payload["sequence_number"] = seq
    return payload


async def pump(
    request: web.Request,
    frames: list[bytes],
    knobs: StreamKnobs,
    *,
    ttft_index: int,
    paced_start: int,
    paced_count: int,
) -> web.StreamResponse:
    """Write one frame per write, with the timing and fault knobs applied."""
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    resp.enable_chunked_encoding()
    keepalive = _KEEPALIVE
    if knobs.crlf:
        frames = [f.replace(b"\n", b"\r\n") for f in frames]
        keepalive = keepalive.replace(b"\n", b"\r\n")
    loop = asyncio.get_running_loop()
    started = 0.0
    try:
        await resp.prepare(request)
        if knobs.comments:
            await resp.write(keepalive)
        for i, frame in enumerate(frames):
            if knobs.cut_after is not None and i >= knobs.cut_after:
                # No terminating chunk: the client sees a truncated chunked body.
                resp.force_close()
                if request.transport is not None:
                    request.transport.close()
                return resp
            if i == ttft_index and knobs.ttft_s > 0:
                await asyncio.sleep(knobs.ttft_s)
            k = i - paced_start
            if 0 <= k < paced_count:
                if k == 0:
                    started = loop.time()
                elif knobs.tokens_per_s > 0:
                    delay = started + k / knobs.tokens_per_s - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if knobs.comments and k and k % 5 == 0:
                    await resp.write(keepalive)
            await resp.write(frame)
        if knobs.hold_open_s > 0:
            await asyncio.sleep(knobs.hold_open_s)
    except ConnectionResetError:  # the client went away; aiohttp handles the rest
        pass
    return resp
