"""Relaying an upstream response to the client: whole JSON bodies, and SSE streams chunk by chunk.

A stream chunk is written to the client first and only then fed to the SSE decoder, so the
tap never delays a byte. When the client goes away mid-stream the upstream is still read, up to
`limits.drain_timeout`, so that the real usage is recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from gateway import errors
from gateway.cache.entry import KEPT_HEADERS, CacheEntry
from gateway.cache.flight import Flight
from gateway.exchange import Exchange
from gateway.sse import SSEDecoder
from gateway.upstream import response_headers
from gateway.usage import StreamTracker, finish_reason, usage_from_body

if TYPE_CHECKING:
    from gateway.runtime import Gateway

CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError, BrokenPipeError)
UPSTREAM_BROKEN = (
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    aiohttp.ServerDisconnectedError,
)
POST_TERMINAL_GRACE = 5.0  # seconds an upstream may hold a finished stream open


def _headers(up: aiohttp.ClientResponse, extra: Mapping[str, str]) -> dict[str, str]:
    out = dict(response_headers(up.headers.items()))
    rid = up.headers.get("x-request-id")
    if rid:
        out["x-upstream-request-id"] = rid
    out.update(extra)
    return out


def _kept(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in headers.items() if k.lower() in KEPT_HEADERS)


async def relay_body(
    gw: Gateway,
    request: web.Request,
    ex: Exchange,
    up: aiohttp.ClientResponse,
    extra: Mapping[str, str],
    store_key: str | None,
    flight: Flight | None,
) -> web.StreamResponse:
    idle = gw.upstreams[ex.upstream].cfg.timeouts.idle
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(idle):
            data = await up.read()
    except TimeoutError:
        raise errors.upstream_timeout(ex.upstream, idle) from None
    except UPSTREAM_BROKEN:
        raise errors.upstream_unavailable(ex.upstream) from None
    finally:
        ex.upstream_wait += time.perf_counter() - t0
    if up.status >= 400:
        data = errors.mask_secrets(data, gw.secrets)
    ex.status = up.status
    headers = _headers(up, extra)
    entry: CacheEntry | None = None
    if (
        (ex.metered or ex.route in ("/v1/responses/{id}", "/v1/responses/{id}/cancel"))
        and up.status == 200
        and "json" in up.content_type
    ):
        obj = _loads(data)
        if isinstance(obj, dict):
            if ex.metered:
                ex.usage = usage_from_body(obj)
            rid, model = obj.get("id"), obj.get("model")
            if isinstance(rid, str):
                ex.response_id = rid
                if rid.startswith("resp_"):
                    gw.owners[rid] = (ex.upstream, ex.team)
            if isinstance(model, str):
                ex.response_model = model
            if obj.get("object") == "response":
                ex.finish_reasons = (finish_reason(obj),)
            if store_key is not None and obj.get("status") == "completed":
                entry = CacheEntry(
                    200, _kept(headers), data, False, ex.team, ex.model, ex.usage, gw.clock()
                )
    if entry is not None and store_key is not None:
        await gw.cache.put(store_key, entry)
    if flight is not None:
        flight.finish(entry, ex.usage)
    resp = web.Response(status=up.status, body=data, headers=headers)
    try:
        await resp.prepare(request)
        await resp.write_eof()
    except CLIENT_GONE:
        ex.error = "client_disconnected"
    return resp


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


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
    headers = _headers(up, extra)
    resp = web.StreamResponse(status=up.status, headers=headers)
    client_gone = False
    try:
        await resp.prepare(request)
    except CLIENT_GONE:
        client_gone = True
    if flight is not None:
        flight.publish_head(up.status, tuple(headers.items()), shared=up.status == 200)
    record: list[bytes] | None = [] if store_key is not None and up.status == 200 else None
    record_size = 0
    cap = gw.settings.cache.max_entry_bytes
    limits = gw.settings.limits
    idle = gw.upstreams[ex.upstream].cfg.timeouts.idle
    decoder = SSEDecoder()
    tracker = StreamTracker()
    summary = tracker.summary
    loop = asyncio.get_running_loop()
    drain_deadline = 0.0
    broken: str | None = None
    content = up.content
    perf = time.perf_counter
    gw.metrics.active_streams.inc()
    try:
        while True:
            timeout = POST_TERMINAL_GRACE if summary.terminal else idle
            if client_gone and (flight is None or flight.followers == 0):
                if summary.terminal:
                    break  # the usage is in: no one is left to read the rest
                timeout = min(timeout, drain_deadline - loop.time())
                if timeout <= 0:
                    broken = "drain timeout"
                    break
            t0 = perf()
            try:
                async with asyncio.timeout(timeout):
                    chunk = await content.readany()
            except TimeoutError:
                if not summary.terminal:
                    broken = "upstream idle timeout"
                break
            except UPSTREAM_BROKEN:
                broken = "upstream closed the stream"
                break
            finally:
                ex.upstream_wait += perf() - t0
            if not chunk:
                break
            if not client_gone:
                t0 = perf()
                try:
                    await resp.write(chunk)
                except CLIENT_GONE:
                    client_gone = True
                    ex.error = "client_disconnected"
                    drain_deadline = loop.time() + limits.drain_timeout
                ex.upstream_wait += perf() - t0
            if flight is not None:
                flight.publish(chunk)
            if record is not None:
                record_size += len(chunk)
                if record_size > cap:
                    record = None
                else:
                    record.append(chunk)
            for event in decoder.feed(chunk):
                if tracker.observe(event) and ex.ttft is None:
                    ex.ttft = perf() - ex.started
        if not summary.terminal and broken is None and ex.metered:
            broken = "upstream ended the stream before a terminal event"
        if broken is not None and not summary.terminal and up.status == 200:
            ex.error = ex.error or "upstream_stream_interrupted"
            gw.metrics.upstream_errors.labels(ex.upstream, "stream_interrupted").inc()
            tail = errors.stream_interrupted_event(
                summary.next_sequence, f"The upstream stream broke: {broken}."
            )
            if flight is not None:
                flight.publish(tail)
            if not client_gone:
                try:
                    await resp.write(tail)
                except CLIENT_GONE:
                    client_gone = True
        if not client_gone:
            try:
                await resp.write_eof()
            except CLIENT_GONE:
                client_gone = True
    finally:
        gw.metrics.active_streams.dec()
        ex.usage = summary.usage if ex.metered else None
        ex.response_id, ex.response_model = summary.response_id, summary.response_model
        ex.finish_reasons = summary.finish_reasons
        if summary.error_code and not ex.error:
            ex.error = summary.error_code
        if ex.response_id and ex.response_id.startswith("resp_"):
            gw.owners[ex.response_id] = (ex.upstream, ex.team)
        entry = None
        if (
            record is not None
            and summary.terminal
            and summary.status == "completed"
            and broken is None
        ):
            entry = CacheEntry(
                200,
                _kept(headers),
                b"".join(record),
                True,
                ex.team,
                ex.model,
                summary.usage,
                gw.clock(),
            )
        if flight is not None:
            flight.finish(entry, summary.usage)
        if entry is not None and store_key is not None:
            await gw.cache.put(store_key, entry)
    return resp


async def replay(
    gw: Gateway, request: web.Request, ex: Exchange, flight: Flight, extra: Mapping[str, str]
) -> web.StreamResponse:
    """A follower: the leader's stream from its first byte, then live, at its own pace."""
    ex.stream = True
    ex.status = flight.status
    headers = dict(flight.headers)
    headers.update({k: v for k, v in extra.items()})
    headers.update(
        {
            "x-request-id": ex.request_id,
            "x-gateway-trace-id": ex.trace_id,
            "x-gateway-cache": "coalesced",
        }
    )
    resp = web.StreamResponse(status=flight.status, headers=headers)
    try:
        await resp.prepare(request)
        async for chunk in flight.follow():
            await resp.write(chunk)
        await resp.write_eof()
    except CLIENT_GONE:
        ex.error = "client_disconnected"
    ex.saved = flight.usage
    return resp
