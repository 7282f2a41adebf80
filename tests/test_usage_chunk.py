"""The usage-chunk filter on its own: any chunking, any line ends, only the usage chunk out."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.usage_chunk import HELD_MAX, UsageChunkFilter, is_usage_chunk

HEAD = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}'
FINISH = b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}'
DONE = b"data: [DONE]"


def stream_of(events: list[bytes], end: bytes) -> bytes:
    return b"".join(e + end + end for e in events)


def run(filt: UsageChunkFilter, chunks: list[bytes]) -> bytes:
    return b"".join([filt.feed(c) for c in chunks]) + filt.flush()


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({p % (len(data) + 1) for p in points})
    return [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)]


@settings(max_examples=200, deadline=None)
@given(
    points=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    end=st.sampled_from([b"\n", b"\r\n", b"\r"]),
)
def test_any_chunking_takes_out_exactly_the_usage_chunk(points: list[int], end: bytes) -> None:
    data = stream_of([HEAD, HEAD, FINISH, USAGE, DONE], end)
    filt = UsageChunkFilter()
    got = run(filt, cut(data, points))
    want = stream_of([HEAD, HEAD, FINISH, DONE], end)
    # a CR that ends a chunk may leave its event's LF to the next: an empty line a reader skips
    assert got.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n\n\n", b"\n\n") == (
        want.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    )
    assert [b.strip() for b in filt.withheld] == [USAGE]


def test_events_pass_through_byte_for_byte_and_at_once() -> None:
    filt = UsageChunkFilter()
    first = HEAD + b"\n\n"
    assert filt.feed(first) == first  # nothing waits but an unfinished event
    assert filt.feed(b"data: {") == b""
    assert filt.feed(b'"choices":[{}]}\n\n') == b'data: {"choices":[{}]}\n\n'


def test_a_chunk_without_choices_and_usage_goes_through() -> None:
    """Azure's first chunk (prompt filter results) has no choices and no usage: it is the
    provider's, not the gateway's, and the client gets it."""
    azure = b'data: {"choices":[],"prompt_filter_results":[]}\n\n'
    filt = UsageChunkFilter()
    assert run(filt, [azure, USAGE + b"\n\n", DONE + b"\n\n"]) == azure + DONE + b"\n\n"
    assert not is_usage_chunk(azure) and is_usage_chunk(USAGE)
    assert is_usage_chunk(b'data:{"choices": [ ],\ndata: "usage": {}}\n\n')
    assert not is_usage_chunk(b'data: {"choices":[],"usage":null}\n\n')
    assert not is_usage_chunk(b"data: [not json\n\n")


def test_an_unfinished_event_at_the_end_goes_on_as_it_came() -> None:
    filt = UsageChunkFilter()
    assert run(filt, [HEAD + b"\n\n", FINISH]) == HEAD + b"\n\n" + FINISH
    assert filt.withheld == []


def test_a_long_unfinished_event_is_not_held() -> None:
    """Only an event that could be the usage chunk (a few hundred bytes) waits for its end."""
    filt = UsageChunkFilter()
    big = b'data: {"choices":[{"delta":{"content":"' + b"x" * HELD_MAX
    assert filt.feed(big[:1000]) == b""
    assert filt.feed(big[1000:]) == big  # over the bound: everything held goes on
    assert filt.feed(b'"}}]}\n\n') == b'"}}]}\n\n'
    assert run(filt, [USAGE + b"\n\n", DONE + b"\n\n"]) == DONE + b"\n\n"


def test_a_usage_chunk_the_stream_left_unfinished_is_withheld_too() -> None:
    """Cut before its blank line, the gateway's error event would end it for the reader."""
    filt = UsageChunkFilter()
    assert run(filt, [HEAD + b"\n\n", USAGE + b"\n"]) == HEAD + b"\n\n"
    assert filt.withheld == [USAGE + b"\n\n\n"]


def test_a_usage_chunk_split_over_data_lines_is_withheld() -> None:
    split = b'data: {"id":"c","choices":\ndata: [],"usage":{"prompt_tokens":3}}\n\n'
    filt = UsageChunkFilter()
    assert run(filt, [HEAD + b"\n\n", split, DONE + b"\n\n"]) == HEAD + b"\n\n" + DONE + b"\n\n"
    assert filt.withheld == [split]


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


@settings(max_examples=200, deadline=None)
@given(
    points=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    end=st.sampled_from([b"\n", b"\r\n", b"\r"]),
)
def test_line_ends_and_chunking_change_neither_the_kept_events_nor_the_withheld_chunk(
    points: list[int], end: bytes
) -> None:
    """Split over data lines, with whichever line end: the same events kept, the same one out."""
    usage = b'data: {"id":"c","choices":[],' + end + b'data: "usage":{"prompt_tokens":3}}'
    events = [HEAD, usage, DONE]
    data = stream_of(events, end)
    filt = UsageChunkFilter()
    got = run(filt, cut(data, points))
    assert lf(got).replace(b"\n\n\n", b"\n\n") == lf(stream_of([HEAD, DONE], end))
    assert [lf(b).strip(b"\n") for b in filt.withheld] == [lf(usage)]


def test_a_blank_line_first_goes_on_at_once() -> None:
    filt = UsageChunkFilter()
    assert filt.feed(b"\n\n") == b"\n\n"
    assert filt.feed(b"data: x\r") == b""  # a CR, and no event ended yet: all of it waits
    assert filt.feed(b"\r") == b"data: x\r\r"


def test_nothing_fed_flushes_nothing_and_a_flush_empties_the_filter() -> None:
    filt = UsageChunkFilter()
    assert filt.flush() == b""
    assert filt.feed(b"data: x") == b""
    assert filt.flush() == b"data: x"
    assert filt.flush() == b""
    assert filt.feed(b"data: y\n\n") == b"data: y\n\n"


def test_an_unfinished_event_of_exactly_held_max_bytes_still_waits() -> None:
    filt = UsageChunkFilter()
    assert filt.feed(b"x" * HELD_MAX) == b""
    assert filt.feed(b"x") == b"x" * (HELD_MAX + 1)


def test_a_usage_chunk_before_a_long_unfinished_event_is_still_withheld() -> None:
    filt = UsageChunkFilter()
    big = b'data: {"choices":[{"delta":{"content":"' + b"x" * HELD_MAX
    assert filt.feed(HEAD + b"\n\n" + USAGE + b"\n\n" + big) == HEAD + b"\n\n" + big
    assert filt.withheld == [USAGE + b"\n\n"]


def test_only_data_lines_make_the_data() -> None:
    assert is_usage_chunk(b'data: {"choices":[],\nabcd: x\ndata: "usage":{}}\n\n')
    assert is_usage_chunk(b'data: {"choices":[],\ndata-x: 1\ndata: "usage":{}}\n\n')
    assert is_usage_chunk(b'data: {"choices":[],\r"x"\rdata: "usage":{}}\r\r')
    assert is_usage_chunk(b'data: {"choices":[],\ndata\ndata: "usage":{}}\n\n')
    assert not is_usage_chunk(b"data\n\n")
    assert not is_usage_chunk(b'event: {"choices":[],"usage":{}}\n\n')


def test_a_chunk_whose_keys_do_not_show_in_its_bytes_is_decided_alike_in_feed_and_flush() -> None:
    """Both keys cut by a line end: the quick look misses it, in `feed` and `flush` alike."""
    hidden = b'data: {"choices":\ndata: [],"usage":\ndata: {}}'
    assert is_usage_chunk(hidden)
    filt = UsageChunkFilter()
    assert filt.feed(hidden + b"\n\n") == hidden + b"\n\n"
    assert run(filt, [hidden]) == hidden
    assert filt.withheld == []
