"""The text a client assembles from an answer: from a stream's deltas, or from a whole JSON
body (Responses and Chat Completions). Pure; anything of another shape gives ""."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.sse import SSEDecoder


def from_sse(raw: bytes) -> str:
    """The text of a stream's `response.output_text.delta` events, or of its chat chunks'
    `delta.content`, joined in order."""
    parts: list[str] = []
    for ev in SSEDecoder().feed(raw):
        if b"delta" not in ev.data:
            continue
        try:
            obj = orjson.loads(ev.data)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(obj, dict):
            continue
        if obj.get("type") == "response.output_text.delta" and isinstance(obj.get("delta"), str):
            parts.append(obj["delta"])
            continue
        for choice in _list(obj.get("choices")):
            delta = choice.get("delta") if isinstance(choice, Mapping) else None
            if isinstance(delta, Mapping) and isinstance(delta.get("content"), str):
                parts.append(delta["content"])
    return "".join(parts)


def from_json(body: bytes) -> str:
    """The output text of a whole answer: a response's `output_text` parts, or the first
    choice's message content (a chat completion) or text (a completion)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(obj, dict):
        return ""
    parts: list[str] = []
    for item in _list(obj.get("output")):
        if not isinstance(item, Mapping) or item.get("type") != "message":
            continue
        for part in _list(item.get("content")):
            if (
                isinstance(part, Mapping)
                and part.get("type") == "output_text"
                and isinstance(part.get("text"), str)
            ):
                parts.append(part["text"])
    if parts:
        return "".join(parts)
    for choice in _list(obj.get("choices"))[:1]:
        if not isinstance(choice, Mapping):
            continue
        message = choice.get("message")
        if isinstance(message, Mapping) and isinstance(message.get("content"), str):
            return str(message["content"])
        if isinstance(choice.get("text"), str):
            return str(choice["text"])
    return ""


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
