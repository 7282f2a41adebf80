"""The request pipeline as a whole: a request runs under the policy it was admitted with, and
every answer, refusals included, carries the request's id and trace id."""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web
from conftest import (
    ALPHA_KEY,
    BETA_KEY,
    GatewayFactory,
    Running,
    Upstream,
    auth,
    ledger_rows,
    make_settings,
    start_app,
    start_gateway,
)

from gateway.backends import build_backends
from gateway.cache.entry import CacheEntry
from gateway.cache.store import MemoryCacheStore
from gateway.runtime import Gateway

TRACE_ID = re.compile(r"^[0-9a-f]{32}$")

RESPONSE = {
    "id": "resp_reload",
    "object": "response",
    "status": "completed",
    "model": "nusantara-base",
    "output": [],
    "usage": {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8},
}
EVENTS = (
    b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
    b'"response":{"id":"resp_s","status":"in_progress"}}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
    b'"sequence_number":1,"delta":"hi"}\n\n'
    b'event: response.completed\ndata: {"type":"response.completed","sequence_number":2,'
    b'"response":{"id":"resp_s","status":"completed","usage":{"input_tokens":3,'
    b'"output_tokens":5,"total_tokens":8}}}\n\n'
)


def _gated_upstream(gate: asyncio.Event, arrived: list[str]):  # type: ignore[no-untyped-def]
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        arrived.append("stream" if body.get("stream") else "json")
        await gate.wait()  # the first byte waits until the test has reloaded
        if body.get("stream"):
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(EVENTS)
            await resp.write_eof()
            return resp
        return web.json_response(RESPONSE)

    return handler


async def test_reload_renaming_the_upstream_never_fails_an_admitted_request(
    tmp_path: Path,
) -> None:
    gate, arrived = asyncio.Event(), []
    url, up_runner = await start_app(_gated_upstream(gate, arrived))
    settings = make_settings(url, tmp_path / "state", cache="true")
    running = await start_gateway(settings)
    old_client = running.gw.policy.upstreams["mock"]
    body = {"model": "nusantara-base", "input": "hi", "max_output_tokens": 8}
    try:
        async with aiohttp.ClientSession() as s:

            async def call(stream: bool) -> tuple[int, bytes]:
                async with s.post(
                    f"{running.url}/v1/responses",
                    json={**body, "stream": stream},
                    headers=auth(ALPHA_KEY),
                ) as r:
                    return r.status, await r.read()

            tasks = [asyncio.ensure_future(call(False)), asyncio.ensure_future(call(True))]
            while len(arrived) < 2:  # noqa: ASYNC110 - the upstream's handler appends
                await asyncio.sleep(0.01)
            # rename the upstream (and change nothing else): its client is replaced
            renamed = make_settings(url, tmp_path / "state", cache="true", upstream_name="m2")
            await running.gw.reload(renamed)
            assert "mock" not in running.gw.policy.upstreams
            assert old_client.started  # two requests still hold it
            gate.set()
            (js, jbody), (ss, sbody) = await asyncio.gather(*tasks)
            assert js == 200 and orjson.loads(jbody) == RESPONSE
            assert ss == 200 and sbody == EVENTS
            await asyncio.sleep(0.05)
            assert not old_client.started  # closed with its last request

            # the gateway serves normally afterwards, through the renamed upstream
            status, again = await call(False)
            assert status == 200 and orjson.loads(again)["id"] == "resp_reload"
        rows = await ledger_rows(running)
        assert [(r["upstream"], r["status"], r["cache"]) for r in rows] == [
            ("mock", 200, "miss"),
            ("mock", 200, "miss"),
            ("m2", 200, "miss"),
        ]
        assert all(r["charged_tokens"] == 0 and r["input_tokens"] == 3 for r in rows)
    finally:
        await running.stop()
        await up_runner.cleanup()


async def test_every_refusal_carries_the_request_and_trace_ids(gateway: Running) -> None:
    cases: list[tuple[str, str, dict[str, str], bytes, int, str]] = [
        ("GET", "/nope", {}, b"", 404, "not_found"),
        ("GET", "/v1//models", auth(), b"", 404, "not_found"),
        ("GET", "/v1/responses/resp_x/other", auth(), b"", 404, "not_found"),
        ("POST", "/v1/responses", {}, b"{}", 401, "invalid_api_key"),
        ("POST", "/v1/responses", auth(), b"{not json", 400, "invalid_json"),
        ("POST", "/v1/responses", auth(), b'{"input": "x"}', 400, "missing_model"),
        ("POST", "/v1/responses", auth(BETA_KEY), b'{"model": "m"}', 403, "model_not_allowed"),
        ("GET", "/v1/responses/resp_nobody", auth(), b"", 404, "not_found"),
        ("POST", "/healthz", {}, b"", 404, "not_found"),
    ]
    async with aiohttp.ClientSession() as s:
        for method, path, headers, body, status, code in cases:
            async with s.request(
                method,
                gateway.url + path,
                data=body,
                headers={**headers, "content-type": "application/json"},
            ) as r:
                assert r.status == status, (path, await r.text())
                assert (await r.json())["error"]["code"] == code, path
                assert r.headers["x-request-id"], path
                assert TRACE_ID.match(r.headers["x-gateway-trace-id"]), path
        # a sane client-sent request id is kept, also on a refusal
        async with s.post(
            gateway.url + "/v1/responses", data=b"{}", headers={"x-request-id": "mine-1"}
        ) as r:
            assert r.status == 401 and r.headers["x-request-id"] == "mine-1"


async def test_unknown_model_is_refused_with_ids(gateway_factory: GatewayFactory) -> None:
    running = await gateway_factory(models='["garda-*"]')
    async with (
        aiohttp.ClientSession() as s,
        s.post(running.url + "/v1/responses", json={"model": "other"}, headers=auth()) as r,
    ):
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "model_not_found"
        assert r.headers["x-request-id"].startswith("req_")
        assert TRACE_ID.match(r.headers["x-gateway-trace-id"])


async def test_other_methods_on_post_routes_under_responses_are_ownership_checked(
    gateway: Running, upstream: Upstream
) -> None:
    before = len(upstream.state.requests)
    async with aiohttp.ClientSession(headers=auth()) as s:
        for method, path in (
            ("GET", "/v1/responses/compact"),
            ("DELETE", "/v1/responses/INPUT_TOKENS"),
        ):
            async with s.request(method, gateway.url + path) as r:
                assert r.status == 404, path
                assert (await r.json())["error"]["code"] == "not_found"
    assert len(upstream.state.requests) == before  # nothing reached the upstream


async def test_a_json_body_under_no_content_type_is_read_for_its_model(gateway: Running) -> None:
    body = orjson.dumps({"model": "gpt-not-for-beta", "input": "x"})
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gateway.url + "/v1/rerank",
            data=body,
            headers={**auth(BETA_KEY), "content-type": "text/plain"},
        ) as r,
    ):
        assert r.status == 403
        assert (await r.json())["error"]["code"] == "model_not_allowed"


async def test_an_ambiguous_field_is_named_without_a_key_in_it(gateway: Running) -> None:
    key = "sk-proj-abcdefghijklmnopqrstuvwxyz0123"
    body = b'{"model": "m", "%s": 1, "%s": 2}' % (key.encode(), key.upper().encode())
    async with (
        aiohttp.ClientSession(headers=auth()) as s,
        s.post(gateway.url + "/v1/responses", data=body) as r,
    ):
        assert r.status == 400
        text = await r.text()
        assert "invalid_json" in text and "abcdefghijklmnop" not in text.lower()


async def test_a_malformed_request_head_is_refused_with_ids(gateway: Running) -> None:
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head = raw.partition(b"\r\n\r\n")[0].lower()
    assert head.split(b" ")[1] == b"400" and b"x-request-id: req_" in head
    assert re.search(rb"x-gateway-trace-id: [0-9a-f]{32}", head)


class _BrokenStore(MemoryCacheStore):
    async def put(self, key: str, entry: CacheEntry) -> bool:
        raise ConnectionError("the cache store is down")


async def test_a_cache_store_that_fails_costs_a_hit_never_an_answer(
    upstream: Upstream, tmp_path: Path
) -> None:
    settings = make_settings(upstream.url, tmp_path / "state", cache="true")
    store = _BrokenStore(ttl=60, max_bytes=10**6, max_entry_bytes=10**5)
    backends = replace(build_backends(settings), cache=store)
    running = await start_gateway(settings, Gateway(settings, backends=backends))
    body = {"model": "nusantara-base", "input": "hi", "max_output_tokens": 8}
    try:
        async with aiohttp.ClientSession(headers=auth()) as s:
            for stream in (False, True):
                async with s.post(
                    running.url + "/v1/responses", json={**body, "stream": stream}
                ) as r:
                    assert r.status == 200
                    assert b"response.completed" in await r.read() or not stream
        rows = await ledger_rows(running)
        assert [(r["status"], r["cache"]) for r in rows] == [(200, "miss"), (200, "miss")]
    finally:
        await running.stop()
