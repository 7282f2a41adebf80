"""The proxy end to end: every route, two teams, the error table, header and key hygiene."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from conftest import (
    ALPHA_KEY,
    BETA_KEY,
    UPSTREAM_KEY,
    GatewayFactory,
    Running,
    Upstream,
    auth,
    free_port,
    make_settings,
    serve_on_free_port,
    start_gateway,
)

RESP = {"model": "nusantara-base", "input": "Tell me a story", "max_output_tokens": 12}


async def post(
    url: str, body: object, key: str = ALPHA_KEY, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url,
            data=orjson.dumps(body),
            headers={**auth(key), **headers, "content-type": "application/json"},
        ) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


def error_of(body: bytes) -> dict[str, object]:
    err = orjson.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err  # type: ignore[no-any-return]


async def test_responses_json_for_two_teams(gateway: Running, upstream: Upstream) -> None:
    status, headers, body = await post(f"{gateway.url}/v1/responses", RESP)
    assert status == 200
    obj = orjson.loads(body)
    assert obj["status"] == "completed" and obj["usage"]["output_tokens"] == 12
    assert headers["x-request-id"].startswith("req_")
    assert headers["x-upstream-request-id"].startswith("req_")
    assert len(headers["x-gateway-trace-id"]) == 32
    # beta may use garda-* only
    status, _, body = await post(f"{gateway.url}/v1/responses", RESP, BETA_KEY)
    assert status == 403 and error_of(body)["code"] == "model_not_allowed"
    status, _, body = await post(
        f"{gateway.url}/v1/responses", {**RESP, "model": "garda-beta-mini"}, BETA_KEY
    )
    assert status == 200 and orjson.loads(body)["model"] == "garda-beta-mini"


async def test_stored_response_routes(gateway: Running) -> None:
    _, _, body = await post(f"{gateway.url}/v1/responses", RESP)
    rid = orjson.loads(body)["id"]
    async with aiohttp.ClientSession(headers=auth()) as s:
        async with s.get(f"{gateway.url}/v1/responses/{rid}") as r:
            assert r.status == 200 and (await r.json())["id"] == rid
        async with s.get(f"{gateway.url}/v1/responses/{rid}/input_items?limit=5") as r:
            assert r.status == 200 and (await r.json())["object"] == "list"
        async with s.post(f"{gateway.url}/v1/responses/{rid}/cancel") as r:
            assert r.status == 200 and (await r.json())["status"] == "cancelled"
        async with s.delete(f"{gateway.url}/v1/responses/{rid}") as r:
            assert r.status == 200 and (await r.json())["deleted"] is True
        async with s.post(
            f"{gateway.url}/v1/responses/input_tokens",
            json={"model": "nusantara-base", "input": "12345678"},
        ) as r:
            assert r.status == 200 and (await r.json())["input_tokens"] == 2
    # a response another team created does not exist for it
    async with (
        aiohttp.ClientSession(headers=auth(BETA_KEY)) as s,
        s.get(f"{gateway.url}/v1/responses/{rid}") as r,
    ):
        assert r.status == 404 and error_of(await r.read())["code"] == "not_found"


async def test_models_filtered_per_team(gateway: Running) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gateway.url}/v1/models", headers=auth()) as r:
            ids = {m["id"] for m in (await r.json())["data"]}
        assert ids == {"nusantara-base", "garda-beta-mini", "gpt-4o-mini"}
        async with s.get(f"{gateway.url}/v1/models", headers=auth(BETA_KEY)) as r:
            assert {m["id"] for m in (await r.json())["data"]} == {"garda-beta-mini"}


async def test_chat_completions_and_other_paths(gateway: Running, upstream: Upstream) -> None:
    chat = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
    }
    status, _, body = await post(f"{gateway.url}/v1/chat/completions", chat)
    assert status == 200 and orjson.loads(body)["usage"]["completion_tokens"] == 5
    async with aiohttp.ClientSession(headers=auth()) as s:
        async with s.post(
            f"{gateway.url}/v1/chat/completions",
            json={**chat, "stream": True, "stream_options": {"include_usage": True}},
        ) as r:
            text = await r.text()
        assert text.rstrip().endswith("data: [DONE]")
        async with s.get(f"{gateway.url}/v1/files?purpose=batch") as r:
            echo = await r.json()
        assert echo["path"].startswith("/v1/files") and echo["method"] == "GET"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gateway.url}/healthz") as r:
            assert r.status == 200
        async with s.get(f"{gateway.url}/readyz") as r:
            assert r.status == 200
        async with s.get(f"{gateway.url}/nope") as r:
            assert r.status == 404 and error_of(await r.read())["code"] == "not_found"


@pytest.mark.parametrize("auth_header", ["authorization", "x-api-key"])
async def test_keys_never_cross(
    gateway_factory: GatewayFactory, upstream: Upstream, auth_header: str
) -> None:
    gw = await gateway_factory(auth_header=auth_header)
    await post(f"{gw.url}/v1/responses", RESP)
    await post(f"{gw.url}/v1/responses", RESP, **{"x-api-key": "also-client"})
    for req in upstream.state.requests:
        flat = orjson.dumps(req.headers).decode()
        assert ALPHA_KEY not in flat and "also-client" not in flat
        if auth_header == "authorization":
            assert req.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
            assert "x-api-key" not in req.headers
        else:
            assert req.headers["x-api-key"] == UPSTREAM_KEY
            assert "authorization" not in req.headers


async def test_echoed_upstream_key_is_masked(gateway: Running) -> None:
    status, _, body = await post(f"{gateway.url}/v1/responses", RESP, **{"x-mock-echo-key": "1"})
    assert status == 401
    assert UPSTREAM_KEY.encode() not in body and b"sk-****" in body


async def test_client_key_via_x_api_key(gateway: Running) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{gateway.url}/v1/responses", json=RESP, headers={"x-api-key": ALPHA_KEY}) as r,
    ):
        assert r.status == 200


async def test_hop_by_hop_and_request_id(gateway: Running, upstream: Upstream) -> None:
    status, headers, _ = await post(
        f"{gateway.url}/v1/responses",
        RESP,
        **{
            "connection": "keep-alive, x-private-hop",
            "x-private-hop": "1",
            "te": "trailers",
            "proxy-authorization": "Basic abc",
            "x-request-id": "client-req-42",
            "x-custom": "kept",
        },
    )
    assert status == 200 and headers["x-request-id"] == "client-req-42"
    seen = upstream.state.requests[-1].headers
    for gone in ("x-private-hop", "te", "proxy-authorization"):
        assert gone not in seen
    assert seen["x-custom"] == "kept" and seen["x-request-id"] == "client-req-42"
    assert "traceparent" in seen
    _, headers, _ = await post(
        f"{gateway.url}/v1/responses", RESP, **{"x-request-id": "bad id with spaces"}
    )
    assert headers["x-request-id"].startswith("req_")


# --- the error table, each row produced for real ------------------------------------------


async def test_401_missing_and_unknown_key(gateway: Running) -> None:
    async with aiohttp.ClientSession() as s:
        for headers in ({}, auth("wrong"), {"Authorization": "Basic abc"}):
            async with s.post(f"{gateway.url}/v1/responses", json=RESP, headers=headers) as r:
                assert r.status == 401
                err = error_of(await r.read())
                assert err["code"] == "invalid_api_key"
                assert err["type"] == "invalid_request_error"


async def test_400_invalid_json_and_missing_model(gateway: Running) -> None:
    async with aiohttp.ClientSession(headers=auth()) as s:
        async with s.post(f"{gateway.url}/v1/responses", data=b"{nope") as r:
            assert r.status == 400 and error_of(await r.read())["code"] == "invalid_json"
        async with s.post(f"{gateway.url}/v1/responses", json={"input": "x"}) as r:
            assert r.status == 400 and error_of(await r.read())["code"] == "missing_model"
        async with s.post(f"{gateway.url}/v1/responses", json=[1, 2]) as r:
            assert r.status == 400 and error_of(await r.read())["code"] == "missing_model"


async def test_404_model_not_found(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(models='["nusantara-*"]')
    status, _, body = await post(f"{gw.url}/v1/responses", {**RESP, "model": "gpt-4o-mini"})
    assert status == 404 and error_of(body)["code"] == "model_not_found"


async def test_413_body_too_large(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(max_body=1000)
    status, _, body = await post(f"{gw.url}/v1/responses", {**RESP, "input": "x" * 2000})
    assert status == 413 and error_of(body)["code"] == "request_too_large"


async def test_502_dead_upstream(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(upstream_url=f"http://127.0.0.1:{free_port()}")
    status, _, body = await post(f"{gw.url}/v1/responses", RESP)
    err = error_of(body)
    assert status == 502 and err["code"] == "upstream_unavailable"
    assert err["type"] == "upstream_error"


async def test_504_slow_first_byte(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(first_byte=0.3)
    status, _, body = await post(
        f"{gw.url}/v1/responses", RESP, **{"x-mock-first-byte-delay-ms": "1500"}
    )
    assert status == 504 and error_of(body)["code"] == "upstream_timeout"


async def test_503_while_draining(gateway: Running) -> None:
    gateway.gw.draining = True
    status, headers, body = await post(f"{gateway.url}/v1/responses", RESP)
    assert status == 503 and error_of(body)["code"] == "shutting_down"
    assert headers["retry-after"] == "1"
    async with aiohttp.ClientSession() as s, s.get(f"{gateway.url}/readyz") as r:
        assert r.status == 503
    gateway.gw.draining = False


async def test_upstream_errors_pass_through(gateway: Running) -> None:
    for code in (400, 429, 500, 503):
        status, _, body = await post(
            f"{gateway.url}/v1/responses", RESP, **{"x-mock-status": str(code)}
        )
        assert status == code and error_of(body)["code"] == "mock_error"


# --- streams --------------------------------------------------------------------------------

RECORDED = [
    b": ping\r\n\r\n",
    b'event: response.created\r\ndata: {"type":"response.created","sequence_number":0,'
    b'"response":{"id":"resp_x","status":"in_progress","usage":null}}\r\n\r\n',
    b'event: response.output_text.delta\r\ndata: {"type":"response.output_text.delta",'
    b'"sequence_number":1,"delta":"Hi"}\r\n\r\nevent: response.output_text.de',
    b'lta\r\ndata: {"type":"response.output_text.delta","sequence_number":2,'
    b'"delta":" there"}\r\n\r\n',
    b'event: response.completed\r\ndata: {"type":"response.completed","sequence_number":3,'
    b'"response":{"id":"resp_x","status":"completed","usage":{"input_tokens":5,'
    b'"output_tokens":2,"total_tokens":7}}}\r\n\r\n',
    b"data: [DONE]\r\n\r\n",
]


async def scripted_upstream(
    chunks: list[bytes], gate: asyncio.Event | None = None, sent_all: asyncio.Event | None = None
) -> web.AppRunner:
    """An upstream that sends exactly these chunks, pausing after the first until `gate`."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i, chunk in enumerate(chunks):
            await resp.write(chunk)
            if i == 1 and gate is not None:
                await gate.wait()
        if sent_all is not None:
            sent_all.set()
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/responses", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    return runner


async def test_stream_byte_identical_and_incremental(gateway_factory: GatewayFactory) -> None:
    gate, sent_all = asyncio.Event(), asyncio.Event()
    runner = await scripted_upstream(RECORDED, gate, sent_all)
    port = await serve_on_free_port(runner)
    try:
        gw = await gateway_factory(upstream_url=f"http://127.0.0.1:{port}")
        got = b""
        async with (
            aiohttp.ClientSession(headers=auth()) as s,
            s.post(f"{gw.url}/v1/responses", json={**RESP, "stream": True}) as r,
        ):
            assert r.headers["content-type"].startswith("text/event-stream")
            while b"response.created" not in got:
                got += await r.content.readany()
            # the first event is here while the upstream still holds back the rest
            assert not sent_all.is_set()
            gate.set()
            got += await r.read()
        assert got == b"".join(RECORDED)
    finally:
        await runner.cleanup()


async def test_stream_cut_by_upstream_ends_with_error_event(gateway: Running) -> None:
    async with (
        aiohttp.ClientSession(headers=auth()) as s,
        s.post(
            f"{gateway.url}/v1/responses",
            json={**RESP, "stream": True},
            headers={"x-mock-cut-after": "5"},
        ) as r,
    ):
        text = (await r.read()).decode()
    events = [e for e in text.split("\n\n") if e.strip()]
    assert len(events) == 6
    last = events[-1].splitlines()
    assert last[0] == "event: error"
    payload = orjson.loads(last[1].removeprefix("data: "))
    assert payload["code"] == "upstream_stream_interrupted" and payload["type"] == "error"
    assert payload["sequence_number"] == 5 and payload["param"] is None


async def test_stream_options_pass_through_unchanged(gateway: Running) -> None:
    async with (
        aiohttp.ClientSession(headers=auth()) as s,
        s.post(
            f"{gateway.url}/v1/responses",
            json={**RESP, "stream": True},
            headers={"x-mock-crlf": "1", "x-mock-comments": "1", "x-mock-done": "1"},
        ) as r,
    ):
        raw = await r.read()
    assert raw.startswith(b": keep-alive\r\n\r\n") and raw.endswith(b"data: [DONE]\r\n\r\n")
    assert b"upstream_stream_interrupted" not in raw


async def test_stream_stalling_past_idle_timeout_ends_with_error_event(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(idle=0.3)
    async with (
        aiohttp.ClientSession(headers=auth()) as s,
        s.post(
            f"{gw.url}/v1/responses",
            json={**RESP, "stream": True},
            headers={"x-mock-tokens-per-s": "2"},  # 0.5 s between deltas
        ) as r,
    ):
        text = (await r.read()).decode()
    assert "response.output_text.delta" in text and "response.completed" not in text
    assert '"code":"upstream_stream_interrupted"' in text
    assert "upstream idle timeout" in text


async def test_chat_stream_usage_is_requested_and_charged_exactly(
    gateway_factory: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway_factory(alpha_budgets="[{tokens: 100000, per: day}]")
    chat = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "stream": True,
    }
    async with (
        aiohttp.ClientSession(headers=auth()) as s,
        s.post(f"{gw.url}/v1/chat/completions", json=chat) as r,
    ):
        text = await r.text()
    sent = orjson.loads(upstream.state.requests[-1].body)
    assert sent["stream_options"] == {"include_usage": True}
    # the client did not ask for the usage chunk: it does not get it
    assert '"choices":[]' not in text.replace(" ", "") and text.rstrip().endswith("data: [DONE]")
    await gw.gw.ledger.flush()
    row = (await gw.gw.ledger.report(None, None, ("team",)))[0]
    assert row.output_tokens == 5 and row.estimated_requests == 0


async def test_response_ownership_survives_a_restart(upstream: Upstream, tmp_path: Path) -> None:
    settings = make_settings(upstream.url, tmp_path / "state")
    first = await start_gateway(settings)
    try:
        _, _, body = await post(f"{first.url}/v1/responses", RESP)
        stream_status, _, raw = await post(f"{first.url}/v1/responses", {**RESP, "stream": True})
        assert stream_status == 200
    finally:
        await first.stop()
    rid = orjson.loads(body)["id"]
    streamed = raw.split(b'"id":"', 2)[1].split(b'"', 1)[0].decode()
    second = await start_gateway(settings)  # nothing in memory: the ledger knows the owners
    try:
        calls = len(upstream.state.requests)
        async with aiohttp.ClientSession() as s:
            for key, want in ((BETA_KEY, 404), (ALPHA_KEY, 200)):
                for r_id in (rid, streamed):
                    async with s.get(f"{second.url}/v1/responses/{r_id}", headers=auth(key)) as r:
                        assert r.status == want, (key, r_id)
            async with s.delete(
                f"{second.url}/v1/responses/resp_never_made_here", headers=auth()
            ) as r:
                assert r.status == 404 and error_of(await r.read())["code"] == "not_found"
        assert len(upstream.state.requests) == calls + 2  # only alpha's two GETs went upstream
    finally:
        await second.stop()
