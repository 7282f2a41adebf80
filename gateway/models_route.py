"""`GET /v1/models`: the upstreams' models that route to them and that the team may use."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from gateway import errors
from gateway.exchange import Exchange
from gateway.masking import mask_body
from gateway.relay import send_whole
from gateway.upstream import UpstreamClient, request_headers

if TYPE_CHECKING:
    from gateway.runtime import Gateway


async def list_models(gw: Gateway, request: web.Request, ex: Exchange) -> web.StreamResponse:
    """The union of the upstreams' models that this team may use and that route to them."""
    policy = gw.policy
    allowed = policy.team_models[ex.team]

    async def fetch(client: UpstreamClient) -> list[dict[str, Any]]:
        headers = request_headers([], {"x-request-id": ex.request_id, **client.auth_header()})
        up = await client.send("GET", "/v1/models", headers, b"")
        try:
            data = orjson.loads(await up.read()) if up.status == 200 else {}
        finally:
            up.release()
        items = data.get("data") if isinstance(data, dict) else None
        return [
            m
            for m in items or []
            if isinstance(m, dict)
            and isinstance(m.get("id"), str)
            and policy.router.route(m["id"]) == client.name
            and allowed(m["id"])
        ]

    ex.upstream = ",".join(gw.upstreams)
    results = await asyncio.gather(
        *(fetch(c) for c in gw.upstreams.values()), return_exceptions=True
    )
    if all(isinstance(r, BaseException) for r in results):
        raise errors.upstream_unavailable(ex.upstream)
    seen: dict[str, dict[str, Any]] = {}
    for r in results:
        if not isinstance(r, BaseException):
            for m in r:
                seen.setdefault(m["id"], m)
    ex.status = 200
    return await send_whole(
        request,
        web.Response(
            # entries are the upstreams' own JSON: mask a key one of them echoes
            body=mask_body(
                orjson.dumps({"object": "list", "data": list(seen.values())}), gw.secrets
            ),
            content_type="application/json",
            headers=ex.response_headers(),
        ),
    )
