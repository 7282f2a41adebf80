"""Responses WebSocket mode: the official SDK's `responses.connect()` through the gateway, in
bridge and native mode, against the mock upstream on real sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import WSMsgType, web
from conftest import (
    ALPHA_KEY,
    BETA_KEY,
    ENV,
    UPSTREAM_KEY,
    GatewayFactory,
    Running,
    Upstream,
    ledger_rows,
    make_settings,
    start_app,
    start_gateway,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_masking import MASKED, completed, resp_delta, serve_stream, upstream_key

from gateway.runtime import Gateway
from gateway.settings import Backoff, Retries, Telemetry, Traces
from gateway.telemetry.tracing import Tracing

NATIVE = "\n    websocket: native"
ARGS: dict[str, Any] = {"model": "nusantara-base", "max_output_tokens": 12}
ROOMY = "[{tokens: 9999, per: day}]"  # budgets, so a response without usage has an estimate
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
    url: str, key: str = ALPHA_KEY, headers_extra: dict[str, str] | None = None
) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    session = aiohttp.ClientSession()
    headers = {"Authorization": f"Bearer {key}", **(headers_extra or {})}
    ws = await session.ws_connect(f"{url}/v1/responses", headers=headers)
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


async def wait_rows(gateway: Running, n: int) -> list[dict[str, Any]]:
    """The ledger once it holds `n` records (a response ends after its client may have left)."""
    async with asyncio.timeout(10):
        while len(rows := await ledger_rows(gateway)) < n:  # noqa: ASYNC110 (a table)
            await asyncio.sleep(0.05)
    return rows


@pytest.mark.parametrize("extra", ["", NATIVE], ids=["bridge", "native"])
async def test_client_leaving_mid_response_is_charged_its_real_usage(
    gateway_factory: GatewayFactory, extra: str
) -> None:
    gateway = await gateway_factory(
        upstream_extra=extra, alpha_budgets="[{tokens: 9999, per: day}]"
    )
    session, ws = await connect(gateway.url, headers_extra={"x-mock-tokens-per-s": "40"})
    try:
        await ws.send_str(create(max_output_tokens=20))  # half a second of deltas
        await until(ws, "response.output_text.delta")
    finally:
        await ws.close()
        await session.close()
    [row] = await wait_rows(gateway, 1)
    assert row["output_tokens"] == 20 and not row["estimated"]
    assert row["charged_tokens"] == row["input_tokens"] + 20
    assert row["status"] == 200 and row["transport"] == "websocket"
    windows = await gateway.gw.budget.windows(gateway.gw.policy.teams["alpha"], gateway.gw.clock())
    assert (windows[0].used, windows[0].reserved) == (row["charged_tokens"], 0)


@pytest.mark.parametrize("extra", ["", NATIVE], ids=["bridge", "native"])
async def test_upstream_cut_gives_an_error_event_and_an_estimate(
    gateway_factory: GatewayFactory, upstream: Upstream, extra: str
) -> None:
    gateway = await gateway_factory(
        upstream_extra=extra, alpha_budgets="[{tokens: 9999, per: day}]"
    )
    session, ws = await connect(gateway.url)
    try:
        await ws.send_str(create())
        assert (await until(ws, "response.completed"))["type"] == "response.completed"
        cut = {"status": "cut", "cut_after": 6, "count": 1, "path": "/v1/responses"}
        async with session.post(f"{upstream.url}/mock/faults", json=cut) as resp:
            assert resp.status == 200, await resp.text()
        await ws.send_str(create(max_output_tokens=30))
        broken = await until(ws, "response.completed")
        assert broken["type"] == "error", broken
        assert broken["code"] == broken["error"]["code"] == "upstream_stream_interrupted"
        # the connection goes on: the next response is whole
        await ws.send_str(create())
        assert (await until(ws, "response.completed"))["type"] == "response.completed"
    finally:
        await ws.close()
        await session.close()
    rows = await wait_rows(gateway, 3)
    assert [(r["status"], bool(r["estimated"])) for r in rows] == [
        (200, False),
        (200, True),
        (200, False),
    ]
    assert rows[1]["charged_tokens"] >= 30  # the estimate: at least what it could produce


async def echoing_upstream(request: web.Request) -> web.StreamResponse:
    """An upstream that says its key back, split over two deltas: as a stream, or (for a
    WebSocket handshake) in the messages of its own WebSocket mode."""
    key = await upstream_key(request)
    if request.method == "POST":
        deltas = [resp_delta(orjson.dumps(f"Your key is {key[:15]}"), 1)]
        deltas.append(resp_delta(orjson.dumps(key[15:]), 2))
        return await serve_stream(request, [*deltas, completed(3)])
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type != WSMsgType.TEXT:
            break
        created = {"type": "response.created", "response": {"id": "resp_1", "status": "x"}}
        await ws.send_str(orjson.dumps(created).decode())
        for part in (f"Your key is {key[:15]}", key[15:]):
            delta = {"type": "response.output_text.delta", "delta": part}
            await ws.send_str(orjson.dumps(delta).decode())
        await ws.send_bytes(f"raw {key}".encode())
        await ws.send_str(completed(4).split(b"data: ")[1].strip().decode())
    return ws


@pytest.mark.parametrize("extra", ["", NATIVE], ids=["bridge", "native"])
async def test_upstream_keys_are_masked_in_every_message(
    gateway_factory: GatewayFactory, extra: str
) -> None:
    url, runner = await start_app(echoing_upstream)
    gateway = await gateway_factory(url, upstream_extra=extra)
    session, ws = await connect(gateway.url)
    seen: list[str] = []
    try:
        await ws.send_str(create())
        async with asyncio.timeout(10):
            while True:
                msg = await ws.receive()
                data = msg.data if isinstance(msg.data, str) else msg.data.decode()
                seen.append(data)
                if '"response.completed"' in data:
                    break
    finally:
        await ws.close()
        await session.close()
        await runner.cleanup()
    everything = "".join(seen)
    assert UPSTREAM_KEY not in everything and UPSTREAM_KEY[8:20] not in everything
    assert MASKED in everything


async def closing(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[str], int | None]:
    """Every event type until the gateway closes the connection, and its close code."""
    kinds = []
    async with asyncio.timeout(10):
        while True:
            msg = await ws.receive()
            if msg.type != WSMsgType.TEXT:
                return kinds, ws.close_code
            kinds.append(orjson.loads(msg.data)["type"])


async def test_an_old_connection_closes_after_its_response(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(limits_extra="\n  max_websocket_seconds: 0.5")
    session, ws = await connect(gateway.url, headers_extra={"x-mock-tokens-per-s": "20"})
    try:
        await ws.send_str(create(max_output_tokens=20))  # a second of deltas: past the age
        kinds, code = await closing(ws)
        assert kinds[-1] == "response.completed" and code == 1001
        # an idle one closes at its age too
        session2, ws2 = await connect(gateway.url)
        assert await closing(ws2) == ([], 1001)
        await session2.close()
    finally:
        await session.close()


async def test_a_graceful_stop_closes_after_the_response_under_way(gateway: Running) -> None:
    session, busy = await connect(gateway.url, headers_extra={"x-mock-tokens-per-s": "40"})
    idle_session, idle = await connect(gateway.url)
    try:
        await busy.send_str(create(max_output_tokens=20))
        await until(busy, "response.output_text.delta")
        gw = gateway.gw
        gw.draining = True
        drained = asyncio.ensure_future(gw.drain(10))
        assert await closing(idle) == ([], 1001)
        kinds, code = await closing(busy)
        assert kinds[-1] == "response.completed" and code == 1001
        await asyncio.wait_for(drained, 10)
        assert not gw.sockets and gw.inflight == 0
    finally:
        await session.close()
        await idle_session.close()


async def test_a_client_that_stops_reading_is_let_go_and_still_charged(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = await gateway_factory(idle=1, alpha_budgets="[{tokens: 1000000, per: day}]")
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(
            f"{gateway.url}/v1/responses", headers={"Authorization": f"Bearer {ALPHA_KEY}"}
        )
        # far more than the sockets' buffers hold; this client never reads a message
        await ws.send_str(create(max_output_tokens=100_000))
        [row] = await wait_rows(gateway, 1)
        assert row["output_tokens"] == 100_000 and not row["estimated"]
        await ws.close()


async def test_a_key_removed_by_a_reload_ends_the_connection(
    gateway: Running, upstream: Upstream, tmp_path: Path
) -> None:
    session, ws = await connect(gateway.url)
    try:
        await ws.send_str(create())
        assert (await until(ws, "response.completed"))["type"] == "response.completed"
        revoked = make_settings(
            upstream.url, tmp_path / "state", env={**ENV, "ALPHA_KEY": "another-key-0123456789"}
        )
        await gateway.gw.reload(revoked)
        await ws.send_str(create())
        refused = await until(ws, "response.completed")
        assert refused["error"]["code"] == "invalid_api_key"
        assert await closing(ws) == ([], 1008)
    finally:
        await session.close()


@pytest.mark.parametrize("extra", ["", NATIVE], ids=["bridge", "native"])
async def test_each_response_is_a_trace_of_its_own(
    upstream: Upstream, tmp_path: Path, extra: str
) -> None:
    settings = make_settings(upstream.url, tmp_path / "s", upstream_extra=extra)
    exporter = InMemorySpanExporter()
    tracing = Tracing.from_settings(Telemetry(traces=Traces()), exporter=exporter)
    running = await start_gateway(settings, Gateway(settings, tracing=tracing))
    try:
        session, ws = await connect(running.url)
        for _ in range(2):
            await ws.send_str(create())
            assert (await until(ws, "response.completed"))["type"] == "response.completed"
        await ws.close()
        await session.close()
        async with asyncio.timeout(10):
            while len(exporter.get_finished_spans()) < 4:  # noqa: ASYNC110 (no event to wait on)
                await asyncio.sleep(0.05)
    finally:
        await running.stop()
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind.name == "SERVER"]
    clients = [s for s in spans if s.kind.name == "CLIENT"]
    assert [s.name for s in servers] == ["WS /v1/responses"] * 2
    assert len({s.context.trace_id for s in servers}) == 2
    for server in servers:
        assert server.attributes is not None
        assert server.attributes["gateway.transport"] == "websocket"
        [client] = [c for c in clients if c.context.trace_id == server.context.trace_id]
        assert client.attributes is not None
        assert client.attributes["gen_ai.usage.output_tokens"] == ARGS["max_output_tokens"]


async def test_a_bridged_response_is_retried_before_its_first_event(
    upstream: Upstream, tmp_path: Path
) -> None:
    settings = make_settings(upstream.url, tmp_path / "s")
    settings = settings.model_copy(
        update={"retries": Retries(attempts=2, backoff=Backoff(base=0.001, max=0.01))}
    )
    running = await start_gateway(settings)
    try:
        # the upstream answers the first POST with a 503, the second with the stream
        session, ws = await connect(running.url, headers_extra={"x-mock-fail-first": "503:1"})
        await ws.send_str(create())
        done = await until(ws, "response.completed")
        assert done["type"] == "response.completed", done
        await ws.close()
        await session.close()
        [row] = await wait_rows(running, 1)
        assert (row["status"], row["attempts"], row["transport"]) == (200, 2, "websocket")
    finally:
        await running.stop()
