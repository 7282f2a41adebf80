"""structlog set-up: one JSON line per request on stdout (or console rendering for humans)."""

from __future__ import annotations

import asyncio
import io
import logging
import select
import sys
from collections.abc import Mapping
from typing import Any, BinaryIO, cast

import orjson
import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class LineSink:
    """Where JSON log lines go: each is written to the stream's buffer at once, and the buffer
    is flushed once per event-loop iteration rather than once per line (a write call per
    request is a measurable share of a request's cost). Outside a running loop every line is
    flushed at once. The buffer never holds more than one loop iteration's lines, or what
    fits in it."""

    __slots__ = ("__weakref__", "_pending", "_stream")  # structlog keeps a lock per file, weakly

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._pending = False

    def write(self, data: bytes) -> int:
        return self._stream.write(data)

    def flush(self) -> None:
        if self._pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._stream.flush()
            return
        self._pending = True
        loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._pending = False
        self._stream.flush()


def whole_lines(raw: io.RawIOBase) -> BinaryIO:
    """A buffered writer over `raw` whose writes are at most PIPE_BUF bytes of whole lines
    (for lines shorter than that). The kernel writes that much to a pipe in one piece, so
    processes that share one stdout pipe (`--workers` processes, under a container runtime)
    never cut into each other's lines."""
    return cast(BinaryIO, io.BufferedWriter(raw, buffer_size=select.PIPE_BUF))


class _Fields:
    """A processor that adds the same fields to every line, under what the line sets."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, object]) -> None:
        self._fields = fields

    def __call__(self, logger: object, method: str, event: dict[str, Any]) -> dict[str, Any]:
        for key, value in self._fields.items():
            event.setdefault(key, value)
        return event


def configure_logging(
    level: str = "info",
    fmt: str = "json",
    fields: Mapping[str, object] | None = None,
    shared_stdout: bool = False,
) -> None:
    """Configure structlog process-wide (called once by the CLI, not on import). `fields`
    go into every line (a `--workers` process's `worker` and `pid`); `shared_stdout` says
    other processes write to the same stdout (see `whole_lines`)."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        *([_Fields(dict(fields))] if fields else []),
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        structlog.processors.format_exc_info,
    ]
    if fmt == "json":
        out: BinaryIO = sys.stdout.buffer
        if shared_stdout:
            out = whole_lines(io.FileIO(sys.stdout.fileno(), "w", closefd=False))
        lines = cast(BinaryIO, LineSink(out))
        structlog.configure(
            processors=[*shared, structlog.processors.JSONRenderer(serializer=orjson.dumps)],
            wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
            logger_factory=structlog.BytesLoggerFactory(lines),
            cache_logger_on_first_use=True,
        )
    else:
        structlog.configure(
            processors=[*shared, structlog.dev.ConsoleRenderer()],
            wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
            logger_factory=structlog.PrintLoggerFactory(sys.stdout),
            cache_logger_on_first_use=True,
        )
    logging.basicConfig(
        level=LEVELS[level],
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
