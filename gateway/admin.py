"""The admin listener's routes: /metrics and /admin/* (CONTRACT section 8)."""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from gateway import config, errors
from gateway.admin_requests import list_requests, one_request, replay_request
from gateway.amounts import amount
from gateway.envelope import expect
from gateway.errors import GatewayError
from gateway.inspector import add_inspector_routes
from gateway.ledger.report import parse_by, parse_when, row_to_dict
from gateway.redis_state import StateUnavailable
from gateway.runtime import GATEWAY

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CONFIG_PATH: web.AppKey[str] = web.AppKey("config_path", str)


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _guard(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        key = request.app[GATEWAY].settings.admin.key
        if key is None:
            return GatewayError(
                403,
                "permission_error",
                "admin_disabled",
                "The admin API is off: set admin.key to use it.",
            ).response()
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(
            sent.encode("utf-8", "surrogateescape"), f"Bearer {key.get()}".encode()
        ):
            return GatewayError(
                401,
                "invalid_request_error",
                "invalid_api_key",
                "Send the admin key as 'Authorization: Bearer <key>'.",
            ).response()
        try:
            return await handler(request)
        except ValueError as e:
            return GatewayError(
                400, "invalid_request_error", "invalid_parameter", str(e)
            ).response()

    return guarded


async def teams(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    now = gw.clock()
    out = []
    for team in gw.policy.teams.values():
        try:
            windows = await gw.budget.windows(team, now)
        except StateUnavailable:
            raise errors.state_unavailable() from None
        out.append(
            {
                "team": team.name,
                "models": list(team.models),
                "budgets": [
                    {
                        "per": w.per,
                        "unit": w.unit,
                        "limit": amount(w.unit, w.limit),
                        "used": amount(w.unit, w.used),
                        "reserved": amount(w.unit, w.reserved),
                        "remaining": amount(w.unit, w.remaining),
                        "resets_at": None if w.per == "total" else w.end,
                    }
                    for w in windows
                ],
            }
        )
    return _json({"teams": out})


async def upstreams(request: web.Request) -> web.Response:
    """Each upstream and each of its keys (by key id, never the key): state, until when,
    requests of the last minute and their error ratio. This replica's view."""
    gw = request.app[GATEWAY]
    health = gw.health
    now, wall = health.clock(), gw.clock()
    out = []
    for client in gw.policy.upstreams.values():
        keys = [
            {"key_id": kid, **health.key(client.name, kid).shown(now, wall)}
            for kid in client.key_ids
            if kid
        ]
        out.append(
            {"upstream": client.name, **health.upstream(client.name).shown(now, wall), "keys": keys}
        )
    return _json({"upstreams": out})


async def usage(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    q = request.query
    since = parse_when(q["since"]) if q.get("since") else None
    until = parse_when(q["until"]) if q.get("until") else None
    by = parse_by(q.get("by", "team,model"))
    rows = await gw.reports.report(since, until, by)
    return _json({"by": list(by), "rows": [row_to_dict(r, by) for r in rows]})


def _state_unavailable() -> web.Response:
    return GatewayError(
        503,
        "server_error",
        "state_unavailable",
        "The shared state store (Redis) does not answer; try again shortly.",
        headers={"retry-after": "1"},
    ).response()


async def cache_stats(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    try:
        stats = await gw.cache.stats()
    except StateUnavailable:
        return _state_unavailable()
    c = gw.cache_counts
    return _json(
        {
            "enabled": gw.settings.cache.enabled,
            "entries": stats.entries,
            "bytes": stats.bytes,
            "hits": c.hits,
            "misses": c.misses,
            "coalesced": c.coalesced,
            "bypass": c.bypass,
            "in_flight": len(gw.flights),
        }
    )


async def cache_purge(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    team = request.query.get("team") or None
    try:
        removed = await gw.cache.purge(team)
    except StateUnavailable:
        return _state_unavailable()
    return _json({"purged": removed, "team": team})


async def reload(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    path = request.app.get(CONFIG_PATH)
    if not path:
        return GatewayError(
            409,
            "invalid_request_error",
            "no_config_file",
            "This gateway was not started from a config file.",
        ).response()
    try:
        settings = config.load(path)
    except config.ConfigError as e:
        return _json({"reloaded": False, "problems": e.problems}, status=400)
    await gw.reload(settings)
    return _json({"reloaded": True})


def _metrics_handler() -> Handler:
    exposition: dict[int, Handler] = {}  # one exposition handler per registry, built once

    async def metrics(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY]
        # a scrape still answers while Redis does not: the cache gauges keep their last values
        with contextlib.suppress(StateUnavailable):
            stats = await gw.cache.stats()
            gw.metrics.cache_entries.set(stats.entries)
            gw.metrics.cache_bytes.set(stats.bytes)
        gw.metrics.ledger_pending.set(gw.ledger.pending)
        await gw.refresh_budget_gauges()  # gauges are read at scrape time, not per request
        registry = gw.metrics.registry
        handler = exposition.get(id(registry))
        if handler is None:
            handler = exposition[id(registry)] = make_aiohttp_handler(registry)
        return await handler(request)

    return metrics


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", _metrics_handler(), expect_handler=expect)
    app.router.add_get("/admin/teams", _guard(teams), expect_handler=expect)
    app.router.add_get("/admin/usage", _guard(usage), expect_handler=expect)
    app.router.add_get("/admin/upstreams", _guard(upstreams), expect_handler=expect)
    app.router.add_get("/admin/requests", _guard(list_requests), expect_handler=expect)
    app.router.add_get("/admin/requests/{request_id}", _guard(one_request), expect_handler=expect)
    app.router.add_post(
        "/admin/requests/{request_id}/replay", _guard(replay_request), expect_handler=expect
    )
    app.router.add_get("/admin/cache", _guard(cache_stats), expect_handler=expect)
    app.router.add_delete("/admin/cache", _guard(cache_purge), expect_handler=expect)
    app.router.add_post("/admin/reload", _guard(reload), expect_handler=expect)
    add_inspector_routes(app)
