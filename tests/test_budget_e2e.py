"""Budgets and the ledger end to end: concurrency, restarts, rollovers, a mixed run, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from conftest import (
    ADMIN_KEY,
    ALPHA_KEY,
    ENV,
    GatewayFactory,
    Running,
    Upstream,
    auth,
    free_port,
    ledger_rows,
    make_settings,
    start_gateway,
)

from gateway.runtime import Gateway

BODY: dict[str, Any] = {
    "model": "nusantara-base",
    "input": "Budget me " * 8,
    "max_output_tokens": 20,
}
ESTIMATE = math.ceil(len(orjson.dumps(BODY)) / 4) + 20
ACTUAL = math.ceil(len(BODY["input"]) / 4) + 20


def session(**kw: Any) -> aiohttp.ClientSession:
    """Compact JSON bodies, so the test knows each reservation's size exactly."""
    return aiohttp.ClientSession(json_serialize=lambda o: orjson.dumps(o).decode(), **kw)


async def admin_teams(gw: Running) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{gw.admin_url}/admin/teams", headers=auth(ADMIN_KEY)) as r,
    ):
        assert r.status == 200
        return {t["team"]: t for t in (await r.json())["teams"]}


async def test_200_concurrent_never_overshoot_and_no_false_429(
    gateway_factory: GatewayFactory,
) -> None:
    limit = int(ESTIMATE * 60.5)
    gw = await gateway_factory(alpha_budgets=f"[{{tokens: {limit}, per: day}}]")
    async with session(headers={**auth(), "x-mock-ttft-ms": "100"}) as s:

        async def one() -> tuple[int, dict[str, str]]:
            async with s.post(f"{gw.url}/v1/responses", json=BODY) as r:
                await r.read()
                return r.status, {k.lower(): v for k, v in r.headers.items()}

        results = await asyncio.gather(*(one() for _ in range(200)))
    admitted = [h for st, h in results if st == 200]
    rejected = [h for st, h in results if st == 429]
    assert len(admitted) + len(rejected) == 200
    # reservations alone guarantee this many; settling early can only admit more
    assert len(admitted) >= limit // ESTIMATE
    for h in rejected:
        assert h["x-should-retry"] == "false" and int(h["retry-after"]) >= 1
    for h in admitted:
        assert int(h["x-gateway-budget-remaining-tokens"]) >= 0
    rows = await ledger_rows(gw)
    spent = sum(r["charged_tokens"] for r in rows)
    assert spent == len(admitted) * ACTUAL <= limit  # documented bound: 0 when usage <= estimate
    team = (await admin_teams(gw))["alpha"]["budgets"][0]
    assert team["used"] == spent and team["reserved"] == 0  # nothing leaked
    # no false 429: while the window can hold one more estimate, the next request is admitted
    async with session(headers=auth()) as s:
        while True:
            before = (await admin_teams(gw))["alpha"]["budgets"][0]["remaining"]
            async with s.post(f"{gw.url}/v1/responses", json=BODY) as r:
                if r.status == 429:
                    assert before < ESTIMATE
                    break
                assert r.status == 200 and before >= ESTIMATE


async def test_admin_teams_shows_whole_tokens_and_rounded_usd(
    gateway_factory: GatewayFactory,
) -> None:
    """After concurrent requests have settled, nothing is reserved: `reserved` is 0, not the
    1e-20 that float reservations leave behind, and token figures are whole numbers."""
    gw = await gateway_factory(alpha_budgets="[{tokens: 20000, per: day}, {usd: 1.0, per: month}]")
    async with session(headers=auth()) as s:

        async def one(i: int) -> int:
            body = {**BODY, "input": f"{i} " + "x" * (i * 7 % 13)}
            async with s.post(f"{gw.url}/v1/responses", json=body) as r:
                await r.read()
                return r.status

        assert set(await asyncio.gather(*(one(i) for i in range(40)))) == {200}
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{gw.admin_url}/admin/teams", headers=auth(ADMIN_KEY)) as r,
    ):
        text = await r.text()
    assert "e-" not in text
    tokens, usd = json.loads(text)["teams"][0]["budgets"]
    assert tokens["unit"] == "tokens" and usd["unit"] == "usd"
    assert all(type(tokens[k]) is int for k in ("limit", "used", "reserved", "remaining"))
    assert tokens["limit"] == 20000 and tokens["reserved"] == 0
    assert tokens["used"] + tokens["remaining"] == 20000
    assert usd["reserved"] == 0 and usd["limit"] == 1
    for k in ("used", "remaining"):
        assert round(usd[k], 6) == usd[k] and 0 < usd[k] < 1
    rows = await ledger_rows(gw)
    assert usd["used"] == round(math.fsum(r["cost_usd"] for r in rows), 6)


async def test_plenty_of_budget_admits_every_concurrent_request(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(alpha_budgets=f"[{{tokens: {ESTIMATE * 200}, per: hour}}]")
    async with session(headers=auth()) as s:

        async def one() -> int:
            async with s.post(f"{gw.url}/v1/responses", json=BODY) as r:
                await r.read()
                return r.status

        assert set(await asyncio.gather(*(one() for _ in range(200)))) == {200}


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_restart_keeps_spend_and_rollover_at_boundary(
    upstream: Upstream, tmp_path: Path
) -> None:
    settings = make_settings(
        upstream.url,
        tmp_path / "state",
        alpha_budgets="[{tokens: 100000, per: day}, {tokens: 1000000, per: month}]",
    )
    clock = Clock(1_795_305_599.0)  # 2026-11-21 23:59:59 UTC
    first = await start_gateway(settings, Gateway(settings, clock=clock))
    async with session(headers=auth()) as s:
        for _ in range(3):
            async with s.post(f"{first.url}/v1/responses", json=BODY) as r:
                assert r.status == 200
    await first.stop()

    second = await start_gateway(settings, Gateway(settings, clock=clock))
    try:
        day, month = (await admin_teams(second))["alpha"]["budgets"]
        assert day["used"] == month["used"] == 3 * ACTUAL  # a restart resets nothing
        clock.now = 1_795_305_600.0  # midnight: a new day, the same month
        day, month = (await admin_teams(second))["alpha"]["budgets"]
        assert day["used"] == 0 and month["used"] == 3 * ACTUAL
        assert day["resets_at"] == 1_795_305_600.0 + 86400
    finally:
        await second.stop()


async def test_mixed_run_ledger_equals_upstream_usage(
    gateway_factory: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway_factory(alpha_budgets="[{tokens: 10000000, per: month}]", drain=10)
    reported: list[int] = []  # total tokens the upstream reported, request by request

    async def direct_usage(body: dict[str, Any]) -> int:
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{upstream.url}/v1/responses", json={**body, "stream": False}) as r,
        ):
            return int((await r.json())["usage"]["total_tokens"])

    async with session(headers=auth()) as s:
        for i in range(3):  # JSON
            body = {**BODY, "input": f"json {i}"}
            async with s.post(f"{gw.url}/v1/responses", json=body) as r:
                reported.append((await r.json())["usage"]["total_tokens"])
        for i in range(3):  # streams, read to the end
            body = {**BODY, "input": f"stream {i}", "stream": True}
            async with s.post(f"{gw.url}/v1/responses", json=body) as r:
                text = await r.text()
            done = [
                json.loads(line[6:])
                for line in text.splitlines()
                if line.startswith("data: {") and "response.completed" in line
            ]
            reported.append(done[0]["response"]["usage"]["total_tokens"])
        async with s.post(
            f"{gw.url}/v1/responses", json=BODY, headers={"x-mock-status": "500"}
        ) as r:
            assert r.status == 500  # an upstream error: no usage, nothing charged
        for i in range(2):  # the client goes away mid-stream; the gateway drains for usage
            body = {**BODY, "input": f"gone {i}", "stream": True}
            async with s.post(
                f"{gw.url}/v1/responses", json=body, headers={"x-mock-tokens-per-s": "100"}
            ) as r:
                await r.content.readany()
                r.close()
            reported.append(await direct_usage(body))
        async with s.post(
            f"{gw.url}/v1/responses",
            json={**BODY, "stream": True},
            headers={"x-mock-cut-after": "6"},
        ) as r:
            assert b"upstream_stream_interrupted" in await r.read()

    rows: list[dict[str, Any]] = []
    for _ in range(100):  # the drained streams finish in the background of their handlers
        rows = await ledger_rows(gw)
        if len(rows) == 10:
            break
        await asyncio.sleep(0.05)
    assert len(rows) == 10
    real = [r for r in rows if not r["estimated"]]
    assert sum(r["input_tokens"] + r["output_tokens"] for r in rows) == sum(reported)
    assert sum(r["charged_tokens"] for r in real) == sum(reported)
    estimated = [r for r in rows if r["estimated"]]
    cut_estimate = math.ceil(len(orjson.dumps({**BODY, "stream": True})) / 4) + 20
    assert len(estimated) == 1 and estimated[0]["charged_tokens"] == cut_estimate
    assert [r["status"] for r in rows].count(500) == 1
    assert sum(1 for r in rows if r["stream"]) == 6
    # the report says the same
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{gw.admin_url}/admin/usage?by=team", headers=auth(ADMIN_KEY)) as r,
    ):
        report = (await r.json())["rows"]
    assert len(report) == 1 and report[0]["requests"] == 10
    assert report[0]["input_tokens"] + report[0]["output_tokens"] == sum(reported)
    assert report[0]["estimated_requests"] == 1
    team = (await admin_teams(gw))["alpha"]["budgets"][0]
    assert team["used"] == sum(reported) + cut_estimate and team["reserved"] == 0


async def test_sdk_gets_rate_limit_error_and_does_not_retry(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(alpha_budgets="[{tokens: 10, per: minute}]")
    async with openai.AsyncOpenAI(
        base_url=f"{gw.url}/v1", api_key=ALPHA_KEY, max_retries=2
    ) as client:
        with pytest.raises(openai.RateLimitError) as e:
            await client.responses.create(**BODY)
    assert e.value.code == "budget_exceeded"
    assert e.value.response.headers["x-should-retry"] == "false"
    rows = await ledger_rows(gw)
    assert [r["status"] for r in rows] == [429]  # one request: the SDK did not retry


def test_sigterm_loses_no_record(mock_upstream_process: str, tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin_port}}}
upstreams:
  mock: {{base_url: "{mock_upstream_process}", api_key: x}}
teams:
  alpha: {{keys: ["${{ALPHA_KEY}}"], budgets: [{{tokens: 100000000, per: total}}]}}
state: {{path: {tmp_path / "state"}}}
ledger: {{flush_interval: 30}}
""")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)],
        env={**os.environ, **ENV},
        stdout=subprocess.DEVNULL,
    )
    try:
        n = asyncio.run(_drive(f"http://127.0.0.1:{port}", 40))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    rows = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "usage",
            "--config",
            str(cfg),
            "--by",
            "team",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        check=True,
    ).stdout
    report = json.loads(rows)
    # a 30 s flush interval: only the graceful stop can have written these
    assert report["rows"][0]["requests"] == n == 40


async def _drive(url: str, n: int) -> int:
    async with session(headers=auth()) as s:
        for _ in range(100):
            try:
                async with s.get(f"{url}/readyz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        done = 0
        for i in range(n):
            async with s.post(f"{url}/v1/responses", json={**BODY, "input": f"t{i}"}) as r:
                done += r.status == 200
        return done


async def test_429_explains_a_request_that_can_never_fit(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(alpha_budgets="[{tokens: 50, per: day}]")
    async with (
        session(headers=auth()) as s,
        s.post(f"{gw.url}/v1/responses", json={**BODY, "max_output_tokens": 500}) as r,
    ):
        err = (await r.json())["error"]
    assert r.status == 429 and err["code"] == "budget_exceeded"
    assert "lower max_output_tokens" in err["message"] and "50" in err["message"]


async def test_usd_budget_refuses_a_model_without_a_price(
    upstream: Upstream, tmp_path: Path
) -> None:
    settings = make_settings(upstream.url, tmp_path / "s", alpha_budgets="[{usd: 5.0, per: day}]")
    priced = {"nusantara-base": settings.prices["nusantara-base"]}
    settings = settings.model_copy(update={"prices": priced})
    gw = await start_gateway(settings)
    try:
        async with session(headers=auth()) as s:
            async with s.post(f"{gw.url}/v1/responses", json=BODY) as r:
                assert r.status == 200
            async with s.post(f"{gw.url}/v1/responses", json={**BODY, "model": "gpt-4o-mini"}) as r:
                err = (await r.json())["error"]
                assert r.status == 403 and err["code"] == "model_not_priced"
        assert upstream.state.calls["POST /v1/responses"] == 1
    finally:
        await gw.stop()


async def test_chat_n_choices_reserve_n_outputs(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(alpha_budgets="[{tokens: 100000, per: day}]")
    chat = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 100,
        "n": 3,
    }
    async with (
        session(headers=auth()) as s,
        s.post(f"{gw.url}/v1/chat/completions", json=chat) as r,
    ):
        remaining = int(r.headers["x-gateway-budget-remaining-tokens"])
    assert remaining == 100000 - (math.ceil(len(orjson.dumps(chat)) / 4) + 300)


async def test_a_requests_budget_counts_upstream_calls_not_cache_hits_nor_refusals(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(
        alpha_budgets="[{requests: 2, per: day}, {tokens: 100000, per: day}]", cache="true"
    )
    statuses = []
    async with session(headers=auth()) as s:
        for body in (BODY, BODY, {**BODY, "input": "another"}, {**BODY, "input": "a third"}):
            async with s.post(f"{gw.url}/v1/responses", json=body) as r:
                statuses.append((r.status, r.headers.get("x-gateway-cache")))
                answer = await r.json()
    # the second is a cache hit: no upstream call, so not counted
    assert statuses == [(200, "miss"), (200, "hit"), (200, "miss"), (429, None)]
    assert "'day:requests'" in answer["error"]["message"]
    requests, tokens = (await admin_teams(gw))["alpha"]["budgets"]
    assert (requests["unit"], requests["used"], requests["reserved"]) == ("requests", 2, 0)
    assert type(requests["limit"]) is int and requests["remaining"] == 0
    assert tokens["used"] > 0
    # a restart rebuilds the count from the ledger: records that made an upstream call
    rows = await ledger_rows(gw)
    assert [r["attempts"] for r in rows] == [1, 0, 1, 0]
    await gw.stop()
    again = await gateway_factory(
        alpha_budgets="[{requests: 2, per: day}, {tokens: 100000, per: day}]", cache="true"
    )
    requests, _ = (await admin_teams(again))["alpha"]["budgets"]
    assert requests["used"] == 2
