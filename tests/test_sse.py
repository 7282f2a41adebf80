"""The incremental SSE decoder and the stream tracker, including any split of a stream."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import SSEDecoder, SSEEvent
from gateway.usage import StreamTracker, Usage

RECORDED = (
    b": keep-alive\n\n"
    b"event: response.created\n"
    b'data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1",'
    b'"status":"in_progress","model":"m","usage":null}}\n\n'
    b"event: response.output_text.delta\r\n"
    b'data: {"type":"response.output_text.delta","sequence_number":1,"delta":"Hel"}\r\n\r\n'
    b"event: response.output_text.delta\r"
    b'data: {"type":"response.output_text.delta","sequence_number":2,"delta":"lo"}\r\r'
    b"event: response.completed\n"
    b'data: {"type":"response.completed","sequence_number":3,"response":{"id":"resp_1",'
    b'"status":"completed","model":"m","output":[],\n'
    b'data: "usage":{"input_tokens":10,"input_tokens_details":{"cached_tokens":4},'
    b'"output_tokens":7,"output_tokens_details":{"reasoning_tokens":2},"total_tokens":17}}}\n\n'
    b"data: [DONE]\n\n"
)


def decode(chunks: list[bytes]) -> tuple[list[SSEEvent], StreamTracker]:
    dec, tracker, events = SSEDecoder(), StreamTracker(), []
    for c in chunks:
        for ev in dec.feed(c):
            events.append(ev)
            tracker.observe(ev)
    return events, tracker


def test_whole_stream_events_and_usage() -> None:
    events, tracker = decode([RECORDED])
    assert [e.event for e in events] == [
        "response.created",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.completed",
        None,
    ]
    assert events[3].data.count(b"\n") == 1  # two data lines joined with LF
    s = tracker.summary
    assert s.terminal and s.status == "completed" and s.response_id == "resp_1"
    assert s.usage == Usage(10, 7, 17, 4, 2)
    assert s.first_output_seen and s.last_sequence == 3 and s.next_sequence == 4


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=40))
def test_any_split_gives_same_events_and_usage(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [RECORDED[a:b] for a, b in zip([0, *points], [*points, len(RECORDED)], strict=True)]
    expected_events, expected = decode([RECORDED])
    events, tracker = decode(chunks)
    assert events == expected_events
    assert tracker.summary.usage == expected.summary.usage
    assert tracker.summary.terminal


def test_crlf_split_between_cr_and_lf_is_one_line_end() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\r") == []
    assert dec.feed(b"\n\r\n") == [SSEEvent(None, b"a")]


def test_comments_fields_and_unterminated_event() -> None:
    dec = SSEDecoder()
    out = dec.feed(b":c\nid: 7\nretry: 10\nfoo: bar\ndata:x\ndata\n\nevent: only\n\ndata: tail")
    assert out == [SSEEvent(None, b"x\n", "7")]
    assert dec.feed(b"") == []  # the tail never ended with a blank line: never dispatched


def test_error_events_flat_and_nested_are_terminal() -> None:
    flat = b'event: error\ndata: {"type":"error","code":"server_error","message":"x"}\n\n'
    nested = b'data: {"type":"error","error":{"code":"quota","message":"x"}}\n\n'
    for raw, code in ((flat, "server_error"), (nested, "quota")):
        _, tracker = decode([raw])
        assert tracker.summary.terminal and tracker.summary.error_code == code
        assert tracker.summary.usage is None


def test_incomplete_failed_and_done_terminals() -> None:
    for kind, status in (
        ("response.incomplete", "incomplete"),
        ("response.failed", "failed"),
        ("response.done", "completed"),
    ):
        raw = (
            f'event: {kind}\ndata: {{"type":"{kind}","response":{{"status":"{status}",'
            f'"usage":{{"input_tokens":3,"output_tokens":2}}}}}}\n\n'
        ).encode()
        _, tracker = decode([raw])
        assert tracker.summary.terminal and tracker.summary.status == status
        assert tracker.summary.usage == Usage(3, 2, 5)


def test_chat_stream_usage_chunk_and_done() -> None:
    raw = (
        b'data: {"id":"c1","object":"chat.completion.chunk","model":"m","choices":[{"index":0,'
        b'"delta":{"content":"hi"},"finish_reason":null}],"usage":null}\n\n'
        b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},'
        b'"finish_reason":"stop"}],"usage":null}\n\n'
        b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],"usage":'
        b'{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}}\n\n'
        b"data: [DONE]\n\n"
    )
    _, tracker = decode([raw])
    s = tracker.summary
    assert s.terminal and s.usage == Usage(9, 4, 13) and s.finish_reasons == ("stop",)
    assert s.first_output_seen and s.response_model == "m"


def test_first_output_is_the_first_delta() -> None:
    tracker = StreamTracker()
    assert not tracker.observe(SSEEvent("response.created", b"{}"))
    assert tracker.observe(SSEEvent("response.output_text.delta", b'{"delta":"a"}'))
    assert not tracker.observe(SSEEvent("response.output_text.delta", b'{"delta":"b"}'))
