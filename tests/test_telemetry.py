"""Traces into a real OTLP/HTTP receiver, exact metrics after a known workload, log lines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from conftest import (
    ALPHA_KEY,
    BETA_KEY,
    UPSTREAM_KEY,
    Running,
    Upstream,
    auth,
    free_port,
    ledger_rows,
    make_settings,
    start_gateway,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from prometheus_client.parser import text_string_to_metric_families

from gateway.runtime import Gateway
from gateway.settings import Telemetry, Traces
from gateway.telemetry.tracing import Tracing

BODY: dict[str, Any] = {
    "model": "nusantara-base",
    "input": "trace me",
    "max_output_tokens": 8,
    "temperature": 0.2,
}
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@dataclass
class Receiver:
    url: str
    spans: list[PbSpan] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attrs(span: PbSpan) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in span.attributes}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    port = free_port()
    rec = Receiver(f"http://127.0.0.1:{port}")

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())
        for rs in msg.resource_spans:
            rec.resources.append({kv.key: value(kv.value) for kv in rs.resource.attributes})
            for ss in rs.scope_spans:
                rec.spans.extend(ss.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield rec
    await runner.cleanup()


@pytest.fixture
async def traced(upstream: Upstream, receiver: Receiver, tmp_path: Path) -> AsyncIterator[Running]:
    settings = make_settings(upstream.url, tmp_path / "s", cache="true")
    tel = Telemetry(
        service_name="gw-test", traces=Traces(endpoint=receiver.url, capture_content=True)
    )
    gw = await start_gateway(settings, Gateway(settings, tracing=Tracing.from_settings(tel)))
    yield gw
    await gw.stop()


async def post(url: str, body: dict[str, Any], **headers: str) -> tuple[int, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/v1/responses", json=body, headers={**auth(), **headers}) as r,
    ):
        await r.read()
        return r.status, {k.lower(): v for k, v in r.headers.items()}


async def test_spans_for_json_stream_cached_and_failed(
    traced: Running, receiver: Receiver, upstream: Upstream
) -> None:
    _, h_json = await post(traced.url, BODY, traceparent=f"00-{TRACE}-{PARENT}-01")
    _, h_stream = await post(
        traced.url, {**BODY, "stream": True, "input": f"my key is {UPSTREAM_KEY}"}
    )
    _, h_hit = await post(traced.url, BODY)
    status, h_fail = await post(traced.url, {**BODY, "input": "x"}, **{"x-mock-status": "503"})
    assert status == 503 and h_hit["x-gateway-cache"] == "hit"
    await asyncio.to_thread(traced.gw.tracing.flush)
    for _ in range(50):
        if len(receiver.spans) >= 7:
            break
        await asyncio.sleep(0.05)
    by_trace: dict[str, list[PbSpan]] = {}
    for sp in receiver.spans:
        by_trace.setdefault(sp.trace_id.hex(), []).append(sp)
    assert receiver.resources[0]["service.name"] == "gw-test"

    # an incoming traceparent is continued, and the upstream got our CLIENT span as parent
    json_spans = by_trace[TRACE]
    assert h_json["x-gateway-trace-id"] == TRACE
    server = next(s for s in json_spans if s.kind == PbSpan.SPAN_KIND_SERVER)
    client = next(s for s in json_spans if s.kind == PbSpan.SPAN_KIND_CLIENT)
    assert server.parent_span_id.hex() == PARENT and server.name == "POST /v1/responses"
    assert client.parent_span_id == server.span_id and client.name == "chat nusantara-base"
    a = attrs(client)
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "mock"
    assert a["gen_ai.request.model"] == a["gen_ai.response.model"] == "nusantara-base"
    assert a["gen_ai.response.id"].startswith("resp_")
    assert a["gen_ai.usage.input_tokens"] == 2 and a["gen_ai.usage.output_tokens"] == 8
    assert a["gen_ai.usage.cache_read.input_tokens"] == 0
    assert a["gen_ai.usage.reasoning.output_tokens"] == 0
    assert a["gen_ai.request.max_tokens"] == 8 and a["gen_ai.request.temperature"] == 0.2
    assert a["gen_ai.request.stream"] is False
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gateway.team"] == "alpha" and a["gateway.cache"] == "miss"
    assert attrs(server)["http.response.status_code"] == 200
    sent = upstream.state.requests[0].headers["traceparent"]
    assert sent.startswith(f"00-{TRACE}-{client.span_id.hex()}-")

    stream_spans = by_trace[h_stream["x-gateway-trace-id"]]
    sc = next(s for s in stream_spans if s.kind == PbSpan.SPAN_KIND_CLIENT)
    sa = attrs(sc)
    assert sa["gen_ai.request.stream"] is True and sa["gen_ai.response.time_to_first_chunk"] > 0
    assert UPSTREAM_KEY not in sa["gen_ai.input.messages"]
    assert "[REDACTED]" in sa["gen_ai.input.messages"]

    hit_spans = by_trace[h_hit["x-gateway-trace-id"]]
    assert [s.kind for s in hit_spans] == [PbSpan.SPAN_KIND_SERVER]  # no upstream call
    assert attrs(hit_spans[0])["gateway.cache"] == "hit"

    fail_spans = by_trace[h_fail["x-gateway-trace-id"]]
    fc = next(s for s in fail_spans if s.kind == PbSpan.SPAN_KIND_CLIENT)
    fs = next(s for s in fail_spans if s.kind == PbSpan.SPAN_KIND_SERVER)
    assert attrs(fc)["error.type"] == "503" and fc.status.code == 2  # STATUS_CODE_ERROR
    assert fs.status.code == 2 and attrs(fs)["http.response.status_code"] == 503


async def test_dead_collector_never_fails_a_request(upstream: Upstream, tmp_path: Path) -> None:
    settings = make_settings(upstream.url, tmp_path / "s")
    tel = Telemetry(traces=Traces(endpoint=f"http://127.0.0.1:{free_port()}"))
    gw = await start_gateway(settings, Gateway(settings, tracing=Tracing.from_settings(tel)))
    try:
        for _ in range(5):
            status, headers = await post(gw.url, BODY)
            assert status == 200 and len(headers["x-gateway-trace-id"]) == 32
    finally:
        await gw.stop()


async def scrape(gw: Running, openmetrics: bool = False) -> str:
    accept = "application/openmetrics-text" if openmetrics else "text/plain"
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{gw.admin_url}/metrics", headers={"accept": accept}) as r,
    ):
        assert r.status == 200
        return await r.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(
        v
        for (n, lbl), v in m.items()
        if n == name and all(dict(lbl).get(k) == x for k, x in labels.items())
    )


async def test_metrics_after_known_workload(gateway_factory: Any, upstream: Upstream) -> None:
    gw = await gateway_factory(cache="true", beta_budgets="[{tokens: 10, per: day}]")
    usage = {"input": 0, "output": 0}
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            async with s.post(
                f"{gw.url}/v1/responses", headers=auth(), json={**BODY, "input": f"n{i}"}
            ) as r:
                u = (await r.json())["usage"]
                usage["input"] += u["input_tokens"]
                usage["output"] += u["output_tokens"]
        async with s.post(
            f"{gw.url}/v1/responses", headers=auth(), json={**BODY, "input": "n0"}
        ) as r:
            assert r.headers["x-gateway-cache"] == "hit"
        async with s.post(
            f"{gw.url}/v1/responses", headers=auth(), json={**BODY, "stream": True}
        ) as r:
            await r.read()
        usage["input"] += 2
        usage["output"] += 8
        async with s.post(
            f"{gw.url}/v1/responses",
            headers={**auth(), "x-mock-status": "500"},
            json={**BODY, "input": "boom"},
        ) as r:
            assert r.status == 500
        async with s.post(
            f"{gw.url}/v1/responses",
            headers=auth(BETA_KEY),
            json={**BODY, "model": "garda-beta-mini"},
        ) as r:
            assert r.status == 429
        async with s.post(f"{gw.url}/v1/responses", headers=auth("nobody"), json=BODY) as r:
            assert r.status == 401
    m = samples(await scrape(gw))
    req = "gateway_requests_total"
    assert get(m, req, team="alpha", status="200", cache="miss") == 4
    assert get(m, req, team="alpha", status="200", cache="hit") == 1
    assert get(m, req, team="alpha", status="500") == 1
    # the budget refused it before any call: no lookup, and no cache result
    assert get(m, req, team="beta", status="429", cache="none") == 1
    assert get(m, req, team="unknown", status="401", cache="none") == 1
    assert get(m, "gateway_tokens_total", team="alpha", type="input") == usage["input"]
    assert get(m, "gateway_tokens_total", team="alpha", type="output") == usage["output"]
    cost = (usage["input"] * 0.10 + usage["output"] * 0.40) / 1e6
    assert get(m, "gateway_cost_usd_total", team="alpha") == pytest.approx(cost)
    assert get(m, "gateway_cache_lookups_total", result="hit") == 1
    assert get(m, "gateway_cache_lookups_total", result="miss") == 5  # not the refused 429
    assert get(m, "gateway_cache_saved_tokens_total", team="alpha") > 0
    assert get(m, "gateway_cache_entries") == 4
    assert get(m, "gateway_budget_rejections_total", team="beta") == 1
    assert get(m, "gateway_budget_limit_tokens", team="beta", window="day") == 10
    assert get(m, "gateway_upstream_errors_total", upstream="mock", reason="http_500") == 1
    assert get(m, "gateway_request_duration_seconds_count", team="alpha") == 6
    assert get(m, "gateway_time_to_first_token_seconds_count", team="alpha") == 1
    assert get(m, "gateway_overhead_seconds_count") == 8
    assert get(m, "gateway_upstream_duration_seconds_count", upstream="mock") == 5
    assert get(m, "gateway_inflight_requests") == 0 and get(m, "gateway_active_streams") == 0
    # every request of a team has its ledger record; one without a valid key has none (it is
    # counted and logged under "unknown": nobody without a key may add durable state)
    rows = await ledger_rows(gw)
    assert len(rows) == 7 and "unknown" not in {r["team"] for r in rows}
    assert (rows[-1]["team"], rows[-1]["status"], rows[-1]["cache"]) == ("beta", 429, "")
    # keys and ids are never labels
    text = await scrape(gw)
    assert ALPHA_KEY not in text and UPSTREAM_KEY not in text and "req_" not in text


async def test_openmetrics_exemplars_carry_trace_ids(traced: Running) -> None:
    _, headers = await post(traced.url, BODY)
    text = await scrape(traced, openmetrics=True)
    assert text.rstrip().endswith("# EOF")
    ex = [
        line
        for line in text.splitlines()
        if line.startswith("gateway_request_duration_seconds_bucket") and "# {" in line
    ]
    assert any(f'trace_id="{headers["x-gateway-trace-id"]}"' in line for line in ex)


async def test_model_label_is_bounded(upstream: Upstream, tmp_path: Path) -> None:
    # the models the config names by pattern get labels (a bare "*" names none)
    settings = make_settings(
        upstream.url, tmp_path / "s", models='["nusantara-*", "garda-*", "gpt-*"]'
    )
    settings = settings.model_copy(update={"telemetry": Telemetry(max_model_labels=2)})
    gw = await start_gateway(settings)
    try:
        for model in ("nusantara-base", "garda-beta-mini", "gpt-4o-mini", "made-up"):
            await post(gw.url, {**BODY, "model": model})
        m = samples(await scrape(gw))
        models = {dict(lbl)["model"] for (n, lbl) in m if n == "gateway_requests_total"}
        assert models == {"nusantara-base", "garda-beta-mini", "other"}
    finally:
        await gw.stop()


async def test_one_log_line_per_request_with_contract_fields(gateway: Running) -> None:
    with structlog.testing.capture_logs() as logs:
        await post(gateway.url, BODY)
        await post(gateway.url, {**BODY, "stream": True})
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{gateway.url}/v1/responses", json=BODY, headers=auth("bad-key")) as r,
        ):
            assert r.status == 401
    lines = [entry for entry in logs if entry["event"] == "request"]
    assert len(lines) == 3
    fields = {
        "request_id",
        "trace_id",
        "team",
        "model",
        "upstream",
        "route",
        "status",
        "stream",
        "cache",
        "input_tokens",
        "output_tokens",
        "duration_ms",
        "ttft_ms",
        "overhead_ms",
        "error",
    }
    for line in lines:
        assert fields <= set(line)
        flat = repr(line)
        assert ALPHA_KEY not in flat and UPSTREAM_KEY not in flat and "trace me" not in flat
    assert lines[1]["stream"] is True and lines[1]["ttft_ms"] > 0
    assert lines[0]["input_tokens"] == 2 and lines[0]["output_tokens"] == 8
    assert lines[2]["status"] == 401 and lines[2]["error"] == "invalid_api_key"
    assert lines[0]["overhead_ms"] < lines[0]["duration_ms"]
