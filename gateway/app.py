"""Application factories: the client-facing app and the admin app. Wiring only, no logic."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway import errors
from gateway.admin import add_admin_routes
from gateway.proxy import GATEWAY, handle
from gateway.runtime import Gateway


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    if gw.ready and not gw.draining:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "draining" if gw.draining else "starting"}, status=503)


async def _no_route(request: web.Request) -> web.Response:
    return errors.not_found(request.path).response()


def create_app(gw: Gateway, *, manage_lifecycle: bool = True) -> web.Application:
    """The client-facing app. With manage_lifecycle the app starts and closes the Gateway."""
    app = web.Application(client_max_size=gw.settings.limits.max_body_bytes)
    app[GATEWAY] = gw
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_route("*", "/v1/{tail:.*}", handle)
    app.router.add_route("*", "/{tail:.*}", _no_route)
    if manage_lifecycle:

        async def lifecycle(app: web.Application) -> AsyncIterator[None]:
            await gw.start()
            yield
            await gw.close()

        app.cleanup_ctx.append(lifecycle)
    return app


class _NoRawRequests(logging.Filter):
    """aiohttp logs a malformed request with the raw bytes it choked on, which can hold a
    client's key: keep the event, drop the bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            kind = type(record.exc_info[1]).__name__
            record.msg, record.args = "rejected a malformed HTTP request (%s)", (kind,)
            record.exc_info, record.exc_text = None, None
        return True


def http_logger() -> logging.Logger:
    logger = logging.getLogger("gateway.http")
    if not any(isinstance(f, _NoRawRequests) for f in logger.filters):
        logger.addFilter(_NoRawRequests())
    return logger


def make_runner(app: web.Application, shutdown_timeout: float = 60.0) -> web.AppRunner:
    """The runner every listener uses: no access log (the gateway writes its own line), and
    a server logger that never prints request bytes."""
    return web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=shutdown_timeout,
        logger=http_logger(),
    )


def create_admin_app(gw: Gateway) -> web.Application:
    app = web.Application()
    app[GATEWAY] = gw
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    add_admin_routes(app)
    return app
