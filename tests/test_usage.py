"""Usage extraction from every shape in the protocol reference."""

from __future__ import annotations

import orjson
import pytest

from gateway.sse import SSEEvent
from gateway.usage import (
    StreamSummary,
    StreamTracker,
    Usage,
    finish_reason,
    parse_usage,
    usage_from_body,
)


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


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"input_tokens": 7}, Usage(7, 0, 7)),  # either count alone names the shape
        ({"output_tokens": 4}, Usage(0, 4, 4)),
        ({"prompt_tokens": 7}, Usage(7, 0, 7)),
        ({"completion_tokens": 4}, Usage(0, 4, 4)),
        # the provider's total is what it billed, even when it is not input + output
        ({"input_tokens": 10, "output_tokens": 5, "total_tokens": 20}, Usage(10, 5, 20)),
        ({"input_tokens": 3, "output_tokens": 4, "total_tokens": 0}, Usage(3, 4, 7)),
        ({"input_tokens": 3, "output_tokens": 4, "total_tokens": "9"}, Usage(3, 4, 7)),
    ],
)
def test_shapes_and_totals(usage: dict[str, object], expected: Usage) -> None:
    assert parse_usage(usage) == expected


@pytest.mark.parametrize(
    ("count", "read"),
    [
        (12, 12),
        (12.7, 12),  # a float count is truncated, as a JSON number may be written 12.0
        (0.5, 0),
        (-3.5, 0),
        (-3, 0),
        (True, 0),  # JSON true is not a count
        (float("inf"), 0),
        (float("nan"), 0),
        (None, 0),
        ("12", 0),
    ],
)
def test_a_count_is_a_non_negative_integer(count: object, read: int) -> None:
    assert parse_usage({"input_tokens": count, "output_tokens": 1}) == Usage(read, 1, read + 1)


def test_top_level_usage_wins_over_an_event_wrapper() -> None:
    body = {"usage": {"input_tokens": 2, "output_tokens": 1}, "response": {"id": "r"}}
    assert usage_from_body(body) == Usage(2, 1, 3)
    wrapped = {"usage": None, "response": {"usage": {"prompt_tokens": 5}}}
    assert usage_from_body(wrapped) == Usage(5, 0, 5)
    assert usage_from_body({"response": "done"}) is None


# --- the stream tracker ----------------------------------------------------------------------


def track(*events: SSEEvent) -> StreamSummary:
    tracker = StreamTracker()
    for ev in events:
        tracker.observe(ev)
    return tracker.summary


def named(kind: str, obj: object) -> SSEEvent:
    return SSEEvent(kind, orjson.dumps(obj))


def unnamed(obj: object) -> SSEEvent:
    return SSEEvent(None, orjson.dumps(obj))


CREATED = {"type": "response.created", "response": {"id": "resp_1", "model": "m-2025"}}


def terminal(kind: str, response: dict[str, object] | None = None) -> dict[str, object]:
    return {"type": f"response.{kind}", **({"response": response} if response else {})}


def test_done_ends_the_stream_and_is_not_an_event() -> None:
    tracker = StreamTracker()
    assert tracker.observe(SSEEvent(None, b"[DONE]")) is False
    s = tracker.summary
    assert (s.terminal, s.done, s.events, s.status) == (True, True, 0, None)
    assert track(SSEEvent(None, b"[DONE] ")).done  # a prefix, as the OpenAI SDK reads it


def test_observe_tells_the_first_output_event_only() -> None:
    tracker = StreamTracker()
    assert tracker.observe(named("response.created", CREATED)) is False
    assert tracker.observe(named("response.output_text.delta", {"delta": "a"})) is True
    assert tracker.observe(named("response.output_text.delta", {"delta": "b"})) is False


def test_the_created_event_gives_id_and_model_of_a_stream_that_breaks_off() -> None:
    s = track(named("response.created", CREATED))
    assert (s.response_id, s.response_model, s.terminal, s.status) == (
        "resp_1",
        "m-2025",
        False,
        None,
    )


CALLED = {"status": "completed", "output": [{"type": "function_call"}]}
CUT = {"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
FILTERED = {"status": "incomplete", "incomplete_details": {"reason": "content_filter"}}


@pytest.mark.parametrize(
    ("response", "status", "reasons"),
    [
        ({"status": "completed", "output": [{"type": "message"}]}, "completed", ("stop",)),
        (CALLED, "completed", ("tool_calls",)),
        (CUT, "incomplete", ("length",)),
        (FILTERED, "incomplete", ("content_filter",)),
        ({"status": "failed"}, "failed", ("error",)),
    ],
)  # fmt: skip
def test_finish_reason_and_status_of_a_responses_terminal_event(
    response: dict[str, object], status: str, reasons: tuple[str, ...]
) -> None:
    kind = {"completed": "completed", "incomplete": "incomplete", "failed": "failed"}[status]
    s = track(named(f"response.{kind}", terminal(kind, {"id": "resp_2", "model": "m", **response})))
    assert (s.terminal, s.status, s.finish_reasons) == (True, status, reasons)
    assert (s.response_id, s.response_model) == ("resp_2", "m")


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("completed", "completed"),
        ("incomplete", "incomplete"),
        ("failed", "failed"),
        ("cancelled", "cancelled"),
        ("done", None),  # no status of its own: only a snapshot could tell
    ],
)
def test_a_terminal_event_without_a_snapshot_takes_its_status_from_its_name(
    kind: str, status: str | None
) -> None:
    s = track(named(f"response.{kind}", terminal(kind)))
    assert (s.terminal, s.status, s.usage, s.finish_reasons) == (True, status, None, ("error",))


def test_a_terminal_event_without_an_event_line_is_read_by_its_type() -> None:
    usage = {"input_tokens": 4, "output_tokens": 6, "total_tokens": 10}
    s = track(unnamed(terminal("completed", {"status": "completed", "usage": usage})))
    assert (s.terminal, s.status, s.usage, s.finish_reasons) == (
        True,
        "completed",
        Usage(4, 6, 10),
        ("stop",),
    )


def test_a_failed_snapshot_gives_its_error_code() -> None:
    failed = {"status": "failed", "error": {"code": "server_error", "message": "x"}}
    assert track(named("response.failed", terminal("failed", failed))).error_code == (
        "server_error"
    )
    odd = {"status": "failed", "error": {"code": 500}}
    assert track(named("response.failed", terminal("failed", odd))).error_code is None


def test_terminal_usage_is_kept_when_a_later_snapshot_has_none() -> None:
    usage = {"input_tokens": 1, "output_tokens": 2}
    s = track(
        named("response.completed", terminal("completed", {"status": "completed", "usage": usage})),
        named("response.done", terminal("done", {"status": "completed", "usage": None})),
    )
    assert s.usage == Usage(1, 2, 3)


@pytest.mark.parametrize(
    ("event", "code"),
    [
        (named("error", {"code": "rate_limit", "message": "slow down"}), "rate_limit"),  # no type
        (named("error", {"message": "no code"}), "error"),
        (unnamed({"error": {"code": "quota", "message": "x"}}), "quota"),  # Chat style
        (unnamed({"error": {"message": "x"}}), "error"),
        (unnamed({"error": "boom", "code": "bad_gateway"}), "bad_gateway"),
        (unnamed({"type": "error", "error": {"code": 7}}), "error"),
    ],
)
def test_an_error_event_fails_the_stream(event: SSEEvent, code: str) -> None:
    s = track(event)
    assert (s.terminal, s.status, s.error_code, s.usage) == (True, "failed", code, None)


def chunk(**fields: object) -> dict[str, object]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m-chat", **fields}


def test_a_chat_stream_gives_id_model_reasons_status_and_usage() -> None:
    s = track(
        unnamed(chunk(choices=[{"index": 0, "delta": {"role": "assistant"}}])),
        unnamed(chunk(choices=[{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}])),
        unnamed(chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "length"}])),
        unnamed(chunk(choices=[], usage={"prompt_tokens": 9, "completion_tokens": 4})),
    )
    assert (s.response_id, s.response_model, s.status, s.finish_reasons) == (
        "chatcmpl-1",
        "m-chat",
        "completed",
        ("length",),
    )
    assert (s.usage, s.terminal, s.first_output_seen) == (Usage(9, 4, 13), False, True)


def test_a_chat_stream_cut_before_its_finish_reason_is_not_completed() -> None:
    s = track(
        unnamed(chunk(choices=[{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]))
    )
    assert (s.status, s.finish_reasons, s.error_code) == (None, (), None)


def test_chat_finish_reasons_of_every_choice_in_order() -> None:
    choices = [
        {"index": 0, "finish_reason": "stop"},
        "not a choice",
        {"index": 1, "finish_reason": None},
        {"index": 2, "finish_reason": "tool_calls"},
    ]
    s = track(unnamed(chunk(choices=choices)))
    assert (s.finish_reasons, s.status) == (("stop", "tool_calls"), "completed")


def test_a_chat_chunk_with_an_empty_error_field_is_not_an_error() -> None:
    s = track(unnamed(chunk(choices=[{"index": 0, "finish_reason": "stop"}], error=None)))
    assert (s.terminal, s.status, s.error_code) == (False, "completed", None)


def test_chat_usage_is_read_without_an_object_field_or_with_an_event_name() -> None:
    bare = {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}}
    assert track(unnamed({"id": "c"}), unnamed(bare)).usage == Usage(2, 3, 5)
    labelled = chunk(choices=[], usage={"prompt_tokens": 2, "completion_tokens": 3})
    assert track(named("message", labelled)).usage == Usage(2, 3, 5)


@pytest.mark.parametrize(
    ("event", "output"),
    [
        (named("response.output_text.delta", {}), True),
        (named("response.function_call_arguments.delta", {}), True),
        (named("response.output_item.added", {"item": {"content": "x"}}), False),
        (SSEEvent(None, b'{"type":"response.output_text.delta","delta":"a"}'), True),
        (SSEEvent(None, b'{"type": "response.output_text.delta", "delta": "a"}'), True),
        (SSEEvent(None, b'{"type":"response.content_part.added","part":{"content":"x"}}'), False),
        (SSEEvent(None, b'{"type": "response.output_item.done", "content": "x"}'), False),
        (unnamed(chunk(choices=[{"delta": {"content": "hi"}}])), True),
        (SSEEvent(None, b'{"choices":[{"delta":{"content": "hi"}}]}'), True),
        (unnamed(chunk(choices=[{"delta": {"content": ""}}])), False),
        (unnamed(chunk(choices=[{"delta": {"tool_calls": [{"index": 0}]}}])), True),
        (unnamed(chunk(choices=[{"delta": {"role": "assistant"}}])), False),
    ],
)
def test_which_event_is_the_first_output(event: SSEEvent, output: bool) -> None:
    tracker = StreamTracker()
    tracker.observe(SSEEvent(None, b"{}"))  # not the stream's first event: no special case
    assert tracker.observe(event) is output
    assert tracker.summary.first_output_seen is output


def test_a_stream_without_output_has_no_first_output() -> None:
    s = track(
        named("response.created", CREATED),
        named("response.in_progress", {"type": "response.in_progress"}),
        named("response.completed", terminal("completed", {"status": "completed"})),
    )
    assert s.terminal and not s.first_output_seen


def test_deltas_and_plain_chat_chunks_are_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[bytes] = []
    loads = orjson.loads

    def counting(data: bytes) -> object:
        decoded.append(data)
        return loads(data)

    monkeypatch.setattr("gateway.usage.orjson.loads", counting)
    track(
        unnamed(chunk(choices=[{"delta": {"content": "a"}}])),
        *(unnamed(chunk(choices=[{"delta": {"content": "b"}}])) for _ in range(20)),
        named("response.output_text.delta", {"delta": "c"}),
        unnamed(chunk(choices=[{"delta": {}, "finish_reason": "stop"}])),
    )
    assert len(decoded) == 2  # the first chunk (ids, model) and the one with a finish reason
