"""The CLIENT span of a call upstream, with the OpenTelemetry GenAI request attributes."""

from __future__ import annotations

from typing import Any

from opentelemetry.trace import Span

from gateway.context import Envelope, RequestContext
from gateway.telemetry.tracing import Tracing
from gateway.upstream.client import UpstreamClient

_REQUEST_NUMBERS = (
    ("max_output_tokens", "gen_ai.request.max_tokens"),
    ("max_tokens", "gen_ai.request.max_tokens"),
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
)


def client_span(
    tracing: Tracing, env: Envelope, ctx: RequestContext, client: UpstreamClient
) -> Span:
    # the model as this upstream is asked for it (its `model_map` may rename it)
    model = ctx.policy.shown(client.cfg.upstream_model(ctx.model) or ctx.model) if ctx.model else ""
    name = f"chat {model}" if model else f"{ctx.method} {ctx.route.name}"
    assert env.span is not None
    if not env.sampled:  # the parent-based sampler drops it too: skip building attributes
        return tracing.client_span(env.span, name, {})
    body = ctx.parsed if isinstance(ctx.parsed, dict) else {}
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat" if ctx.model else "http",
        "gen_ai.provider.name": client.name,
        "server.address": client.host,
        "http.request.method": ctx.method,
    }
    if client.port is not None:
        attrs["server.port"] = client.port
    if ctx.model:
        attrs["gen_ai.request.model"] = model
        attrs["gen_ai.request.stream"] = ctx.stream
        for src, dst in _REQUEST_NUMBERS:
            v = body.get(src)
            if isinstance(v, int | float) and not isinstance(v, bool):
                attrs[dst] = v
        if tracing.capture_content:
            attrs.update(tracing.content_attributes(body, ctx.policy.redactor))
    return tracing.client_span(env.span, name, attrs)
