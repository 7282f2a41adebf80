"""One request's record as it moves through the pipeline, and what is done when it ends:
settle the budget, append the ledger record, observe metrics, end the spans, log one line."""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from opentelemetry.trace import Span, Status, StatusCode

from gateway.budget.store import Reservation
from gateway.ledger.records import LedgerRecord
from gateway.usage import Usage

if TYPE_CHECKING:
    from gateway.runtime import Gateway

# Matched without regard to case: an upstream that routes case-insensitively must not be
# reached past an ownership check or a budget by `/v1/Responses/...`.
_ROUTES = tuple(
    (re.compile(pattern, re.IGNORECASE), name)
    for pattern, name in (
        (r"^/v1/responses$", "/v1/responses"),
        (r"^/v1/responses/input_tokens$", "/v1/responses/input_tokens"),
        (r"^/v1/responses/compact$", "/v1/responses/compact"),
        (r"^/v1/responses/[^/]+$", "/v1/responses/{id}"),
        (r"^/v1/responses/[^/]+/cancel$", "/v1/responses/{id}/cancel"),
        (r"^/v1/responses/[^/]+/input_items$", "/v1/responses/{id}/input_items"),
        # anything else about a stored response: refused, never passed through unchecked
        (r"^/v1/responses/", "/v1/responses/*"),
        (r"^/v1/chat/completions$", "/v1/chat/completions"),
        (r"^/v1/completions$", "/v1/completions"),
        (r"^/v1/embeddings$", "/v1/embeddings"),
        (r"^/v1/models$", "/v1/models"),
        (r"^/v1/models/.+$", "/v1/models/{model}"),
    )
)
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def route_of(path: str) -> str:
    """A bounded route template for labels and span names; never the raw path."""
    for pattern, name in _ROUTES:
        if pattern.match(path):
            return name
    return "/v1/*"


def request_id(sent: str | None) -> str:
    if sent and _SANE_ID.match(sent):
        return sent
    return "req_" + secrets.token_hex(12)


@dataclass(slots=True)
class Exchange:
    request_id: str
    method: str
    route: str
    started: float = field(default_factory=time.perf_counter)
    team: str = ""
    key_id: str = ""
    model: str = ""
    upstream: str = ""
    stream: bool = False
    status: int = 0
    cache: str = ""
    usage: Usage | None = None
    metered: bool = False  # a generation route: its usage is charged
    output_estimate: int = 0  # most output tokens a metered request can produce
    estimated: bool = False
    saved: Usage | None = None  # a cache hit or coalesced answer: what it would have cost
    ttft: float | None = None  # seconds from start to the first output event
    upstream_wait: float = 0.0  # seconds spent waiting on the upstream or the client
    upstream_started: float = 0.0
    upstream_status: int = 0
    upstream_reached: bool = False  # failed after the request may have reached the upstream
    error: str | None = None
    reservation: Reservation | None = None
    response_id: str | None = None
    response_model: str | None = None
    finish_reasons: tuple[str, ...] = ()
    request_body: Any = None
    span: Span | None = None
    client_span: Span | None = None
    trace_id: str = ""
    sampled: bool = False  # the trace is exported: metric exemplars may point at it
    creates_response: bool = False  # POST /v1/responses: its response id becomes owned
    started_response: web.StreamResponse | None = None  # headers sent: no other answer possible

    def response_headers(self) -> dict[str, str]:
        """The headers every answer of the gateway carries."""
        h = {"x-request-id": self.request_id}
        if self.trace_id:
            h["x-gateway-trace-id"] = self.trace_id
        return h


async def finish(gw: Gateway, ex: Exchange) -> None:
    """The single end of every request: nothing here may raise into the caller."""
    duration = time.perf_counter() - ex.started
    now = gw.clock()
    policy = gw.policy
    charged, cost = 0, 0.0
    if ex.metered and ex.reservation is not None:
        if ex.usage is not None:
            charged = ex.usage.total_tokens
            cost = policy.prices.cost(ex.model, ex.usage)
        elif ex.upstream_status == 200 or ex.upstream_reached:
            # the upstream (may have) worked but never told us how much: charge the estimate
            ex.estimated = True
            charged, cost = ex.reservation.tokens, ex.reservation.usd
        await gw.budget.settle(ex.reservation, charged, cost, now)
    elif ex.metered and ex.usage is not None:
        cost = policy.prices.cost(ex.model, ex.usage)
    usage = ex.usage if ex.metered else None
    shown = gw.shown(ex.model) if ex.model else ""  # never a key, never 5,000 characters
    if ex.team:
        saved = ex.saved.total_tokens if ex.saved is not None else 0
        gw.ledger.append(
            LedgerRecord(
                ts=now,
                request_id=ex.request_id,
                team=ex.team,
                key_id=ex.key_id,
                model=shown,
                upstream=ex.upstream,
                route=ex.route,
                status=ex.status,
                stream=ex.stream,
                cache=ex.cache,
                input_tokens=usage.input_tokens if usage else 0,
                cached_tokens=usage.cached_tokens if usage else 0,
                output_tokens=usage.output_tokens if usage else 0,
                reasoning_tokens=usage.reasoning_tokens if usage else 0,
                charged_tokens=charged,
                cost_usd=cost,
                estimated=ex.estimated,
                duration_ms=duration * 1000,
                ttft_ms=ex.ttft * 1000 if ex.ttft is not None else None,
                saved_tokens=saved,
                response_id=(ex.response_id or "") if ex.creates_response else "",
            )
        )
    overhead = max(0.0, duration - ex.upstream_wait)
    _observe(gw, ex, duration, overhead, usage, cost)
    _end_spans(gw, ex, usage)
    gw.log.info(
        "request",
        request_id=ex.request_id,
        trace_id=ex.trace_id,
        team=ex.team,
        model=shown,
        upstream=ex.upstream,
        route=ex.route,
        status=ex.status,
        stream=ex.stream,
        cache=ex.cache,
        input_tokens=usage.input_tokens if usage else None,
        output_tokens=usage.output_tokens if usage else None,
        duration_ms=round(duration * 1000, 3),
        ttft_ms=round(ex.ttft * 1000, 3) if ex.ttft is not None else None,
        overhead_ms=round(overhead * 1000, 3),
        error=ex.error,
    )


def _observe(
    gw: Gateway, ex: Exchange, duration: float, overhead: float, usage: Usage | None, cost: float
) -> None:
    m = gw.metrics
    model = m.model(ex.model)
    team = ex.team or "unknown"
    exemplar = {"trace_id": ex.trace_id} if ex.sampled else None
    m.requests.labels(team, model, ex.route, str(ex.status), ex.cache or "none").inc()
    m.request_duration.labels(team, model, ex.route).observe(duration, exemplar)
    m.overhead.labels(ex.route).observe(overhead, exemplar)
    if ex.ttft is not None:
        m.ttft.labels(team, model).observe(ex.ttft, exemplar)
    if ex.upstream_started and ex.upstream:
        m.upstream_duration.labels(
            ex.upstream, model, str(ex.upstream_status or ex.status)
        ).observe(time.perf_counter() - ex.upstream_started, exemplar)
    if usage is not None:
        tokens = m.tokens
        tokens.labels(team, model, "input").inc(usage.input_tokens)
        tokens.labels(team, model, "output").inc(usage.output_tokens)
        tokens.labels(team, model, "cached").inc(usage.cached_tokens)
        tokens.labels(team, model, "reasoning").inc(usage.reasoning_tokens)
    if cost:  # what was charged, a marked estimate included: the ledger and budgets agree
        m.cost.labels(team, model).inc(cost)
    if ex.saved is not None:
        m.cache_saved_tokens.labels(team, model).inc(ex.saved.total_tokens)


def _end_spans(gw: Gateway, ex: Exchange, usage: Usage | None) -> None:
    client, server = ex.client_span, ex.span
    if client is not None and client.is_recording():
        attrs: dict[str, Any] = {"gateway.team": ex.team, "gateway.cache": ex.cache or "none"}
        if ex.response_id:
            attrs["gen_ai.response.id"] = ex.response_id
        if ex.response_model:
            attrs["gen_ai.response.model"] = ex.response_model
        if ex.finish_reasons:
            attrs["gen_ai.response.finish_reasons"] = list(ex.finish_reasons)
        if usage is not None:
            attrs["gen_ai.usage.input_tokens"] = usage.input_tokens
            attrs["gen_ai.usage.output_tokens"] = usage.output_tokens
            attrs["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
            attrs["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
        if ex.ttft is not None:
            attrs["gen_ai.response.time_to_first_chunk"] = ex.ttft
        if ex.upstream_status:
            attrs["http.response.status_code"] = ex.upstream_status
        if ex.error or ex.upstream_status >= 400:
            attrs["error.type"] = ex.error or str(ex.upstream_status)
            client.set_status(Status(StatusCode.ERROR))
        client.set_attributes(attrs)
    if client is not None:
        client.end()
    if server is not None:
        if server.is_recording():
            server.set_attributes(
                {
                    "http.response.status_code": ex.status,
                    "gateway.team": ex.team,
                    "gateway.cache": ex.cache or "none",
                    "gateway.request_id": ex.request_id,
                }
            )
            if ex.status >= 500:
                server.set_attribute("error.type", ex.error or str(ex.status))
                server.set_status(Status(StatusCode.ERROR))
        server.end()
