"""What a connection does with each admitted `response.create` and with any other event.

A response whose upstream is in bridge mode runs here to its end, before the connection takes
its next message. One whose upstream is `websocket: native` goes up that upstream's WebSocket
(opened at the first such response, one per upstream and connection) and ends in the link's
relay, while the connection goes on reading: other client events (`response.steer`) go up the
link the last native response used. Without one, they are refused with `unsupported_event`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.context import Envelope
from gateway.runtime import Gateway
from gateway.websocket import bridge, turn
from gateway.websocket.native import NativeLink


class Responder:
    __slots__ = ("gw", "headers", "last", "links", "transport", "ws")

    def __init__(
        self,
        gw: Gateway,
        ws: web.WebSocketResponse,
        headers: Mapping[str, str],
        transport: asyncio.Transport | None,
    ) -> None:
        self.gw, self.ws, self.headers, self.transport = gw, ws, headers, transport
        self.links: dict[str, NativeLink] = {}  # by upstream name
        self.last: NativeLink | None = None

    async def create(
        self, env: Envelope, event: dict[str, Any], lane: str | None, message: str | bytes
    ) -> bool:
        """Run one `response.create`; True when its end is the native link's to record.
        Raises the GatewayError of a refusal."""
        ctx = await turn.admit(self.gw, env, self.headers, event)
        upstream = ctx.plan[0]
        if upstream.cfg.websocket != "native":
            await bridge.respond(self.gw, self.ws, env, ctx, self.headers, lane, self.transport)
            return False
        link = self.links.get(upstream.name)
        if link is None or link.closed:
            if link is not None:
                await link.close(0)
            link = self.links[upstream.name] = await NativeLink.open(
                self.gw, self.ws, ctx, env, self.headers
            )
        self.last = link
        await link.create(env, ctx, message)
        return True

    async def other(self, message: str | bytes) -> bool:
        """Relay an event that is not a `response.create`; False when nothing can take it."""
        return self.last is not None and await self.last.forward(message)

    async def close(self) -> None:
        """The connection ends: native responses under way are read to their ends first."""
        within = self.gw.settings.limits.drain_timeout
        for link in self.links.values():
            await link.close(within)
