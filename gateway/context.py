"""What one request is and what became of it.

- `Envelope`: made by the envelope middleware for every request: its id, trace and start;
  the pipeline adds who asked, who it is for (`attribution`, read in the parse step, so that
  a request refused after it is attributed too) and, once admitted, the `RequestContext`.
- `RequestContext`: frozen at admission. Principal, the policy snapshot it runs under, route,
  model, body and the attempt plan. No step after admission reads live settings.
- `Outcome`: what happened, written as it happens: by the cache step (`cache`, `saved`),
  the reservation (`reservation`), each attempt (`attempts`), the relay (`status`, `error`,
  `response`) and the usage tap (`usage`, `ttft`, the response's id and model). `finish`
  reads it once, at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.trace import Span

from gateway import ids
from gateway.attribution import NONE, Attribution
from gateway.auth import Principal
from gateway.budget.store import Reservation
from gateway.capture.tap import CaptureTap
from gateway.policy import Policy
from gateway.routes import Route
from gateway.schema import Secret
from gateway.upstream.client import UpstreamClient
from gateway.usage import Usage


@dataclass(frozen=True, slots=True)
class Candidate:
    """One way to answer a request: an upstream and the key to use there."""

    client: UpstreamClient
    index: int  # the key's place in the upstream's pool

    @property
    def key(self) -> Secret | None:
        return self.client.keys[self.index]

    @property
    def kid(self) -> str:
        """The key as it may be shown ("" for an upstream without a key)."""
        return self.client.key_ids[self.index]


@dataclass(frozen=True, slots=True)
class RequestContext:
    method: str
    route: Route
    target: str  # path and query, sent upstream as they are
    principal: Principal
    policy: Policy
    model: str  # "" when the request names none
    body: bytes  # as the client sent it
    send: bytes  # as the upstream gets it
    parsed: Any  # the body's JSON (a dict) when it is JSON
    stream: bool  # the client asked for a stream
    hide_usage: bool  # the client did not ask for the usage chunk the gateway asked for
    output_estimate: int  # most output tokens a metered request can produce
    plan: tuple[UpstreamClient, ...]  # the upstreams that may answer, tried in this order

    @property
    def team(self) -> str:
        return self.principal.team.name

    @property
    def metered(self) -> bool:
        """A generation: its usage is charged."""
        return self.route.metered and self.method == "POST" and bool(self.model)

    @property
    def cacheable(self) -> bool:
        return self.route.cacheable and self.method == "POST"

    @property
    def creates_response(self) -> bool:
        return self.route.creates_response and self.method == "POST"


@dataclass(slots=True)
class Attempt:
    """One call to an upstream."""

    upstream: str
    started: float  # perf_counter
    status: int = 0  # the upstream's HTTP status; 0 when none arrived
    reached: bool = False  # failed after the request may have reached the upstream
    ended: float = 0.0
    key_id: str = ""
    outcome: str = "ok"  # ok: its answer was relayed | retried | failed (and was the last)
    error: str = ""  # what went wrong: connect_error, timeout, or the HTTP status


@dataclass(slots=True)
class Outcome:
    status: int = 0
    error: str | None = None
    first_byte: float = 0.0  # perf_counter when the answer's head went out; 0: not yet
    streamed: bool = False  # the answer is an SSE stream
    cache: str = ""  # hit | miss | bypass | coalesced | "" (not cacheable)
    saved: Usage | None = None  # a cache hit or coalesced answer: what it would have cost
    reservation: Reservation | None = None
    # held before retrying attempts the upstream may have billed: released, unspent, at the end
    more_reservations: list[Reservation] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    usage: Usage | None = None
    ttft: float | None = None  # seconds from start to the first output event
    response_id: str | None = None
    response_model: str | None = None
    finish_reasons: tuple[str, ...] = ()
    upstream_wait: float = 0.0  # seconds spent waiting on the upstream or the client
    response: web.StreamResponse | None = None  # headers sent: no other answer possible
    client_span: Span | None = None
    capture: CaptureTap | None = None  # the request may be captured: its tap

    def head(self, status: int) -> None:
        """The answer's status is chosen and its head goes out now (the first one counts)."""
        self.status = status
        if not self.first_byte:
            self.first_byte = time.perf_counter()

    @property
    def upstream(self) -> str:
        return self.attempts[-1].upstream if self.attempts else ""

    @property
    def upstream_status(self) -> int:
        return self.attempts[-1].status if self.attempts else 0


_SANE_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


def request_id(sent: str | None) -> str:
    """A sane client-sent id is kept; anything else gets one of ours."""
    # not one made of dots only: `.` and `..` are no path segment an admin URL can carry
    if sent and len(sent) <= 128 and _SANE_ID_CHARS.issuperset(sent) and sent.strip("."):
        return sent
    return ids.request_id()


@dataclass(slots=True)
class Envelope:
    request_id: str
    trace_id: str
    span: Span | None
    sampled: bool  # the trace is exported: span attributes and exemplars are worth making
    route: Route
    method: str
    started: float = field(default_factory=time.perf_counter)
    transport: str = "http"  # http | websocket
    replay_of: str = ""  # the request id this one replays (`gateway.replay`)
    policy: Policy | None = None  # the snapshot the request runs under, held to its end
    principal: Principal | None = None
    model: str = ""  # the requested model, once read
    attribution: Attribution = NONE  # user and tags, once the request is parsed (redacted)
    ctx: RequestContext | None = None
    outcome: Outcome = field(default_factory=Outcome)

    def headers(self) -> dict[str, str]:
        """The headers every answer of the gateway carries; once upstreams were called, also
        which answered (or was called last) and how many calls there were."""
        out = {"x-request-id": self.request_id, "x-gateway-trace-id": self.trace_id}
        attempts = self.outcome.attempts
        if attempts:
            out["x-gateway-upstream"] = attempts[-1].upstream
            out["x-gateway-attempts"] = str(len(attempts))
        return out
