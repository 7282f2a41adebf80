"""A fake OpenAI-compatible provider for the demo, the tests and the benchmark.

Owns: the mock's routes (Responses API, Chat Completions, models, a catch-all echo), its
deterministic text and usage, the realistic SSE event sequences, the per-request fault knobs
(``x-mock-*`` request headers) and the request recorder (``MockState`` under ``MOCK_STATE``).

Output text is a pure function of the input text: the same request always gets the same words
and usage, only the ids differ. Usage arithmetic:
``input_tokens = max(1, ceil(chars / 4))`` over instructions plus every input text,
``output_tokens = N + reasoning`` where ``N`` is the number of words produced.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

__all__ = [
    "MOCK_STATE",
    "MockOptions",
    "MockState",
    "RecordedRequest",
    "create_mock_app",
    "run_mock",
    "start_mock",
]


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


MOCK_STATE: web.AppKey[MockState] = web.AppKey("mock_state", MockState)

_MAX_RECORDED = 10_000
_MAX_OUTPUT_TOKENS = 131_072  # like a real model's output limit; keeps a silly request bounded
_MAX_BODY_BYTES = 64 * 1024 * 1024

# 64 words, so a byte of hash output picks one uniformly with `b % 64`.
_WORDS = (
    "the", "quick", "river", "flows", "past", "green", "rice", "fields", "under", "a",
    "warm", "island", "sky", "where", "small", "boats", "carry", "spice", "and", "tea",
    "to", "busy", "harbor", "towns", "every", "morning", "light", "falls", "on", "old",
    "stone", "temples", "while", "children", "sing", "songs", "about", "the", "sea", "wind",
    "mountain", "forest", "garden", "market", "bridge", "lantern", "story", "silver", "gold",
    "ocean", "rain", "cloud", "sun", "moon", "star", "path", "home", "friend", "quiet",
    "bright", "gentle", "swift", "clear", "deep",
)  # fmt: skip
_FIRST = tuple(_WORDS[b % 64] for b in range(256))
_REST = tuple(" " + w for w in _FIRST)
_FIRST_JSON = tuple(orjson.dumps(w) for w in _FIRST)
_REST_JSON = tuple(orjson.dumps(w) for w in _REST)

_JSON = "application/json"
_SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache"}
_TRUE = frozenset({"1", "true", "yes", "on"})
_DONE = b"data: [DONE]\n\n"
_KEEPALIVE = b": keep-alive\n\n"
_FAIL_MESSAGE = "The mock upstream was asked to fail this response (x-mock-response-status)."


@dataclass(frozen=True, slots=True)
class _Runtime:
    """Per-app constants pre-built from the options."""

    options: MockOptions
    models: frozenset[str]
    models_body: bytes
    model_bodies: Mapping[str, bytes]


_RUNTIME: web.AppKey[_Runtime] = web.AppKey("mock_runtime", _Runtime)


@dataclass(frozen=True, slots=True)
class _Generated:
    digest: bytes  # one byte per output word
    text: str
    input_tokens: int
    cached_tokens: int
    reasoning_tokens: int

    @property
    def output_tokens(self) -> int:
        return len(self.digest) + self.reasoning_tokens


@dataclass(frozen=True, slots=True)
class _StreamKnobs:
    ttft_s: float
    tokens_per_s: float
    cut_after: int | None
    crlf: bool
    comments: bool
    hold_open_s: float
    done: bool
    error_event: str | None  # "flat" | "nested"


# ---------------------------------------------------------------- helpers


def _hex_id(prefix: str, nbytes: int = 24) -> str:
    return prefix + os.urandom(nbytes).hex()


def _header_int(request: web.Request, name: str) -> int | None:
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
    return value is not None and value.strip().lower() in _TRUE


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type=_JSON)


def _error(
    status: int,
    message: str,
    etype: str = "invalid_request_error",
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON, headers=headers)


async def _json_body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "We could not parse the JSON body of your request.", code="invalid_json")
    if not isinstance(body, dict):
        return _error(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def _check_model(body: dict[str, Any], runtime: _Runtime) -> web.Response | None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _error(400, "You must provide a model parameter.", code="missing_model")
    if model not in runtime.models:
        message = f"The model `{model}` does not exist or you do not have access to it."
        return _error(404, message, code="model_not_found")
    return None


def _content_texts(content: Any, out: list[str]) -> None:
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(text := part.get("text"), str):
                out.append(text)


def _responses_texts(body: Mapping[str, Any]) -> list[str]:
    texts: list[str] = []
    if isinstance(instructions := body.get("instructions"), str):
        texts.append(instructions)
    items = body.get("input")
    if isinstance(items, str):
        texts.append(items)
    elif isinstance(items, list):
        for item in items:
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, dict):
                _content_texts(item.get("content"), texts)
                if isinstance(output := item.get("output"), str):  # function_call_output
                    texts.append(output)
    return texts


def _chat_texts(body: Mapping[str, Any]) -> list[str]:
    texts: list[str] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                _content_texts(message.get("content"), texts)
    return texts


def _input_tokens(texts: list[str]) -> int:
    return max(1, math.ceil(sum(map(len, texts)) / 4))


def _requested_tokens(body: Mapping[str, Any], keys: tuple[str, ...], default: int) -> int:
    for key in keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def _generate(request: web.Request, texts: list[str], requested: int) -> _Generated:
    """Deterministic words from a hash of the input; knobs from the x-mock-* headers."""
    count = _header_int(request, "x-mock-output-tokens")
    count = min(max(requested if count is None else count, 0), _MAX_OUTPUT_TOKENS)
    digest = (
        hashlib.shake_128("\x1f".join(texts).encode("utf-8", "surrogatepass")).digest(count)
        if count
        else b""
    )
    text = _FIRST[digest[0]] + "".join(map(_REST.__getitem__, digest[1:])) if digest else ""
    input_tokens = _input_tokens(texts)
    cached = min(max(_header_int(request, "x-mock-cached-tokens") or 0, 0), input_tokens)
    reasoning = max(_header_int(request, "x-mock-reasoning-tokens") or 0, 0)
    return _Generated(digest, text, input_tokens, cached, reasoning)


def _ttft_s(request: web.Request, options: MockOptions) -> float:
    ttft_ms = _header_float(request, "x-mock-ttft-ms")
    return max(options.ttft_ms if ttft_ms is None else ttft_ms, 0.0) / 1000


def _stream_knobs(request: web.Request, options: MockOptions) -> _StreamKnobs:
    tps = _header_float(request, "x-mock-tokens-per-s")
    hold_ms = _header_float(request, "x-mock-hold-open-ms") or 0.0
    error_event = (request.headers.get("x-mock-error-event") or "").strip().lower()
    return _StreamKnobs(
        ttft_s=_ttft_s(request, options),
        tokens_per_s=max(options.tokens_per_s if tps is None else tps, 0.0),
        cut_after=_header_int(request, "x-mock-cut-after"),
        crlf=_header_flag(request, "x-mock-crlf"),
        comments=_header_flag(request, "x-mock-comments"),
        hold_open_s=max(hold_ms, 0.0) / 1000,
        done=_header_flag(request, "x-mock-done"),
        error_event=error_event if error_event in ("flat", "nested") else None,
    )


def _response_status(request: web.Request) -> str:
    value = (request.headers.get("x-mock-response-status") or "").strip().lower()
    return value if value in ("incomplete", "failed") else "completed"


# ---------------------------------------------------------------- Responses API objects


def _usage(gen: _Generated) -> dict[str, Any]:
    return {
        "input_tokens": gen.input_tokens,
        "input_tokens_details": {"cached_tokens": gen.cached_tokens},
        "output_tokens": gen.output_tokens,
        "output_tokens_details": {"reasoning_tokens": gen.reasoning_tokens},
        "total_tokens": gen.input_tokens + gen.output_tokens,
    }


def _response_object(
    rid: str, created_at: int, model: str, body: Mapping[str, Any], status: str
) -> dict[str, Any]:
    """A Response in `status` with empty output and no usage; callers fill in the rest."""
    return {
        "id": rid,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": body.get("background", False),
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"),
        "model": model,
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
        "safety_identifier": body.get("safety_identifier"),
        "service_tier": "default",
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_logprobs": body.get("top_logprobs", 0),
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": None,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


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


def _finish(obj: dict[str, Any], msg_id: str, gen: _Generated, status: str) -> dict[str, Any]:
    """Turn an in-progress Response into its terminal form (completed, incomplete or failed)."""
    item_status = "completed" if status == "completed" else "incomplete"
    obj = {**obj, "status": status, "completed_at": int(time.time()), "usage": _usage(gen)}
    obj["output"] = [_message_item(msg_id, item_status, [_output_part(gen.text)])]
    if status == "incomplete":
        obj["incomplete_details"] = {"reason": "max_output_tokens"}
    elif status == "failed":
        obj["error"] = {"code": "server_error", "message": _FAIL_MESSAGE}
    return obj


def _sse(event: str, payload: dict[str, Any]) -> bytes:
    return b"".join((b"event: ", event.encode(), b"\ndata: ", orjson.dumps(payload), b"\n\n"))


def _error_payload(kind: str, seq: int | None) -> dict[str, Any]:
    detail: dict[str, Any] = {"code": "server_error", "message": "boom", "param": None}
    payload: dict[str, Any] = (
        {"type": "error", **detail}
        if kind == "flat"
        else {"type": "error", "error": {"type": "server_error", **detail}}
    )
    if seq is not None:
        payload["sequence_number"] = seq
    return payload


def _responses_frames(
    obj: dict[str, Any], msg_id: str, gen: _Generated, status: str, knobs: _StreamKnobs
) -> list[bytes]:
    """Every SSE event of a text response, in order; the first delta is frame 4.

    `obj` is the in-progress Response snapshot; `status` the terminal one.
    """
    frames: list[bytes] = []

    def add(event: str, payload: dict[str, Any]) -> None:
        frames.append(_sse(event, {"type": event, "sequence_number": len(frames), **payload}))

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
        word = _REST_JSON[b] if i else _FIRST_JSON[b]
        frames.append(b"".join((head, str(len(frames)).encode(), mid, word, tail)))
    if knobs.error_event is not None:
        del frames[4 + min(2, len(gen.digest)) :]
        frames.append(_sse("error", _error_payload(knobs.error_event, len(frames))))
        return frames
    final = _finish(obj, msg_id, gen, status)
    add("response.output_text.done", {**part_ref, "text": gen.text, "logprobs": []})
    add("response.content_part.done", {**part_ref, "part": _output_part(gen.text)})
    add("response.output_item.done", {"output_index": 0, "item": final["output"][0]})
    add("response." + status, {"response": final})  # completed | incomplete | failed
    if knobs.done:
        frames.append(_DONE)
    return frames


# ---------------------------------------------------------------- stream writer


async def _pump(
    request: web.Request,
    frames: list[bytes],
    knobs: _StreamKnobs,
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


# ---------------------------------------------------------------- handlers: Responses API


async def _create_response(request: web.Request) -> web.StreamResponse:
    runtime = request.app[_RUNTIME]
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    if (problem := _check_model(body, runtime)) is not None:
        return problem
    options = runtime.options
    model: str = body["model"]
    rid, created_at = _hex_id("resp_"), int(time.time())
    stream = body.get("stream") is True
    if body.get("background") is True and not stream:
        return _json(_response_object(rid, created_at, model, body, "queued"))
    requested = _requested_tokens(body, ("max_output_tokens",), options.default_output_tokens)
    gen = _generate(request, _responses_texts(body), requested)
    return await _reply_response(request, runtime, rid, created_at, model, body, gen, stream)


async def _reply_response(
    request: web.Request,
    runtime: _Runtime,
    rid: str,
    created_at: int,
    model: str,
    body: Mapping[str, Any],
    gen: _Generated,
    stream: bool,
) -> web.StreamResponse:
    status = _response_status(request)
    msg_id = _hex_id("msg_")
    obj = _response_object(rid, created_at, model, body, "in_progress")
    if stream:
        knobs = _stream_knobs(request, runtime.options)
        frames = _responses_frames(obj, msg_id, gen, status, knobs)
        return await _pump(
            request, frames, knobs, ttft_index=4, paced_start=4, paced_count=len(gen.digest)
        )
    ttft = _ttft_s(request, runtime.options)
    if ttft > 0:
        await asyncio.sleep(ttft)
    return _json(_finish(obj, msg_id, gen, status))


def _response_id(request: web.Request) -> str | web.Response:
    rid = request.match_info["response_id"]
    if not rid.startswith("resp_"):
        return _error(404, f"No response found with id '{rid}'.", code="not_found")
    return rid


_STORED_INPUT = "hello"  # what every "stored" response was asked


async def _retrieve_response(request: web.Request) -> web.StreamResponse:
    rid = _response_id(request)
    if isinstance(rid, web.Response):
        return rid
    runtime = request.app[_RUNTIME]
    options = runtime.options
    gen = _generate(request, [_STORED_INPUT], options.default_output_tokens)
    stream = request.query.get("stream", "").lower() in _TRUE
    body = {"input": _STORED_INPUT}
    now = int(time.time())
    return await _reply_response(request, runtime, rid, now, options.models[0], body, gen, stream)


async def _delete_response(request: web.Request) -> web.StreamResponse:
    rid = _response_id(request)
    if isinstance(rid, web.Response):
        return rid
    return _json({"id": rid, "object": "response", "deleted": True})


async def _cancel_response(request: web.Request) -> web.StreamResponse:
    rid = _response_id(request)
    if isinstance(rid, web.Response):
        return rid
    model = request.app[_RUNTIME].options.models[0]
    body = {"background": True, "input": _STORED_INPUT}
    return _json(_response_object(rid, int(time.time()), model, body, "cancelled"))


async def _input_items(request: web.Request) -> web.StreamResponse:
    rid = _response_id(request)
    if isinstance(rid, web.Response):
        return rid
    item_id = _hex_id("msg_")
    content = [{"type": "input_text", "text": _STORED_INPUT}]
    item = {"type": "message", "id": item_id, "role": "user", "content": content}
    listing = {"object": "list", "data": [item], "first_id": item_id, "last_id": item_id}
    return _json({**listing, "has_more": False})


async def _count_input_tokens(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    tokens = _input_tokens(_responses_texts(body))
    return _json({"object": "response.input_tokens", "input_tokens": tokens})


# ---------------------------------------------------------------- handlers: Chat Completions


def _chat_usage(gen: _Generated) -> dict[str, Any]:
    return {
        "prompt_tokens": gen.input_tokens,
        "completion_tokens": gen.output_tokens,
        "total_tokens": gen.input_tokens + gen.output_tokens,
        "prompt_tokens_details": {"cached_tokens": gen.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": gen.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chat_frames(
    head: dict[str, Any], gen: _Generated, finish: str, include_usage: bool, knobs: _StreamKnobs
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
        frames.append(b"".join((prefix, _REST_JSON[b] if i else _FIRST_JSON[b], suffix)))
    if knobs.error_event is not None:
        del frames[1 + min(2, len(gen.digest)) :]
        error = orjson.dumps(_error_payload(knobs.error_event, None))
        frames.append(b"data: " + error + b"\n\n")
        return frames
    frames.append(chunk({}, finish))
    if include_usage:
        usage_chunk = {**head, "choices": [], "usage": _chat_usage(gen)}
        frames.append(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
    frames.append(_DONE)
    return frames


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    runtime = request.app[_RUNTIME]
    options = runtime.options
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    if (problem := _check_model(body, runtime)) is not None:
        return problem
    keys = ("max_completion_tokens", "max_tokens")
    requested = _requested_tokens(body, keys, options.default_output_tokens)
    gen = _generate(request, _chat_texts(body), requested)
    finish = "length" if _response_status(request) == "incomplete" else "stop"
    head = {
        "id": _hex_id("chatcmpl-", 15),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "service_tier": "default",
        "system_fingerprint": "fp_mock",
    }
    if body.get("stream") is True:
        knobs = _stream_knobs(request, options)
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage")
        head["object"] = "chat.completion.chunk"
        frames = _chat_frames(head, gen, finish, include_usage is True, knobs)
        return await _pump(
            request, frames, knobs, ttft_index=0, paced_start=1, paced_count=len(gen.digest)
        )
    ttft = _ttft_s(request, options)
    if ttft > 0:
        await asyncio.sleep(ttft)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": gen.text,
        "refusal": None,
        "annotations": [],
    }
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return _json({**head, "choices": [choice], "usage": _chat_usage(gen)})


# ---------------------------------------------------------------- handlers: models, echo


async def _list_models(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[_RUNTIME].models_body, content_type=_JSON)


async def _get_model(request: web.Request) -> web.StreamResponse:
    model = request.match_info["model"]
    body = request.app[_RUNTIME].model_bodies.get(model)
    if body is None:
        return _error(404, f"The model `{model}` does not exist.", code="model_not_found")
    return web.Response(body=body, content_type=_JSON)


async def _echo(request: web.Request) -> web.StreamResponse:
    echo = {"object": "mock.echo", "method": request.method, "path": request.path}
    return _json({**echo, "query": request.query_string})


# ---------------------------------------------------------------- middleware and app


@web.middleware
async def _record_and_faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record every request, then apply the faults that pre-empt any handler."""
    state = request.app[MOCK_STATE]
    headers = {k.lower(): v for k, v in request.headers.items()}
    recorded = RecordedRequest(request.method, request.path_qs, headers, await request.read())
    if len(state.requests) >= _MAX_RECORDED:
        del state.requests[: len(state.requests) - _MAX_RECORDED + 1]
    state.requests.append(recorded)
    state.calls[f"{request.method} {request.path}"] += 1

    if (delay_ms := _header_float(request, "x-mock-first-byte-delay-ms")) and delay_ms > 0:
        await asyncio.sleep(delay_ms / 1000)
    status = _header_int(request, "x-mock-status")
    if status is not None and 400 <= status <= 599:
        etype = "server_error" if status >= 500 else "invalid_request_error"
        extra = {"retry-after": "1"} if status == 429 else None
        return _error(status, f"Mock error {status} (x-mock-status).", etype, "mock_error", extra)
    if _header_flag(request, "x-mock-echo-key"):
        auth = headers.get("authorization", "")
        key = auth[7:] if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
        return _error(401, f"Incorrect API key provided: {key}", code="invalid_api_key")
    return await handler(request)


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if "x-request-id" not in response.headers:
        response.headers["x-request-id"] = _hex_id("req_", 12)


def _runtime(options: MockOptions) -> _Runtime:
    entries = {
        m: {"id": m, "object": "model", "created": 1700000000, "owned_by": "mock"}
        for m in options.models
    }
    return _Runtime(
        options=options,
        models=frozenset(options.models),
        models_body=orjson.dumps({"object": "list", "data": list(entries.values())}),
        model_bodies={m: orjson.dumps(entry) for m, entry in entries.items()},
    )


def create_mock_app(options: MockOptions | None = None) -> web.Application:
    """The mock as an aiohttp application (use with a runner or the test client)."""
    options = options or MockOptions()
    if not options.models:
        raise ValueError("MockOptions.models must name at least one model")
    app = web.Application(middlewares=[_record_and_faults], client_max_size=_MAX_BODY_BYTES)
    app[MOCK_STATE] = MockState()
    app[_RUNTIME] = _runtime(options)
    app.on_response_prepare.append(_add_request_id)
    routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("POST", "/v1/responses", _create_response),
        ("POST", "/v1/responses/input_tokens", _count_input_tokens),
        ("GET", "/v1/responses/{response_id}", _retrieve_response),
        ("DELETE", "/v1/responses/{response_id}", _delete_response),
        ("POST", "/v1/responses/{response_id}/cancel", _cancel_response),
        ("GET", "/v1/responses/{response_id}/input_items", _input_items),
        ("POST", "/v1/chat/completions", _chat_completions),
        ("GET", "/v1/models", _list_models),
        ("GET", "/v1/models/{model:.+}", _get_model),
        ("*", "/v1/{tail:.*}", _echo),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return app


async def start_mock(
    host: str = "127.0.0.1", port: int = 0, options: MockOptions | None = None
) -> tuple[web.AppRunner, int]:
    """Start on a real socket; returns the runner (caller calls runner.cleanup()) and the port."""
    # A short shutdown timeout: a fake provider need not wait long for held-open streams.
    app = create_mock_app(options)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound_port


def run_mock(host: str, port: int, options: MockOptions) -> None:
    """Blocking: serve until SIGINT/SIGTERM (with uvloop when available); prints the URL once."""

    async def serve() -> None:
        runner, bound_port = await start_mock(host, port, options)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # e.g. Windows
                loop.add_signal_handler(sig, stop.set)
        shown = f"[{host}]" if ":" in host else host
        print(f"mock upstream listening on http://{shown}:{bound_port}/v1", flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop  # optional, and only this blocking entry point wants it

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    # KeyboardInterrupt: SIGINT where no signal handler could be installed.
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory) as r:
        r.run(serve())
