"""Token usage from JSON bodies and from stream events (Responses and Chat). Pure functions.

Every `*_details` field and `total_tokens` is optional; the provider's simplified body
(`{"usage": {"input_tokens", "output_tokens"}}`) and Chat Completions usage are accepted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.sse import SSEEvent

TERMINAL_RESPONSE_EVENTS = frozenset(
    {
        "response.completed",
        "response.incomplete",
        "response.failed",
        "response.done",
        "response.cancelled",
    }
)
_STATUS_OF_EVENT: dict[str | None, str] = {
    "response.completed": "completed",
    "response.incomplete": "incomplete",
    "response.failed": "failed",
    "response.cancelled": "cancelled",
}
_USAGE = (b'"usage":{', b'"usage": {')
_CONTENT = re.compile(rb'"content":\s*"[^"]')
_SNIFF = (
    *_USAGE,
    b'"error"',
    b'"finish_reason":"',
    b'"finish_reason": "',
    b"response.completed",
    b"response.incomplete",
    b"response.failed",
    b"response.done",
    b"response.cancelled",
)


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0


def _int(v: Any) -> int:
    if isinstance(v, bool):
        return 0
    if isinstance(v, int):
        return max(v, 0)
    if isinstance(v, float) and math.isfinite(v):
        return max(int(v), 0)
    return 0


def _detail(obj: Mapping[str, Any], key: str, field: str) -> int:
    d = obj.get(key)
    return _int(d.get(field)) if isinstance(d, Mapping) else 0


def parse_usage(u: Any) -> Usage | None:
    """A `usage` object of either API shape -> Usage; None when it is absent or unusable."""
    if not isinstance(u, Mapping):
        return None
    if "input_tokens" in u or "output_tokens" in u:
        inp, out = _int(u.get("input_tokens")), _int(u.get("output_tokens"))
        return Usage(
            inp,
            out,
            _int(u.get("total_tokens")) or inp + out,  # the provider's total, when it has one
            _detail(u, "input_tokens_details", "cached_tokens"),
            _detail(u, "output_tokens_details", "reasoning_tokens"),
        )
    if "prompt_tokens" in u or "completion_tokens" in u:
        inp, out = _int(u.get("prompt_tokens")), _int(u.get("completion_tokens"))
        return Usage(
            inp,
            out,
            inp + out,
            _detail(u, "prompt_tokens_details", "cached_tokens"),
            _detail(u, "completion_tokens_details", "reasoning_tokens"),
        )
    return None


def usage_from_body(body: Any) -> Usage | None:
    """Usage of a JSON response body (a Response, a chat.completion, or an event wrapper)."""
    if not isinstance(body, Mapping):
        return None
    found = parse_usage(body.get("usage"))
    if found is None and isinstance(body.get("response"), Mapping):
        found = parse_usage(body["response"].get("usage"))
    return found


@dataclass(slots=True)
class StreamSummary:
    """What one stream has told so far: fed every event by `StreamTracker`."""

    events: int = 0
    terminal: bool = False
    done: bool = False  # `data: [DONE]` arrived: nothing can follow
    usage: Usage | None = None
    status: str | None = None
    response_id: str | None = None
    response_model: str | None = None
    error_code: str | None = None
    last_sequence: int | None = None
    first_output_seen: bool = False
    finish_reasons: tuple[str, ...] = ()

    @property
    def next_sequence(self) -> int:
        # only some events are decoded; sequence numbers count events from 0 upwards
        if self.last_sequence is None:
            return self.events
        return max(self.last_sequence + 1, self.events)


class StreamTracker:
    """Reads lifecycle, usage and the first output event from a Responses or Chat stream.

    Only events that can matter are JSON-decoded: terminal events, errors, and data that
    mentions usage. Deltas are recognised by their `event:` name or a cheap byte test.
    """

    __slots__ = ("summary",)

    def __init__(self) -> None:
        self.summary = StreamSummary()

    def skipped(self, events: int) -> None:
        """Count events that were not fed: ones that cannot change the summary."""
        self.summary.events += events

    def observe(self, ev: SSEEvent) -> bool:
        """Feed one event; returns True when it is the stream's first output event."""
        s = self.summary
        data = ev.data
        if data.startswith(b"[DONE]"):  # as the OpenAI SDK tests it
            s.terminal = s.done = True
            return False
        s.events += 1
        name = ev.event
        first = False
        if not s.first_output_seen and _is_output(name, data):
            s.first_output_seen = first = True
        if name is not None:
            wanted = (
                name in TERMINAL_RESPONSE_EVENTS
                or name in ("error", "response.created")
                or any(m in data for m in _USAGE)
            )
        else:
            wanted = s.events == 1 or any(m in data for m in _SNIFF)
        if not wanted:
            return first
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return first
        if isinstance(obj, dict):
            self._apply(obj, name)
        return first

    def _apply(self, obj: dict[str, Any], name: str | None) -> None:
        s = self.summary
        seq = obj.get("sequence_number")
        if isinstance(seq, int):
            s.last_sequence = seq
        typ = obj.get("type")
        kind = typ if isinstance(typ, str) else name
        response = obj.get("response")
        if isinstance(response, Mapping):
            if isinstance(response.get("id"), str):
                s.response_id = response["id"]
            if isinstance(response.get("model"), str):
                s.response_model = response["model"]
        if kind in TERMINAL_RESPONSE_EVENTS:
            s.terminal = True
            snapshot: Mapping[str, Any] = response if isinstance(response, Mapping) else {}
            status = snapshot.get("status")
            s.status = status if isinstance(status, str) else _STATUS_OF_EVENT.get(kind)
            s.usage = parse_usage(snapshot.get("usage")) or s.usage
            s.finish_reasons = (finish_reason(snapshot),)
            err = snapshot.get("error")
            if isinstance(err, Mapping) and isinstance(err.get("code"), str):
                s.error_code = err["code"]
            return
        if kind == "error" or (kind is None and "error" in obj and "choices" not in obj):
            s.terminal = True
            s.status = "failed"
            err = obj.get("error")
            code = err.get("code") if isinstance(err, Mapping) else obj.get("code")
            s.error_code = code if isinstance(code, str) else "error"
            return
        if kind is None or obj.get("object") == "chat.completion.chunk":
            # Chat Completions: ids and model on every chunk, usage on the final one
            if isinstance(obj.get("id"), str):
                s.response_id = obj["id"]
            if isinstance(obj.get("model"), str):
                s.response_model = obj["model"]
            found = parse_usage(obj.get("usage"))
            if found is not None:
                s.usage = found
            choices = obj.get("choices")
            if isinstance(choices, list):
                reasons = tuple(
                    c["finish_reason"]
                    for c in choices
                    if isinstance(c, Mapping) and isinstance(c.get("finish_reason"), str)
                )
                if reasons:
                    s.finish_reasons = reasons
                    s.status = "completed"


def _is_output(name: str | None, data: bytes) -> bool:
    if name is not None:
        return name.endswith(".delta")
    if b'"type":"response.' in data or b'"type": "response.' in data:
        return b'.delta"' in data
    # Chat chunk: the first one carrying content or a tool call
    return _CONTENT.search(data) is not None or b'"tool_calls"' in data


def finish_reason(response: Mapping[str, Any]) -> str:
    """A GenAI finish reason for a Responses snapshot (the API has no native field)."""
    status = response.get("status")
    if status == "completed":
        output = response.get("output")
        if isinstance(output, list) and any(
            isinstance(o, Mapping) and o.get("type") == "function_call" for o in output
        ):
            return "tool_calls"
        return "stop"
    if status == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, Mapping) else None
        return "content_filter" if reason == "content_filter" else "length"
    return "error"
