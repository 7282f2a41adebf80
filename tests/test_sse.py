"""The incremental SSE decoder and the stream tracker, including any split of a stream."""

from __future__ import annotations

import itertools

import pytest
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


def feed_all(chunks: list[bytes]) -> tuple[list[SSEEvent], SSEDecoder]:
    dec = SSEDecoder()
    return [ev for c in chunks for ev in dec.feed(c)], dec


def test_lf_that_starts_the_next_chunk_completes_the_crlf() -> None:
    events, _ = feed_all([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"])
    assert events == [SSEEvent(None, b"a\nb")]  # one event: no blank line between a and b


def test_an_empty_chunk_between_cr_and_lf_changes_nothing() -> None:
    events, _ = feed_all([b"data: a\r", b"", b"\ndata: b\n\n"])
    assert events == [SSEEvent(None, b"a\nb")]


def test_only_one_lf_after_a_split_cr_is_dropped() -> None:
    events, _ = feed_all([b"data: a\r", b"\n\ndata: b\n\n"])
    assert events == [SSEEvent(None, b"a"), SSEEvent(None, b"b")]


def test_a_cr_not_at_the_end_of_a_chunk_leaves_the_next_lf_alone() -> None:
    events, _ = feed_all([b"data: a\r\r", b"x", b"\ndata: b\n\n"])
    assert events == [SSEEvent(None, b"a"), SSEEvent(None, b"b")]  # `x` is an unknown field


def test_a_bare_colon_is_a_comment_and_unknown_fields_are_ignored() -> None:
    events, _ = feed_all([b":\n;data: x\ndata:y\n:data: z\n\n"])
    assert events == [SSEEvent(None, b"y")]


def test_event_name_and_id_that_are_not_utf8_are_replaced_not_fatal() -> None:
    events, _ = feed_all([b"event: \xffx\nid: 7\xfe\ndata: d\n\n"])
    assert events == [SSEEvent("\ufffdx", b"d", "7\ufffd")]


def test_an_id_with_nul_is_ignored_and_the_last_id_persists() -> None:
    events, _ = feed_all([b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n"])
    assert events == [SSEEvent(None, b"a", "1"), SSEEvent(None, b"b", "1")]


@pytest.mark.parametrize(
    ("fed", "terminator", "between"),
    [
        (b"", b"", True),
        (b"data: a\n\n", b"", True),
        (b"data: a", b"\n\n", False),  # a partial line, then the event it belongs to
        (b"data: a\n", b"\n", False),  # a field: the event needs its blank line
        (b"event: x\n", b"\n", False),  # an event name alone is an unfinished event too
        (b"id: 1\n", b"", True),  # an id alone starts no event
        (b"id: 1\n: pi", b"\n\n", False),  # any partial line may be a field: both end
        (b"data: a\r", b"\n\n", False),  # a CR: an LF first, which a reader drops as its half
        (b"data: a\n\r", b"\n", False),  # the event is ended; only the CR's LF is due
        (b"data: a\r\n\r\n", b"", True),
    ],
)
def test_terminator_ends_exactly_what_is_unfinished(
    fed: bytes, terminator: bytes, between: bool
) -> None:
    dec = SSEDecoder()
    dec.feed(fed)
    assert (dec.terminator(), dec.between_events()) == (terminator, between)


LINE_ENDS = st.sampled_from([b"\n", b"\r", b"\r\n"])
FIELDS = st.sampled_from(
    [b"data: x", b"data:y", b"data", b"event: e", b"id: 9", b": ping", b":", b"retry: 5", b""]
)


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.tuples(FIELDS, LINE_ENDS), max_size=20))
    tail = draw(st.sampled_from([b"", b"data: part", b"da"]))
    return b"".join(field + end for field, end in lines) + tail


@settings(max_examples=150, deadline=None)
@given(sse_streams(), st.lists(st.integers(0, 400), max_size=10))
def test_any_chunking_gives_the_same_events_and_state(raw: bytes, cuts: list[int]) -> None:
    """Cut anywhere, empty chunks included: CR, LF and CRLF split across chunks all read the
    same as the whole stream."""
    bounds = sorted(c % (len(raw) + 1) for c in [0, len(raw), *cuts])
    chunks = [raw[a:b] for a, b in itertools.pairwise(bounds)]
    whole_events, whole = feed_all([raw])
    events, dec = feed_all(chunks)
    assert events == whole_events
    assert (dec.terminator(), dec.between_events()) == (whole.terminator(), whole.between_events())


@settings(max_examples=150, deadline=None)
@given(sse_streams())
def test_own_event_after_the_terminator_arrives_whole(raw: bytes) -> None:
    """What a reader of the bytes gets when the gateway appends an event of its own."""
    dec = SSEDecoder()
    dec.feed(raw)
    ending = dec.terminator()
    dec.feed(ending)
    assert dec.between_events()
    events, _ = feed_all([raw + ending + b"event: own\ndata: {}\n\n"])
    assert (events[-1].event, events[-1].data) == ("own", b"{}")
