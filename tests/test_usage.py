"""Usage extraction from every shape in the protocol reference."""

from __future__ import annotations

from gateway.usage import Usage, finish_reason, parse_usage, usage_from_body


def test_full_responses_usage() -> None:
    u = {
        "input_tokens": 36,
        "input_tokens_details": {"cached_tokens": 6, "cache_write_tokens": 0},
        "output_tokens": 87,
        "output_tokens_details": {"reasoning_tokens": 20},
        "total_tokens": 123,
    }
    assert parse_usage(u) == Usage(36, 87, 123, 6, 20)


def test_details_and_total_missing() -> None:
    assert parse_usage({"input_tokens": 15, "output_tokens": 12}) == Usage(15, 12, 27)


def test_provider_simplified_body() -> None:
    body = {
        "id": "x",
        "type": "message",
        "output": [{"type": "output_text", "text": "hi"}],
        "usage": {"input_tokens": 4, "output_tokens": 2},
        "_metadata": {"tier": "Free"},
    }
    assert usage_from_body(body) == Usage(4, 2, 6)


def test_chat_usage_counts_prompt_plus_completion() -> None:
    u = {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 99,
        "prompt_tokens_details": {"cached_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 1},
    }
    assert parse_usage(u) == Usage(10, 5, 15, 3, 1)


def test_garbage_and_null() -> None:
    assert parse_usage(None) is None
    assert parse_usage({"foo": 1}) is None
    assert usage_from_body([1, 2]) is None
    assert parse_usage({"input_tokens": "x", "output_tokens": -3, "total_tokens": None}) == Usage(
        0, 0, 0
    )


def test_usage_inside_event_wrapper() -> None:
    assert usage_from_body(
        {"response": {"usage": {"input_tokens": 1, "output_tokens": 1}}}
    ) == Usage(1, 1, 2)


def test_finish_reasons() -> None:
    assert finish_reason({"status": "completed", "output": [{"type": "message"}]}) == "stop"
    assert (
        finish_reason({"status": "completed", "output": [{"type": "function_call"}]})
        == "tool_calls"
    )
    assert (
        finish_reason(
            {"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
        )
        == "length"
    )
    assert (
        finish_reason({"status": "incomplete", "incomplete_details": {"reason": "content_filter"}})
        == "content_filter"
    )
    assert finish_reason({"status": "failed"}) == "error"
