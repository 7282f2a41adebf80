"""Chat Completions: the ``/v1/chat/completions`` route, as JSON or as a ``data:`` chunk stream.

Owns: every chunk of a streamed completion in order (role, one chunk per word, finish,
optional usage chunk, ``[DONE]``) and the handler.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from gateway.mock_upstream.knobs import StreamKnobs, response_status, stream_knobs, ttft_s
from gateway.mock_upstream.objects import chat_usage
from gateway.mock_upstream.replies import check_model, hex_id, json_body, json_reply
from gateway.mock_upstream.state import RUNTIME
from gateway.mock_upstream.stream import DONE, error_payload, pump
from gateway.mock_upstream.text import (
    FIRST_JSON,
    REST_JSON,
    Generated,
    chat_texts,
    generate,
    requested_tokens,
)

__all__ = ["chat_completions"]


def _chat_frames(
    head: dict[str, Any], gen: Generated, finish: str, include_usage: bool, knobs: StreamKnobs
) -> list[bytes]:
    """Every `data:` chunk of a chat stream, in order; the first content chunk is frame 1."""
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return b"data: " + orjson.dumps({**head, "choices": [choice], **extra}) + b"\n\n"

    frames = [chunk({"role": "assistant", "content": ""}, None)]
    # Content chunks differ only in the word: split a rendered one around it once.
    prefix, _, suffix = chunk({"content": ""}, None).partition(b'"content":""')
    prefix += b'"content":'
    for i, b in enumerate(gen.digest):
        frames.append(b"".join((prefix, REST_JSON[b] if i else FIRST_JSON[b], suffix)))
    if knobs.error_event is not None:
        del frames[1 + min(2, len(gen.digest)) :]
        error = orjson.dumps(error_payload(knobs.error_event, None))
        frames.append(b"data: " + error + b"\n\n")
        return frames
    frames.append(chunk({}, finish))
    if include_usage:
        usage_chunk = {**head, "choices": [], "usage": chat_usage(gen)}
        frames.append(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
    frames.append(DONE)
    return frames


async def chat_completions(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    options = runtime.options
    body = await json_body(request)
    if isinstance(body, web.Response):
        return body
    if (problem := check_model(body, runtime)) is not None:
        return problem
    keys = ("max_completion_tokens", "max_tokens")
    requested = requested_tokens(body, keys, options.default_output_tokens)
    gen = generate(request, chat_texts(body), requested)
    finish = "length" if response_status(request) == "incomplete" else "stop"
    head = {
        "id": hex_id("chatcmpl-", 15),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "service_tier": "default",
        "system_fingerprint": "fp_mock",
    }
    if body.get("stream") is True:
        knobs = stream_knobs(request, options)
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage")
        head["object"] = "chat.completion.chunk"
        frames = _chat_frames(head, gen, finish, include_usage is True, knobs)
        return await pump(
            request, frames, knobs, ttft_index=0, paced_start=1, paced_count=len(gen.digest)
        )
    ttft = ttft_s(request, options)
    if ttft > 0:
        await asyncio.sleep(ttft)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": gen.text,
        "refusal": None,
        "annotations": [],
    }
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return json_reply({**head, "choices": [choice], "usage": chat_usage(gen)})
