"""Log lines reach stdout whole and in order, flushed once per event-loop iteration."""

from __future__ import annotations

import asyncio
import io

from gateway.telemetry.logging import LineSink, whole_lines


class CountingStream(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_outside_a_loop_every_line_is_flushed_at_once() -> None:
    stream = CountingStream()
    sink = LineSink(stream)
    sink.write(b"a\n")
    sink.flush()
    assert stream.flushes == 1 and stream.getvalue() == b"a\n"


async def test_lines_of_one_iteration_share_one_flush() -> None:
    stream = CountingStream()
    sink = LineSink(stream)
    for i in range(5):
        sink.write(b"line %d\n" % i)
        sink.flush()
    assert stream.flushes == 0  # not yet: later in this iteration of the loop
    await asyncio.sleep(0)
    assert stream.flushes == 1
    sink.write(b"later\n")
    sink.flush()
    await asyncio.sleep(0)
    assert stream.flushes == 2
    assert stream.getvalue().splitlines() == [*(b"line %d" % i for i in range(5)), b"later"]


class RecordingRaw(io.RawIOBase):
    """A raw stream that records each write the buffer above it makes."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes.append(bytes(data))
        return len(data)


def test_shared_stdout_gets_whole_lines_of_at_most_pipe_buf_bytes() -> None:
    """What lets several processes share one stdout pipe without cutting into each other's
    lines: every write is whole lines and no longer than the kernel writes in one piece."""
    import select

    raw = RecordingRaw()
    out = whole_lines(raw)
    lines = [(b"x" * (50 + 37 * i % 900)) + b"\n" for i in range(200)]
    sink = LineSink(out)
    for i, line in enumerate(lines):
        sink.write(line)
        if i % 17 == 0:
            sink.flush()
    sink.flush()
    assert b"".join(raw.writes) == b"".join(lines)
    assert len(raw.writes) > 1
    assert all(len(w) <= select.PIPE_BUF and w.endswith(b"\n") for w in raw.writes)
