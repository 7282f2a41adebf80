"""A small Responses upstream for capture tests: it answers with the request's input text, as
JSON or as a stream of small deltas written in chunks that split events (and keys) apart."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

PIECE = 5  # characters per delta


def response(text: str) -> dict[str, Any]:
    return {
        "id": "resp_capture",
        "object": "response",
        "status": "completed",
        "model": "nusantara-base",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}],
        "usage": {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8},
    }


def event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


async def handler(request: web.Request) -> web.StreamResponse:
    """`x-test-status: S` answers S; `x-test-cut: 1` breaks the stream off after two deltas;
    `x-test-sleep: SECONDS` waits before answering; `x-test-echo: TEXT` answers TEXT."""
    body = await request.json() if request.can_read_body else {}
    if sleep := request.headers.get("x-test-sleep"):
        await asyncio.sleep(float(sleep))
    if status := request.headers.get("x-test-status"):
        err = {"error": {"type": "invalid_request_error", "code": "test", "message": "no"}}
        return web.json_response(err, status=int(status))
    text = request.headers.get("x-test-echo") or str(body.get("input", ""))
    if not body.get("stream"):
        return web.json_response(response(text))
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    events = [event("response.created", {"response": {**response(""), "status": "in_progress"}})]
    for i in range(0, len(text), PIECE):
        events.append(event("response.output_text.delta", {"delta": text[i : i + PIECE]}))
    events.append(event("response.completed", {"response": response(text)}))
    raw = b"".join(events)
    if request.headers.get("x-test-cut"):
        raw = b"".join(events[:3])
    for i in range(0, len(raw), 7):  # chunks of 7 bytes: every event and key split apart
        await resp.write(raw[i : i + 7])
        await asyncio.sleep(0)
    if request.headers.get("x-test-cut"):
        assert request.transport is not None
        request.transport.close()
        return resp
    await resp.write_eof()
    return resp
