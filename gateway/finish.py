"""The single end of every request: settle the budget, append the ledger record, observe
metrics, end the spans, write one log line. Nothing here may raise into the caller."""

from __future__ import annotations

import time
from typing import Any

from opentelemetry.trace import Status, StatusCode

from gateway.budget.charge import charge
from gateway.capture.draft import Draft
from gateway.capture.tap import SLACK
from gateway.context import Envelope
from gateway.ledger.records import LedgerRecord
from gateway.redis_state import StateUnavailable
from gateway.runtime import Gateway
from gateway.settings import UNKNOWN_TEAM
from gateway.usage import Usage


async def end(gw: Gateway, env: Envelope, counted: int) -> LedgerRecord | None:
    """A request is no longer in flight (`counted`: whether a drain waited for it); finish it.
    Never raises. Its ledger record, None when it had none (no team) or finishing failed."""
    gw.inflight -= counted
    gw.metrics.inflight.dec()
    try:
        return await finish(gw, env)
    except Exception:
        gw.log.exception("finishing a request failed", request_id=env.request_id)
        return None
    finally:
        gw.active -= 1


async def finish(gw: Gateway, env: Envelope) -> LedgerRecord | None:
    duration = time.perf_counter() - env.started
    now = gw.clock()
    out, ctx = env.outcome, env.ctx
    policy = env.policy or gw.policy
    metered = ctx is not None and ctx.metered
    usage = out.usage if metered else None
    charged, cost, estimated = 0, 0.0, False
    if env.policy is not None:
        await env.policy.release()
    if ctx is not None:
        charged, cost, estimated = charge(ctx.model, metered, out, policy.prices)
        if out.reservation is not None:
            # a request counts in `requests` windows once it reached for an upstream, as the
            # ledger rebuild counts it (attempts > 0)
            requests = 1 if out.attempts else 0
            try:
                await gw.budget.settle(out.reservation, charged, cost, now, requests)
                for more in out.more_reservations:  # the charge above covers what they held
                    await gw.budget.settle(more, 0, 0.0, now)
            except StateUnavailable:
                pass  # counted in gateway_state_errors_total; the ledger record corrects it
            except Exception:  # the record, metrics and log line still go out
                gw.log.exception("settling a reservation failed", request_id=env.request_id)
    shown = policy.shown(env.model) if env.model else ""  # never a key, never 5,000 characters
    upstream = out.upstream or (ctx.plan[0].name if ctx is not None and ctx.plan else "")
    # a request refused before it had a team (no or a wrong key) is logged and counted under
    # "unknown", but not written to the ledger: without a key nobody may add durable state
    team = env.principal.team.name if env.principal is not None else UNKNOWN_TEAM
    stream = out.streamed or (ctx is not None and ctx.stream)
    ttft_ms = out.ttft * 1000 if out.ttft is not None else None
    first_byte_ms = (out.first_byte - env.started) * 1000 if out.first_byte else None
    who = env.attribution  # redacted when it was read
    record = None
    if env.principal is not None:
        record = LedgerRecord(
            ts=now,
            request_id=env.request_id,
            team=team,
            key_id=env.principal.key_id,
            model=shown,
            upstream=upstream,
            route=env.route.name,
            status=out.status,
            stream=stream,
            cache=out.cache,
            input_tokens=usage.input_tokens if usage else 0,
            cached_tokens=usage.cached_tokens if usage else 0,
            output_tokens=usage.output_tokens if usage else 0,
            reasoning_tokens=usage.reasoning_tokens if usage else 0,
            charged_tokens=charged,
            cost_usd=cost,
            estimated=estimated,
            duration_ms=duration * 1000,
            ttft_ms=ttft_ms,
            saved_tokens=out.saved.total_tokens if out.saved is not None else 0,
            response_id=(out.response_id or "") if ctx is not None and ctx.creates_response else "",
            attempts=len(out.attempts),
            transport=env.transport,
            user=who.user,
            tags=who.tags_text,
            replay_of=env.replay_of,
            first_byte_ms=round(first_byte_ms, 3) if first_byte_ms is not None else None,
            trace_id=env.trace_id,
        )
        gw.ledger.append(record)
        if out.capture is not None:
            _capture(gw, env, now, team)
    overhead = max(0.0, duration - out.upstream_wait)
    _observe(gw, env, team, upstream, duration, overhead, usage, cost)
    _end_spans(env, team, usage)
    gw.log.info(
        "request",
        request_id=env.request_id,
        trace_id=env.trace_id,
        team=team,
        model=shown,
        upstream=upstream,
        route=env.route.name,
        status=out.status,
        stream=stream,
        transport=env.transport,
        user=who.user or None,
        tags=dict(who.tags) if who.tags else None,
        cache=out.cache,
        input_tokens=usage.input_tokens if usage else None,
        output_tokens=usage.output_tokens if usage else None,
        duration_ms=round(duration * 1000, 3),
        ttft_ms=round(ttft_ms, 3) if ttft_ms is not None else None,
        overhead_ms=round(overhead * 1000, 3),
        attempts=len(out.attempts),
        error=out.error,
        replay_of=env.replay_of or None,
    )
    return record


def _capture(gw: Gateway, env: Envelope, now: float, team: str) -> None:
    """Hand the request to the capture writer if it was sampled, or failed and failures are
    kept: references only, the writer redacts and renders. Failed: an error status, an error
    the gateway noted (a stream cut, a timeout), or an answer that did not end whole."""
    out, ctx, policy = env.outcome, env.ctx, env.policy or gw.policy
    tap = out.capture
    assert tap is not None
    failed = out.status >= 400 or out.error is not None or (tap.status > 0 and not tap.complete)
    if failed and policy.capture.errors:
        reason = "error"
    elif tap.sampled:
        reason = "sampled"
    else:
        return
    body = ctx.body if ctx is not None else None
    gw.captures.submit(
        Draft(
            request_id=env.request_id,
            ts=now,
            team=team,
            trace_id=env.trace_id,
            reason=reason,
            tap=tap,
            # a copy only past the cap: a body within it is held as it is
            body=body[: tap.cap + SLACK] if body is not None and len(body) > tap.cap else body,
            body_size=len(body) if body is not None else 0,
            status=out.status,
            error=out.error,
            streamed=out.streamed,
            started=env.started,
            ended=time.perf_counter(),
            attempts=out.attempts,
            redactor=policy.redactor,
        )
    )


def _observe(
    gw: Gateway,
    env: Envelope,
    team: str,
    upstream: str,
    duration: float,
    overhead: float,
    usage: Usage | None,
    cost: float,
) -> None:
    m, out = gw.metrics, env.outcome
    model = m.model(env.model)
    route = env.route.name
    exemplar = {"trace_id": env.trace_id} if env.sampled else None
    m.requests.labels(team, model, route, str(out.status), out.cache or "none").inc()
    m.request_duration.labels(team, model, route).observe(duration, exemplar)
    m.overhead.labels(route).observe(overhead, exemplar)
    if out.ttft is not None:
        m.ttft.labels(team, model).observe(out.ttft, exemplar)
    if out.attempts:
        ended = time.perf_counter()
        for a in out.attempts:
            # an attempt with no answer is labelled with the gateway error it ended in, not
            # with the status a later attempt gave the client
            status = str(a.status) if a.status else ("504" if a.error == "timeout" else "502")
            m.upstream_duration.labels(a.upstream, model, status).observe(
                (a.ended or ended) - a.started, exemplar
            )
            m.upstream_attempts.labels(a.upstream, a.outcome).inc()
    if usage is not None:
        tokens = m.tokens
        tokens.labels(team, model, "input").inc(usage.input_tokens)
        tokens.labels(team, model, "output").inc(usage.output_tokens)
        tokens.labels(team, model, "cached").inc(usage.cached_tokens)
        tokens.labels(team, model, "reasoning").inc(usage.reasoning_tokens)
    if cost:  # what was charged, a marked estimate included: the ledger and budgets agree
        m.cost.labels(team, model).inc(cost)
    if out.saved is not None:
        m.cache_saved_tokens.labels(team, model).inc(out.saved.total_tokens)


def attribution_attributes(env: Envelope) -> dict[str, str]:
    """`gateway.user` and one `gateway.tags.<key>` per tag: span attributes, never metric
    labels (a user id or a tag is unbounded)."""
    who = env.attribution
    attrs = {f"gateway.tags.{k}": v for k, v in who.tags}
    if who.user:
        attrs["gateway.user"] = who.user
    return attrs


def _end_spans(env: Envelope, team: str, usage: Usage | None) -> None:
    out = env.outcome
    client, server = out.client_span, env.span
    if client is not None and client.is_recording():
        attrs: dict[str, Any] = {"gateway.team": team, "gateway.cache": out.cache or "none"}
        if out.response_id:
            attrs["gen_ai.response.id"] = out.response_id
        if out.response_model:
            attrs["gen_ai.response.model"] = out.response_model
        if out.finish_reasons:
            attrs["gen_ai.response.finish_reasons"] = list(out.finish_reasons)
        if usage is not None:
            attrs["gen_ai.usage.input_tokens"] = usage.input_tokens
            attrs["gen_ai.usage.output_tokens"] = usage.output_tokens
            attrs["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
            attrs["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
        if out.ttft is not None:
            attrs["gen_ai.response.time_to_first_chunk"] = out.ttft
        upstream_status = out.upstream_status
        if upstream_status:
            attrs["http.response.status_code"] = upstream_status
        if out.error or upstream_status >= 400:
            attrs["error.type"] = out.error or str(upstream_status)
            client.set_status(Status(StatusCode.ERROR))
        client.set_attributes(attrs)
    if client is not None:
        client.end()
    if server is not None:
        if server.is_recording():
            server.set_attributes(
                {
                    "http.response.status_code": out.status,
                    "gateway.team": team,
                    "gateway.cache": out.cache or "none",
                    "gateway.request_id": env.request_id,
                    **attribution_attributes(env),
                }
            )
            if out.status >= 500:
                server.set_attribute("error.type", out.error or str(out.status))
                server.set_status(Status(StatusCode.ERROR))
        server.end()
