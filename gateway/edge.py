"""The edge of both listeners: one canonical path per request, and JSON for every refusal.

Runs before any handler. A non-canonical path (see `gateway.paths`) is answered 404 before
authentication, so it can reach neither an ownership check nor an upstream; the path that
passes is stored on the request and is the only one the pipeline reads. aiohttp's own
HTTP exceptions (no route, wrong method, body over `client_max_size`) become OpenAI-shaped
JSON instead of aiohttp's text/plain pages.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

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
    raise web.HTTPExpectationFailed(text=err.body().decode(), content_type="application/json")


def http_error(status: int) -> GatewayError:
    type_, code, message = _CODES.get(
        status, ("invalid_request_error", "bad_request", "The request could not be handled.")
    )
    return GatewayError(status, type_, code, message)
