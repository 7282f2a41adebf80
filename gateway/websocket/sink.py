"""Where a bridged response goes: each SSE event of the upstream's stream becomes one text
message on the client's WebSocket.

A send has a deadline, as a write to an HTTP client has: a client that takes in nothing for
`idle` seconds is gone, and its response is read on (for its usage) without it. aiohttp waits
for the socket to drain once its write buffer passes its limit, so a client that reads slowly
holds the relay back instead of growing the gateway's memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from aiohttp import WSMsgType, web

from gateway.context import Outcome
from gateway.relay.sink import CLIENT_GONE, SMALL_WRITE
from gateway.sse import SSEDecoder
from gateway.websocket import events

ERROR_BODY_MAX = 64 * 1024  # of an upstream's error answer that is not JSON


def _single_data(block: bytes) -> bytes | None:
    """The value of a whole event's one `data` line when it is its last line, or None when
    the event has another shape (the decoder takes those)."""
    at = block.find(b"data:")
    if at < 0 or (at and block[at - 1] != 0x0A) or b"\n" in block[at:]:
        return None
    value = block[at + 5 :]
    return value[1:] if value[:1] == b" " else value


def _utf8(data: bytes) -> bytes:
    """`data` when it is valid UTF-8 (a text frame must be), else with replacement marks."""
    if data.isascii():
        return data
    try:
        data.decode()
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace").encode()
    return data


class EventCut:
    """An SSE stream, fed in chunks, cut into the data of its events. Events in the usual form
    (whole, LF line ends, one `data` line last) are cut out directly; anything else goes
    through the decoder, which knows every rule of the format."""

    __slots__ = ("decoder",)

    def __init__(self) -> None:
        self.decoder = SSEDecoder()

    def feed(self, chunk: bytes) -> list[bytes]:
        decoder = self.decoder
        if not decoder.between_events() or b"\r" in chunk:
            return [e.data for e in decoder.feed(chunk)]
        blocks = chunk.split(b"\n\n")
        tail = blocks.pop()  # b"" when the chunk ends an event
        found: list[bytes] = []
        for block in blocks:
            data = _single_data(block)
            if data is not None:
                found.append(data)
            elif block:
                found.extend(e.data for e in decoder.feed(block + b"\n\n"))
        if tail:
            found.extend(e.data for e in decoder.feed(tail))
        return found


class WebSocketSink:
    __slots__ = ("cut", "failed", "idle", "lane", "out", "present", "transport", "ws")

    def __init__(
        self,
        ws: web.WebSocketResponse,
        out: Outcome,
        idle: float,
        lane: str | None,
        transport: asyncio.Transport | None = None,
    ) -> None:
        self.ws, self.out, self.idle, self.lane = ws, out, idle, lane
        self.cut = EventCut()
        self.present = not ws.closed
        self.transport = transport
        self.failed: bytearray | None = None  # the body of an upstream error that is no stream

    async def send(self, message: str | bytes) -> None:
        """One text message to the client, within `idle` seconds; a client that fails it is
        gone. Bytes are sent as they are when they are valid UTF-8, else with replacements."""
        if not self.present:
            return
        ws = self.ws
        if ws.closed:
            self._gone()
            return
        data = message.encode() if isinstance(message, str) else _utf8(message)
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() + len(data) <= SMALL_WRITE:
            # far below where aiohttp waits for the socket to drain: this send cannot wait on
            # the client, so it needs no timer
            try:
                await ws.send_frame(data, WSMsgType.TEXT)
            except CLIENT_GONE:
                self._gone()
            return
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.idle):
                await ws.send_frame(data, WSMsgType.TEXT)
        except (TimeoutError, *CLIENT_GONE):
            self._gone()
        finally:
            self.out.upstream_wait += time.perf_counter() - t0

    def _gone(self) -> None:
        self.present = False
        self.out.error = self.out.error or "client_disconnected"

    async def whole(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        """An upstream that answered with one body: its error as an `error` event, or a whole
        response (an upstream that ignored `stream`) as the `response.completed` it stands for."""
        self.out.head(status)
        if status == 200 and body.lstrip()[:1] == b"{":
            await self.send(
                '{"type":"response.completed","response":' + body.decode("utf-8", "replace") + "}"
            )
            return
        await self.send(events.upstream_error_event(status, body, self.lane))

    async def open(self, status: int, headers: Mapping[str, str]) -> None:
        self.out.head(status)
        if status != 200 and "text/event-stream" not in headers.get("content-type", ""):
            self.failed = bytearray()

    async def write(self, chunk: bytes) -> None:
        if self.failed is not None:
            self.failed += chunk[: ERROR_BODY_MAX - len(self.failed)]
            return
        for data in self.cut.feed(chunk):
            message = events.server_message(data, self.lane)
            if message is not None:
                await self.send(message)

    async def close(self) -> None:
        """The response ended; the connection stays open for the next."""
        if self.failed is not None:
            await self.send(
                events.upstream_error_event(self.out.status, bytes(self.failed), self.lane)
            )

    def abort(self) -> None:
        return None  # an incomplete response ended with its error event; the connection stays
