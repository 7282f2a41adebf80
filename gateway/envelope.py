"""The envelope around every answer of both listeners: middleware that runs before any handler.

- One canonical path per request (`gateway.paths`): anything else is answered 404 before
  authentication, so it reaches neither an ownership check nor an upstream; the path that
  passes is stored on the request and is the only one read afterwards.
- Every answer carries `x-request-id` and `x-gateway-trace-id`, refusals included.
- Requests to the `/v1` routes get a server span, count as in flight, and end in `finish`
  (settle, ledger, metrics, spans, one log line), whatever path they took.
- Gateway errors, aiohttp's own HTTP errors (no route, wrong method, a body over the limit)
  and anything unexpected become OpenAI-shaped JSON.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from gateway import errors
from gateway.context import Envelope, request_id
from gateway.errors import GatewayError
from gateway.finish import end
from gateway.paths import canonical_path
from gateway.relay.sink import send_whole
from gateway.routes import PASSTHROUGH, ROUTES, Route, for_method, route_of
from gateway.runtime import GATEWAY, Gateway
from gateway.server import fresh_ids
from gateway.telemetry.tracing import trace_id_hex

# (path, raw query) as the client sent them, checked canonical
TARGET: web.RequestKey[tuple[str, str]] = web.RequestKey("target", tuple)
ENVELOPE: web.RequestKey[Envelope] = web.RequestKey("envelope", Envelope)
# the app's WebSocket endpoint (the client listener's `GET /v1/responses`): (request, path)
WEBSOCKET: web.AppKey[Callable[[web.Request, str], Awaitable[web.StreamResponse]]] = web.AppKey(
    "websocket"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PASSTHROUGH_CANONICAL = PASSTHROUGH.path.replace(":.*}", "}")  # as aiohttp names the resource
# registered resources whose route is known without looking at the path again
_STATIC = {r.path: r for r in ROUTES if r.path and "{" not in r.path}
_DYNAMIC = frozenset({r.path for r in ROUTES if "{" in r.path} | {PASSTHROUGH_CANONICAL})

_CODES = {
    404: ("invalid_request_error", "not_found", "No such route."),
    405: ("invalid_request_error", "method_not_allowed", "This method is not allowed here."),
    413: ("invalid_request_error", "request_too_large", "The request body is too large."),
}


def _route(request: web.Request, path: str) -> Route | None:
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else ""
    route = _STATIC.get(canonical)
    if route is None and canonical in _DYNAMIC:
        route = route_of(path)
    return for_method(route, request.method) if route is not None else None


@web.middleware
async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    target = canonical_path(request.raw_path)
    if hdrs.UPGRADE in request.headers and "websocket" in request.headers[hdrs.UPGRADE].lower():
        return await _upgrade(request, target)
    route = _route(request, target[0]) if target is not None else None
    if route is None:
        return await _plain(request, handler, target)
    assert target is not None
    request[TARGET] = target
    gw = request.app[GATEWAY]
    method = request.method
    span = gw.tracing.server_span(f"{method} {route.name}", request.headers)
    env = Envelope(
        request_id(request.headers.get("x-request-id")),
        trace_id_hex(span),
        span,
        span.is_recording(),
        route,
        method,
    )
    request[ENVELOPE] = env
    if env.sampled:  # attributes cost time: only for spans that are exported
        _server_attributes(gw, request, env, target[0])
    gw.metrics.inflight.inc()
    # a drain waits for requests admitted before it, not for the 503s it answers meanwhile
    counted = 0 if gw.draining else 1
    gw.inflight += counted
    gw.active += 1
    try:
        return await _answer(gw, request, handler, env)
    finally:
        await end(gw, env, counted)


async def _answer(
    gw: Gateway, request: web.Request, handler: Handler, env: Envelope
) -> web.StreamResponse:
    out = env.outcome
    try:
        return await handler(request)
    except web.HTTPException as e:  # aiohttp's own refusals
        if e.status < 400:
            raise
        error = http_error(e.status)
    except GatewayError as e:
        error = e
    except Exception:
        gw.log.exception("unhandled error", request_id=env.request_id)
        out.error = "internal_error"
        error = GatewayError(
            500, "server_error", "internal_error", "The gateway failed to handle this request."
        )
    if out.response is not None and out.response.prepared:
        out.error = out.error or error.code  # a stream is under way: it ends where it is
        return out.response
    out.error = out.error or error.code
    out.head(error.status)
    resp = error.response(env.headers())
    if out.capture is not None:
        out.capture.answered(resp.status, resp.headers, resp.body)  # type: ignore[arg-type]
    return await send_whole(request, resp)


async def _upgrade(request: web.Request, target: tuple[str, str] | None) -> web.StreamResponse:
    """A request to switch protocols: a WebSocket where the app takes one (`WEBSOCKET`), a JSON
    refusal anywhere else (the connection stays HTTP: nothing was switched)."""
    headers = _ids(request)
    endpoint = request.app.get(WEBSOCKET)
    try:
        if target is None:
            raise errors.not_found()
        if endpoint is None:
            raise websocket_refused()
        return await endpoint(request, target[0])
    except GatewayError as e:
        resp = e.response(headers)
    return resp


def websocket_refused() -> GatewayError:
    return GatewayError(
        400,
        "invalid_request_error",
        "websocket_not_supported",
        "WebSocket connections are accepted only at GET /v1/responses on the client listener.",
    )


async def _plain(
    request: web.Request, handler: Handler, target: tuple[str, str] | None
) -> web.StreamResponse:
    """Health checks, the admin listener, refusals: ids on the answer, no ledger or span."""
    headers = _ids(request)
    if target is None:
        return errors.not_found().response(headers)
    request[TARGET] = target
    try:
        resp = await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return http_error(e.status).response(headers)
    except GatewayError as e:
        return e.response(headers)
    if not resp.prepared:
        resp.headers.update(headers)
    return resp


def _ids(request: web.BaseRequest) -> dict[str, str]:
    """Ids for an answer outside the pipeline (a sane client-sent request id is kept)."""
    ids = fresh_ids()
    sent = request.headers.get("x-request-id")
    if sent:
        ids["x-request-id"] = request_id(sent)
    return ids


def _server_attributes(gw: Gateway, request: web.Request, env: Envelope, path: str) -> None:
    assert env.span is not None
    redact = gw.policy.redactor
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    env.span.set_attributes(
        {
            "http.request.method": env.method,
            "http.route": env.route.name,
            "url.path": redact(path),
            "url.scheme": request.scheme,
            # from the socket: a client's Host header can be junk
            "server.port": int(sockname[1]) if isinstance(sockname, tuple) else 0,
            "user_agent.original": redact(request.headers.get("user-agent", "")[:512]),
        }
    )


async def expect(request: web.Request) -> None:
    """Every route's `Expect` handler: `100-continue` as aiohttp answers it; any other
    expectation 417 in JSON (aiohttp's own answer is text quoting the header, and comes
    before any middleware)."""
    value = request.headers.get(hdrs.EXPECT, "")
    if request.version != (1, 1):
        return
    if value.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's head is still to come
        return
    err = GatewayError(
        417, "invalid_request_error", "expectation_failed", "Only 'Expect: 100-continue' is known."
    )
    raise web.HTTPExpectationFailed(
        text=err.body().decode(), content_type="application/json", headers=_ids(request)
    )


def http_error(status: int) -> GatewayError:
    type_, code, message = _CODES.get(
        status, ("invalid_request_error", "bad_request", "The request could not be handled.")
    )
    return GatewayError(status, type_, code, message)
