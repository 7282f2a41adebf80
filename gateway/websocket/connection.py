"""One client's Responses WebSocket: its messages read as they come, its responses run.

A reader task takes messages in as they arrive (so pings are answered and a client's close is
seen while a response runs) and queues at most `MAX_QUEUED`; past that it stops reading, and
the client's own socket buffer holds it back. The connection runs the queued messages one at a
time, in arrival order. It closes, with a close frame, after the response under way when the
client closed its side, when the gateway stops (1001) or when the connection is older than
`limits.max_websocket_seconds` (1001).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping

from aiohttp import WSCloseCode, WSMsgType, web

from gateway.auth import Principal
from gateway.budget.admission import has_room
from gateway.errors import GatewayError
from gateway.relay.sink import CLIENT_GONE
from gateway.runtime import Gateway
from gateway.websocket import events, turn
from gateway.websocket.responder import Responder

ERROR_SEND_TIMEOUT = 10.0  # seconds a client gets to take in an error event
MAX_QUEUED = 16  # client messages waiting for their turn before the reader stops reading
# (and at most `limits.max_body_bytes` of them: one request body, as an HTTP connection holds)


class Connection:
    __slots__ = (
        "closed",
        "expires",
        "gw",
        "headers",
        "max_queued_bytes",
        "principal",
        "queue",
        "queued_bytes",
        "revoked",
        "space",
        "stopping",
        "wake",
        "ws",
    )

    def __init__(
        self,
        gw: Gateway,
        ws: web.WebSocketResponse,
        headers: Mapping[str, str],
        principal: Principal,
        expires: float,
    ) -> None:
        self.gw, self.ws, self.headers, self.expires = gw, ws, headers, expires
        self.principal = principal  # as the handshake authenticated it
        self.queue: deque[str | bytes] = deque()
        self.queued_bytes = 0
        # one request body's worth: as much as an HTTP connection holds (one message always fits)
        self.max_queued_bytes = gw.settings.limits.max_body_bytes
        self.wake = asyncio.Event()  # a message arrived, the client closed, or a stop began
        self.space = asyncio.Event()  # the queue has room again
        self.closed = False  # the client's side is closed, or the socket broke
        self.stopping = False  # the gateway stops: close once the response under way ends
        self.revoked = False  # the key the handshake authenticated is no longer valid

    def stop(self) -> None:
        """Close after the response under way (a graceful stop)."""
        self.stopping = True
        self.wake.set()

    async def run(self, responder: Responder) -> None:
        reader = asyncio.get_running_loop().create_task(self._read())
        try:
            while (message := await self._next()) is not None:
                await self._turn(responder, message)
        finally:
            reader.cancel()
            try:
                await responder.close()  # native responses under way end first
            finally:
                await self._close()

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break  # an error: the socket is done
                data = msg.data
                while self.queue and (
                    len(self.queue) >= MAX_QUEUED
                    or self.queued_bytes + len(data) > self.max_queued_bytes
                ):
                    self.space.clear()
                    await self.space.wait()
                self.queue.append(data)
                self.queued_bytes += len(data)
                self.wake.set()
        except asyncio.CancelledError:
            raise  # the gateway ends the connection: the client did not close it
        except Exception:  # the socket broke under the reader: the client is gone
            self.closed = True
        else:
            self.closed = True
        finally:
            self.wake.set()

    async def _next(self) -> str | bytes | None:
        """The next message to run; None when the connection should close."""
        loop = asyncio.get_running_loop()
        while True:
            if self.stopping or self.revoked or self.gw.draining or loop.time() >= self.expires:
                return None
            if self.closed:
                return None  # what it queued is nobody's to read any more
            if self.queue:
                message = self.queue.popleft()
                self.queued_bytes -= len(message)
                self.space.set()
                return message
            self.wake.clear()
            try:
                async with asyncio.timeout(self.expires - loop.time()):
                    await self.wake.wait()
            except TimeoutError:
                pass

    async def _turn(self, responder: Responder, message: str | bytes) -> None:
        gw = self.gw
        try:
            event = events.client_event(message, gw.settings.limits.max_json_depth)
        except GatewayError as e:
            await self._refuse(e, None)
            return
        kind = event["type"]
        lane = event.get("stream_id") if isinstance(event.get("stream_id"), str) else None
        if kind != events.CREATE:
            try:
                principal = gw.policy.auth.authenticate(self.headers)
            except GatewayError as e:
                await self._refuse(e, lane)
                self.revoked = True
                return
            if not await has_room(gw.budget, principal.team, gw.clock()):
                await self._refuse(events.no_room(principal.team.name), lane)
                return
            if not await responder.other(message):
                await self._refuse(events.unsupported(kind, gw.redactor), lane)
            return
        env = turn.begin(gw, self.headers)
        elsewhere = False  # the response ends in a native link's relay
        try:
            elsewhere = await responder.create(env, event, lane, message)
        except GatewayError as e:
            out = env.outcome
            out.error = out.error or e.code
            out.head(e.status)
            await self.error(e, lane)
            if e.status == 401:  # a reload removed the key: the connection ends with it
                self.revoked = True
        except Exception:
            gw.log.exception("unhandled error", request_id=env.request_id)
            out = env.outcome
            out.error = "internal_error"
            out.head(500)
            failed = GatewayError(
                500, "server_error", "internal_error", "The gateway failed this response."
            )
            await self.error(failed, lane)
        finally:
            if not elsewhere:
                await turn.end(gw, env)

    async def _refuse(self, error: GatewayError, lane: str | None) -> None:
        """A message refused before it was a response: recorded as a refused request."""
        env = turn.begin(self.gw, self.headers)
        env.principal = self.principal
        env.outcome.status, env.outcome.error = error.status, error.code
        try:
            await self.error(error, lane)
        finally:
            await turn.end(self.gw, env)

    async def error(self, error: GatewayError, lane: str | None) -> None:
        """An `error` event to the client; the connection stays open."""
        if self.ws.closed:
            return
        try:
            async with asyncio.timeout(ERROR_SEND_TIMEOUT):
                await self.ws.send_str(events.error_event(error, lane))
        except (TimeoutError, *CLIENT_GONE):
            pass

    async def _close(self) -> None:
        if self.ws.closed:
            return
        code, reason = WSCloseCode.OK, b""
        if self.revoked:
            code, reason = WSCloseCode.POLICY_VIOLATION, b"the API key is no longer valid"
        elif self.stopping or self.gw.draining:
            code, reason = WSCloseCode.GOING_AWAY, b"the gateway is shutting down"
        elif not self.closed:
            code, reason = WSCloseCode.GOING_AWAY, b"the connection reached its age limit"
        try:
            async with asyncio.timeout(5.0):
                await self.ws.close(code=code, message=reason)
        except (TimeoutError, ConnectionError):
            pass
