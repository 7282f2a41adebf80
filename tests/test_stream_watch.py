"""StreamWatch skims the deltas of a stream; what it reports must be exactly what decoding
every event reports, however the bytes are cut into chunks."""

from __future__ import annotations

import itertools

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import SSEDecoder, SSEEvent
from gateway.stream_watch import (
    _DONE,
    _NOTABLE,
    _NOTABLE_NAME,
    StreamWatch,
    _events,
    _first_notable,
)
from gateway.usage import StreamSummary, StreamTracker, Usage


def _event(name: str | None, obj: object) -> bytes:
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


def _delta(seq: int, text: str) -> bytes:
    return _event(
        "response.output_text.delta",
        {"type": "response.output_text.delta", "sequence_number": seq, "delta": text},
    )


def _terminal(kind: str, seq: int) -> bytes:
    if kind == "done":
        return b"data: [DONE]\n\n"
    if kind == "error":
        return _event("error", {"type": "error", "code": "boom", "sequence_number": seq})
    status = {"completed": "completed", "incomplete": "incomplete", "failed": "failed"}[kind]
    return _event(
        f"response.{kind}",
        {
            "type": f"response.{kind}",
            "sequence_number": seq,
            "response": {
                "id": "resp_1",
                "model": "m",
                "status": status,
                "usage": {"input_tokens": 3, "output_tokens": seq, "total_tokens": 3 + seq},
            },
        },
    )


def _odd_block(draw: st.DrawFn, seq: int) -> bytes:
    """Blocks that are not one data line: what the skimming's fast count must not miscount."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return b": ping\n\n"
    if kind == 1:
        return b"event: noop\n\n" if draw(st.booleans()) else b"id: 7\nretry: 10\n\n"
    if kind == 2:  # a comment line inside an event
        return b": note\n" + _delta(seq, "x")
    if kind == 3:  # JSON split over two data lines, joined with LF
        return (
            b"event: response.output_text.delta\n"
            + f'data: {{"type":"response.output_text.delta",\ndata: "sequence_number":{seq},'
            f'"delta":"y"}}\n\n'.encode()
        )
    if kind == 4:  # the bytes a terminal event holds, as text
        return _delta(seq, draw(st.sampled_from(["[DONE]", "response.completed", '"usage":{'])))
    return b"\n\n"  # blank lines between events


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    out = [
        _event(
            "response.created",
            {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_1"}},
        )
    ]
    texts = draw(st.lists(st.text(max_size=12), max_size=30))
    for i, text in enumerate(texts, start=1):
        out.append(_delta(i, text))
        if draw(st.integers(0, 4)) == 0:
            out.append(_odd_block(draw, i))
    end = draw(st.sampled_from(["completed", "incomplete", "failed", "error", "done", "cut"]))
    if end != "cut":
        out.append(_terminal(end, len(texts) + 1))
    raw = b"".join(out)
    if draw(st.booleans()):  # the stream breaks off somewhere
        raw = raw[: draw(st.integers(0, len(raw)))]
    if draw(st.integers(0, 3)) == 0:  # CR or CRLF line ends from some point on
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + raw[at:].replace(b"\n", draw(st.sampled_from([b"\r\n", b"\r"])))
    return raw


class Recording(StreamTracker):
    """A tracker that keeps every event it is fed, with the number of events before it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, SSEEvent]] = []

    def observe(self, ev: SSEEvent) -> bool:
        self.seen.append((self.summary.events, ev))
        return super().observe(ev)


def _cuts(raw: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(raw), *(p % (len(raw) + 1) for p in points)})
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def _decoded(chunks: list[bytes]) -> tuple[StreamSummary, list[int], bytes, Recording]:
    decoder, tracker, firsts = SSEDecoder(), Recording(), []
    for i, chunk in enumerate(chunks):
        if any([tracker.observe(event) for event in decoder.feed(chunk)]):
            firsts.append(i)
    return tracker.summary, firsts, decoder.terminator(), tracker


def _watched(chunks: list[bytes]) -> tuple[StreamSummary, list[int], bytes, Recording]:
    watch = StreamWatch()
    watch.tracker = tracker = Recording()
    firsts = [i for i, chunk in enumerate(chunks) if watch.feed(chunk)]
    return watch.summary, firsts, watch.terminator(), tracker


@settings(max_examples=300, deadline=None)
@given(streams(), st.lists(st.integers(0, 10_000), max_size=12))
def test_skimming_reports_what_decoding_every_event_does(raw: bytes, points: list[int]) -> None:
    chunks = _cuts(raw, points)
    summary, firsts, terminator, watched = _watched(chunks)
    expected, expected_firsts, expected_terminator, decoded = _decoded(chunks)
    assert (summary, firsts, terminator) == (expected, expected_firsts, expected_terminator)
    # what it did decode are the stream's own events, each in its place (ids aside: a skipped
    # `id:` line is not seen, and the tracker reads no id)
    assert {(i, e.event, e.data) for i, e in watched.seen} <= {
        (i, e.event, e.data) for i, e in decoded.seen
    }


@pytest.mark.parametrize("size", [100, 10**6], ids=["small chunks", "one chunk"])
def test_deltas_are_skimmed_not_decoded(size: int) -> None:
    raw = _event(
        "response.created",
        {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_1"}},
    ) + b"".join(_delta(i, "word ") for i in range(1, 50))
    decoded: list[SSEEvent] = []

    class Counting(StreamTracker):
        __slots__ = ()

        def observe(self, ev: SSEEvent) -> bool:
            decoded.append(ev)
            return super().observe(ev)

    watch = StreamWatch()
    watch.tracker = Counting()
    for i in range(0, len(raw), size):
        watch.feed(raw[i : i + size])
    watch.feed(_terminal("completed", 50))
    assert watch.summary.terminal and watch.summary.usage is not None
    assert watch.summary.events == 51
    assert len(decoded) < 10  # the created event, the first delta or two, the terminal one


# --- examples: what is decoded, what is only counted ------------------------------------------

CREATED = _event(
    "response.created",
    {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_1"}},
)


def _watch(*chunks: bytes) -> tuple[StreamWatch, Recording, list[bool]]:
    watch = StreamWatch()
    watch.tracker = tracker = Recording()
    return watch, tracker, [watch.feed(c) for c in chunks]


def _names(tracker: Recording) -> list[str | None]:
    return [e.event for _, e in tracker.seen]


@pytest.mark.parametrize(
    ("block", "events"),
    [
        (b"", 0),
        (b"data: a\n\n", 1),
        (b"data: a\n\ndata: b\n\n", 2),
        (b"event: x\ndata: a\n\n", 1),
        (b"data: a\ndata: b\n\n", 1),  # one event of two data lines
        (b": ping\n\n", 0),
        (b": ping\ndata: a\n\n", 1),
        (b"id: 1\n\n", 0),
        (b"event: x\n\nevent: y\ndata: a\ndata: b\n\n", 1),  # one block without data
        (b"data: a\ndata: b\n\n\n\n", 1),  # an empty block after it
        (b"data: a\n\nid: 1\n\n", 1),
        (b'data: {"text":"big data"}\n\n', 1),  # a word `data` in the payload is no field
        # one block without its blank line, as a chunk of one event reaches it
        (b"data: a", 1),
        (b"event: x\ndata: a", 1),
        (b": ping", 0),
        (b"id: 1", 0),
        (b'event: x\ndata: {"text":"big data"}', 1),
    ],
)
def test_events_counts_the_blocks_that_have_data(block: bytes, events: int) -> None:
    assert _events(block) == events


@pytest.mark.parametrize(
    ("data", "at"),
    [
        (_delta(1, "a") + _delta(2, "b"), None),
        (b'data: {"usage":{"input_tokens":1}}\n\n', 7),
        (b'data: {"usage" : {"input_tokens":1}}\n\n', 7),
        (b'data: {"usage":null}\n\n', None),  # no usage to read
        (b'data: {"error":{"code":"x"}}\n\n', 7),
        (b'data: {"choices":[{"finish_reason":"stop"}]}\n\n', 19),
        (b'data: {"choices":[{"finish_reason":null}]}\n\n', None),
        (b'data: {"type":"response.failed"}\n\n', 14),
        (b"event: error\ndata: {}\n\n", 0),
        (b"event:response.done\ndata: {}\n\n", 0),
        (b"data: x\n\ndata: [DONE]\n\n", 15),
        (b'data: {"delta":"x"}\n\ndata: {"error":1}\n\ndata: [DONE]\n\n', 28),  # the first
    ],
)
def test_first_notable_finds_what_can_change_the_summary(data: bytes, at: int | None) -> None:
    assert _first_notable(data) == at


_PIECES = (
    b"usage",
    b'"usage":{',
    b'"usage" : {',
    b'"error"',
    b'"finish_reason":"',
    b'"response.completed"',
    b'"response.done"',
    b"response.failed",
    b"event: error",
    b"event:response.cancelled",
    b"[DONE]",
    b"[DONE",
    b'"',
    b"data: ",
    b"\n\n",
    b"completed",
    b"x",
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=12))
def test_first_notable_is_what_the_three_searches_find(parts: list[bytes]) -> None:
    """The quick test of words in front of the searches never hides a match of theirs."""
    data = b"".join(parts)
    found = [m.start() for m in (r.search(data) for r in (_NOTABLE, _NOTABLE_NAME, _DONE)) if m]
    assert _first_notable(data) == min(found, default=None)


def test_after_the_first_output_only_the_terminal_event_is_decoded() -> None:
    stream = CREATED + b"".join(_delta(i, "w") for i in range(1, 41)) + _terminal("completed", 41)
    for chunks in (
        [stream + b"data: [DONE]\n\n"],
        [stream[:700], stream[700:], b"data: [DONE]\n\n"],
    ):
        watch, tracker, firsts = _watch(*chunks)
        assert _names(tracker) == [
            "response.created",
            "response.output_text.delta",
            "response.completed",
            None,
        ]
        assert firsts == [True] + [False] * (len(chunks) - 1)
        s = watch.summary
        assert (s.events, s.terminal, s.done, s.status, s.next_sequence) == (
            42,
            True,
            True,
            "completed",
            42,
        )


def test_leading_blank_lines_change_nothing() -> None:
    body = CREATED + b"".join(_delta(i, "w") for i in range(1, 6)) + _terminal("completed", 6)
    _, tracker, _ = _watch(b"\n\n" + body)
    assert _names(tracker) == [
        "response.created",
        "response.output_text.delta",
        "response.completed",
    ]


def test_the_event_under_way_is_finished_line_by_line_then_skimmed() -> None:
    one, two = _delta(1, "a"), _delta(2, "b")
    # the first output is dispatched by the blank line that starts the second chunk, which
    # ends one byte short of the next event's end: that byte, a line feed, starts the third
    watch, tracker, firsts = _watch(
        CREATED + one[:-1],
        b"\n" + two[:-1],
        b"\n" + _delta(3, "c") + _delta(4, "d") + _terminal("completed", 5),
    )
    assert _names(tracker) == [
        "response.created",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.completed",
    ]
    assert firsts == [False, True, False]
    assert watch.summary.events == 6


@pytest.mark.parametrize(
    "odd",
    [
        b": ping\n\nevent: noop\n\nid: 7\n\n\n\n" + b"data: {}\ndata: {}\n\n",
        # no comment: two blocks without data and an event of three data lines, which add up
        # to one data line a block (counting lines alone took them for three events)
        b"event: noop\n\nid: 7\n\n" + b"data: {}\ndata: {}\ndata: {}\n\n",
    ],
)
def test_blocks_without_data_are_not_counted_while_skimming(odd: bytes) -> None:
    watch, _, _ = _watch(CREATED + _delta(1, "a"), odd + _delta(2, "b"))
    assert watch.summary.events == 4  # created, two deltas, one event of several data lines
    assert watch.summary.next_sequence == 4


def test_a_switch_to_cr_line_ends_while_skimming_is_decoded() -> None:
    crlf = (_delta(2, "b") + _terminal("completed", 3)).replace(b"\n", b"\r\n")
    cut = len(crlf) - 30  # inside the terminal event, on a CR line end
    watch, _, _ = _watch(CREATED + _delta(1, "a"), crlf[:cut], crlf[cut:] + b"data: [DONE]\n\n")
    s = watch.summary
    assert (s.events, s.terminal, s.done, s.status) == (4, True, True, "completed")
    assert s.usage is not None and s.usage.output_tokens == 3


def test_lf_after_cr_line_ends_goes_back_to_skimming() -> None:
    # the CR chunk stops inside its event (the CR of its blank line is the half of a CRLF
    # that the next chunk completes): that event is finished by decoding, then skimming goes on
    cr = _delta(2, "b").replace(b"\n", b"\r")
    watch, tracker, _ = _watch(
        CREATED + _delta(1, "a"),
        cr[:-1],
        b"\n\n" + _delta(3, "c") + _delta(4, "d") + _terminal("completed", 5),
    )
    s = watch.summary
    assert (s.events, s.terminal, s.status) == (6, True, "completed")
    assert _names(tracker) == [
        "response.created",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.completed",
    ]


def test_a_watch_reads_into_its_own_tracker() -> None:
    watch = StreamWatch()
    assert watch.summary == StreamSummary()
    stream = CREATED + _delta(1, "a") + _delta(2, "b") + _terminal("completed", 3)
    assert watch.feed(stream) is True
    assert watch.summary is watch.tracker.summary
    assert (watch.summary.events, watch.summary.terminal) == (4, True)


@pytest.mark.parametrize(
    ("tail", "ending"),
    [
        (b"", b""),
        (b"data: {", b"\n\n"),  # a partial line
        (b"event: x\ndata: {}\n", b"\n"),  # a whole line: only the event's blank line is due
    ],
)
def test_terminator_while_skimming_ends_the_partial_event(tail: bytes, ending: bytes) -> None:
    watch, _, _ = _watch(CREATED + _delta(1, "a"), _delta(2, "b") + tail)
    assert watch.terminator() == ending
    assert watch.terminator() == ending  # asked again: the same, the rest is not fed twice


def test_an_event_aside_is_observed_without_touching_what_the_client_got() -> None:
    chat = (
        b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"delta":{"content":"hi"}}]}'
    )
    watch = StreamWatch()
    watch.feed(chat + b"\n\ndata: {")  # the client got part of an event
    usage = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    watch.aside(usage)
    assert watch.summary.usage == Usage(3, 2, 5)
    assert watch.summary.events == 2
    assert watch.terminator() == b"\n\n"  # the client's partial event is still under way
