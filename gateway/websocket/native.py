"""Native mode: a client connection's messages relayed to the upstream's own WebSocket.

One upstream WebSocket per client connection and upstream, opened with the upstream's key
(never the client's). Client messages go up unchanged once admitted (`response.steer`
included); upstream messages come down unchanged but for masked keys. Each `response.create`
is one request: it is matched to its response by order (the upstream answers creates in the
order it got them, with `response.created` or an `error`), and ends at that response's
terminal event, which carries its usage. A response the upstream starts on its own (a
steered response's successor) is recorded too, charged to the team of the response before it.

The relay reads the next upstream message only once the client took the last one (within the
upstream's `idle` seconds), so a slow client holds the upstream back rather than growing the
gateway's memory; a client that left is no longer written to, but its responses are read to
their terminal events (at most `drain_timeout`) and charged their real usage.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
from aiohttp import WSMsgType, web

from gateway import errors
from gateway.context import Attempt, Candidate, Envelope, RequestContext
from gateway.jsonbody import with_model
from gateway.masking import Secrets, mask_body
from gateway.relay.sink import CLIENT_GONE
from gateway.runtime import Gateway
from gateway.telemetry.genai import client_span
from gateway.upstream.headers import request_headers
from gateway.usage import finish_reason, usage_from_body
from gateway.websocket import events, turn

MAX_UPSTREAM_MESSAGE = 64 * 1024 * 1024  # a whole response object may ride in one message
_OUTPUT_EVENTS = (b"response.output_text.delta", b"response.function_call_arguments.delta")


class NativeLink:
    """One upstream WebSocket of one client connection, and the responses running on it."""

    __slots__ = (
        "candidate",
        "client_ws",
        "closed",
        "cutting",
        "gw",
        "last",
        "live",
        "pending",
        "present",
        "pump",
        "secrets",
        "upstream_ws",
    )

    def __init__(
        self,
        gw: Gateway,
        client_ws: web.WebSocketResponse,
        candidate: Candidate,
        secrets: Secrets,
        upstream_ws: aiohttp.ClientWebSocketResponse,
    ) -> None:
        self.gw, self.client_ws, self.candidate = gw, client_ws, candidate
        self.secrets, self.upstream_ws = secrets, upstream_ws
        self.pending: deque[Envelope] = deque()  # sent, not yet answered: in order
        self.live: dict[str, Envelope] = {}  # answered with response.created, by response id
        self.last: Envelope | None = None  # the response a successor is charged like
        self.present = True  # the client still takes messages
        self.closed = False  # the upstream socket ended
        self.cutting = False
        self.pump: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        gw: Gateway,
        client_ws: web.WebSocketResponse,
        ctx: RequestContext,
        env: Envelope,
        headers: Mapping[str, str],
    ) -> NativeLink:
        """Connect to the first upstream of `ctx`'s plan with its next healthy key."""
        client = ctx.plan[0]
        index = client.key_order()[0]
        for i in client.key_order():
            if gw.health.usable(client.name, client.key_ids[i], gw.health.clock()):
                index = i
                break
        candidate = Candidate(client, index)
        sent = request_headers(headers.items(), {"x-request-id": env.request_id})
        for name in ("content-type", "accept"):
            sent.popall(name, None)
        sent.update(client.auth_header(candidate.key))
        started = time.perf_counter()
        try:
            upstream_ws = await client.websocket(turn.TARGET, sent, MAX_UPSTREAM_MESSAGE)
        except errors.GatewayError as e:
            env.outcome.attempts.append(
                Attempt(client.name, started, e.status, False, time.perf_counter(), candidate.kid)
            )
            if e.status in (401, 403):
                gw.health.refused(client.name, candidate.kid)
            else:
                gw.health.failed(client.name, candidate.kid)
            raise
        gw.health.succeeded(client.name, candidate.kid)
        client.hold()  # a reload that replaces this upstream closes it after this link
        link = cls(gw, client_ws, candidate, ctx.policy.secrets, upstream_ws)
        link.pump = asyncio.get_running_loop().create_task(link._relay())
        gw.track(link)
        return link

    @property
    def name(self) -> str:
        return self.candidate.client.name

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.live)

    async def create(self, env: Envelope, ctx: RequestContext, message: str | bytes) -> None:
        """Send an admitted `response.create` up; its response ends in the relay."""
        client = self.candidate.client
        mapped = client.cfg.upstream_model(ctx.model)
        data = message.encode() if isinstance(message, str) else message
        if mapped is not None:
            data = with_model(data, mapped)
        out = env.outcome
        out.streamed = True
        out.client_span = client_span(self.gw.tracing, env, ctx, client)
        out.attempts.append(Attempt(client.name, time.perf_counter(), key_id=self.candidate.kid))
        if self.closed:
            raise errors.upstream_unavailable(client.name)
        self.pending.append(env)
        self.last = env
        try:
            await self.upstream_ws.send_str(data.decode("utf-8", "replace"))
        except (ConnectionError, RuntimeError):
            if all(e is not env for e in self.pending):
                return  # the upstream closed while this was sent: the relay ended it
            self.pending.remove(env)
            raise errors.upstream_unavailable(client.name) from None
        out.attempts[-1].reached = True

    async def forward(self, message: str | bytes) -> bool:
        """Send any other client event up as it is; False when the upstream socket is gone."""
        if self.closed:
            return False
        try:
            if isinstance(message, str):
                await self.upstream_ws.send_str(message)
            else:
                await self.upstream_ws.send_bytes(message)
        except (ConnectionError, RuntimeError):
            return False
        return True

    def cut(self) -> None:
        """A graceful stop ran out of time: end what runs here now."""
        self.cutting = True
        self.gw.spawn(self.upstream_ws.close())

    async def close(self, within: float) -> None:
        """The client connection ends: let responses under way reach their terminal events
        (read for their usage, at most `within` seconds), then close the upstream socket."""
        self.present = False
        if self.busy and self.pump is not None:
            try:
                async with asyncio.timeout(within):
                    while self.busy and not self.closed:  # noqa: ASYNC110
                        await asyncio.sleep(0.02)
            except TimeoutError:
                pass
        await self.upstream_ws.close()
        if self.pump is not None:
            await asyncio.shield(self.pump)
        await self.candidate.client.release()

    async def _relay(self) -> None:
        idle = self.candidate.client.cfg.timeouts.idle
        try:
            while True:
                try:
                    async with asyncio.timeout(idle if self.busy else None):
                        msg = await self.upstream_ws.receive()
                except TimeoutError:
                    break  # a response under way went quiet for longer than `idle`
                if msg.type == WSMsgType.TEXT:
                    data: bytes = msg.data.encode()
                elif msg.type == WSMsgType.BINARY:
                    data = msg.data
                else:
                    break
                data = mask_body(data, self.secrets)
                await self._deliver(data if msg.type == WSMsgType.BINARY else data.decode())
                self._observe(data)
        finally:
            self.closed = True
            await self._interrupted()
            self.gw.streams.discard(self)

    async def _deliver(self, message: str | bytes) -> None:
        if not self.present or self.client_ws.closed:
            self.present = False
            return
        idle = self.candidate.client.cfg.timeouts.idle
        try:
            async with asyncio.timeout(idle):
                if isinstance(message, str):
                    await self.client_ws.send_str(message)
                else:
                    await self.client_ws.send_bytes(message)
        except (TimeoutError, *CLIENT_GONE):
            self.present = False

    def _observe(self, data: bytes) -> None:
        head = data[:80]
        if b'"type"' not in head:
            return
        if any(kind in head for kind in _OUTPUT_EVENTS):
            for env in self.live.values():
                if env.outcome.ttft is None:
                    env.outcome.ttft = time.perf_counter() - env.started
            return
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        response = event.get("response")
        rid = response.get("id") if isinstance(response, dict) else None
        if kind == "response.created" and isinstance(rid, str):
            self._created(rid)
        elif kind in events.TERMINAL and isinstance(rid, str) and isinstance(response, dict):
            self._ended(rid, event, response)
        elif kind == "error" and self.pending:
            self._refused(self.pending.popleft(), event)

    def _created(self, rid: str) -> None:
        if rid in self.live:
            return
        env = self.pending.popleft() if self.pending else self._successor()
        if env is None:
            return
        out = env.outcome
        out.status, out.response_id = 200, rid
        out.attempts[-1].status = 200
        self.live[rid] = env
        self.gw.owners[rid] = (env.ctx.team if env.ctx else "", self.name)

    def _successor(self) -> Envelope | None:
        """A response the upstream started on its own: charged like the one before it."""
        parent = self.last
        if parent is None or parent.ctx is None:
            return None
        env = turn.begin(self.gw, {})
        env.principal, env.model = parent.principal, parent.model
        env.policy = self.gw.policy.hold()
        env.ctx = parent.ctx
        out = env.outcome
        out.streamed = True
        out.attempts.append(
            Attempt(self.name, time.perf_counter(), reached=True, key_id=self.candidate.kid)
        )
        self.last = env
        return env

    def _ended(self, rid: str, event: dict[str, Any], response: dict[str, Any]) -> None:
        env = self.live.pop(rid, None)
        if env is None:
            return
        out = env.outcome
        out.usage = usage_from_body(event)
        model = response.get("model")
        if isinstance(model, str):
            out.response_model = model
        out.finish_reasons = (finish_reason(response),)
        if event.get("type") == "response.failed":
            out.error = out.error or "response_failed"
        self._end(env)

    def _refused(self, env: Envelope, event: dict[str, Any]) -> None:
        """The upstream answered a create with an `error`: nothing was generated."""
        out = env.outcome
        status = event.get("status")
        detail = event.get("error") if isinstance(event.get("error"), dict) else event
        code = detail.get("code") if isinstance(detail, dict) else None
        out.status = status if isinstance(status, int) and status >= 400 else 400
        out.attempts[-1].status = out.status
        out.attempts[-1].reached = False
        out.error = code if isinstance(code, str) else "upstream_error"
        self._end(env)

    async def _interrupted(self) -> None:
        """The upstream socket ended with responses under way: each gets the contract's error
        event and is charged its estimate."""
        waiting = [*self.pending, *self.live.values()]
        self.pending.clear()
        self.live.clear()
        for env in waiting:
            out = env.outcome
            out.status = out.status or 502
            code = "shutting_down" if self.cutting else "upstream_stream_interrupted"
            out.error = out.error or code
            message = (
                "The gateway shut down during this response."
                if self.cutting
                else "The upstream WebSocket closed before the response ended."
            )
            error = errors.GatewayError(502, "server_error", code, message)
            await self._deliver(events.error_event(error))
            if not self.cutting:
                self.gw.metrics.upstream_errors.labels(self.name, "stream_interrupted").inc()
            self._end(env)

    def _end(self, env: Envelope) -> None:
        attempt = env.outcome.attempts[-1] if env.outcome.attempts else None
        if attempt is not None:
            attempt.ended = time.perf_counter()
        self.gw.spawn(turn.end(self.gw, env))
