"""The Responses API: text answers, their SSE event sequence and the ``/v1/responses`` routes.

Owns: choosing between a text answer and a function call (the rule is in ``tools``, the call's
reply in ``calls``), the message item of a text answer, every event of a streamed text response
in order, and the handlers for create, retrieve, delete, cancel, input items and input-token
counting. Retrieved, cancelled and listed responses are synthesised: every "stored" response
was asked ``"hello"``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from gateway.mock_upstream.calls import reply_function_call
from gateway.mock_upstream.knobs import (
    TRUTHY,
    StreamKnobs,
    response_status,
    stream_knobs,
    ttft_s,
)
from gateway.mock_upstream.objects import response_object, terminal
from gateway.mock_upstream.replies import check_model, error, hex_id, json_body, json_reply
from gateway.mock_upstream.state import RUNTIME, Runtime
from gateway.mock_upstream.stream import DONE, error_payload, pump, sse
from gateway.mock_upstream.text import (
    FIRST_JSON,
    REST_JSON,
    Generated,
    generate,
    input_tokens,
    requested_tokens,
    responses_texts,
)
from gateway.mock_upstream.tools import responses_call

__all__ = [
    "cancel_response",
    "count_input_tokens",
    "create_response",
    "delete_response",
    "input_items",
    "retrieve_response",
]

_STORED_INPUT: Final = "hello"  # what every "stored" response was asked

# ---------------------------------------------------------------- text answers


def _output_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _message_item(msg_id: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": msg_id,
        "type": "message",
        "status": status,
        "content": content,
        "role": "assistant",
    }


def _finish(obj: dict[str, Any], msg_id: str, gen: Generated, status: str) -> dict[str, Any]:
    """Turn an in-progress Response into its terminal form (completed, incomplete or failed)."""
    item_status = "completed" if status == "completed" else "incomplete"
    output = [_message_item(msg_id, item_status, [_output_part(gen.text)])]
    return terminal(obj, output, gen, status)


def _responses_frames(
    obj: dict[str, Any], msg_id: str, gen: Generated, status: str, knobs: StreamKnobs
) -> list[bytes]:
    """Every SSE event of a text response, in order; the first delta is frame 4.

    `obj` is the in-progress Response snapshot; `status` the terminal one.
    """
    frames: list[bytes] = []

    def add(event: str, payload: dict[str, Any]) -> None:
        frames.append(sse(event, {"type": event, "sequence_number": len(frames), **payload}))

    part_ref = {"item_id": msg_id, "output_index": 0, "content_index": 0}
    add("response.created", {"response": obj})
    add("response.in_progress", {"response": obj})
    add(
        "response.output_item.added",
        {"output_index": 0, "item": _message_item(msg_id, "in_progress", [])},
    )
    add("response.content_part.added", {**part_ref, "part": _output_part("")})
    # Deltas are the bulk of a stream: splice pre-encoded words into a fixed template.
    head = (
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
        b'"sequence_number":'
    )
    mid = b',"item_id":"' + msg_id.encode() + b'","output_index":0,"content_index":0,"delta":'
    tail = b',"logprobs":[]}\n\n'
    for i, b in enumerate(gen.digest):
        word = REST_JSON[b] if i else FIRST_JSON[b]
        frames.append(b"".join((head, str(len(frames)).encode(), mid, word, tail)))
    if knobs.error_event is not None:
        del frames[4 + min(2, len(gen.digest)) :]
        frames.append(sse("error", error_payload(knobs.error_event, len(frames))))
        return frames
    final = _finish(obj, msg_id, gen, status)
    add("response.output_text.done", {**part_ref, "text": gen.text, "logprobs": []})
    add("response.content_part.done", {**part_ref, "part": _output_part(gen.text)})
    add("response.output_item.done", {"output_index": 0, "item": final["output"][0]})
    add("response." + status, {"response": final})  # completed | incomplete | failed
    if knobs.done:
        frames.append(DONE)
    return frames


# ---------------------------------------------------------------- handlers


async def create_response(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    body = await json_body(request)
    if isinstance(body, web.Response):
        return body
    if (problem := check_model(body, runtime)) is not None:
        return problem
    options = runtime.options
    model: str = body["model"]
    rid, created_at = hex_id("resp_"), int(time.time())
    stream = body.get("stream") is True
    if body.get("background") is True and not stream:
        return json_reply(response_object(rid, created_at, model, body, "queued"))
    if (call := responses_call(request, body)) is not None:
        obj = response_object(rid, created_at, model, body, "in_progress")
        return await reply_function_call(request, runtime, obj, call, stream)
    requested = requested_tokens(body, ("max_output_tokens",), options.default_output_tokens)
    gen = generate(request, responses_texts(body), requested)
    return await _reply_response(request, runtime, rid, created_at, model, body, gen, stream)


async def _reply_response(
    request: web.Request,
    runtime: Runtime,
    rid: str,
    created_at: int,
    model: str,
    body: Mapping[str, Any],
    gen: Generated,
    stream: bool,
) -> web.StreamResponse:
    status = response_status(request)
    msg_id = hex_id("msg_")
    obj = response_object(rid, created_at, model, body, "in_progress")
    if stream:
        knobs = stream_knobs(request, runtime.options)
        frames = _responses_frames(obj, msg_id, gen, status, knobs)
        return await pump(
            request, frames, knobs, ttft_index=4, paced_start=4, paced_count=len(gen.digest)
        )
    ttft = ttft_s(request, runtime.options)
    if ttft > 0:
        await asyncio.sleep(ttft)
    return json_reply(_finish(obj, msg_id, gen, status))


def _response_id(request: web.Request) -> str | web.Response:
    rid = request.match_info["response_id"]
    if not rid.startswith("resp_"):
        return error(404, f"No response found with id '{rid}'.", code="not_found")
    return rid


async def retrieve_response(request: web.Request) -> web.StreamResponse:
    rid = _response_id(request)
    if isinstance(rid, web.Response):
        return rid
    runtime = request.app[RUNTIME]
    options = runtime.options
    gen = generate(request, [_STORED_INPUT], options.default_output_tokens)
    stream = request.query.get("stream", "").lower() in TRUTHY
    body = {"input": _STORED_INPUT}
    now = int(time.time())
    return await _reply_response(request, runtime, rid, now, options.models[0], body, gen, stream)


async def delete_response(request: web.Request) -> web.StreamResponse:
    rid = _response_id(request)
    if isinstance(rid, web.Response):
        return rid
    return json_reply({"id": rid, "object": "response", "deleted": True})


async def cancel_response(request: web.Request) -> web.StreamResponse:
    rid = _response_id(request)
    if isinstance(rid, web.Response):
        return rid
    model = request.app[RUNTIME].options.models[0]
    body = {"background": True, "input": _STORED_INPUT}
    return json_reply(response_object(rid, int(time.time()), model, body, "cancelled"))


async def input_items(request: web.Request) -> web.StreamResponse:
    rid = _response_id(request)
    if isinstance(rid, web.Response):
        return rid
    item_id = hex_id("msg_")
    content = [{"type": "input_text", "text": _STORED_INPUT}]
    item = {"type": "message", "id": item_id, "role": "user", "content": content}
    listing = {"object": "list", "data": [item], "first_id": item_id, "last_id": item_id}
    return json_reply({**listing, "has_more": False})


async def count_input_tokens(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    if isinstance(body, web.Response):
        return body
    tokens = input_tokens(responses_texts(body))
    return json_reply({"object": "response.input_tokens", "input_tokens": tokens})
