"""Relaying an upstream response to clients: JSON bodies, other bodies, and SSE streams.

A stream is read once, by a `StreamPump`. Without a flight it writes each chunk to the client
first and only then feeds the SSE decoder, so the tap never delays a byte. With a flight
(identical requests sharing one upstream call) it publishes each chunk to the flight, and
every client, the leader's own included, is served from there at its own pace: no client can
stall another. When every client has gone the upstream is still read, up to
`limits.drain_timeout`, so that the real usage is recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from gateway import errors
from gateway.cache.entry import KEPT_HEADERS, CacheEntry
from gateway.cache.flight import Flight
from gateway.exchange import Exchange
from gateway.masking import Secrets, StreamMasker, mask_body, mask_headers
from gateway.sse import SSEDecoder
from gateway.sse_masking import SSEMasker
from gateway.upstream import response_headers
from gateway.usage import StreamTracker, finish_reason, usage_from_body

if TYPE_CHECKING:
    from gateway.runtime import Gateway

# a client that went away: aiohttp raises ConnectionResetError, its ClientConnectionResetError
# subclass, or a bare ConnectionError("Connection lost") when a blocked write is cut off
CLIENT_GONE = (ConnectionError, aiohttp.ClientConnectionResetError)
UPSTREAM_BROKEN = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)
POST_TERMINAL_GRACE = 1.0  # seconds an upstream may keep a finished stream open
WHOLE_WRITE_IDLE = 30.0  # seconds a client may take to start taking in a whole answer
WHOLE_WRITE_PIECE = 256 * 1024  # a whole body larger than this is written in pieces
SMALL_WRITE = 32 * 1024  # well under aiohttp's 64 KiB write-buffer limit, headers included


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
    if size <= SMALL_WRITE:
        # below aiohttp's write-buffer limit the writer never waits on the client: no timer
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except CLIENT_GONE:
            return False
        return True
    try:
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


def _headers(
    up: aiohttp.ClientResponse, extra: Mapping[str, str], secrets: Secrets
) -> dict[str, str]:
    """The client's headers: the upstream's (an echoed key masked, so also in cache entries and
    for coalesced followers, which take theirs from here), then the gateway's own."""
    out = dict(response_headers(up.headers.items()))
    rid = up.headers.get("x-request-id")
    if rid:
        out["x-upstream-request-id"] = rid
    out = mask_headers(out, secrets)
    out.update(extra)
    return out


def _kept(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in headers.items() if k.lower() in KEPT_HEADERS)


async def _read_chunk(up: aiohttp.ClientResponse, ex: Exchange, within: float) -> bytes:
    """One chunk of the upstream body within `within` seconds (idle time, not total time)."""
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(within):
            return await up.content.readany()
    finally:
        ex.upstream_wait += time.perf_counter() - t0


async def _write(resp: web.StreamResponse, chunk: bytes, ex: Exchange, within: float) -> None:
    """Write to a client; one that takes in nothing for `within` seconds counts as gone."""
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(within):
            await resp.write(chunk)
    except TimeoutError:
        raise ConnectionError("the client stopped reading") from None
    finally:
        ex.upstream_wait += time.perf_counter() - t0


async def relay_body(
    gw: Gateway,
    request: web.Request,
    ex: Exchange,
    up: aiohttp.ClientResponse,
    extra: Mapping[str, str],
    store_key: str | None,
    flight: Flight | None,
) -> web.StreamResponse:
    """A JSON body: read whole (usage and cacheability come from it), masked, then sent."""
    idle = gw.upstreams[ex.upstream].cfg.timeouts.idle
    parts: list[bytes] = []
    try:
        while chunk := await _read_chunk(up, ex, idle):
            parts.append(chunk)
    except TimeoutError:
        raise errors.upstream_timeout(ex.upstream, idle) from None
    except UPSTREAM_BROKEN:
        raise errors.upstream_unavailable(ex.upstream, reached=True) from None
    data = mask_body(b"".join(parts), gw.secrets)
    ex.status = up.status
    headers = _headers(up, extra, gw.secrets)
    entry: CacheEntry | None = None
    if up.status == 200 and (
        ex.metered or ex.route in ("/v1/responses/{id}", "/v1/responses/{id}/cancel")
    ):
        obj = _loads(data)
        if isinstance(obj, dict):
            if ex.metered:
                ex.usage = usage_from_body(obj)
            rid, model = obj.get("id"), obj.get("model")
            if isinstance(rid, str):
                ex.response_id = rid
                if ex.creates_response:
                    gw.owners[rid] = (ex.team, ex.upstream)
            if isinstance(model, str):
                ex.response_model = model
            if obj.get("object") == "response":
                ex.finish_reasons = (finish_reason(obj),)
            if store_key is not None and not ex.stream and obj.get("status") == "completed":
                entry = CacheEntry(
                    200, _kept(headers), data, False, ex.team, ex.model, ex.usage, gw.clock()
                )
    if entry is not None and store_key is not None:
        await gw.cache.put(store_key, entry)
    if flight is not None:
        if flight.stream:  # streamed followers cannot take a JSON answer
            flight.publish_head(up.status, (), shared=False)
        flight.finish(entry, ex.usage)
    if len(data) <= WHOLE_WRITE_PIECE:
        whole = web.Response(status=up.status, body=data, headers=headers)
        if not await deliver(request, whole, idle):
            ex.error = "client_disconnected"
        return whole
    # a large body goes in pieces, each within `idle`: a client that stops reading is cut off
    # however long the whole transfer may take at its pace
    resp = web.StreamResponse(status=up.status, headers=headers)
    resp.content_length = len(data)
    try:
        async with asyncio.timeout(idle):
            await resp.prepare(request)
        for i in range(0, len(data), WHOLE_WRITE_PIECE):
            await _write(resp, data[i : i + WHOLE_WRITE_PIECE], ex, idle)
        async with asyncio.timeout(idle):
            await resp.write_eof()
    except (TimeoutError, *CLIENT_GONE):
        ex.error = "client_disconnected"
        if request.transport is not None:
            request.transport.close()
    return resp


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


async def relay_raw(
    gw: Gateway,
    request: web.Request,
    ex: Exchange,
    up: aiohttp.ClientResponse,
    extra: Mapping[str, str],
    flight: Flight | None,
) -> web.StreamResponse:
    """Any other body (audio, files, text errors): passed through chunk by chunk, masked."""
    if flight is not None:
        flight.publish_head(up.status, (), shared=False)
        flight.finish(None, None)
    ex.status = up.status
    idle = gw.upstreams[ex.upstream].cfg.timeouts.idle
    masker = StreamMasker(gw.secrets)
    resp = ex.started_response = web.StreamResponse(
        status=up.status, headers=_headers(up, extra, gw.secrets)
    )
    try:
        await resp.prepare(request)
        while chunk := await _read_chunk(up, ex, idle):
            if out := masker.feed(chunk):
                await _write(resp, out, ex, idle)
        if tail := masker.flush():
            await _write(resp, tail, ex, idle)
        await resp.write_eof()
    except CLIENT_GONE:
        ex.error = "client_disconnected"
    except (TimeoutError, *UPSTREAM_BROKEN):
        ex.error = "upstream_body_interrupted"
        gw.metrics.upstream_errors.labels(ex.upstream, "body_interrupted").inc()
        if request.transport is not None:
            request.transport.close()  # the body is incomplete: the client must not take it
    return resp


class StreamPump:
    """Reads one upstream SSE stream to its end: taps usage, records it for the cache, and
    hands each chunk to `emit` (the client's socket, or the flight)."""

    def __init__(
        self,
        gw: Gateway,
        ex: Exchange,
        up: aiohttp.ClientResponse,
        headers: Mapping[str, str],
        store_key: str | None,
        flight: Flight | None,
    ) -> None:
        self.gw, self.ex, self.up, self.flight = gw, ex, up, flight
        self.headers = headers
        self.store_key = store_key
        self.record: list[bytes] | None = [] if store_key is not None and up.status == 200 else None
        self.decoder = SSEDecoder()
        self.tracker = StreamTracker()
        self.masker = SSEMasker(gw.secrets)
        self.broken: str | None = None
        self.cutting = False  # a graceful stop ran out of time: end the stream now
        self._reading: asyncio.Timeout | None = None

    def cut(self) -> None:
        """End this stream now, with the contract's error event (a graceful stop calls it
        when `drain_timeout` has passed)."""
        self.cutting = True
        if self._reading is not None:
            self._reading.reschedule(-1.0)  # a deadline in the past: the read ends at once

    async def _read(self, within: float) -> bytes:
        """One chunk of the upstream body within `within` seconds (idle time, not total)."""
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(within) as self._reading:
                return await self.up.content.readany()
        finally:
            self._reading = None
            self.ex.upstream_wait += time.perf_counter() - t0

    async def run(self, emit: Callable[[bytes], Any], readers: Callable[[], int]) -> None:
        """`emit(chunk)` may be a coroutine function; `readers()` counts clients still there."""
        gw, ex, summary = self.gw, self.ex, self.tracker.summary
        idle = gw.upstreams[ex.upstream].cfg.timeouts.idle
        drain = gw.settings.limits.drain_timeout
        cap = gw.settings.cache.max_entry_bytes
        loop = asyncio.get_running_loop()
        perf = time.perf_counter
        deadline = float("inf")  # after a terminal event, or once every client left
        size = 0
        gw.metrics.active_streams.inc()
        gw.streams.add(self)
        try:
            while True:
                if self.cutting:
                    self.broken = "the gateway is shutting down"
                    break
                now = loop.time()
                if readers() == 0:
                    if summary.terminal and self.record is None:
                        break  # the usage is in: no one is left to read the rest
                    if deadline == float("inf"):
                        deadline = now + drain
                elif not summary.terminal:
                    deadline = float("inf")
                timeout = min(idle, deadline - now)
                if timeout <= 0:
                    if not summary.terminal:
                        self.broken = "drain timeout"
                    break
                try:
                    chunk = await self._read(timeout)
                except TimeoutError:
                    if self.cutting:
                        self.broken = "the gateway is shutting down"
                    elif not summary.terminal and deadline - loop.time() > 0:
                        self.broken = "upstream idle timeout"
                    elif not summary.terminal:
                        self.broken = "drain timeout"
                    break
                except UPSTREAM_BROKEN:
                    self.broken = "upstream closed the stream"
                    break
                if not chunk:
                    break
                out = self.masker.feed(chunk)
                if out:
                    result = emit(out)
                    if result is not None:
                        await result
                if self.record is not None:
                    size += len(out)
                    if size > cap:
                        self.record = None
                    else:
                        self.record.append(out)
                was_terminal = summary.terminal
                # what the client got, masked: a key in an event must not reach a span or a log
                for event in self.decoder.feed(out):
                    if self.tracker.observe(event) and ex.ttft is None:
                        ex.ttft = perf() - ex.started
                if summary.terminal and not was_terminal:
                    deadline = loop.time() + POST_TERMINAL_GRACE
                if summary.done:
                    break  # nothing follows [DONE]
            await self._end(emit)
        finally:
            gw.streams.discard(self)
            gw.metrics.active_streams.dec()
            await self._settle()

    async def _end(self, emit: Callable[[bytes], Any]) -> None:
        gw, ex, summary = self.gw, self.ex, self.tracker.summary
        tail = self.masker.flush()
        for event in self.decoder.feed(tail):  # what the masker held to the end
            if self.tracker.observe(event) and ex.ttft is None:
                ex.ttft = time.perf_counter() - ex.started
        if not summary.terminal and self.broken is None and ex.metered:
            self.broken = "upstream ended the stream before a terminal event"
        if self.broken is not None and not summary.terminal and self.up.status == 200:
            code, message = (
                "upstream_stream_interrupted",
                f"The upstream stream broke: {self.broken}.",
            )
            if self.cutting:  # the upstream did nothing wrong: the gateway is stopping
                code, message = "shutting_down", "The gateway shut down during this stream."
                ex.error = "shutting_down"
            elif self.broken != "drain timeout":  # not the upstream's fault: nobody was reading
                ex.error = ex.error or code
                gw.metrics.upstream_errors.labels(ex.upstream, "stream_interrupted").inc()
            tail += self.decoder.terminator() + errors.stream_interrupted_event(
                summary.next_sequence, message, code
            )
        if tail:
            if self.record is not None:
                self.record.append(tail)
            result = emit(tail)
            if result is not None:
                await result

    async def _settle(self) -> None:
        gw, ex, summary = self.gw, self.ex, self.tracker.summary
        ex.usage = summary.usage if ex.metered else None
        ex.response_id, ex.response_model = summary.response_id, summary.response_model
        ex.finish_reasons = summary.finish_reasons
        if summary.error_code and not ex.error:
            ex.error = summary.error_code
        if ex.response_id and ex.creates_response:
            gw.owners[ex.response_id] = (ex.team, ex.upstream)
        entry = None
        if (
            self.record is not None
            and summary.terminal
            and summary.status == "completed"
            and self.broken is None
        ):
            entry = CacheEntry(
                200,
                _kept(self.headers),
                b"".join(self.record),
                True,
                ex.team,
                ex.model,
                summary.usage,
                gw.clock(),
            )
        if self.flight is not None:
            self.flight.finish(entry, summary.usage)
        if entry is not None and self.store_key is not None:
            await gw.cache.put(self.store_key, entry)


async def relay_stream(
    gw: Gateway,
    request: web.Request,
    ex: Exchange,
    up: aiohttp.ClientResponse,
    extra: Mapping[str, str],
    store_key: str | None,
    flight: Flight | None,
) -> web.StreamResponse:
    ex.stream = True
    ex.status = up.status
    headers = _headers(up, extra, gw.secrets)
    pump = StreamPump(gw, ex, up, headers, store_key, flight)
    resp = ex.started_response = web.StreamResponse(status=up.status, headers=headers)
    idle = gw.upstreams[ex.upstream].cfg.timeouts.idle
    if flight is not None:
        flight.publish_head(up.status, tuple(headers.items()), shared=up.status == 200)
        flight.readers += 1
        task = gw.spawn(pump.run(flight.publish, lambda: flight.readers))
        try:
            await _serve(request, resp, flight, ex, idle)
        finally:
            flight.readers -= 1
        await asyncio.shield(task)
        return resp

    present = True

    async def emit(chunk: bytes) -> None:
        nonlocal present
        if present:
            try:
                await _write(resp, chunk, ex, idle)
            except CLIENT_GONE:
                present = False
                ex.error = "client_disconnected"

    try:
        await resp.prepare(request)
    except CLIENT_GONE:
        present = False
        ex.error = "client_disconnected"
    await pump.run(emit, lambda: 1 if present else 0)
    if present:
        try:
            await resp.write_eof()
        except CLIENT_GONE:
            ex.error = "client_disconnected"
    return resp


async def _serve(
    request: web.Request,
    resp: web.StreamResponse,
    flight: Flight,
    ex: Exchange,
    idle: float,
) -> None:
    """One client of a flight: everything published so far, then live, at its own pace."""
    try:
        await resp.prepare(request)
        async for chunk in flight.follow():
            await _write(resp, chunk, ex, idle)
        await resp.write_eof()
    except CLIENT_GONE:
        ex.error = "client_disconnected"


async def replay(
    gw: Gateway,
    request: web.Request,
    ex: Exchange,
    flight: Flight,
    extra: Mapping[str, str],
) -> web.StreamResponse:
    """A follower of a streamed flight."""
    ex.stream = True
    ex.status = flight.status
    headers = dict(flight.headers)
    headers.update(extra)
    headers.update(
        {
            "x-request-id": ex.request_id,
            "x-gateway-trace-id": ex.trace_id,
            "x-gateway-cache": "coalesced",
        }
    )
    resp = ex.started_response = web.StreamResponse(status=flight.status, headers=headers)
    idle = gw.upstreams[ex.upstream].cfg.timeouts.idle
    await _serve(request, resp, flight, ex, idle)
    ex.saved = flight.usage
    return resp
