"""`GET /v1/models`: the upstreams' models that route to them and that the team may use."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from gateway import errors
from gateway.context import Envelope
from gateway.masking import mask_body
from gateway.policy import Policy
from gateway.relay.sink import send_whole
from gateway.runtime import Gateway
from gateway.upstream.client import UpstreamClient
from gateway.upstream.headers import request_headers


async def list_models(
    gw: Gateway, request: web.Request, env: Envelope, policy: Policy
) -> web.StreamResponse:
    """The union of the upstreams' models that this team may use and that route to them."""
    assert env.principal is not None
    allowed = policy.team_models[env.principal.team.name]
    clients = list(policy.upstreams.values())

    async def fetch(client: UpstreamClient) -> list[dict[str, Any]]:
        extra = {"x-request-id": env.request_id, **client.auth_header(client.next_key())}
        up = await client.send("GET", "/v1/models", request_headers([], extra), b"")
        try:
            async with asyncio.timeout(client.cfg.timeouts.idle):  # a stalled listing fails
                data = orjson.loads(await up.read()) if up.status == 200 else {}
        finally:
            up.release()
        items = data.get("data") if isinstance(data, dict) else None
        return [
            m
            for m in items or []
            if isinstance(m, dict)
            and isinstance(m.get("id"), str)
            and policy.router.route(m["id"])[:1] == (client.name,)
            and allowed(m["id"])
        ]

    results = await asyncio.gather(*(fetch(c) for c in clients), return_exceptions=True)
    if all(isinstance(r, BaseException) for r in results):
        raise errors.upstream_unavailable(",".join(c.name for c in clients))
    seen: dict[str, dict[str, Any]] = {}
    for r in results:
        if not isinstance(r, BaseException):
            for m in r:
                seen.setdefault(m["id"], m)
    env.outcome.head(200)
    listing = orjson.dumps({"object": "list", "data": list(seen.values())})
    return await send_whole(
        request,
        web.Response(
            # entries are the upstreams' own JSON: mask a key one of them echoes
            body=mask_body(listing, policy.secrets),
            content_type="application/json",
            headers=env.headers(),
        ),
    )
