"""Native mode: a client connection's messages relayed to the upstream's own WebSocket.

One upstream WebSocket per client connection and upstream, opened with the upstream's key
(never the client's). Client messages go up unchanged once admitted (`response.steer`
included); upstream messages come down unchanged but for masked keys, which are followed
across messages as a stream's masker follows them across events.

The upstream answers what it is sent in order: a `response.create` with `response.created`
(or an `error`), a steer with `response.steer.*` (or an `error`). So each message sent up
waits in `awaiting` for its answer, and an `error` answers the oldest: a create it answers
is refused (nothing was generated, nothing is charged); any other is the client's business.
A response ends at its terminal event, which carries its usage. A response the upstream
starts on its own (a steered response's successor) is recorded too, and charged to the team
of the response before it through a reservation of nothing, so its usage still reaches the
budget.

At most `MAX_UNDER_WAY` responses run on one link: past that a create waits, and with it the
connection's reading. The relay reads the next upstream message only once the client took the
last one (within the upstream's `idle` seconds), so a slow client holds the upstream back; a
client that missed that deadline gets nothing more of the responses under way (they are read
on for their usage) but does get the next one it asks for. An upstream that sends nothing for
`idle` seconds while responses are under way, or that does not take a message within `idle`
seconds, is given up: its socket is closed and each response under way gets the contract's
`upstream_stream_interrupted` error event and is charged its estimate.
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
from gateway.budget.admission import zero_hold
from gateway.context import Attempt, Candidate, Envelope, RequestContext
from gateway.jsonbody import with_model
from gateway.masking import Secrets, mask_body
from gateway.relay.sink import CLIENT_GONE
from gateway.runtime import Gateway
from gateway.sse_masking import SSEMasker
from gateway.telemetry.genai import client_span
from gateway.upstream.attempts import note_answer
from gateway.upstream.headers import request_headers
from gateway.usage import finish_reason, usage_from_body
from gateway.websocket import events, turn
from gateway.websocket.sink import EventCut

MAX_UPSTREAM_MESSAGE = 64 * 1024 * 1024  # a whole response object may ride in one message
MAX_UNDER_WAY = 8  # responses one link runs at once (sent and not yet ended)
_OUTPUT_EVENTS = (b"response.output_text.delta", b"response.function_call_arguments.delta")
_STEER_ANSWERS = b'"response.steer.'


class NativeLink:
    """One upstream WebSocket of one client connection, and the responses running on it."""

    __slots__ = (
        "awaiting",
        "candidate",
        "client_ws",
        "closed",
        "cutting",
        "gw",
        "heard",
        "last",
        "live",
        "masker",
        "present",
        "pump",
        "room",
        "secrets",
        "splitter",
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
        # sent up and not yet answered, in order: a create's envelope, or None for any other
        self.awaiting: deque[Envelope | None] = deque()
        self.live: dict[str, Envelope] = {}  # answered with response.created, by response id
        self.last: Envelope | None = None  # the response a successor is charged like
        self.masker = SSEMasker(secrets)  # upstream text messages, framed as SSE events
        self.splitter = EventCut()
        self.present = True  # the client takes the messages of the responses under way
        self.closed = False  # the upstream socket ended
        self.cutting = False
        # the upstream's last sign of life, or when it was last asked something while idle
        self.heard = time.monotonic()
        self.room = asyncio.Event()  # a response ended: a waiting create may go
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
        """Connect to the first upstream of `ctx`'s plan with its next usable key."""
        client = ctx.plan[0]
        health = gw.health
        order = client.key_order()
        index = next(
            (i for i in order if health.usable(client.name, client.key_ids[i], health.clock())),
            order[0],
        )
        candidate = Candidate(client, index)
        sent = request_headers(headers.items(), {"x-request-id": env.request_id})
        for name in ("content-type", "accept"):
            sent.popall(name, None)
        sent.update(client.auth_header(candidate.key))
        started = time.perf_counter()
        health.begin(client.name, candidate.kid, health.clock())
        try:
            upstream_ws = await client.websocket(turn.TARGET, sent, MAX_UPSTREAM_MESSAGE)
        except errors.GatewayError as e:
            env.outcome.attempts.append(
                Attempt(client.name, started, e.status, False, time.perf_counter(), candidate.kid)
            )
            _judge_handshake(gw, candidate, e)
            raise
        health.succeeded(client.name, candidate.kid)
        client.hold()  # a reload that replaces this upstream closes it after this link
        link = cls(gw, client_ws, candidate, ctx.policy.secrets, upstream_ws)
        link.pump = asyncio.get_running_loop().create_task(link._relay())
        gw.track(link)
        return link

    @property
    def name(self) -> str:
        return self.candidate.client.name

    @property
    def idle(self) -> float:
        return self.candidate.client.cfg.timeouts.idle

    @property
    def under_way(self) -> int:
        return len(self.live) + sum(1 for e in self.awaiting if e is not None)

    @property
    def busy(self) -> bool:
        return bool(self.awaiting or self.live)

    async def create(self, env: Envelope, ctx: RequestContext, message: str | bytes) -> None:
        """Send an admitted `response.create` up; its response ends in the relay. Waits while
        `MAX_UNDER_WAY` responses run here; raises the GatewayError of an upstream that is gone
        or does not take it."""
        while self.under_way >= MAX_UNDER_WAY and not self.closed:
            self.room.clear()
            await self.room.wait()
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
        if not self.client_ws.closed:
            self.present = True  # a client that missed a deadline before asks again
        if not self.busy:
            self.heard = time.monotonic()  # the upstream's time for this one starts now
        self.awaiting.append(env)
        self.last = env
        if not await self._send(data.decode("utf-8", "replace")):
            if env in self.awaiting:
                self.awaiting.remove(env)
                raise errors.upstream_unavailable(client.name)
            return  # the relay ended it already, as the upstream went away
        out.attempts[-1].reached = True

    async def forward(self, message: str | bytes) -> bool:
        """Send any other client event up as it is; False when the upstream socket is gone."""
        if self.closed:
            return False
        self.awaiting.append(None)
        return await self._send(message)

    async def _send(self, message: str | bytes) -> bool:
        """One message up within `idle` seconds; an upstream that does not take it is given
        up (its socket closed, so the relay ends what runs here)."""
        try:
            async with asyncio.timeout(self.idle):
                if isinstance(message, str):
                    await self.upstream_ws.send_str(message)
                else:
                    await self.upstream_ws.send_bytes(message)
        except TimeoutError:
            self._abandon()
            return False
        except (ConnectionError, RuntimeError):
            return False
        return True

    def _abandon(self) -> None:
        """Close the upstream socket now, without waiting on a peer that does not answer."""
        self.closed = True
        self.gw.spawn(self.upstream_ws.close())
        pump = self.pump
        if pump is not None and not pump.done():
            pump.cancel()

    def cut(self) -> None:
        """A graceful stop ran out of time: end what runs here now."""
        self.cutting = True
        self._abandon()

    async def close(self, within: float) -> None:
        """The client connection ends: let responses under way reach their terminal events
        (delivered to a client still there, and read for their usage; at most `within`
        seconds), then close the upstream socket."""
        if self.busy and not self.closed:
            try:
                async with asyncio.timeout(within):
                    while self.busy and not self.closed:
                        self.room.clear()
                        await self.room.wait()
            except TimeoutError:
                pass
        await self.upstream_ws.close()
        if self.pump is not None:
            await asyncio.wait([self.pump])  # however it ended, cancelled included
        await self.candidate.client.release()

    async def _relay(self) -> None:
        try:
            while True:
                try:
                    msg = await self._receive()
                except TimeoutError:
                    break  # responses under way, and nothing from the upstream for `idle`
                if msg.type == WSMsgType.TEXT:
                    await self._text(msg.data.encode())
                elif msg.type == WSMsgType.BINARY:
                    await self._deliver(mask_body(msg.data, self.secrets))
                else:
                    break
            if rest := self.masker.flush():
                for data in self.splitter.feed(rest + b"\n\n"):
                    await self._message(data)
        finally:
            self.closed = True
            await self._interrupted()
            self.gw.streams.discard(self)

    async def _receive(self) -> aiohttp.WSMessage:
        """The next upstream message; TimeoutError when responses are under way and the
        upstream has said nothing for `idle` seconds since the last of them was sent or the
        last message came (an idle link waits as long as it likes, looking again each `idle`
        seconds for a response sent meanwhile)."""
        while True:
            wait = self.idle
            if self.busy:
                wait = self.heard + self.idle - time.monotonic()
                if wait <= 0:
                    raise TimeoutError
            try:
                async with asyncio.timeout(wait):
                    msg = await self.upstream_ws.receive()
            except TimeoutError:
                continue
            self.heard = time.monotonic()
            return msg

    async def _text(self, data: bytes) -> None:
        """An upstream text message, through the masker (framed as an SSE event, so a key
        split over two messages is masked as one split over two events is)."""
        for event in self.splitter.feed(self.masker.feed(b"data: " + data + b"\n\n")):
            await self._message(event)

    async def _message(self, data: bytes) -> None:
        await self._deliver(data.decode("utf-8", "replace"))
        self._observe(data)

    async def _deliver(self, message: str | bytes) -> None:
        if not self.present:
            return
        if self.client_ws.closed:
            self.present = False
            return
        try:
            async with asyncio.timeout(self.idle):
                if isinstance(message, str):
                    await self.client_ws.send_str(message)
                else:
                    await self.client_ws.send_bytes(message)
        except (TimeoutError, *CLIENT_GONE):
            self.present = False
            for env in self._under_way():
                env.outcome.error = env.outcome.error or "client_disconnected"

    def _under_way(self) -> list[Envelope]:
        return [*(e for e in self.awaiting if e is not None), *self.live.values()]

    def _observe(self, data: bytes) -> None:
        head = data[:80]
        if any(kind in head for kind in _OUTPUT_EVENTS):
            now = time.perf_counter()
            for env in self.live.values():
                if env.outcome.ttft is None:
                    env.outcome.ttft = now - env.started
            return
        if _STEER_ANSWERS in head:
            self._answered_other()
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
        elif kind == "error" and self.awaiting:
            answered = self.awaiting.popleft()
            if answered is not None:
                self._refused(answered, event)
        elif isinstance(kind, str) and kind.startswith("response.steer."):
            self._answered_other()

    def _answered_other(self) -> None:
        """A forwarded event's answer: it waits no longer."""
        for i, waiting in enumerate(self.awaiting):
            if waiting is None:
                del self.awaiting[i]
                return

    def _created(self, rid: str) -> None:
        if rid in self.live:
            return
        env = None
        for i, waiting in enumerate(self.awaiting):
            if waiting is not None:
                env = waiting
                del self.awaiting[i]
                break
        if env is None:
            env = self._successor()
            if env is None:
                return
        out = env.outcome
        out.response_id = rid
        out.head(200)
        out.attempts[-1].status = 200
        self.live[rid] = env
        self.gw.owners.remember(rid, (env.ctx.team if env.ctx else "", self.name))

    def _successor(self) -> Envelope | None:
        """A response the upstream started on its own: charged to the team of the one before
        it, through a reservation of nothing."""
        parent = self.last
        if parent is None or parent.ctx is None:
            return None
        gw = self.gw
        env = turn.begin(gw, {})
        env.principal, env.model = parent.principal, parent.model
        env.policy = gw.policy.hold()
        env.ctx = parent.ctx
        out = env.outcome
        out.streamed = True
        team = parent.ctx.principal.team
        if team.budgets:
            out.reservation = zero_hold(team, gw.clock())
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
        waiting = self._under_way()
        self.awaiting.clear()
        self.live.clear()
        code = "shutting_down" if self.cutting else "upstream_stream_interrupted"
        message = (
            "The gateway shut down during this response."
            if self.cutting
            else "The upstream WebSocket closed before the response ended."
        )
        for env in waiting:
            out = env.outcome
            out.status = out.status or 502
            out.error = out.error or code
            await self._deliver(
                events.error_event(errors.GatewayError(502, "server_error", code, message))
            )
            if not self.cutting:
                self.gw.metrics.upstream_errors.labels(self.name, "stream_interrupted").inc()
            self._end(env)

    def _end(self, env: Envelope) -> None:
        attempt = env.outcome.attempts[-1] if env.outcome.attempts else None
        if attempt is not None:
            attempt.ended = time.perf_counter()
        self.room.set()
        self.gw.spawn(turn.end(self.gw, env))


def _judge_handshake(gw: Gateway, c: Candidate, e: errors.GatewayError) -> None:
    """What a refused handshake says of its key and upstream, as an HTTP answer would: a
    401/403 refuses the key, a 429 rests it, a 5xx or no answer is a failure; any other 4xx
    (the client's headers, say) only shows the upstream is up."""
    if e.code != "upstream_refused_websocket":
        gw.health.failed(c.client.name, c.kid)  # unreachable, or no answer in time
    else:
        note_answer(gw.health, c, e.status, e.headers)
