"""The request pipeline for /v1/*: auth → parse → route → cache → reserve → attempts → relay.

Orchestration only: each step's work lives in its own module. The envelope middleware
(`gateway.envelope`) made the request's id and span before this runs and ends every request
in `finish` after it, whatever path it took.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from functools import partial

import aiohttp
from aiohttp import web

from gateway import errors, parse, plan
from gateway.auth import Principal
from gateway.budget.admission import budget_headers, reserve
from gateway.budget.store import Reservation
from gateway.cache.lookup import Lookup, lookup
from gateway.context import Candidate, Envelope, Outcome, RequestContext
from gateway.envelope import ENVELOPE, TARGET
from gateway.models_route import list_models
from gateway.policy import Policy
from gateway.relay import answer
from gateway.relay.sink import ClientSink
from gateway.routes import Route
from gateway.runtime import GATEWAY, Gateway
from gateway.upstream import attempts
from gateway.upstream.client import UpstreamClient


async def handle(request: web.Request) -> web.StreamResponse:
    gw, env = request.app[GATEWAY], request[ENVELOPE]
    if gw.draining:
        raise errors.shutting_down()
    # read once: the request runs under this snapshot to its end, its pools held till then
    policy = env.policy = gw.policy.hold()
    principal = env.principal = policy.auth.authenticate(request.headers)
    path, query = request[TARGET]
    target = f"{path}?{query}" if query else path
    # from here a request may be captured: a refusal of its body or model is worth keeping
    env.outcome.capture = policy.capture.admit(
        principal.team.name, request.method, target, request.headers
    )
    limits = policy.settings.limits
    route = env.route
    parsed = await parse.read(request, route, limits, policy.redactor)
    env.attribution = parse.attribute(request.headers, parsed, policy.redactor)
    if route.model_list and request.method == "GET":
        return await list_models(gw, request, env, policy)
    model = env.model = "" if route.owned else parsed.model
    candidates = await plan.plan(
        policy, route, principal, model, gw.owners, gw.reports, path, parsed.previous
    )
    ctx = admitted(request.method, route, target, principal, policy, model, parsed, candidates)
    env.ctx = ctx
    found = Lookup("")
    if ctx.cacheable:
        found = await lookup(
            policy.settings.cache,
            gw.cache,
            gw.flights,
            gw.cache_counts,
            gw.metrics,
            team=ctx.team,
            upstream=candidates[0].name,
            body=parsed.json,
            top=parsed.top,
            stream=ctx.stream,
            cache_control=request.headers.get("cache-control", ""),
        )
        if found.entry is not None or found.follow is not None:
            env.outcome.cache = found.result
            return await _shared(gw, request, env, ctx, found)
    try:
        return await _call(gw, request, env, ctx, found)
    finally:
        if found.lead is not None:
            assert found.store_key is not None
            await gw.flights.land(found.store_key, found.lead)


async def _shared(
    gw: Gateway, request: web.Request, env: Envelope, ctx: RequestContext, found: Lookup
) -> web.StreamResponse:
    """An answer another request paid for: a stored one, or an identical request's."""
    out, idle = env.outcome, ctx.plan[0].cfg.timeouts.idle
    try:
        extra = {
            **env.headers(),
            "x-gateway-cache": found.result,
            **await budget_headers(gw.budget, ctx.principal.team, gw.clock()),
        }
        if found.entry is not None:
            entry = found.entry
            headers = {**dict(entry.headers), **extra}
            if found.result == "hit":
                headers["age"] = str(max(0, int(gw.clock() - entry.created_at)))
            return await answer.from_entry(request, out, entry, headers, idle)
        assert found.follow is not None
        out.streamed = True
        return await answer.from_flight(request, out, found.follow, extra, idle)
    finally:
        if found.follow is not None:
            found.follow.readers -= 1


async def _call(
    gw: Gateway, request: web.Request, env: Envelope, ctx: RequestContext, found: Lookup
) -> web.StreamResponse:
    out, team = env.outcome, ctx.principal.team
    if ctx.metered and team.budgets:
        out.reservation = await hold(gw, ctx)
    if found.result:  # a miss or a bypass is counted once its call is admitted
        out.cache = found.result
        gw.cache_counts.count(found.result, gw.metrics)
    up, candidate = await call(gw, env, ctx, request.headers)
    # an answer from further down the route is not the first upstream's to store
    store_key = found.store_key if candidate.client is ctx.plan[0] else None
    try:
        extra = env.headers()
        if out.reservation is not None:
            extra.update(await budget_headers(gw.budget, team, gw.clock()))
        if out.cache:
            extra["x-gateway-cache"] = out.cache
        sink = ClientSink(request, out, candidate.client.cfg.timeouts.idle)
        await answer.from_upstream(
            gw, sink, ctx, out, up, candidate, extra, env.started, store_key, found.lead
        )
        return sink.resp or web.Response()
    finally:
        up.release()


def admitted(
    method: str,
    route: Route,
    target: str,
    principal: Principal,
    policy: Policy,
    model: str,
    parsed: parse.Parsed,
    candidates: tuple[UpstreamClient, ...],
) -> RequestContext:
    """The request's context, frozen at admission (HTTP, a WebSocket create, a replay)."""
    metered = route.metered and method == "POST" and bool(model)
    limits = policy.settings.limits
    return RequestContext(
        method=method,
        route=route,
        target=target,
        principal=principal,
        policy=policy,
        model=model,
        body=parsed.body,
        send=parse.upstream_body(route, parsed),
        parsed=parsed.json,
        stream=parsed.stream,
        hide_usage=parse.adds_usage(route, parsed),
        output_estimate=parse.output_estimate(parsed, limits) if metered else 0,
        plan=candidates,
    )


def call(
    gw: Gateway, env: Envelope, ctx: RequestContext, headers: Mapping[str, str]
) -> Awaitable[tuple[aiohttp.ClientResponse, Candidate]]:
    """The admitted request's attempt plan, run: the answer to relay and who gave it."""
    return attempts.run(
        gw.tracing,
        gw.metrics,
        gw.health,
        gw.retry_budget,
        env,
        ctx,
        headers,
        partial(hold_more, gw, ctx, env.outcome),
    )


def hold(gw: Gateway, ctx: RequestContext, counted: bool = True) -> Awaitable[Reservation]:
    """The request's estimate, held in every window of its team (or a 429)."""
    return reserve(
        gw.budget,
        ctx.policy,
        gw.metrics,
        ctx.principal.team,
        ctx.model,
        len(ctx.body),
        ctx.output_estimate,
        gw.clock(),
        counted=counted,
    )


async def hold_more(gw: Gateway, ctx: RequestContext, out: Outcome) -> bool:
    """One more estimate before a retry of an attempt the upstream may have billed: each such
    attempt is charged one, so each must be held first (refused: no retry)."""
    if out.reservation is None:
        return True
    try:
        more = await hold(gw, ctx, counted=False)  # a retry's hold is no request refused
    except errors.GatewayError:
        return False
    out.more_reservations.append(more)
    return True
