"""Regression tests for what an attack on the gateway found: budget bypass by output caps,
cross-team access through path forms, abandoned uploads, deep JSON, and cost that disagreed."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import web
from conftest import (
    ADMIN_KEY,
    ALPHA_KEY,
    BETA_KEY,
    UPSTREAM_KEY,
    GatewayFactory,
    Running,
    Upstream,
    auth,
    ledger_rows,
    start_app,
)


async def raw_request(url: str, data: bytes, *, close_after: bool = False) -> bytes:
    host, port = url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    if close_after:
        writer.close()
        return b""
    out = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return out


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


async def metrics_text(gw: Running) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{gw.admin_url}/metrics") as r:
        return await r.text()


# -- 1. the reservation takes the largest output cap under any name ------------------------


async def honouring_upstream() -> tuple[str, web.AppRunner, list[dict[str, Any]]]:
    """An upstream that honours `max_tokens` whatever else the body says, as many do."""
    seen: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        out = int(body.get("max_tokens", 16)) * int(body.get("n", 1))
        if request.path == "/v1/chat/completions":
            usage = {"prompt_tokens": 5, "completion_tokens": out, "total_tokens": 5 + out}
            return web.json_response(
                {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                 "choices": [], "usage": usage}
            )  # fmt: skip
        return web.json_response(
            {"id": "resp_1", "object": "response", "status": "completed", "model": body["model"],
             "output": [], "usage": {"input_tokens": 5, "output_tokens": out}}
        )  # fmt: skip

    url, runner = await start_app(handler)
    return url, runner, seen


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
async def test_a_small_cap_under_one_name_cannot_hide_a_large_one(
    gateway_factory: GatewayFactory, path: str
) -> None:
    url, runner, seen = await honouring_upstream()
    try:
        gw = await gateway_factory(url, alpha_budgets="[{tokens: 5000, per: day}]")
        body = {"model": "nusantara-base", "input": "hi", "messages": [],
                "max_output_tokens": 1, "max_tokens": 2000}  # fmt: skip
        statuses = []
        async with aiohttp.ClientSession(headers=auth()) as s:
            for _ in range(6):
                async with s.post(gw.url + path, json=body) as r:
                    statuses.append(r.status)
        spent = sum(r["charged_tokens"] for r in await ledger_rows(gw))
        # each request may spend 2,000 output tokens: only two fit in 5,000
        assert statuses.count(200) == 2 and statuses.count(429) == 4
        assert spent <= 5000
        assert len(seen) == 2
    finally:
        await runner.cleanup()


async def test_n_choices_multiply_the_largest_cap(gateway_factory: GatewayFactory) -> None:
    url, runner, _ = await honouring_upstream()
    try:
        gw = await gateway_factory(url, alpha_budgets="[{tokens: 5000, per: day}]")
        body = {"model": "m", "messages": [], "max_completion_tokens": 10, "max_tokens": 1000,
                "n": 3}  # fmt: skip
        async with (
            aiohttp.ClientSession(headers=auth()) as s,
            s.post(gw.url + "/v1/chat/completions", json=body) as r,
        ):
            assert r.status == 200
            assert int(r.headers["x-gateway-budget-remaining-tokens"]) <= 5000 - 3000
        assert sum(r["charged_tokens"] for r in await ledger_rows(gw)) == 3005
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("name", ["max_output_tokens", "max_tokens", "max_completion_tokens", "n"])
@pytest.mark.parametrize("value", [0, -5, 1.5, "100", True, [10], {"a": 1}])
async def test_a_cap_that_is_not_a_positive_integer_is_400(
    gateway: Running, upstream: Upstream, name: str, value: object
) -> None:
    body = {"model": "nusantara-base", "input": "hi", name: value}
    async with (
        aiohttp.ClientSession(headers=auth()) as s,
        s.post(gateway.url + "/v1/responses", json=body) as r,
    ):
        assert r.status == 400
        err = (await r.json())["error"]
    assert err["code"] == "invalid_value" and err["param"] == name
    assert err["type"] == "invalid_request_error"
    assert upstream.state.requests == []


async def test_a_null_cap_is_no_cap(gateway: Running) -> None:
    body = {"model": "nusantara-base", "input": "hi", "max_tokens": None, "n": None}
    async with (
        aiohttp.ClientSession(headers=auth()) as s,
        s.post(gateway.url + "/v1/responses", json=body) as r,
    ):
        assert r.status == 200


# -- 2. one canonical path for ownership, routing and forwarding ---------------------------

HOSTILE = [
    ("GET", "/v1/responses/{id}/"),
    ("GET", "//v1/responses/{id}"),
    ("GET", "/v1/responses//{id}"),
    ("GET", "/v1/responses/{id}/input_items/"),
    ("POST", "/v1/responses/{id}/cancel/"),
    ("DELETE", "/v1/responses/{id}/"),
    ("GET", "/v1/responses/{id};x=1"),
    ("GET", "/v1/responses/x/..;/{id}"),
    ("GET", "/v1/responses/x/%5C..%5C/{id}"),
    ("GET", "/v1/responses/x/%252e%252e/{id}"),
    ("GET", "/v1/responses/x/%2e%2e/{id}"),
    ("GET", "/v1/respons%65s/{id}"),
    ("GET", "/v1/responses%2F{id}"),
    ("GET", "/v1/responses\\{id}"),
    ("GET", "/v1/models/../responses/{id}"),
    # case: an upstream that routes without regard to case would serve these
    ("GET", "/v1/Responses/{id}"),
    ("DELETE", "/v1/RESPONSES/{id}"),
    ("POST", "/v1/responses/{id}/CANCEL"),
    ("GET", "/v1/responses/{id}/Input_Items"),
    # any other sub-resource of a stored response
    ("GET", "/v1/responses/{id}/input_items/x"),
    ("POST", "/v1/responses/{id}/steer"),
]


async def test_another_teams_response_is_unreachable_by_any_path_form(
    gateway: Running, upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            gateway.url + "/v1/responses",
            json={"model": "nusantara-base", "input": "mine", "store": True},
            headers=auth(ALPHA_KEY),
        ) as r:
            assert r.status == 200
            rid = (await r.json())["id"]
        async with s.get(f"{gateway.url}/v1/responses/{rid}", headers=auth(BETA_KEY)) as r:
            assert r.status == 404
    before = len(upstream.state.requests)
    for method, form in HOSTILE:
        target = form.format(id=rid)
        raw = await raw_request(
            gateway.url,
            f"{method} {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {BETA_KEY}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode(),
        )
        assert status_of(raw) == 404, target
        assert b'"code":"not_found"' in raw and b"application/json" in raw
    # a model in the body does not turn a request about a stored response into a new one
    async with aiohttp.ClientSession(headers=auth(BETA_KEY)) as s:
        for method, form in [
            ("POST", "/v1/responses/{id}/cancel"),
            ("DELETE", "/v1/responses/{id}"),
            ("GET", "/v1/responses/{id}/input_items"),
        ]:
            body = {"model": "garda-beta-mini", "input": "x"}
            async with s.request(method, gateway.url + form.format(id=rid), json=body) as r:
                assert r.status == 404, form
                assert (await r.json())["error"]["code"] == "not_found"
    assert len(upstream.state.requests) == before  # nothing reached the upstream


async def test_the_owner_still_reaches_its_response(gateway: Running) -> None:
    async with aiohttp.ClientSession(headers=auth()) as s:
        async with s.post(
            gateway.url + "/v1/responses", json={"model": "nusantara-base", "input": "x"}
        ) as r:
            rid = (await r.json())["id"]
        async with s.get(f"{gateway.url}/v1/responses/{rid}?include=x") as r:
            assert r.status in (200, 404)  # the mock may not store it, but it got through
            assert r.headers.get("x-request-id")


async def test_the_upstream_receives_the_checked_path_verbatim(
    gateway_factory: GatewayFactory,
) -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.raw_path)
        return web.json_response({})

    url, runner = await start_app(handler)
    try:
        gw = await gateway_factory(url)
        for target in ("/v1/models/my%20model", "/v1/files?purpose=batch&after=a%2Fb"):
            raw = await raw_request(
                gw.url,
                f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALPHA_KEY}\r\n"
                "Connection: close\r\n\r\n".encode(),
            )
            assert status_of(raw) == 200
        assert seen == ["/v1/models/my%20model", "/v1/files?purpose=batch&after=a%2Fb"]
    finally:
        await runner.cleanup()


# -- 7. a client that leaves while uploading ------------------------------------------------


async def test_client_leaving_mid_upload_is_a_disconnect_not_a_500(
    gateway: Running, upstream: Upstream
) -> None:
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            await raw_request(
                gateway.url,
                b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + ALPHA_KEY.encode()
                + b"\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
                + b'{"model": "nusantara-base", "input": "',
                close_after=True,
            )
        for _ in range(50):  # bounded wait for the five requests to finish
            if sum(1 for e in logs if e["event"] == "request") == 5:
                break
            await asyncio.sleep(0.05)
    lines = [e for e in logs if e["event"] == "request"]
    assert len(lines) == 5
    assert all(e["status"] == 499 and e["error"] == "client_disconnected" for e in lines)
    assert not [e for e in logs if e["event"] != "request"]  # no traceback, no other line
    rows = await ledger_rows(gateway)
    assert [(r["status"], r["charged_tokens"]) for r in rows] == [(499, 0)] * 5
    text = await metrics_text(gateway)
    assert 'status="499"' in text and 'status="500"' not in text
    assert upstream.state.requests == []


# -- 8. deep JSON is refused up front ---------------------------------------------------------


@pytest.mark.parametrize("depth", [65, 254, 300, 1023, 1100])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/responses", "/v1/chat/completions"])
async def test_over_deep_json_is_400(
    gateway_factory: GatewayFactory, upstream: Upstream, depth: int, stream: bool, path: str
) -> None:
    gw = await gateway_factory(cache="true")
    nested = "[" * (depth - 1) + "]" * (depth - 1)
    body = f'{{"model": "nusantara-base", "stream": {str(stream).lower()}, "input": {nested}}}'
    async with (
        aiohttp.ClientSession(headers={**auth(), "content-type": "application/json"}) as s,
        s.post(gw.url + path, data=body) as r,
    ):
        assert r.status == 400
        err = (await r.json())["error"]
    assert err["code"] == "invalid_json" and err["type"] == "invalid_request_error"
    assert upstream.state.requests == []


async def test_json_at_the_depth_limit_passes(gateway: Running) -> None:
    nested = "[" * 63 + "]" * 63  # with the outer object: 64 levels
    body = f'{{"model": "nusantara-base", "input": "x", "metadata": {{"k": "v"}}, "t": {nested}}}'
    async with (
        aiohttp.ClientSession(headers={**auth(), "content-type": "application/json"}) as s,
        s.post(gateway.url + "/v1/responses", data=body) as r,
    ):
        assert r.status == 200


# -- 9. cost agrees everywhere, estimates included --------------------------------------------


async def test_estimated_charges_count_in_the_cost_metric(
    gateway_factory: GatewayFactory,
) -> None:
    """A stream cut before its terminal event is charged its estimate in the ledger and the
    budget; the cost metric must count the same amount."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'event: response.created\ndata: {"type":"response.created"}\n\n')
        request.transport.close()  # type: ignore[union-attr]
        return resp

    url, runner = await start_app(handler)
    try:
        gw = await gateway_factory(url, alpha_budgets="[{usd: 10.0, per: day}]")
        body = {"model": "nusantara-base", "input": "x" * 400, "stream": True,
                "max_output_tokens": 100}  # fmt: skip
        async with aiohttp.ClientSession(headers=auth()) as s:
            for _ in range(3):
                async with s.post(gw.url + "/v1/responses", json=body) as r:
                    await r.read()
        rows = await ledger_rows(gw)
        assert len(rows) == 3 and all(r["estimated"] for r in rows)
        ledger_cost = sum(r["cost_usd"] for r in rows)
        assert ledger_cost > 0
        metric = 0.0
        for line in (await metrics_text(gw)).splitlines():
            if line.startswith("gateway_cost_usd_total{"):
                metric += float(line.rsplit(" ", 1)[1])
        assert metric == pytest.approx(ledger_cost, rel=1e-9)
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{gw.admin_url}/admin/teams", headers=auth(ADMIN_KEY)) as r,
        ):
            teams = {t["team"]: t for t in (await r.json())["teams"]}
        (window,) = [w for w in teams["alpha"]["budgets"] if w["unit"] == "usd"]
        assert window["used"] == round(ledger_cost, 6)  # shown to the micro-dollar
    finally:
        await runner.cleanup()


# -- 4. error messages that show client input go through the redactor ------------------------


@pytest.mark.parametrize("model", [UPSTREAM_KEY, ALPHA_KEY, "x" * 5000, "bad\x00model"])
async def test_error_messages_never_show_keys_or_raw_junk(gateway: Running, model: str) -> None:
    async with (
        aiohttp.ClientSession(headers=auth(BETA_KEY)) as s,
        s.post(gateway.url + "/v1/responses", json={"model": model, "input": "x"}) as r,
    ):
        assert r.status == 403
        raw = await r.read()
    message = orjson.loads(raw)["error"]["message"]
    assert UPSTREAM_KEY not in message and ALPHA_KEY not in message
    assert len(message) < 300 and "\x00" not in message


# -- fuzzing: path forms through the gateway --------------------------------------------------

FUZZ_PIECES = [
    "v1", "responses", "resp_1", "cancel", "input_items", "models", "chat", "completions",
    ".", "..", "%2e", "%2E", "%2f", "%5c", "\\", ";", ";x=1", "%3b", "%25", "%252e", "%20",
    "%41", ":", "@", "~", "a.b", "%", "%g1", "?", "?a=1", "&", "=", "/", "/", "/", "/v1/",
]  # fmt: skip


async def test_fuzzed_paths_are_refused_or_forwarded_verbatim(
    gateway_factory: GatewayFactory,
) -> None:
    """Random path forms: each is either refused 404 in JSON without reaching the upstream,
    or reaches it byte for byte as sent (never a re-quoted or normalised form)."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.raw_path)
        return web.json_response({"ok": True})

    url, runner = await start_app(handler)
    rng = random.Random(8)
    try:
        gw = await gateway_factory(url)
        for _ in range(300):
            target = "/" + "".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(1, 8)))
            before = len(seen)
            raw = await raw_request(
                gw.url,
                f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALPHA_KEY}\r\n"
                "Connection: close\r\n\r\n".encode(),
            )
            head, _, body = raw.partition(b"\r\n\r\n")
            assert b"application/json" in head, target
            if len(seen) > before:
                assert seen[-1] == target and status_of(raw) == 200
            else:
                assert status_of(raw) == 404, target
                assert orjson.loads(body)["error"]["code"] in ("not_found", "model_not_found")
    finally:
        await runner.cleanup()


async def test_models_listing_masks_an_echoed_key(gateway_factory: GatewayFactory) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        entry = {"id": "nusantara-base", "object": "model", "owned_by": UPSTREAM_KEY}
        return web.json_response({"object": "list", "data": [entry]})

    url, runner = await start_app(handler)
    try:
        gw = await gateway_factory(url)
        async with (
            aiohttp.ClientSession(headers=auth()) as s,
            s.get(gw.url + "/v1/models") as r,
        ):
            assert r.status == 200
            raw = await r.read()
        assert UPSTREAM_KEY.encode() not in raw and b"sk-****" in raw
    finally:
        await runner.cleanup()


async def test_compact_still_reaches_the_upstream(gateway_factory: GatewayFactory) -> None:
    """`POST /v1/responses/compact` is a generation route, not a stored response's id."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        return web.json_response(
            {"id": "cmp_1", "object": "response.compaction", "output": [],
             "usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}}
        )  # fmt: skip

    url, runner = await start_app(handler)
    try:
        gw = await gateway_factory(url, alpha_budgets="[{tokens: 100000, per: day}]")
        async with (
            aiohttp.ClientSession(headers=auth()) as s,
            s.post(gw.url + "/v1/responses/compact", json={"model": "m", "input": "x"}) as r,
        ):
            assert r.status == 200
        assert seen == ["/v1/responses/compact"]
        assert [r["charged_tokens"] for r in await ledger_rows(gw)] == [10]
    finally:
        await runner.cleanup()


# -- what a review of the fixes found --------------------------------------------------------


async def test_an_unknown_expectation_is_json_and_echoes_nothing(gateway: Running) -> None:
    for path in ("/v1/responses", "/healthz"):
        raw = await raw_request(
            gateway.url,
            f"POST {path} HTTP/1.1\r\nHost: x\r\nExpect: {ALPHA_KEY}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode(),
        )
        head, _, body = raw.partition(b"\r\n\r\n")
        assert status_of(raw) == 417 and b"application/json" in head
        assert b"x-request-id: req_" in head.lower() and b"x-gateway-trace-id: " in head.lower()
        assert ALPHA_KEY.encode() not in raw
        assert orjson.loads(body)["error"]["code"] == "expectation_failed"
    # 100-continue still works
    async with (
        aiohttp.ClientSession(headers=auth()) as s,
        s.post(
            gateway.url + "/v1/responses",
            json={"model": "nusantara-base", "input": "x"},
            expect100=True,
        ) as r,
    ):
        assert r.status == 200


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": "m", "prompt": "x", "max_tokens": 900, "best_of": 20}, 429),
        ({"model": "m", "prompt": "x", "MAX_TOKENS": 5000}, 429),
        ({"model": "m", "prompt": "x", "max_tokens": 1, "MAX_TOKENS": 5000}, 400),
        ({"model": "m", "prompt": "x", "Max_Tokens": 1, "max_tokens": 5000}, 400),
        ({"model": "m", "prompt": "x", "best_of": 0}, 400),
    ],
)
async def test_caps_under_other_spellings_and_best_of_count(
    gateway_factory: GatewayFactory, upstream: Upstream, body: dict[str, Any], status: int
) -> None:
    """An upstream that reads keys without regard to case (Go's encoding/json) or honours
    best_of would spend far past the estimate: both count, ambiguous spellings are refused."""
    gw = await gateway_factory(alpha_budgets="[{tokens: 1000, per: day}]")
    async with (
        aiohttp.ClientSession(headers=auth()) as s,
        s.post(gw.url + "/v1/completions", json=body) as r,
    ):
        assert r.status == status
    assert upstream.state.requests == []


async def test_a_model_spelt_twice_cannot_pass_the_allowlist(
    gateway: Running, upstream: Upstream
) -> None:
    for path in ("/v1/responses", "/v1/audio/speech"):
        async with (
            aiohttp.ClientSession(headers=auth(BETA_KEY)) as s,
            s.post(gateway.url + path, json={"model": "garda-x", "MODEL": "nusantara-base"}) as r,
        ):
            assert r.status == 400
            assert (await r.json())["error"]["code"] == "invalid_json"
        async with (
            aiohttp.ClientSession(headers=auth(BETA_KEY)) as s,
            s.post(gateway.url + path, json={"MODEL": "nusantara-base", "input": "x"}) as r,
        ):
            assert r.status == 403  # read as the model it is, and refused
    assert upstream.state.requests == []


async def test_keys_in_stream_fields_and_client_input_stay_out_of_logs(
    gateway_factory: GatewayFactory,
) -> None:
    """A key the upstream puts in a stream's model or error code, and a client key a client
    puts in its model, path or user agent, reach neither the log line nor the ledger."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        created = {
            "type": "response.created",
            "sequence_number": 0,
            "response": {"id": "resp_k", "model": UPSTREAM_KEY, "status": "in_progress"},
        }
        failed = {"type": "error", "sequence_number": 1, "code": UPSTREAM_KEY, "message": "x"}
        for ev in (created, failed):  # fmt: skip
            await resp.write(f"event: {ev['type']}\ndata: ".encode() + orjson.dumps(ev) + b"\n\n")
        return resp

    url, runner = await start_app(handler)
    try:
        gw = await gateway_factory(url)
        with structlog.testing.capture_logs() as logs:
            async with aiohttp.ClientSession(
                headers={**auth(), "user-agent": f"agent {ALPHA_KEY}"}
            ) as s:
                body = {"model": ALPHA_KEY, "input": "x", "stream": True}
                async with s.post(gw.url + "/v1/responses", json=body) as r:
                    streamed = await r.read()
                async with s.get(f"{gw.url}/v1/responses/{ALPHA_KEY}") as r:
                    assert r.status == 404
                    assert ALPHA_KEY not in (await r.json())["error"]["message"]
        assert UPSTREAM_KEY.encode() not in streamed
        text = repr(logs) + repr(await ledger_rows(gw))
        assert UPSTREAM_KEY not in text, text[text.find(UPSTREAM_KEY) - 300 :][:400]
        assert ALPHA_KEY not in text, text[text.find(ALPHA_KEY) - 300 :][:400]
    finally:
        await runner.cleanup()


async def test_a_client_that_never_reads_a_large_answer_is_let_go(
    gateway_factory: GatewayFactory,
) -> None:
    big = b'{"object": "list", "data": "' + b"x" * 24_000_000 + b'"}'

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=big, content_type="application/json")

    url, runner = await start_app(handler)
    try:
        gw = await gateway_factory(url, idle=1)
        with structlog.testing.capture_logs() as logs:
            host, port = gw.url.split("//")[1].split(":")
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                f"GET /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALPHA_KEY}\r\n"
                "\r\n".encode()
            )
            await writer.drain()  # and never read
            for _ in range(100):  # bounded: the gateway lets go within about idle seconds
                if any(e["event"] == "request" for e in logs):
                    break
                await asyncio.sleep(0.1)
            writer.close()
        (line,) = [e for e in logs if e["event"] == "request"]
        assert line["error"] == "client_disconnected"
        assert gw.gw.inflight == 0
    finally:
        await runner.cleanup()
