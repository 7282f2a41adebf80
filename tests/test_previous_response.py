"""`previous_response_id` names a stored response whose whole conversation the upstream reads
into the new one: only the team that made it may name it (HTTP and WebSocket alike), and the
request goes where that response is kept."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from conftest import ALPHA_KEY, BETA_KEY, GatewayFactory, Running, Upstream, auth
from test_websocket import NATIVE, connect, until

RESPONSES = "POST /v1/responses"


async def post(gateway: Running, body: dict[str, Any], key: str = ALPHA_KEY) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{gateway.url}/v1/responses", json=body, headers=auth(key)) as r,
    ):
        return r.status, orjson.loads(await r.read())


async def made(gateway: Running, stream: bool = False) -> str:
    """A response alpha made: its id."""
    if not stream:
        status, body = await post(gateway, {"model": "garda-beta-mini", "input": "remember 42"})
        assert status == 200
        return str(body["id"])
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{gateway.url}/v1/responses",
            json={"model": "garda-beta-mini", "input": "remember 42", "stream": True},
            headers=auth(),
        ) as r,
    ):
        raw = await r.read()
    created = next(line for line in raw.decode().splitlines() if '"response.created"' in line)
    return str(orjson.loads(created.removeprefix("data: "))["response"]["id"])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_only_the_team_that_made_a_response_may_continue_it(
    gateway: Running, upstream: Upstream, stream: bool
) -> None:
    rid = await made(gateway, stream)
    calls = upstream.state.calls[RESPONSES]
    body = {
        "model": "garda-beta-mini",
        "input": "what was the number?",
        "previous_response_id": rid,
    }
    status, got = await post(gateway, body, key=BETA_KEY)
    assert status == 404 and got["error"]["code"] == "not_found"
    assert upstream.state.calls[RESPONSES] == calls  # never reached the upstream
    status, got = await post(gateway, body)
    assert status == 200, got
    assert upstream.state.requests[-1].body and rid.encode() in upstream.state.requests[-1].body


async def test_unknown_and_malformed_previous_ids(gateway: Running, upstream: Upstream) -> None:
    base = {"model": "garda-beta-mini", "input": "hi"}
    status, got = await post(gateway, {**base, "previous_response_id": "resp_nobody_made"})
    assert status == 404 and got["error"]["code"] == "not_found"
    for bad in (42, "", ["resp_x"], {"id": "resp_x"}):
        status, got = await post(gateway, {**base, "previous_response_id": bad})
        assert status == 400 and got["error"]["code"] == "invalid_value", bad
        assert got["error"]["param"] == "previous_response_id"
    status, _ = await post(gateway, {**base, "previous_response_id": None})  # null: none
    assert status == 200
    assert upstream.state.calls[RESPONSES] == 1


@pytest.mark.parametrize("extra", ["", NATIVE], ids=["bridge", "native"])
async def test_a_websocket_create_may_not_continue_another_teams_response(
    gateway_factory: GatewayFactory, upstream: Upstream, extra: str
) -> None:
    gateway = await gateway_factory(upstream_extra=extra)
    rid = await made(gateway)
    event = {"type": "response.create", "model": "garda-beta-mini", "input": "the number?"}
    session, ws = await connect(gateway.url, key=BETA_KEY)
    try:
        await ws.send_str(orjson.dumps({**event, "previous_response_id": rid}).decode())
        refused = await until(ws, "response.completed")
        assert refused["type"] == "error" and refused["error"]["code"] == "not_found"
        await ws.send_str(orjson.dumps(event).decode())  # the connection still serves
        assert (await until(ws, "response.completed"))["type"] == "response.completed"
    finally:
        await ws.close()
        await session.close()
    assert rid.encode() not in b"".join(m.encode() for m in upstream.state.websocket_messages)
    assert not any(rid.encode() in r.body for r in upstream.state.requests[1:])
