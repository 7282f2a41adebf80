"""The request pipeline for /v1/*: authenticate, parse, route, reserve, cache, relay, finish.

Orchestration only: each step's work lives in its own module. Every request ends in
`exchange.finish`, whatever path it took.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web
from opentelemetry.trace import Span

from gateway import errors, jsonbody
from gateway.budget import estimate
from gateway.budget.admission import budget_headers, reserve
from gateway.cache.entry import CacheEntry
from gateway.cache.key import cache_key
from gateway.edge import TARGET
from gateway.errors import GatewayError
from gateway.exchange import Exchange, finish, request_id, route_of
from gateway.models_route import list_models
from gateway.relay import relay_body, relay_raw, relay_stream, replay, send_whole
from gateway.runtime import Gateway
from gateway.server import read_body
from gateway.settings import Limits
from gateway.telemetry.tracing import trace_id_hex
from gateway.upstream import UpstreamClient, request_headers

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)

MODEL_ROUTES = frozenset(
    {
        "/v1/responses",
        "/v1/responses/input_tokens",
        "/v1/responses/compact",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
    }
)
ID_ROUTES = frozenset(
    {"/v1/responses/{id}", "/v1/responses/{id}/cancel", "/v1/responses/{id}/input_items"}
)


async def handle(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    path = request[TARGET][0]
    ex = Exchange(request_id(request.headers.get("x-request-id")), request.method, route_of(path))
    ex.span = span = gw.tracing.server_span(f"{request.method} {ex.route}", request.headers)
    ex.trace_id = trace_id_hex(span)
    ex.sampled = span.is_recording()
    if ex.sampled:  # attributes cost time: only for spans that are exported
        span.set_attributes(
            {
                "http.request.method": request.method,
                "http.route": ex.route,
                "url.path": gw.redactor(path),
                "url.scheme": request.scheme,
                "server.port": _local_port(request),
                "user_agent.original": gw.redactor(request.headers.get("user-agent", "")[:512]),
            }
        )
    gw.metrics.inflight.inc()
    # a drain waits for requests admitted before it, not for the 503s it answers meanwhile
    counted = 0 if gw.draining else 1
    gw.inflight += counted
    try:
        return await _pipeline(gw, request, ex)
    except GatewayError as e:
        if ex.started_response is not None and ex.started_response.prepared:
            # a stream is under way: it ends where it is
            ex.error = ex.error or e.code
            return ex.started_response
        ex.status, ex.error = e.status, ex.error or e.code
        return await send_whole(request, e.response(ex.response_headers()))
    except Exception:
        gw.log.exception("unhandled error", request_id=ex.request_id)
        if ex.started_response is not None and ex.started_response.prepared:
            ex.error = "internal_error"
            return ex.started_response
        ex.status, ex.error = 500, "internal_error"
        err = GatewayError(
            500, "server_error", "internal_error", "The gateway failed to handle this request."
        )
        return await send_whole(request, err.response(ex.response_headers()))
    finally:
        gw.inflight -= counted
        gw.metrics.inflight.dec()
        try:
            await finish(gw, ex)
        except Exception:
            gw.log.exception("finishing a request failed", request_id=ex.request_id)


def _local_port(request: web.Request) -> int:
    """The port this request arrived on, from the socket (a client's Host header can be junk)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return int(sockname[1]) if isinstance(sockname, tuple) and len(sockname) > 1 else 0


async def _read_body(request: web.Request, limits: Limits) -> bytes:
    try:
        return await read_body(request, limits.max_body_bytes, limits.body_timeout)
    except ConnectionError:  # the client left mid-upload: nobody to answer, nothing to charge
        raise errors.client_disconnected() from None


async def _pipeline(gw: Gateway, request: web.Request, ex: Exchange) -> web.StreamResponse:
    if gw.draining:
        raise errors.shutting_down()
    policy = gw.policy
    principal = policy.auth.authenticate(request.headers)
    team = principal.team
    ex.team, ex.key_id = team.name, principal.key_id
    settings = policy.settings
    body = await _read_body(request, settings.limits)

    method = request.method
    needs_model = method == "POST" and ex.route in MODEL_ROUTES
    parsed: Any = None
    if method == "POST" and body and (needs_model or "json" in request.content_type):
        try:
            parsed = jsonbody.loads(body, settings.limits.max_json_depth)
        except jsonbody.TooDeep:
            raise errors.json_too_deep(settings.limits.max_json_depth) from None
        except orjson.JSONDecodeError as e:
            if needs_model:
                raise errors.invalid_json(str(e)) from None
    # fields as every upstream reads them, whatever the case of their names
    try:
        top = jsonbody.fields(parsed) if isinstance(parsed, dict) else {}
    except jsonbody.AmbiguousKeys as e:
        raise errors.invalid_json(str(e)) from None
    model = top.get("model")
    if needs_model and (not isinstance(model, str) or not model):
        raise errors.missing_model()
    if method == "GET" and ex.route == "/v1/models":
        return await list_models(gw, request, ex)

    if ex.route in ID_ROUTES:
        # a stored response: only its creating team reaches it, whatever the body says
        upstream_name = await _owner_upstream(gw, request, ex)
    elif ex.route == "/v1/responses/*":
        raise errors.not_found()
    elif isinstance(model, str) and model:
        ex.model = model
        if not policy.team_models[team.name](model):
            raise errors.model_not_allowed(gw.redactor(model), team.name)
        routed = policy.router.route(model)
        if routed is None:
            raise errors.model_not_found(gw.redactor(model))
        upstream_name = routed
        ex.metered = method == "POST" and ex.route != "/v1/responses/input_tokens"
        if ex.metered:
            try:
                ex.output_estimate = estimate.output_tokens(
                    top, settings.limits.default_max_output_tokens
                )
            except estimate.InvalidValue as e:
                raise errors.invalid_value(e.param, str(e)) from None
        ex.creates_response = method == "POST" and ex.route == "/v1/responses"
    else:
        upstream_name = next(iter(gw.upstreams))
    ex.upstream = upstream_name
    if isinstance(parsed, dict):
        ex.stream = top.get("stream") is True
        ex.request_body = parsed
    client = gw.upstreams[upstream_name]

    # cache: only POST /v1/responses, and never background requests
    key: str | None = None
    store = False
    if method == "POST" and ex.route == "/v1/responses":
        cc = request.headers.get("cache-control", "").lower()
        if not settings.cache.enabled or top.get("background") is True or "no-store" in cc:
            ex.cache = "bypass"
        else:
            scope = "shared" if settings.cache.scope == "shared" else f"team:{team.name}"
            key = cache_key(scope, upstream_name, parsed)
            store = True
            if "no-cache" in cc:
                ex.cache = "bypass"
            else:
                answered, lead = await _from_cache(gw, request, ex, key)
                if answered is not None:
                    return answered
                if lead:
                    return await _lead(gw, request, ex, client, body, key)
        if ex.cache == "bypass":
            _count_lookup(gw, "bypass")
    return await _call(gw, request, ex, client, body, key if store else None, None)


async def _owner_upstream(gw: Gateway, request: web.Request, ex: Exchange) -> str:
    """A request about a stored response goes where it was created, and only for the team
    that created it."""
    rid = request[TARGET][0].split("/")[3]
    owner = gw.owners.get(rid)
    if owner is None:
        owner = await gw.ledger.owner(rid)
        if owner is not None:
            gw.owners[rid] = owner
    if owner is None or owner[0] != ex.team:
        # every response made through the gateway is in the ledger with its team: one that
        # is not, or is another team's, does not exist for this team
        raise GatewayError(
            404,
            "invalid_request_error",
            "not_found",
            f"No response found with id {errors.quoted(gw.redactor(rid))}.",
        )
    return owner[1] if owner[1] in gw.upstreams else next(iter(gw.upstreams))


def _count_lookup(gw: Gateway, result: str) -> None:
    c = gw.cache_counts
    if result == "hit":
        c.hits += 1
    elif result == "miss":
        c.misses += 1
    elif result == "coalesced":
        c.coalesced += 1
    elif result == "bypass":
        c.bypass += 1
    else:
        return
    gw.metrics.cache_lookups.labels(result).inc()


async def _from_cache(
    gw: Gateway, request: web.Request, ex: Exchange, key: str
) -> tuple[web.StreamResponse | None, bool]:
    """Serve a stored answer or join an identical request in flight; sets ex.cache.

    Returns (response, lead): no response and lead=True means this request leads a new
    flight; lead=False means the flight's answer could not be shared and it calls alone.
    """
    entry = await gw.cache.get(key)
    if entry is not None and entry.stream == ex.stream:
        ex.cache = "hit"
        _count_lookup(gw, "hit")
        return await _serve_entry(gw, request, ex, entry, "hit"), False
    flight = gw.flights.peek(key)
    if flight is None:
        ex.cache = "miss"
        return None, True
    flight.readers += 1
    try:
        if flight.stream:
            if await flight.wait_head():
                ex.cache = "coalesced"
                _count_lookup(gw, "coalesced")
                return await replay(gw, request, ex, flight, await budget_headers(gw, ex)), False
        else:
            shared = await flight.wait_done()
            if shared is not None:
                ex.cache = "coalesced"
                _count_lookup(gw, "coalesced")
                return await _serve_entry(gw, request, ex, shared, "coalesced"), False
    finally:
        flight.readers -= 1
    ex.cache = "miss"  # the leader's answer cannot be shared: make our own call
    _count_lookup(gw, "miss")
    return None, False


async def _serve_entry(
    gw: Gateway, request: web.Request, ex: Exchange, entry: CacheEntry, result: str
) -> web.StreamResponse:
    ex.status, ex.saved = entry.status, entry.usage
    headers = {
        **dict(entry.headers),
        **ex.response_headers(),
        "x-gateway-cache": result,
        **await budget_headers(gw, ex),
    }
    if result == "hit":
        headers["age"] = str(max(0, int(gw.clock() - entry.created_at)))
    return await send_whole(
        request, web.Response(status=entry.status, body=entry.body, headers=headers)
    )


async def _lead(
    gw: Gateway, request: web.Request, ex: Exchange, client: UpstreamClient, body: bytes, key: str
) -> web.StreamResponse:
    flight = gw.flights.open(key, ex.stream)
    _count_lookup(gw, "miss")
    try:
        return await _call(gw, request, ex, client, body, key, flight)
    finally:
        if not flight.done:
            flight.finish(None, None)
        gw.flights.land(key, flight)


async def _call(
    gw: Gateway,
    request: web.Request,
    ex: Exchange,
    client: UpstreamClient,
    body: bytes,
    store_key: str | None,
    flight: Any,
) -> web.StreamResponse:
    team = gw.policy.teams.get(ex.team)  # a reload may have removed it mid-request
    if ex.metered and team is not None and team.budgets:
        await reserve(gw, ex, len(body))
    body = _with_stream_usage(ex, body)
    extra = {"x-request-id": ex.request_id, **client.auth_header()}
    ex.client_span = _client_span(gw, ex, client)
    headers = request_headers(request.headers.items(), extra)
    carrier: dict[str, str] = {}
    gw.tracing.inject(ex.client_span, carrier)
    headers.update(carrier)
    ex.upstream_started = t0 = time.perf_counter()
    try:
        path, query = request[TARGET]
        target = f"{path}?{query}" if query else path
        up = await client.send(request.method, target, headers, body)
    except GatewayError as e:
        ex.upstream_status = 0
        ex.upstream_reached = e.reached
        gw.metrics.upstream_errors.labels(client.name, e.code).inc()
        raise
    finally:
        ex.upstream_wait += time.perf_counter() - t0
    try:
        ex.upstream_status = up.status
        if up.status >= 500:
            gw.metrics.upstream_errors.labels(client.name, f"http_{up.status}").inc()
        budget = await budget_headers(gw, ex) if ex.reservation is not None else {}
        extra_out = {**ex.response_headers(), **budget}
        if ex.cache:
            extra_out["x-gateway-cache"] = ex.cache
        ctype = up.content_type
        if ctype == "text/event-stream":
            return await relay_stream(gw, request, ex, up, extra_out, store_key, flight)
        if "json" in ctype:
            return await relay_body(gw, request, ex, up, extra_out, store_key, flight)
        return await relay_raw(gw, request, ex, up, extra_out, flight)
    finally:
        up.release()


def _with_stream_usage(ex: Exchange, body: bytes) -> bytes:
    """A Chat Completions stream reports usage only when asked: ask, so it is charged exactly.

    Clients that did not ask then also receive the final usage chunk (`choices: []`), a
    documented chunk shape that the OpenAI SDKs handle.
    """
    parsed = ex.request_body
    if ex.route != "/v1/chat/completions" or not ex.stream or not isinstance(parsed, dict):
        return body
    options = parsed.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body
    options = (
        {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
    )
    return orjson.dumps({**parsed, "stream_options": options})


def _client_span(gw: Gateway, ex: Exchange, client: UpstreamClient) -> Span:
    model = gw.shown(ex.model) if ex.model else ""
    name = f"chat {model}" if model else f"{ex.method} {ex.route}"
    assert ex.span is not None
    if not ex.sampled:  # the parent-based sampler drops it too: skip building attributes
        return gw.tracing.client_span(ex.span, name, {})
    body = ex.request_body if isinstance(ex.request_body, dict) else {}
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat" if ex.model else "http",
        "gen_ai.provider.name": client.name,
        "server.address": client.host,
        "http.request.method": ex.method,
    }
    if client.port is not None:
        attrs["server.port"] = client.port
    if ex.model:
        attrs["gen_ai.request.model"] = model
        attrs["gen_ai.request.stream"] = ex.stream
        for src, dst in (
            ("max_output_tokens", "gen_ai.request.max_tokens"),
            ("max_tokens", "gen_ai.request.max_tokens"),
            ("temperature", "gen_ai.request.temperature"),
            ("top_p", "gen_ai.request.top_p"),
        ):
            v = body.get(src)
            if isinstance(v, int | float) and not isinstance(v, bool):
                attrs[dst] = v
        if gw.tracing.capture_content:
            attrs.update(gw.tracing.content_attributes(body))
    return gw.tracing.client_span(ex.span, name, attrs)
