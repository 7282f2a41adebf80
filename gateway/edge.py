"""The edge of both listeners: one canonical path per request, and JSON for every refusal.

Runs before any handler. A non-canonical path (see `gateway.paths`) is answered 404 before
authentication, so it can reach neither an ownership check nor an upstream; the path that
passes is stored on the request and is the only one the pipeline reads. aiohttp's own
HTTP exceptions (no route, wrong method, body over `client_max_size`) become OpenAI-shaped
JSON instead of aiohttp's text/plain pages.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway import errors
from gateway.errors import GatewayError
from gateway.paths import canonical_path

# (path, raw query) as the client sent them, checked canonical
TARGET: web.RequestKey[tuple[str, str]] = web.RequestKey("target", tuple)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_CODES = {
    404: ("invalid_request_error", "not_found", "No such route."),
    405: ("invalid_request_error", "method_not_allowed", "This method is not allowed here."),
    413: ("invalid_request_error", "request_too_large", "The request body is too large."),
}


@web.middleware
async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    target = canonical_path(request.raw_path)
    if target is None:
        return errors.not_found().response()
    request[TARGET] = target
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return http_error(e.status).response()


def http_error(status: int) -> GatewayError:
    type_, code, message = _CODES.get(
        status, ("invalid_request_error", "bad_request", "The request could not be handled.")
    )
    return GatewayError(status, type_, code, message)
