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

from aiohttp import web

from gateway.context import Outcome
from gateway.relay.sink import CLIENT_GONE
from gateway.sse import SSEDecoder
from gateway.websocket import events

ERROR_BODY_MAX = 64 * 1024  # of an upstream's error answer that is not JSON


class WebSocketSink:
    __slots__ = ("decoder", "failed", "idle", "lane", "out", "present", "ws")

    def __init__(
        self, ws: web.WebSocketResponse, out: Outcome, idle: float, lane: str | None
    ) -> None:
        self.ws, self.out, self.idle, self.lane = ws, out, idle, lane
        self.decoder = SSEDecoder()
        self.present = not ws.closed
        self.failed: bytearray | None = None  # the body of an upstream error that is no stream

    async def send(self, message: str) -> None:
        """One message to the client, within `idle` seconds; a client that fails it is gone."""
        if not self.present:
            return
        if self.ws.closed:
            self._gone()
            return
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.idle):
                await self.ws.send_str(message)
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
        self.out.status = status
        if status == 200 and body.lstrip()[:1] == b"{":
            await self.send(
                '{"type":"response.completed","response":' + body.decode("utf-8", "replace") + "}"
            )
            return
        await self.send(events.upstream_error_event(status, body, self.lane))

    async def open(self, status: int, headers: Mapping[str, str]) -> None:
        self.out.status = status
        if status != 200 and "text/event-stream" not in headers.get("content-type", ""):
            self.failed = bytearray()

    async def write(self, chunk: bytes) -> None:
        if self.failed is not None:
            self.failed += chunk[: ERROR_BODY_MAX - len(self.failed)]
            return
        for event in self.decoder.feed(chunk):
            message = events.server_message(event.data, self.lane)
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
