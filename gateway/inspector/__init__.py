"""The inspector: `GET /admin/ui` on the admin listener (CONTRACT section 11).

A page of static files shipped inside this package: no CDN, no build step. The page holds
no data, so it loads without the admin key; its script asks for the key once per browser
session, keeps it in `sessionStorage` and sends it as `Authorization: Bearer` on every call
to the admin API. Only the files named here are served, each from memory: no path from the
request is joined to anything.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

from gateway.envelope import expect

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PREFIX = "/admin/ui"

# name -> content type; `index.html` is the page itself, at PREFIX
FILES = {
    "index.html": "text/html; charset=utf-8",
    "inspector.css": "text/css; charset=utf-8",
    "inspector.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}

# the page runs only its own script and style and talks only to its own origin
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


def _file(body: bytes, content_type: str) -> Handler:
    headers = {"content-type": content_type, **SECURITY_HEADERS}

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers)

    return handler


def add_inspector_routes(app: web.Application) -> None:
    """The page at PREFIX and its files at PREFIX/<name>, read once from the package."""
    here = resources.files(__package__)
    for name, content_type in FILES.items():
        handler = _file(here.joinpath(name).read_bytes(), content_type)
        path = PREFIX if name == "index.html" else f"{PREFIX}/{name}"
        app.router.add_get(path, handler, expect_handler=expect)
