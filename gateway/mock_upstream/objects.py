"""The Response object, its terminal forms and the usage blocks of both APIs.

Owns: a Response snapshot in some status (``response_object``), turning an in-progress one
into its completed, incomplete or failed form around a given output (``terminal``), and the
usage blocks of the Responses API and of Chat Completions, built from anything that counts
tokens the mock's way (``Counts``: generated text and function calls alike).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final, Protocol

__all__ = ["Counts", "chat_usage", "response_object", "responses_usage", "terminal"]

_FAIL_MESSAGE: Final = "The mock upstream was asked to fail this response (x-mock-response-status)."


class Counts(Protocol):
    """Token counts of one answer: ``output_tokens`` includes ``reasoning_tokens``."""

    @property
    def input_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int: ...
    @property
    def reasoning_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...


def responses_usage(counts: Counts) -> dict[str, Any]:
    return {
        "input_tokens": counts.input_tokens,
        "input_tokens_details": {"cached_tokens": counts.cached_tokens},
        "output_tokens": counts.output_tokens,
        "output_tokens_details": {"reasoning_tokens": counts.reasoning_tokens},
        "total_tokens": counts.input_tokens + counts.output_tokens,
    }


def chat_usage(counts: Counts) -> dict[str, Any]:
    return {
        "prompt_tokens": counts.input_tokens,
        "completion_tokens": counts.output_tokens,
        "total_tokens": counts.input_tokens + counts.output_tokens,
        "prompt_tokens_details": {"cached_tokens": counts.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": counts.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def response_object(
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


def terminal(
    obj: dict[str, Any], output: list[dict[str, Any]], counts: Counts, status: str
) -> dict[str, Any]:
    """An in-progress Response in its terminal `status` (completed, incomplete or failed)."""
    obj = {**obj, "status": status, "completed_at": int(time.time())}
    obj["output"] = output
    obj["usage"] = responses_usage(counts)
    if status == "incomplete":
        obj["incomplete_details"] = {"reason": "max_output_tokens"}
    elif status == "failed":
        obj["error"] = {"code": "server_error", "message": _FAIL_MESSAGE}
    return obj
