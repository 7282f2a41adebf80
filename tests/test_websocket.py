"""Responses WebSocket mode: the official SDK's `responses.connect()` through the gateway, in
bridge and native mode, against the mock upstream on real sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import WSMsgType
from conftest import (
    ALPHA_KEY,
    BETA_KEY,
    UPSTREAM_KEY,
    GatewayFactory,
    Running,
    Upstream,
    ledger_rows,
)

NATIVE = "\n    websocket: native"
ARGS: dict[str, Any] = {"model": "nusantara-base", "max_output_tokens": 12}
INPUTS = ("first question", "a second one", "and a third")


async def sdk_connection_results(url: str, inputs: tuple[str, ...]) -> list[tuple[str, Any]]:
    """(text, usage) of each response, all on one connection."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=ALPHA_KEY, max_retries=0)
    found = []
    async with client.responses.connect() as conn:
        for text in inputs:
            await conn.send({"type": "response.create", "input": text, **ARGS})
            deltas = ""
            async for event in conn:
                if event.type == "response.output_text.delta":
                    deltas += event.delta
                if event.type == "error":
                    raise AssertionError(event)
                if event.type == "response.completed":
                    assert event.response.output_text == deltas
                    usage = event.response.usage
                    assert usage is not None
                    found.append((deltas, usage.model_dump()))
                    break
    await client.close()
    return found


async def http_stream_results(url: str, inputs: tuple[str, ...]) -> list[tuple[str, Any]]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=ALPHA_KEY, max_retries=0)
    found = []
    for text in inputs:
        stream = await client.responses.create(input=text, stream=True, **ARGS)
        deltas = ""
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas += event.delta
            if event.type == "response.completed":
                assert event.response.usage is not None
                found.append((deltas, event.response.usage.model_dump()))
    await client.close()
    return found


def upstream_keys_seen(upstream: Upstream) -> set[str]:
    """Every credential the upstream got, in any header."""
    seen = set()
    for recorded in upstream.state.requests:
        for name in ("authorization", "x-api-key"):
            if name in recorded.headers:
                seen.add(recorded.headers[name])
    return seen


@pytest.mark.parametrize("extra", ["", NATIVE], ids=["bridge", "native"])
async def test_sdk_connect_equals_http_stream_and_ledger_is_exact(
    gateway_factory: GatewayFactory, upstream: Upstream, extra: str
) -> None:
    gateway = await gateway_factory(upstream_extra=extra)
    over_ws = await sdk_connection_results(gateway.url, INPUTS)
    over_http = await http_stream_results(gateway.url, INPUTS)
    assert over_ws == over_http
    assert all(text for text, _ in over_ws)
    rows = await ledger_rows(gateway)
    ws_rows = [r for r in rows if r["transport"] == "websocket"]
    assert len(ws_rows) == len(INPUTS)
    for row, (_, usage) in zip(ws_rows, over_ws, strict=True):
        assert row["status"] == 200 and row["stream"] == 1 and not row["estimated"]
        assert (row["input_tokens"], row["output_tokens"]) == (
            usage["input_tokens"],
            usage["output_tokens"],
        )
        assert row["response_id"].startswith("resp_")
    assert {r["transport"] for r in rows} == {"websocket", "http"}
    # the upstream saw its own key only, never the client's
    assert upstream_keys_seen(upstream) == {f"Bearer {UPSTREAM_KEY}"}
    calls = upstream.state.calls
    if extra:
        assert calls["GET /v1/responses"] == 1  # one upstream WebSocket for the connection
    else:
        assert calls["GET /v1/responses"] == 0


async def test_native_relays_steer_unchanged(
    gateway_factory: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await gateway_factory(upstream_extra=NATIVE)
    steer = '{"type":"response.steer","previous_response_id":"resp_x","input":"faster"}'
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"{gateway.url}/v1/responses", headers={"Authorization": f"Bearer {ALPHA_KEY}"}
        ) as ws,
    ):
        await ws.send_str(orjson.dumps({"type": "response.create", "input": "hi", **ARGS}).decode())
        await until(ws, "response.completed")
        await ws.send_str(steer)
        accepted = await until(ws, "response.steer.accepted")
        assert accepted["steer"]["previous_response_id"] == "resp_x"
    assert upstream.state.websocket_messages[-1] == steer
    handshake = next(r for r in upstream.state.requests if r.method == "GET")
    assert handshake.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert not any(ALPHA_KEY in v for v in handshake.headers.values())


async def until(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    """Read events until one of `kind` (an `error` ends the wait too, and is returned)."""
    async with asyncio.timeout(10):
        while True:
            msg = await ws.receive()
            assert msg.type == WSMsgType.TEXT, msg
            event = orjson.loads(msg.data)
            if event["type"] in (kind, "error"):
                return event


async def connect(
    url: str, key: str = ALPHA_KEY, **kw: Any
) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(
        f"{url}/v1/responses", headers={"Authorization": f"Bearer {key}"}, **kw
    )
    return session, ws


def create(**fields: Any) -> str:
    return orjson.dumps({"type": "response.create", **ARGS, "input": "hi", **fields}).decode()


@pytest.mark.parametrize("extra", ["", NATIVE], ids=["bridge", "native"])
async def test_refusals_are_error_events_on_an_open_connection(
    gateway_factory: GatewayFactory, upstream: Upstream, extra: str
) -> None:
    gateway = await gateway_factory(upstream_extra=extra, alpha_budgets="[{tokens: 200, per: day}]")
    session, ws = await connect(gateway.url)
    try:
        await ws.send_str("{not json")
        bad = await until(ws, "response.completed")
        assert bad["type"] == "error" and bad["error"]["code"] == "invalid_json"
        assert bad["status"] == 400 and bad["code"] == "invalid_json"
        await ws.send_str(create(max_output_tokens=20))
        assert (await until(ws, "response.completed"))["type"] == "response.completed"
        # what is left of the day's budget cannot hold this one's estimate
        await ws.send_str(create(max_output_tokens=190))
        refused = await until(ws, "response.completed")
        assert refused["type"] == "error" and refused["error"]["code"] == "budget_exceeded"
        assert refused["status"] == 429
        await ws.send_str('{"type":"response.cancel"}')  # no such client event
        other = await until(ws, "response.completed")
        assert other["error"]["code"] == "unsupported_event"
        # still open, still serving
        await ws.send_str(create(max_output_tokens=1))
        last = await until(ws, "response.completed")
        assert last["type"] == "response.completed", last
    finally:
        await ws.close()
        await session.close()
    rows = await ledger_rows(gateway)
    assert [(r["status"], r["transport"]) for r in rows if r["status"] != 200] == (
        [(400, "websocket"), (429, "websocket")] + ([] if extra else [(400, "websocket")])
    )
    assert sum(r["output_tokens"] for r in rows) == 21


async def test_model_not_allowed_is_an_error_event(gateway: Running) -> None:
    session, ws = await connect(gateway.url, BETA_KEY)  # beta may use garda-* only
    try:
        await ws.send_str(create())
        refused = await until(ws, "response.completed")
        assert refused["error"]["code"] == "model_not_allowed" and refused["status"] == 403
        await ws.send_str(create(model="garda-beta-mini"))
        assert (await until(ws, "response.completed"))["type"] == "response.completed"
    finally:
        await ws.close()
        await session.close()


async def test_bad_key_is_refused_before_the_upgrade(gateway: Running, upstream: Upstream) -> None:
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": "Bearer nope-0123456789"}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await session.ws_connect(f"{gateway.url}/v1/responses", headers=headers)
            assert caught.value.status == 401
        async with session.get(
            f"{gateway.url}/v1/responses",
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        ) as resp:
            assert resp.status == 401
            body = await resp.json()
            assert body["error"]["code"] == "invalid_api_key"
    assert not upstream.state.requests


async def test_upgrades_elsewhere_are_refused(gateway: Running) -> None:
    async with aiohttp.ClientSession() as session:
        for url in (
            f"{gateway.url}/v1/chat/completions",
            f"{gateway.admin_url}/metrics",
            f"{gateway.admin_url}/v1/responses",
        ):
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await session.ws_connect(url, headers={"Authorization": f"Bearer {ALPHA_KEY}"})
            assert caught.value.status == 400, url
