"""Budget settlement when the upstream may have done, and billed, work it reported no usage for."""

from __future__ import annotations

import asyncio
import math

import aiohttp
import orjson
from aiohttp import web
from conftest import GatewayFactory, auth, start_app

BODY = {"model": "nusantara-base", "input": "hello there", "max_output_tokens": 50}
ESTIMATE = math.ceil(len(orjson.dumps(BODY)) / 4) + 50


async def test_first_byte_timeout_is_charged_a_marked_estimate(
    gateway_factory: GatewayFactory,
) -> None:
    """A request that reached the upstream but got no answer within `timeouts.first_byte` gets a
    504 and is charged its reservation estimate, marked as estimated: the upstream may have done,
    and billed, the work, so the team's budget still moves."""
    served = asyncio.Event()

    async def slow_json(request: web.Request) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(1.3)  # generating... (first_byte is 1 s)
        served.set()
        return web.json_response(
            {
                "id": "resp_t",
                "object": "response",
                "status": "completed",
                "model": "nusantara-base",
                "output": [],
                "usage": {"input_tokens": 3, "output_tokens": 50},
            }
        )

    url, runner = await start_app(slow_json)
    try:
        gw = await gateway_factory(url, first_byte=1, alpha_budgets="[{tokens: 100000, per: day}]")
        async with (
            aiohttp.ClientSession(json_serialize=lambda o: orjson.dumps(o).decode()) as s,
            s.post(f"{gw.url}/v1/responses", json=BODY, headers=auth()) as r,
        ):
            assert r.status == 504
        await gw.gw.ledger.flush()
        rows = await gw.gw.ledger._run(
            gw.gw.ledger._query,
            "SELECT status, charged_tokens, estimated FROM ledger",
            (),
        )
        assert rows == [(504, ESTIMATE, 1)], rows
    finally:
        await runner.cleanup()
