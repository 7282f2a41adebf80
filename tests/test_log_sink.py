"""Log lines reach stdout whole and in order, flushed once per event-loop iteration."""

from __future__ import annotations

import asyncio
import io

from gateway.telemetry.logging import LineSink


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
