"""Function-call answers of the Responses API, as JSON or as an SSE event sequence.

Owns: the ``function_call`` output item and every event of a streamed function call, in order:
``response.created``, ``response.in_progress``, ``response.output_item.added`` (the item with
empty arguments, in progress), one ``response.function_call_arguments.delta`` per piece of the
arguments, ``response.function_call_arguments.done``, ``response.output_item.done`` and the
terminal ``response.completed`` (or ``.incomplete``/``.failed`` by ``x-mock-response-status``).
The stream knobs apply as to text: the time to first token falls before the first arguments
delta, pacing spreads the deltas, an error event replaces the stream after two deltas.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from aiohttp import web

from gateway.mock_upstream.knobs import StreamKnobs, response_status, stream_knobs, ttft_s
from gateway.mock_upstream.objects import terminal
from gateway.mock_upstream.replies import hex_id, json_reply
from gateway.mock_upstream.state import Runtime
from gateway.mock_upstream.stream import DONE, error_payload, pump, sse
from gateway.mock_upstream.tools import Call, pieces

__all__ = ["reply_function_call"]

_FIRST_DELTA: Final = 3  # the frame of the first arguments delta


def _item(item_id: str, call_id: str, call: Call, status: str, arguments: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": call.name,
        "arguments": arguments,
        "status": status,
    }


def _frames(
    obj: dict[str, Any], item: dict[str, Any], call: Call, status: str, knobs: StreamKnobs
) -> list[bytes]:
    """Every SSE event of a function call, in order; `item` is the terminal output item."""
    frames: list[bytes] = []

    def add(event: str, payload: dict[str, Any]) -> None:
        frames.append(sse(event, {"type": event, "sequence_number": len(frames), **payload}))

    ref = {"item_id": item["id"], "output_index": 0}
    add("response.created", {"response": obj})
    add("response.in_progress", {"response": obj})
    started = {**item, "arguments": "", "status": "in_progress"}
    add("response.output_item.added", {"output_index": 0, "item": started})
    deltas = pieces(call.arguments)
    for delta in deltas:
        add("response.function_call_arguments.delta", {**ref, "delta": delta})
    if knobs.error_event is not None:
        del frames[_FIRST_DELTA + min(2, len(deltas)) :]
        frames.append(sse("error", error_payload(knobs.error_event, len(frames))))
        return frames
    done = {**ref, "name": call.name, "arguments": call.arguments}
    add("response.function_call_arguments.done", done)
    add("response.output_item.done", {"output_index": 0, "item": item})
    add("response." + status, {"response": terminal(obj, [item], call, status)})
    if knobs.done:
        frames.append(DONE)
    return frames


async def reply_function_call(
    request: web.Request, runtime: Runtime, obj: dict[str, Any], call: Call, stream: bool
) -> web.StreamResponse:
    """Answer with `call`; `obj` is the in-progress Response snapshot."""
    status = response_status(request)
    item_status = "completed" if status == "completed" else "incomplete"
    item = _item(hex_id("fc_"), hex_id("call_", 12), call, item_status, call.arguments)
    if stream:
        knobs = stream_knobs(request, runtime.options)
        frames = _frames(obj, item, call, status, knobs)
        count = len(pieces(call.arguments))
        return await pump(
            request,
            frames,
            knobs,
            ttft_index=_FIRST_DELTA,
            paced_start=_FIRST_DELTA,
            paced_count=count,
        )
    ttft = ttft_s(request, runtime.options)
    if ttft > 0:
        await asyncio.sleep(ttft)
    return json_reply(terminal(obj, [item], call, status))
