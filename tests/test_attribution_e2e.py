"""Attribution through a running gateway: over HTTP and WebSocket, into the ledger, never
upstream, and a malformed header refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson
import pytest
import structlog
from conftest import (
    ALPHA_KEY,
    BETA_KEY,
    GatewayFactory,
    Running,
    Upstream,
    auth,
    ledger_rows,
    make_settings,
    start_gateway,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_websocket import connect, create, until

from gateway.runtime import Gateway
from gateway.settings import Telemetry, Traces
from gateway.telemetry.tracing import Tracing
from gateway.upstream.headers import request_headers

BODY = {"model": "nusantara-base", "input": "hi", "max_output_tokens": 8}


async def post(
    gateway: Running,
    headers: dict[str, str],
    body: dict[str, object] | None = None,
    key: str = ALPHA_KEY,
) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{gateway.url}/v1/responses", json=body or BODY, headers={**auth(key), **headers}
        ) as r,
    ):
        return r.status, await r.json()


async def test_user_and_tags_are_recorded_and_never_sent_upstream(
    gateway: Running, upstream: Upstream
) -> None:
    status, _ = await post(
        gateway,
        {"x-gateway-user": "alice", "x-gateway-tags": "env=prod, feature=search"},
        {**BODY, "metadata": {"env": "dev", "ticket": "T-1"}},
    )
    assert status == 200
    status, _ = await post(gateway, {}, {**BODY, "user": "bob"})
    assert status == 200
    rows = await ledger_rows(gateway)
    assert [(r["user"], r["tags"]) for r in rows] == [
        ("alice", '{"env":"prod","feature":"search","ticket":"T-1"}'),
        ("bob", ""),
    ]
    assert all(r["replay_of"] == "" for r in rows)
    for recorded in upstream.state.requests:
        assert not any(name.startswith("x-gateway-") for name in recorded.headers)
    # the body, metadata included, goes upstream unchanged
    assert orjson.loads(upstream.state.requests[0].body)["metadata"] == {
        "env": "dev",
        "ticket": "T-1",
    }


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"x-gateway-tags": "env"}, "invalid_tags"),
        ({"x-gateway-tags": ",".join(f"k{i}=v" for i in range(11))}, "invalid_tags"),
        ({"x-gateway-tags": "Env=prod"}, "invalid_tags"),
        ({"x-gateway-user": "u" * 129}, "invalid_user"),
    ],
)
async def test_a_malformed_header_is_refused_before_any_upstream_call(
    gateway: Running, upstream: Upstream, headers: dict[str, str], code: str
) -> None:
    status, body = await post(gateway, headers)
    assert status == 400
    assert body["error"] == {
        "message": body["error"]["message"],  # type: ignore[index]
        "type": "invalid_request_error",
        "param": None,
        "code": code,
    }
    assert not upstream.state.requests
    rows = await ledger_rows(gateway)
    assert [r["status"] for r in rows] == [400]


async def test_a_refused_request_is_attributed_too(gateway: Running) -> None:
    # beta may use garda-* models only
    status, _ = await post(
        gateway, {"x-gateway-user": "carol", "x-gateway-tags": "env=ci"}, key=BETA_KEY
    )
    assert status == 403
    rows = await ledger_rows(gateway)
    assert [(r["status"], r["user"], r["tags"]) for r in rows] == [(403, "carol", '{"env":"ci"}')]


async def test_websocket_responses_are_attributed_and_bad_tags_are_an_error_event(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = await gateway_factory()
    session, ws = await connect(
        gateway.url, headers_extra={"x-gateway-user": "dora", "x-gateway-tags": "env=ws"}
    )
    try:
        await ws.send_str(create(metadata={"run": "7"}))
        assert (await until(ws, "response.completed"))["type"] == "response.completed"
    finally:
        await ws.close()
        await session.close()
    session, ws = await connect(gateway.url, headers_extra={"x-gateway-tags": "bad tag"})
    try:
        await ws.send_str(create())
        refused = await until(ws, "response.completed")
        assert refused["type"] == "error" and refused["error"]["code"] == "invalid_tags"
        assert refused["status"] == 400
    finally:
        await ws.close()
        await session.close()
    rows = await ledger_rows(gateway)
    assert [(r["transport"], r["status"], r["user"], r["tags"]) for r in rows] == [
        ("websocket", 200, "dora", '{"env":"ws","run":"7"}'),
        ("websocket", 400, "", ""),
    ]


async def test_the_log_line_shows_user_and_tags(gateway: Running) -> None:
    with structlog.testing.capture_logs() as logs:
        await post(gateway, {"x-gateway-user": "erin", "x-gateway-tags": "env=prod"})
        await post(gateway, {})
    lines = [entry for entry in logs if entry["event"] == "request"]
    assert [(x["user"], x["tags"]) for x in lines] == [("erin", {"env": "prod"}), (None, None)]


async def test_user_and_tags_are_server_span_attributes_never_metric_labels(
    upstream: Upstream, tmp_path: Path
) -> None:
    settings = make_settings(upstream.url, tmp_path / "s")
    exporter = InMemorySpanExporter()
    tracing = Tracing.from_settings(Telemetry(traces=Traces()), exporter=exporter)
    running = await start_gateway(settings, Gateway(settings, tracing=tracing))
    try:
        await post(running, {"x-gateway-user": "frank", "x-gateway-tags": "env=prod,app=web"})
        async with asyncio.timeout(10):
            while not [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{running.admin_url}/metrics") as r,
        ):
            metrics = await r.text()
    finally:
        await running.stop()
    [server] = [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
    assert server.attributes is not None
    assert server.attributes["gateway.user"] == "frank"
    assert server.attributes["gateway.tags.env"] == "prod"
    assert server.attributes["gateway.tags.app"] == "web"
    assert "frank" not in metrics and "prod" not in metrics


def test_no_x_gateway_header_is_forwarded_upstream() -> None:
    sent = request_headers(
        [("X-Gateway-User", "u"), ("x-gateway-tags", "a=b"), ("x-gateway-other", "1"), ("a", "b")],
        {},
    )
    assert [k.lower() for k in sent] == ["a", "accept-encoding"]
