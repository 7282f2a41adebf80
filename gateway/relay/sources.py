"""Where an answer comes from: the upstream (a whole JSON body, an SSE stream, other bytes),
a cache entry, or a flight being led by an identical request.

Upstream sources apply the filters that must act before the client sees a byte (masking an
echoed upstream key) and keep the upstream's timeouts; the relay only moves bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp

from gateway import errors
from gateway.cache.flight import FlightLike
from gateway.context import Outcome
from gateway.masking import Secrets, StreamMasker, mask_body, mask_headers
from gateway.sse_masking import SSEMasker
from gateway.stream_watch import StreamWatch
from gateway.telemetry.metrics import Metrics
from gateway.upstream.headers import response_headers
from gateway.usage_chunk import UsageChunkFilter

UPSTREAM_BROKEN = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)
POST_TERMINAL_GRACE = 1.0  # seconds an upstream may keep a finished stream open
NEVER = float("inf")


def client_headers(
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


@dataclass(frozen=True, slots=True)
class Answer:
    """An upstream's answer as a source reads it."""

    up: aiohttp.ClientResponse
    headers: Mapping[str, str]  # the client's, made by `client_headers`
    out: Outcome
    idle: float  # the upstream's idle timeout
    metrics: Metrics
    secrets: Secrets


class _Upstream:
    """Reading one upstream body, each chunk within `idle` seconds (idle time, not total)."""

    __slots__ = (
        "_reading",
        "aborted",
        "complete",
        "headers",
        "idle",
        "metrics",
        "out",
        "secrets",
        "status",
        "up",
        "upstream",
    )

    whole = False

    def __init__(self, answer: Answer) -> None:
        self.up, self.headers, self.out = answer.up, answer.headers, answer.out
        self.idle, self.metrics, self.secrets = answer.idle, answer.metrics, answer.secrets
        self.status = answer.up.status
        self.upstream = answer.out.upstream
        self.complete = False
        self.aborted = False
        self._reading: asyncio.Timeout | None = None  # the read under way, if any

    async def _chunk(self, within: float) -> bytes:
        """The next chunk within `within` seconds (idle time, not total time)."""
        content = self.up.content
        chunk = content.read_nowait()  # what has arrived already: no timer, no wait
        if chunk or content.at_eof():
            return chunk
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(within) as self._reading:
                return await content.readany()
        finally:
            self._reading = None
            self.out.upstream_wait += time.perf_counter() - t0

    def tail(self) -> bytes:
        return b""

    def ending(self) -> bytes:
        return b""


class UpstreamWhole(_Upstream):
    """A JSON body: read whole (usage and cacheability come from it), then masked."""

    __slots__ = ()
    whole = True

    async def read(self) -> bytes:
        parts: list[bytes] = []
        try:
            while chunk := await self._chunk(self.idle):
                parts.append(chunk)
        except TimeoutError:
            raise errors.upstream_timeout(self.upstream, self.idle) from None
        except UPSTREAM_BROKEN:
            raise errors.upstream_unavailable(self.upstream, reached=True) from None
        self.complete = True
        return mask_body(parts[0] if len(parts) == 1 else b"".join(parts), self.secrets)


class UpstreamRaw(_Upstream):
    """Any other body (audio, files, text errors): chunk by chunk, masked; nobody needs what
    is left once the client is gone."""

    __slots__ = ("masker", "present")

    def __init__(self, answer: Answer, present: Callable[[], bool]) -> None:
        super().__init__(answer)
        self.masker = StreamMasker(answer.secrets)
        self.present = present

    async def read(self) -> bytes:
        while self.present():
            try:
                chunk = await self._chunk(self.idle)
            except (TimeoutError, *UPSTREAM_BROKEN):
                self.out.error = "upstream_body_interrupted"
                self.metrics.upstream_errors.labels(self.upstream, "body_interrupted").inc()
                self.aborted = True  # the body is incomplete: the client must not take it
                return b""
            if not chunk:
                self.complete = True
                return b""
            if out := self.masker.feed(chunk):
                return out
        return b""

    def tail(self) -> bytes:
        return self.masker.flush() if self.complete else b""


class UpstreamStream(_Upstream):
    """An SSE stream, read to its end. When every client has gone it is still read, up to
    `drain` seconds, so that the real usage is recorded; after its terminal event the upstream
    gets `POST_TERMINAL_GRACE` seconds to end it. A graceful stop may `cut` it."""

    __slots__ = (
        "_terminal",
        "broken",
        "cutting",
        "deadline",
        "drain",
        "expects_terminal",
        "hold",
        "masker",
        "present",
        "summary",
        "wants_rest",
        "watch",
    )

    def __init__(
        self,
        answer: Answer,
        *,
        drain: float,
        watch: StreamWatch,
        present: Callable[[], bool],
        wants_rest: Callable[[], bool],
        expects_terminal: bool,
        hide_usage: bool = False,
    ) -> None:
        super().__init__(answer)
        self.masker = SSEMasker(answer.secrets)
        # a Chat stream's usage chunk its client did not ask for: read, never sent on
        self.hold = UsageChunkFilter() if hide_usage else None
        self.drain, self.watch, self.summary = drain, watch, watch.summary
        self.present, self.wants_rest = present, wants_rest
        self.expects_terminal = expects_terminal
        self.broken: str | None = None
        self.cutting = False  # a graceful stop ran out of time: end the stream now
        self.deadline = NEVER  # after a terminal event, or once every client left
        self._terminal = False

    def cut(self) -> None:
        """End this stream now, with the contract's error event (a graceful stop calls it
        when `drain_timeout` has passed)."""
        self.cutting = True
        if self._reading is not None:
            self._reading.reschedule(-1.0)  # a deadline in the past: the read ends at once

    async def read(self) -> bytes:
        summary = self.summary
        loop = asyncio.get_running_loop()
        if summary.done:
            return b""  # nothing follows [DONE]
        if summary.terminal and not self._terminal:
            self._terminal = True
            self.deadline = loop.time() + POST_TERMINAL_GRACE
        while True:
            if self.cutting:
                self.broken = "the gateway is shutting down"
                return b""
            now = loop.time()
            if not self.present():
                if summary.terminal and not self.wants_rest():
                    return b""  # the usage is in: no one is left to read the rest
                if self.deadline == NEVER:
                    self.deadline = now + self.drain
            elif not summary.terminal:
                self.deadline = NEVER
            timeout = min(self.idle, self.deadline - now)
            if timeout <= 0:
                if not summary.terminal:
                    self.broken = "drain timeout"
                return b""
            try:
                chunk = await self._chunk(timeout)
            except TimeoutError:
                if self.cutting:
                    self.broken = "the gateway is shutting down"
                elif not summary.terminal and self.deadline - loop.time() > 0:
                    self.broken = "upstream idle timeout"
                elif not summary.terminal:
                    self.broken = "drain timeout"
                return b""
            except UPSTREAM_BROKEN:
                self.broken = "upstream closed the stream"
                return b""
            if not chunk:
                return b""
            out = self.masker.feed(chunk)
            if self.hold is not None:
                out = self._held(out)
            if out:
                return out

    def _held(self, data: bytes) -> bytes:
        hold = self.hold
        assert hold is not None
        out = hold.feed(data)
        if hold.withheld:
            for block in hold.withheld:
                self.watch.aside(block)
            hold.withheld.clear()
        return out

    def tail(self) -> bytes:
        """What the filters held back, as the stream ended."""
        rest = self.masker.flush()
        if self.hold is not None:
            rest = self._held(rest)
            rest += self.hold.flush()
            self._held(b"")  # what the flush withheld, read for its usage
        return rest

    def ending(self) -> bytes:
        """After the tail: the contract's error event when the stream broke before its
        terminal event (the decoder has seen everything sent, to end a partial event first)."""
        summary = self.summary
        if not summary.terminal and self.broken is None and self.expects_terminal:
            self.broken = "upstream ended the stream before a terminal event"
        self.complete = self.broken is None
        if self.broken is None or summary.terminal or self.status != 200:
            return b""
        code, message = "upstream_stream_interrupted", f"The upstream stream broke: {self.broken}."
        if self.cutting:  # the upstream did nothing wrong: the gateway is stopping
            code, message = "shutting_down", "The gateway shut down during this stream."
            self.out.error = "shutting_down"
        elif self.broken != "drain timeout":  # not the upstream's fault: nobody was reading
            self.out.error = self.out.error or code
            self.metrics.upstream_errors.labels(self.upstream, "stream_interrupted").inc()
        return self.watch.terminator() + errors.stream_interrupted_event(
            summary.next_sequence, message, code
        )


class EntrySource:
    """A stored answer: a cache hit, or the cacheable result of a JSON flight."""

    __slots__ = ("body", "headers", "status")
    whole = True
    complete = True
    aborted = False

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    async def read(self) -> bytes:
        return self.body

    def tail(self) -> bytes:
        return b""

    def ending(self) -> bytes:
        return b""


class FlightSource:
    """A streamed flight, followed from its first chunk at this client's own pace."""

    __slots__ = ("_chunks", "complete", "flight", "headers", "status")
    whole = False
    aborted = False

    def __init__(self, flight: FlightLike, status: int, headers: Mapping[str, str]) -> None:
        self.flight, self.headers, self.status = flight, headers, status
        self._chunks = flight.follow()
        self.complete = False

    async def read(self) -> bytes:
        async for chunk in self._chunks:
            return chunk
        self.complete = True
        return b""

    def tail(self) -> bytes:
        return b""

    def ending(self) -> bytes:
        return b""
