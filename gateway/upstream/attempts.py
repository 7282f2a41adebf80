"""Running a request's attempt plan: each candidate (an upstream and a key) gets exactly one
call, in order, until one answers: a candidate that could not be reached at all passes the
request to the next (a route's fallback upstream). This loop is where retries go."""

from __future__ import annotations

import time
from collections.abc import Mapping

import aiohttp

from gateway.context import Attempt, Candidate, Envelope, Outcome, RequestContext
from gateway.errors import GatewayError
from gateway.jsonbody import with_model
from gateway.telemetry.genai import client_span
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tracing import Tracing
from gateway.upstream.client import UpstreamClient
from gateway.upstream.headers import request_headers


async def run(
    tracing: Tracing,
    metrics: Metrics,
    env: Envelope,
    ctx: RequestContext,
    incoming: Mapping[str, str],
) -> tuple[aiohttp.ClientResponse, Candidate]:
    """The first answer of the plan's candidates; a candidate that could not be reached at
    all passes the request to the next one. Raises the last candidate's error."""
    out = env.outcome
    last = len(ctx.plan) - 1
    for i, candidate in enumerate(ctx.plan):
        try:
            up = await attempt(tracing, metrics, env, ctx, out, candidate, incoming)
            return up, candidate
        except GatewayError as e:
            if i == last or e.reached:  # one the upstream may have billed is not repeated
                raise
    raise AssertionError("an admitted request has a plan")


def body_for(ctx: RequestContext, client: UpstreamClient) -> bytes:
    """The body as this upstream gets it: its `model_map` renames the model."""
    mapped = client.cfg.upstream_model(ctx.model) if ctx.model else None
    return ctx.send if mapped is None else with_model(ctx.send, mapped)


async def attempt(
    tracing: Tracing,
    metrics: Metrics,
    env: Envelope,
    ctx: RequestContext,
    out: Outcome,
    candidate: Candidate,
    incoming: Mapping[str, str],
) -> aiohttp.ClientResponse:
    client = candidate.client
    if out.client_span is not None:  # the attempt before this one
        out.client_span.end()
    span = out.client_span = client_span(tracing, env, ctx, client)
    headers = request_headers(
        incoming.items(), {"x-request-id": env.request_id, **client.auth_header(candidate.key)}
    )
    tracing.inject(span, headers)
    record = Attempt(client.name, time.perf_counter())
    out.attempts.append(record)
    try:
        up = await client.send(ctx.method, ctx.target, headers, body_for(ctx, client))
    except GatewayError as e:
        record.reached = e.reached
        metrics.upstream_errors.labels(client.name, e.code).inc()
        raise
    finally:
        out.upstream_wait += time.perf_counter() - record.started
    record.status = up.status
    if up.status >= 500:
        metrics.upstream_errors.labels(client.name, f"http_{up.status}").inc()
    return up
