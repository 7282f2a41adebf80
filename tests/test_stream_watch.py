"""StreamWatch skims the deltas of a stream; what it reports must be exactly what decoding
every event reports, however the bytes are cut into chunks."""

from __future__ import annotations

import itertools

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import SSEDecoder, SSEEvent
from gateway.stream_watch import StreamWatch
from gateway.usage import StreamSummary, StreamTracker


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
        if draw(st.integers(0, 9)) == 0:
            out.append(b": ping\n\n")
    end = draw(st.sampled_from(["completed", "incomplete", "failed", "error", "done", "cut"]))
    if end != "cut":
        out.append(_terminal(end, len(texts) + 1))
    raw = b"".join(out)
    if draw(st.booleans()):  # the stream breaks off somewhere
        raw = raw[: draw(st.integers(0, len(raw)))]
    if draw(st.integers(0, 4)) == 0:
        raw = raw.replace(b"\n", b"\r\n")
    return raw


def _cuts(raw: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(raw), *(p % (len(raw) + 1) for p in points)})
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def _decoded(chunks: list[bytes]) -> tuple[StreamSummary, int | None, bytes]:
    decoder, tracker, first = SSEDecoder(), StreamTracker(), None
    for i, chunk in enumerate(chunks):
        for event in decoder.feed(chunk):
            if tracker.observe(event) and first is None:
                first = i
    return tracker.summary, first, decoder.terminator()


@settings(max_examples=300, deadline=None)
@given(streams(), st.lists(st.integers(0, 10_000), max_size=12))
def test_skimming_reports_what_decoding_every_event_does(raw: bytes, points: list[int]) -> None:
    chunks = _cuts(raw, points)
    watch, first = StreamWatch(), None
    for i, chunk in enumerate(chunks):
        if watch.feed(chunk) and first is None:
            first = i
    assert (watch.summary, first, watch.terminator()) == _decoded(chunks)


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
