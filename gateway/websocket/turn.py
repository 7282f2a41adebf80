"""One `response.create` on a WebSocket connection, as the pipeline sees a request.

Each gets its own envelope (request id, server span, outcome), is admitted as a streamed
`POST /v1/responses` is (the team's key as the handshake sent it, checked against the live
config; the model allowlist; routing; the budget reservation), and ends in the one `finish`
(settle, ledger record and log line with `transport: websocket`, metrics, spans).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway import finish, parse, plan
from gateway.context import Envelope, RequestContext, request_id
from gateway.pipeline import admitted, hold
from gateway.routes import ROUTES, Route
from gateway.runtime import Gateway
from gateway.telemetry.tracing import trace_id_hex
from gateway.websocket import events

RESPONSES: Route = ROUTES[0]
assert RESPONSES.name == "/v1/responses"
TARGET = "/v1/responses"
SPAN_NAME = "WS /v1/responses"


def begin(gw: Gateway, headers: Mapping[str, str]) -> Envelope:
    """A new response's envelope, counted in flight until `end`."""
    span = gw.tracing.server_span(SPAN_NAME, headers)
    env = Envelope(
        request_id(None),
        trace_id_hex(span),
        span,
        span.is_recording(),
        RESPONSES,
        "POST",
        transport="websocket",
    )
    if env.sampled:
        span.set_attributes(
            {"http.route": RESPONSES.name, "gateway.transport": "websocket", "url.scheme": "ws"}
        )
    gw.metrics.inflight.inc()
    gw.inflight += 1
    gw.active += 1
    return env


async def end(gw: Gateway, env: Envelope) -> None:
    """The response's single end: never raises."""
    await finish.end(gw, env, 1)


async def admit(
    gw: Gateway, env: Envelope, headers: Mapping[str, str], event: dict[str, Any]
) -> RequestContext:
    """Admit a `response.create` as a streamed `POST /v1/responses`: raises the GatewayError
    an HTTP request would get (a key a reload removed, a model not allowed, no route, a budget
    with no room, a bad field)."""
    policy = env.policy = gw.policy.hold()
    principal = env.principal = policy.auth.authenticate(headers)
    # captured as a streamed POST is: the handshake's headers, the event's body, and (bridge
    # mode) the upstream's stream as relayed
    env.outcome.capture = policy.capture.admit(principal.team.name, "POST", TARGET, headers)
    limits = policy.settings.limits
    body, _ = events.create_body(event)
    parsed = parse.parse(body, "POST", "application/json", RESPONSES, limits, policy.redactor)
    # the handshake's attribution headers hold for every response of the connection
    env.attribution = parse.attribute(headers, parsed, policy.redactor)
    model = env.model = parsed.model
    candidates = await plan.plan(
        policy, RESPONSES, principal, model, gw.owners, gw.reports, TARGET, parsed.previous
    )
    ctx = env.ctx = admitted(
        "POST", RESPONSES, TARGET, principal, policy, model, parsed, candidates
    )
    if ctx.metered and principal.team.budgets:
        env.outcome.reservation = await hold(gw, ctx)
    return ctx
