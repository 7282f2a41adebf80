"""Where an answer goes: the client's socket, or a flight that clients follow.

`ClientSink` is the one place that prepares, writes and ends a client's answer: a write has
a deadline (a client that takes in nothing for `idle` seconds is gone), a client that left
is noted once and never written to again, and an incomplete body closes the connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Protocol

import aiohttp
from aiohttp import web

from gateway.cache.flight import FlightLike
from gateway.context import Outcome
from gateway.owners import OwnerStore

# a client that went away: aiohttp raises ConnectionResetError, its ClientConnectionResetError
# subclass, or a bare ConnectionError("Connection lost") when a blocked write is cut off
CLIENT_GONE = (ConnectionError, aiohttp.ClientConnectionResetError)
WHOLE_WRITE_IDLE = 30.0  # seconds a client may take to start taking in a whole answer
WHOLE_WRITE_PIECE = 256 * 1024  # a whole body larger than this is written in pieces
SMALL_WRITE = 32 * 1024  # well under aiohttp's 64 KiB write-buffer limit, headers included


class Sink(Protocol):
    @property
    def present(self) -> bool:
        """Someone still takes the answer in."""
        ...

    async def whole(self, status: int, headers: Mapping[str, str], body: bytes) -> None: ...

    async def open(self, status: int, headers: Mapping[str, str]) -> None: ...

    async def write(self, chunk: bytes) -> None: ...

    async def close(self) -> None: ...

    def abort(self) -> None:
        """The body is incomplete: whoever reads it must not take it as whole."""
        ...


async def send_whole(request: web.Request, resp: web.Response) -> web.StreamResponse:
    """Write a whole response now, so the request's end is known when it is finished."""
    await deliver(request, resp, WHOLE_WRITE_IDLE)
    return resp


async def deliver(request: web.Request, resp: web.Response, within: float) -> bool:
    """Write a whole response; whether the client got it. A client that does not take it in
    within `within` seconds, plus a second per 64 KiB of body, is cut off: one that never
    reads must not hold the request (and a drain) forever."""
    body = resp.body
    size = len(body) if isinstance(body, bytes | bytearray) else 0
    try:
        if size <= SMALL_WRITE:
            # below aiohttp's write-buffer limit the writer never waits on the client: no timer
            await resp.prepare(request)
            await resp.write_eof()
            return True
        async with asyncio.timeout(within + size / 65536):
            await resp.prepare(request)
            await resp.write_eof()
    except CLIENT_GONE:
        return False
    except TimeoutError:
        if request.transport is not None:
            request.transport.close()
        return False
    return True


class ClientSink:
    __slots__ = ("idle", "out", "present", "request", "resp")

    def __init__(self, request: web.Request, out: Outcome, idle: float) -> None:
        self.request, self.out, self.idle = request, out, idle
        self.resp: web.StreamResponse | None = None
        self.present = True

    def _gone(self) -> None:
        self.present = False
        self.out.error = self.out.error or "client_disconnected"

    async def whole(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.out.head(status)
        if len(body) <= WHOLE_WRITE_PIECE:
            whole = web.Response(status=status, body=body, headers=headers)
            self.resp = self.out.response = whole  # once written, no other answer is possible
            if not await deliver(self.request, whole, self.idle):
                self._gone()
            return
        # a large body goes in pieces, each within `idle`: a client that stops reading is cut
        # off however long the whole transfer may take at its pace
        resp = self.resp = self.out.response = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(body)
        try:
            async with asyncio.timeout(self.idle):
                await resp.prepare(self.request)
            for i in range(0, len(body), WHOLE_WRITE_PIECE):
                await self.write(body[i : i + WHOLE_WRITE_PIECE])
                if not self.present:
                    break
            else:
                async with asyncio.timeout(self.idle):
                    await resp.write_eof()
                return
        except (TimeoutError, *CLIENT_GONE):
            self._gone()
        self.abort()

    async def open(self, status: int, headers: Mapping[str, str]) -> None:
        self.out.head(status)
        resp = self.resp = self.out.response = web.StreamResponse(status=status, headers=headers)
        try:
            await resp.prepare(self.request)
        except CLIENT_GONE:
            self._gone()

    async def write(self, chunk: bytes) -> None:
        """Write to the client; one that takes in nothing for `idle` seconds counts as gone."""
        if not self.present:
            return
        assert self.resp is not None
        transport = self.request.transport
        if transport is not None and transport.get_write_buffer_size() + len(chunk) <= SMALL_WRITE:
            # the socket's buffer stays far below where writing pauses: this write cannot wait
            # on the client, so it needs no timer
            try:
                await self.resp.write(chunk)
            except CLIENT_GONE:
                self._gone()
            return
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.idle):
                await self.resp.write(chunk)
        except (TimeoutError, *CLIENT_GONE):
            self._gone()
        finally:
            self.out.upstream_wait += time.perf_counter() - t0

    async def close(self) -> None:
        if self.present and self.resp is not None:
            try:
                await self.resp.write_eof()
            except CLIENT_GONE:
                self._gone()

    def abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.close()


class FlightSink:
    """A flight's leader writes here; every client, its own included, follows the flight at
    its own pace, so no client can stall another."""

    __slots__ = ("flight",)

    def __init__(self, flight: FlightLike) -> None:
        self.flight = flight

    @property
    def present(self) -> bool:
        return self.flight.readers > 0

    async def whole(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        raise AssertionError("a flight carries streams; whole answers are shared by entry")

    async def open(self, status: int, headers: Mapping[str, str]) -> None:
        self.flight.publish_head(status, tuple(headers.items()), shared=status == 200)

    async def write(self, chunk: bytes) -> None:
        self.flight.publish(chunk)

    async def close(self) -> None:
        return None  # the leader finishes the flight with its result, after the taps

    def abort(self) -> None:
        return None  # followers get the error event the stream ended with


class OwnedFirst:
    """A whole answer that may carry a new response's id: the id's owner is readable by every
    replica before the client gets the id (the id is recorded as the body is observed, just
    before it is written)."""

    __slots__ = ("owners", "sink")

    def __init__(self, sink: Sink, owners: OwnerStore) -> None:
        self.sink, self.owners = sink, owners

    @property
    def present(self) -> bool:
        return self.sink.present

    async def whole(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        await self.owners.settle()
        await self.sink.whole(status, headers, body)

    async def open(self, status: int, headers: Mapping[str, str]) -> None:
        await self.sink.open(status, headers)

    async def write(self, chunk: bytes) -> None:
        await self.sink.write(chunk)

    async def close(self) -> None:
        await self.sink.close()

    def abort(self) -> None:
        self.sink.abort()
