"""A bare aiohttp + uvloop reverse proxy: the floor the benchmark compares the gateway with.

What any aiohttp reverse proxy must do and nothing more: one pooled ``ClientSession``; the
request's method, path, query and body forwarded; the usual request headers forwarded minus
hop-by-hop ones (and those the ``Connection`` header names), ``Host``, ``Content-Length`` and
the client's credentials; the upstream key set; the response streamed back chunk by chunk as
it arrives (``StreamResponse`` + ``iter_any()``), with the upstream's status, headers (minus
hop-by-hop ones) and ``Content-Length`` when it sent one. No authentication, no body parsing,
no logging, no metrics. Its CPU per request is the least a Python proxy on aiohttp spends.

    python bench/bare_proxy.py --port 8081 --upstream http://127.0.0.1:8090 --key KEY
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Iterable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "authorization", "x-api-key"}
_DROP_RESPONSE = HOP_BY_HOP

SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


def _filtered(headers: Iterable[tuple[str, str]], drop: frozenset[str]) -> CIMultiDict[str]:
    pairs = list(headers)
    named = {t.strip().lower() for k, v in pairs if k.lower() == "connection" for t in v.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in pairs:
        lk = k.lower()
        if lk not in drop and lk not in named:
            out.add(k, v)
    return out


def create_app(upstream: str, key: str) -> web.Application:
    base = upstream.rstrip("/")
    auth = f"Bearer {key}"
    app = web.Application(client_max_size=16 * 1024 * 1024)

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers = _filtered(request.headers.items(), _DROP_REQUEST)
        headers["Authorization"] = auth
        body = await request.read()
        url = URL(base + request.raw_path, encoded=True)
        try:
            up = await app[SESSION].request(
                request.method, url, data=body or None, headers=headers, allow_redirects=False
            )
        except (aiohttp.ClientError, OSError):
            return web.Response(status=502, text="upstream unreachable")
        try:
            resp = web.StreamResponse(
                status=up.status,
                reason=up.reason,
                headers=_filtered(up.headers.items(), _DROP_RESPONSE),
            )
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        finally:
            up.release()

    async def session(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0)
        app[SESSION] = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0),
            auto_decompress=False,  # bytes pass through as sent, Content-Length stays right
            skip_auto_headers=("User-Agent",),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


async def serve(host: str, port: int, upstream: str, key: str) -> None:
    runner = web.AppRunner(create_app(upstream, key), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bare proxy on http://{host}:{port} -> {upstream}", flush=True)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8090")
    p.add_argument("--key", default="bench-upstream-key", help="the upstream's API key")
    args = p.parse_args(argv)
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args.host, args.port, args.upstream, args.key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
