"""The admin listener of `gateway serve --workers N`, served by the supervisor.

- `/metrics`: every worker's metrics scraped from its private socket and merged (`merge`);
  a worker that does not answer counts with the counters of its last scrape, and workers
  that are gone with theirs, so no counter goes down.
- `/readyz`: ready only when every worker is (and 503 once the supervisor drains).
- `/healthz`: 200 while the supervisor runs.
- `POST /admin/reload`: every worker re-reads the config; the answer is the first refusal,
  else the first success.
- every other `/admin/*` call: one worker answers it, in turn (they share their state).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from gateway.errors import GatewayError, not_found
from gateway.workers.link import Answer
from gateway.workers.merge import counters_only, merge, parse
from gateway.workers.pool import Pool, Worker

__all__ = ["POOL", "create_supervisor_admin_app"]

POOL: web.AppKey[Pool] = web.AppKey("pool", Pool)
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
MAX_ADMIN_BODY = 1 << 20
# what of an admin call a worker needs: its key, its body's type, the answer's format
_FORWARDED = ("authorization", "content-type", "accept")


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _unavailable() -> web.Response:
    return GatewayError(
        503, "server_error", "workers_unavailable", "No worker answers; try again shortly."
    ).response()


def _relay(answer: Answer) -> web.Response:
    r = web.Response(body=answer.body, status=answer.status)
    if answer.content_type:
        r.headers["content-type"] = answer.content_type
    return r


async def _healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    if pool.stopping:
        return _json({"status": "draining"}, status=503)

    async def status(w: Worker) -> str:
        try:
            answer = await w.link.call("GET", "/readyz", within=2.0)
        except Exception:
            return "starting"
        if answer.status == 200:
            return "ready"
        try:
            return str(orjson.loads(answer.body)["status"])
        except (ValueError, KeyError, TypeError):
            return "starting"

    found = await asyncio.gather(*(status(w) for w in pool.workers))
    ready = found.count("ready")
    if ready == len(found):
        return _json({"status": "ready", "workers": ready})
    first = next(s for s in found if s != "ready")
    return _json({"status": first, "workers": len(found), "ready": ready}, status=503)


async def _scrape(pool: Pool, w: Worker) -> list[Metric]:
    pid = w.pid
    try:
        answer = await w.link.call("GET", "/metrics", {"accept": OPENMETRICS})
        if answer.status != 200:
            raise ValueError(f"status {answer.status}")
        families = parse(answer.body.decode())
    except Exception:
        return w.scraped[1] if w.scraped[0] == pid else []
    pool.keep_scrape(w, pid, families)
    return families


class _Families:
    """A collector that yields families gathered beforehand."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


async def _metrics(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    scrapes = await asyncio.gather(*(_scrape(pool, w) for w in pool.workers))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merge([counters_only(pool.retired), *scrapes])))
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return web.Response(body=encoder(registry), headers={"content-type": content_type})


async def _forwarded(request: web.Request) -> tuple[dict[str, str], bytes]:
    if (request.content_length or 0) > MAX_ADMIN_BODY:
        raise GatewayError(
            413, "invalid_request_error", "request_too_large", "Admin request body too large."
        )
    body = await request.content.read(MAX_ADMIN_BODY + 1)
    headers = {k: v for k in _FORWARDED if (v := request.headers.get(k)) is not None}
    return headers, body[:MAX_ADMIN_BODY]


async def _admin(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    headers, body = await _forwarded(request)
    path = request.rel_url.raw_path_qs
    for w in pool.rotation():
        if not w.ready:
            continue
        try:
            return _relay(await w.link.call(request.method, path, headers, body, within=60.0))
        except Exception:
            continue  # restarting or stopping: the next one answers
    return _unavailable()


async def _reload(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    headers, body = await _forwarded(request)
    live = [w for w in pool.workers if w.ready]
    if len(live) < len(pool.workers):
        for w in pool.workers:
            if not w.ready:
                w.reload_pending = True  # it may have read the old file: it reloads when ready
    answers: list[Answer] = []
    for w in live:
        try:
            answers.append(await w.link.call("POST", "/admin/reload", headers, body, 60.0))
        except Exception:
            w.reload_pending = True
    if not answers:
        return _unavailable()
    refused = [a for a in answers if a.status != 200]
    return _relay(refused[0] if refused else answers[0])


async def _no_route(request: web.Request) -> web.Response:
    return not_found().response()


def _json_errors() -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except GatewayError as e:
            return e.response()

    return errors


def create_supervisor_admin_app(pool: Pool) -> web.Application:
    app = web.Application(middlewares=[_json_errors()])
    app[POOL] = pool
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/admin/reload", _reload)
    app.router.add_route("*", "/admin/{tail:.*}", _admin)
    app.router.add_route("*", "/{tail:.*}", _no_route)
    return app
