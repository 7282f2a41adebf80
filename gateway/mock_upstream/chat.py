"""Chat Completions: the ``/v1/chat/completions`` route, as JSON or as a ``data:`` chunk stream.

Owns: choosing between text and a tool call (the rule is in ``tools``), every chunk of a
streamed completion in order (role, one chunk per word, finish, optional usage chunk,
``[DONE]``; for a tool call, the call with its name, then one chunk per piece of its
arguments, finish ``tool_calls``, the same ending) and the handler.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from gateway.mock_upstream.knobs import StreamKnobs, response_status, stream_knobs, ttft_s
from gateway.mock_upstream.objects import Counts, chat_usage
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
from gateway.mock_upstream.tools import Call, chat_call, pieces

__all__ = ["chat_completions"]


class _Chunks:
    """Renders the `data:` chunks of one chat stream and closes it the same way for any answer."""

    def __init__(self, head: dict[str, Any], include_usage: bool) -> None:
        self.head = head
        self.include_usage = include_usage
        self.extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(self, delta: dict[str, Any], reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return b"data: " + orjson.dumps({**self.head, "choices": [choice], **self.extra}) + b"\n\n"

    def close(
        self, frames: list[bytes], deltas: int, counts: Counts, finish: str, knobs: StreamKnobs
    ) -> list[bytes]:
        """Add the end to `frames` (a first chunk, then `deltas` output chunks): the finish
        chunk, the usage chunk when asked and ``[DONE]``; or, by the error-event knob, an error
        after the second output chunk."""
        if knobs.error_event is not None:
            del frames[1 + min(2, deltas) :]
            error = orjson.dumps(error_payload(knobs.error_event, None))
            frames.append(b"data: " + error + b"\n\n")
            return frames
        frames.append(self.chunk({}, finish))
        if self.include_usage:
            usage_chunk = {**self.head, "choices": [], "usage": chat_usage(counts)}
            frames.append(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
        frames.append(DONE)
        return frames


# A stream's frames for _Chunks and the stream knobs, and how many output chunks they have.
_Render = Callable[[_Chunks, StreamKnobs], tuple[list[bytes], int]]


def _text_frames(
    gen: Generated, finish: str, chunks: _Chunks, knobs: StreamKnobs
) -> tuple[list[bytes], int]:
    """Every chunk of a text stream, in order; the first content chunk is frame 1."""
    frames = [chunks.chunk({"role": "assistant", "content": ""}, None)]
    # Content chunks differ only in the word: split a rendered one around it once.
    prefix, _, suffix = chunks.chunk({"content": ""}, None).partition(b'"content":""')
    prefix += b'"content":'
    for i, b in enumerate(gen.digest):
        frames.append(b"".join((prefix, REST_JSON[b] if i else FIRST_JSON[b], suffix)))
    return chunks.close(frames, len(gen.digest), gen, finish, knobs), len(gen.digest)


def _tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _call_frames(
    call: Call, call_id: str, finish: str, chunks: _Chunks, knobs: StreamKnobs
) -> tuple[list[bytes], int]:
    """Every chunk of a tool-call stream: the call with its name, then its arguments."""
    first = {"index": 0, **_tool_call(call_id, call.name, "")}
    delta = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [first]}
    frames = [chunks.chunk(delta, None)]
    deltas = pieces(call.arguments)
    for piece in deltas:
        tool_calls = [{"index": 0, "function": {"arguments": piece}}]
        frames.append(chunks.chunk({"tool_calls": tool_calls}, None))
    return chunks.close(frames, len(deltas), call, finish, knobs), len(deltas)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    options = runtime.options
    body = await json_body(request)
    if isinstance(body, web.Response):
        return body
    if (problem := check_model(body, runtime)) is not None:
        return problem
    head = {
        "id": hex_id("chatcmpl-", 15),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "service_tier": "default",
        "system_fingerprint": "fp_mock",
    }
    incomplete = response_status(request) == "incomplete"
    if (call := chat_call(request, body)) is not None:
        call_id = hex_id("call_", 12)
        finish = "length" if incomplete else "tool_calls"
        content = {"tool_calls": [_tool_call(call_id, call.name, call.arguments)]}
        render = functools.partial(_call_frames, call, call_id, finish)
        return await _reply(request, body, head, call, finish, content, render)
    keys = ("max_completion_tokens", "max_tokens")
    requested = requested_tokens(body, keys, options.default_output_tokens)
    gen = generate(request, chat_texts(body), requested)
    finish = "length" if incomplete else "stop"
    render = functools.partial(_text_frames, gen, finish)
    return await _reply(request, body, head, gen, finish, {"content": gen.text}, render)


async def _reply(
    request: web.Request,
    body: dict[str, Any],
    head: dict[str, Any],
    counts: Counts,
    finish: str,
    content: dict[str, Any],
    render: _Render,
) -> web.StreamResponse:
    """The completion as JSON (the message is `content` over an empty one) or as a stream."""
    options = request.app[RUNTIME].options
    if body.get("stream") is True:
        knobs = stream_knobs(request, options)
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage")
        head["object"] = "chat.completion.chunk"
        frames, deltas = render(_Chunks(head, include_usage is True), knobs)
        return await pump(request, frames, knobs, ttft_index=0, paced_start=1, paced_count=deltas)
    ttft = ttft_s(request, options)
    if ttft > 0:
        await asyncio.sleep(ttft)
    message = {"role": "assistant", "content": None, "refusal": None, "annotations": [], **content}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return json_reply({**head, "choices": [choice], "usage": chat_usage(counts)})
