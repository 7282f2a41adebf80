"""The mock as an aiohttp application, and the ways to run it.

Owns: the route table (the ``/mock/`` control routes are in ``control``), the models and
catch-all echo routes, the ``x-request-id`` header on every response, building the per-app
``Runtime`` and fault state, ``create_mock_app``, ``start_mock`` (on a real socket, for tests
and embedding) and the blocking ``run_mock`` behind ``gateway mock-upstream``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Final

import orjson
from aiohttp import web

from gateway.mock_upstream.chat import chat_completions
from gateway.mock_upstream.control import CONTROL_ROUTES
from gateway.mock_upstream.knobs import record_and_faults
from gateway.mock_upstream.replies import JSON_TYPE, error, hex_id, json_reply
from gateway.mock_upstream.responses import (
    cancel_response,
    count_input_tokens,
    create_response,
    delete_response,
    input_items,
    retrieve_response,
)
from gateway.mock_upstream.state import MOCK_STATE, RUNTIME, MockOptions, MockState, Runtime
from gateway.mock_upstream.websocket import responses_websocket

__all__ = ["create_mock_app", "run_mock", "start_mock"]

_MAX_BODY_BYTES: Final = 64 * 1024 * 1024


async def _list_models(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[RUNTIME].models_body, content_type=JSON_TYPE)


async def _get_model(request: web.Request) -> web.StreamResponse:
    model = request.match_info["model"]
    body = request.app[RUNTIME].model_bodies.get(model)
    if body is None:
        return error(404, f"The model `{model}` does not exist.", code="model_not_found")
    return web.Response(body=body, content_type=JSON_TYPE)


async def _echo(request: web.Request) -> web.StreamResponse:
    echo = {"object": "mock.echo", "method": request.method, "path": request.path}
    return json_reply({**echo, "query": request.query_string})


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if "x-request-id" not in response.headers:
        response.headers["x-request-id"] = hex_id("req_", 12)


def _runtime(options: MockOptions) -> Runtime:
    entries = {
        m: {"id": m, "object": "model", "created": 1700000000, "owned_by": "mock"}
        for m in options.models
    }
    return Runtime(
        options=options,
        models=frozenset(options.models),
        models_body=orjson.dumps({"object": "list", "data": list(entries.values())}),
        model_bodies={m: orjson.dumps(entry) for m, entry in entries.items()},
    )


def create_mock_app(options: MockOptions | None = None) -> web.Application:
    """The mock as an aiohttp application (use with a runner or the test client)."""
    options = options or MockOptions()
    if not options.models:
        raise ValueError("MockOptions.models must name at least one model")
    app = web.Application(middlewares=[record_and_faults], client_max_size=_MAX_BODY_BYTES)
    app[MOCK_STATE] = MockState(faults=options.faults())
    app[RUNTIME] = _runtime(options)
    app.on_response_prepare.append(_add_request_id)
    routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("POST", "/v1/responses", create_response),
        ("GET", "/v1/responses", responses_websocket),
        ("POST", "/v1/responses/input_tokens", count_input_tokens),
        ("GET", "/v1/responses/{response_id}", retrieve_response),
        ("DELETE", "/v1/responses/{response_id}", delete_response),
        ("POST", "/v1/responses/{response_id}/cancel", cancel_response),
        ("GET", "/v1/responses/{response_id}/input_items", input_items),
        ("POST", "/v1/chat/completions", chat_completions),
        ("GET", "/v1/models", _list_models),
        ("GET", "/v1/models/{model:.+}", _get_model),
        ("*", "/v1/{tail:.*}", _echo),
        *CONTROL_ROUTES,
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return app


async def start_mock(
    host: str = "127.0.0.1", port: int = 0, options: MockOptions | None = None
) -> tuple[web.AppRunner, int]:
    """Start on a real socket; returns the runner (caller calls runner.cleanup()) and the port."""
    # A short shutdown timeout: a fake provider need not wait long for held-open streams.
    app = create_mock_app(options)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound_port


def run_mock(host: str, port: int, options: MockOptions) -> None:
    """Blocking: serve until SIGINT/SIGTERM (with uvloop when available); prints the URL once."""

    async def serve() -> None:
        runner, bound_port = await start_mock(host, port, options)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # e.g. Windows
                loop.add_signal_handler(sig, stop.set)
        shown = f"[{host}]" if ":" in host else host
        print(f"mock upstream listening on http://{shown}:{bound_port}/v1", flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop  # optional, and only this blocking entry point wants it

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    # KeyboardInterrupt: SIGINT where no signal handler could be installed.
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory) as r:
        r.run(serve())
