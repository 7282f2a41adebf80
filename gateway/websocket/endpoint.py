"""The handshake of `GET /v1/responses` with a WebSocket upgrade.

The team key is checked before the upgrade: a missing or unknown key gets the 401 of any
request, and nothing reaches an upstream. An upgrade anywhere else, or on the admin listener,
is refused (400 `websocket_not_supported`). Each connection then runs in bridge mode, or
relays to an upstream's own WebSocket mode (`websocket: native`) once its first
`response.create` has picked the upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from aiohttp import web
from multidict import CIMultiDict

from gateway import errors
from gateway.envelope import websocket_refused
from gateway.errors import GatewayError
from gateway.runtime import GATEWAY
from gateway.websocket import turn
from gateway.websocket.connection import Connection
from gateway.websocket.responder import Responder

# the handshake's own headers: never sent on to an upstream's HTTP endpoint
_HANDSHAKE = ("sec-websocket-", "upgrade", "connection", "origin")


def forwarded(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The handshake's headers as each bridged POST sends them on (credentials are dropped
    later, with every other request's)."""
    # hop-by-hop: the headers the client named in `Connection` go no further than it does
    named = {
        t.strip().lower()
        for k, v in headers.items()
        if k.lower() == "connection"
        for t in v.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict(
        (k, v)
        for k, v in headers.items()
        if not k.lower().startswith(_HANDSHAKE) and k.lower() not in named
    )
    out["content-type"] = "application/json"
    out["accept"] = "text/event-stream"
    return out


async def endpoint(request: web.Request, path: str) -> web.StreamResponse:
    """Answer an upgrade request: a WebSocket for `GET /v1/responses`, a JSON refusal else."""
    gw = request.app[GATEWAY]
    if path != turn.TARGET or request.method != "GET":
        raise websocket_refused()
    if gw.draining:
        raise errors.shutting_down()
    try:
        principal = gw.policy.auth.authenticate(request.headers)
    except GatewayError as e:
        # a refused handshake is a request like any other: logged and counted, never upgraded
        env = turn.begin(gw, request.headers)
        env.outcome.status, env.outcome.error = e.status, e.code
        await turn.end(gw, env)
        raise
    limits = gw.settings.limits
    # no permessage-deflate: a zlib context per connection costs memory and every message CPU,
    # for JSON that mostly crosses a data centre
    ws = web.WebSocketResponse(max_msg_size=limits.max_body_bytes, autoping=True, compress=False)
    if request.version < (1, 1) or not ws.can_prepare(request).ok:  # RFC 6455 4.1: HTTP/1.1+
        raise GatewayError(
            400, "invalid_request_error", "invalid_websocket", "Not a valid WebSocket handshake."
        )
    await ws.prepare(request)
    loop = asyncio.get_running_loop()
    headers = forwarded(request.headers)  # the key stays in: each response is authenticated
    conn = Connection(gw, ws, headers, principal, loop.time() + limits.max_websocket_seconds)
    gw.sockets.add(conn)
    gw.metrics.websockets.inc()
    try:
        await conn.run(Responder(gw, ws, headers, request.transport))
    finally:
        gw.sockets.discard(conn)
        gw.metrics.websockets.dec()
    return ws
