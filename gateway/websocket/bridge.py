"""Bridge mode: each `response.create` is sent to the upstream as a streamed
`POST /v1/responses`, and each SSE event it answers with goes to the client as one message.

It works with every upstream (those without a WebSocket mode of their own included), runs the
same attempt plan as HTTP (so a response may be retried before its first event), and relays
through the same source as an HTTP stream: upstream keys masked, a client that left still
metered to the terminal event, a stream that broke off ended with `upstream_stream_interrupted`
and charged its estimate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from aiohttp import web

from gateway.context import Envelope, RequestContext
from gateway.pipeline import call
from gateway.relay import answer
from gateway.runtime import Gateway
from gateway.websocket.sink import WebSocketSink


async def respond(
    gw: Gateway,
    ws: web.WebSocketResponse,
    env: Envelope,
    ctx: RequestContext,
    headers: Mapping[str, str],
    lane: str | None,
    transport: asyncio.Transport | None,
) -> None:
    """Run one admitted response to its end; raises the GatewayError of an upstream that gave
    no answer (nothing was sent to the client then)."""
    out = env.outcome
    up, candidate = await call(gw, env, ctx, headers)
    try:
        sink = WebSocketSink(ws, out, candidate.client.cfg.timeouts.idle, lane, transport)
        await answer.from_upstream(gw, sink, ctx, out, up, candidate, {}, env.started, None, None)
    finally:
        up.release()
