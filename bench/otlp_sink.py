"""A tiny OTLP/HTTP trace sink for the benchmark: accepts and counts, stores nothing.

``POST /v1/traces`` answers 200 with an empty ``ExportTraceServiceResponse`` (an empty
protobuf body, ``content-type: application/x-protobuf``). ``GET /stats`` returns
``{"exports": N, "bytes": N, "spans": N}`` (spans are counted when the OTLP protobuf
classes are importable, else -1). ``GET /healthz`` answers 200.

    python bench/otlp_sink.py --port 4318
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable

from aiohttp import web

STATS: web.AppKey[dict[str, int]] = web.AppKey("stats", dict)


def _span_counter() -> Callable[[bytes], int]:
    try:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )
    except ImportError:
        return lambda _data: -1

    def count(data: bytes) -> int:
        req = ExportTraceServiceRequest.FromString(data)
        return sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)

    return count


def create_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATS] = {"exports": 0, "bytes": 0, "spans": 0}
    count_spans = _span_counter()

    async def traces(request: web.Request) -> web.Response:
        data = await request.read()
        stats = request.app[STATS]
        stats["exports"] += 1
        stats["bytes"] += len(data)
        n = count_spans(data)
        stats["spans"] = -1 if n < 0 else stats["spans"] + n
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(request.app[STATS])

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", stats)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(create_app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"otlp sink listening on http://{host}:{port}/v1/traces", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="a counting OTLP/HTTP trace sink")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4318)
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
