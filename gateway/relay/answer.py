"""Answering a request: from the upstream's response, a cache entry, or a flight.

Each picks its source and its taps and hands them to the one relay. A stream led for a
flight is read by its own task into the flight; the leader's client follows the flight like
every other client, so none of them can stall another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
from aiohttp import web

from gateway.cache.entry import CacheEntry
from gateway.cache.flight import FlightLike
from gateway.context import Candidate, Outcome, RequestContext
from gateway.relay.relay import relay
from gateway.relay.sink import ClientSink, FlightSink, OwnedFirst, Sink
from gateway.relay.sources import (
    Answer,
    EntrySource,
    FlightSource,
    UpstreamRaw,
    UpstreamStream,
    UpstreamWhole,
    client_headers,
)
from gateway.relay.taps import BodyUsage, CacheRecorder, StreamUsage, Tap
from gateway.runtime import Gateway

_LEADERS_OWN = frozenset({"x-gateway-upstream", "x-gateway-attempts"})


async def from_upstream(
    gw: Gateway,
    sink: Sink,
    ctx: RequestContext,
    out: Outcome,
    up: aiohttp.ClientResponse,
    candidate: Candidate,
    extra: Mapping[str, str],
    started: float,
    store_key: str | None,
    flight: FlightLike | None,
) -> None:
    """Relay the upstream's answer to `sink` (a client's socket, or a WebSocket connection)."""
    policy, client = ctx.policy, candidate.client
    idle = client.cfg.timeouts.idle
    headers = client_headers(up, extra, policy.secrets)
    owner = (ctx.team, client.name)
    owners = gw.owners if ctx.creates_response else None
    answer = Answer(up, headers, out, idle, gw.metrics, policy.secrets)
    ctype = up.content_type
    taps: list[Tap] = [out.capture] if out.capture is not None else []
    if ctype == "text/event-stream":
        out.streamed = True
        usage = StreamUsage(out, started, owners, owner)
        taps.append(usage)
        recorder = _recorder(gw, ctx, store_key, usage)
        if recorder is not None:
            taps.append(recorder)
        stream_sink: Sink = sink if flight is None else FlightSink(flight)
        source = UpstreamStream(
            answer,
            drain=policy.settings.limits.drain_timeout,
            watch=usage.watch,
            present=(lambda: sink.present) if flight is None else (lambda: flight.readers > 0),
            wants_rest=lambda: recorder is not None and recorder.parts is not None,
            expects_terminal=ctx.metered,
            hide_usage=ctx.hide_usage,
        )
        if flight is None:
            await _streamed(gw, source, sink, taps)
            if recorder is not None:
                await recorder.store_entry(gw.log)
            return
        flight.readers += 1  # the leader's own client
        pump = gw.spawn(_lead_stream(gw, source, stream_sink, taps, flight, recorder, out))
        try:
            await relay(FlightSource(flight, up.status, headers), sink)
        finally:
            flight.readers -= 1
        await asyncio.shield(pump)
        return
    if flight is not None and flight.stream:  # streamed followers cannot take this answer
        flight.publish_head(up.status, (), shared=False)
    if "json" in ctype:
        parse = ctx.metered or ctx.route.name in ("/v1/responses/{id}", "/v1/responses/{id}/cancel")
        body_usage = BodyUsage(out, parse, owners, owner)
        taps.append(body_usage)
        recorder = _recorder(gw, ctx, store_key, body_usage) if not ctx.stream else None
        if recorder is not None:
            taps.append(recorder)
        whole: Sink = sink if owners is None or owners.immediate else OwnedFirst(sink, owners)
        try:
            await relay(UpstreamWhole(answer), whole, taps)
        finally:
            if flight is not None:
                flight.finish(recorder.entry if recorder is not None else None, out.usage)
        if recorder is not None:
            await recorder.store_entry(gw.log)
        return
    if flight is not None:
        flight.finish(None, None)
    await relay(UpstreamRaw(answer, lambda: sink.present), sink, taps)


def _recorder(
    gw: Gateway, ctx: RequestContext, key: str | None, result: BodyUsage | StreamUsage
) -> CacheRecorder | None:
    if key is None:
        return None
    stream, team, model, clock = ctx.stream, ctx.team, ctx.model, gw.clock

    def make(headers: tuple[tuple[str, str], ...], body: bytes) -> CacheEntry:
        usage = result.out.usage if isinstance(result, BodyUsage) else result.summary.usage
        return CacheEntry(200, headers, body, stream, team, model, usage, clock())

    cap = ctx.policy.settings.cache.max_entry_bytes
    return CacheRecorder(gw.cache, key, cap, result, make)


async def _streamed(gw: Gateway, source: UpstreamStream, sink: Sink, taps: list[Tap]) -> None:
    gw.metrics.active_streams.inc()
    gw.track(source)
    try:
        await relay(source, sink, taps)
    finally:
        gw.streams.discard(source)
        gw.metrics.active_streams.dec()


async def _lead_stream(
    gw: Gateway,
    source: UpstreamStream,
    sink: Sink,
    taps: list[Tap],
    flight: FlightLike,
    recorder: CacheRecorder | None,
    out: Outcome,
) -> None:
    try:
        await _streamed(gw, source, sink, taps)
        # stored before the clients' streams end: a client that read its whole answer and
        # asks again, through any replica sharing the store, gets a hit (in-process this
        # costs nothing; through Redis, one round trip before the end)
        if recorder is not None:
            await recorder.store_entry(gw.log)
    finally:
        flight.finish(recorder.entry if recorder is not None else None, out.usage)


def _captured(out: Outcome) -> tuple[Tap, ...]:
    return (out.capture,) if out.capture is not None else ()


async def from_entry(
    request: web.Request, out: Outcome, entry: CacheEntry, headers: Mapping[str, str], idle: float
) -> web.StreamResponse:
    """A cache hit, or the shared result of a JSON flight."""
    out.saved = entry.usage
    sink = ClientSink(request, out, idle)
    await relay(EntrySource(entry.status, headers, entry.body), sink, _captured(out))
    return sink.resp or web.Response()


async def from_flight(
    request: web.Request,
    out: Outcome,
    flight: FlightLike,
    extra: Mapping[str, str],
    idle: float,
) -> web.StreamResponse:
    """A follower of a streamed flight: from its first chunk, at this client's pace. The
    leader's attempts were not this request's: their headers are left out."""
    headers = {k: v for k, v in flight.headers if k.lower() not in _LEADERS_OWN}
    headers.update(extra)
    sink = ClientSink(request, out, idle)
    await relay(FlightSource(flight, flight.status, headers), sink, _captured(out))
    out.saved = flight.usage
    return sink.resp or web.Response()
