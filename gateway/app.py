"""Application factories: the client-facing app and the admin app. Wiring only, no logic."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from gateway import errors
from gateway.admin import add_admin_routes
from gateway.envelope import WEBSOCKET, envelope, expect
from gateway.pipeline import handle
from gateway.routes import PASSTHROUGH, ROUTES
from gateway.runtime import GATEWAY, Gateway
from gateway.server import GatewayRunner, http_logger
from gateway.websocket.endpoint import endpoint as websocket_endpoint


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    if gw.ready and not gw.draining:
        if not await gw.state_ok():
            return web.json_response({"status": "state_unavailable"}, status=503)
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "draining" if gw.draining else "starting"}, status=503)


async def _no_route(request: web.Request) -> web.Response:
    raise errors.not_found()


def create_app(gw: Gateway, *, manage_lifecycle: bool = True) -> web.Application:
    """The client-facing app. With manage_lifecycle the app starts and closes the Gateway."""
    app = web.Application(client_max_size=gw.settings.limits.max_body_bytes, middlewares=[envelope])
    app[GATEWAY] = gw
    app[WEBSOCKET] = websocket_endpoint
    app.router.add_get("/healthz", _healthz, expect_handler=expect)
    app.router.add_get("/readyz", _readyz, expect_handler=expect)
    for route in ROUTES:
        if route.path:
            app.router.add_route("*", route.path, handle, expect_handler=expect)
    app.router.add_route("*", PASSTHROUGH.path, handle, expect_handler=expect)
    app.router.add_route("*", "/{tail:.*}", _no_route, expect_handler=expect)
    if manage_lifecycle:

        async def lifecycle(app: web.Application) -> AsyncIterator[None]:
            await gw.start()
            yield
            await gw.close()

        app.cleanup_ctx.append(lifecycle)
    return app


def make_runner(app: web.Application, shutdown_timeout: float = 60.0) -> web.AppRunner:
    """The runner every listener uses: no access log (the gateway writes its own line), a
    server logger that never prints request bytes, JSON for aiohttp's own error answers, and
    the request-head deadline of `limits.header_timeout` (gateway.server)."""
    return GatewayRunner(
        app,
        header_timeout=app[GATEWAY].settings.limits.header_timeout,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=shutdown_timeout,
        logger=http_logger(),
    )


def create_admin_app(gw: Gateway) -> web.Application:
    app = web.Application(middlewares=[envelope])
    app[GATEWAY] = gw
    app.router.add_get("/healthz", _healthz, expect_handler=expect)
    app.router.add_get("/readyz", _readyz, expect_handler=expect)
    add_admin_routes(app)
    return app
