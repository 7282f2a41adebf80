"""Budgets in Redis through the whole pipeline: the requests unit, and Redis not answering
under `state.on_unavailable: reject` and `admit`, with the mock upstream and real sockets."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis
from conftest import (
    ADMIN_KEY,
    BETA_KEY,
    Running,
    Upstream,
    auth,
    free_port,
    ledger_rows,
    make_settings,
    start_gateway,
)
from redis_proxy import RedisProxy
from servers import REDIS_URL, postgres_database, redis_prefix

from gateway.backends import build_backends
from gateway.budget.redis import RedisBudgetStore
from gateway.runtime import Gateway
from gateway.settings import LedgerSettings, State

pytestmark = pytest.mark.redis

BODY: dict[str, Any] = {"model": "nusantara-base", "input": "hello there", "max_output_tokens": 20}
# a fixed instant half way through a minute: no window rolls over during a test
NOW = (time.time() // 60) * 60 + 30


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    async with redis_prefix() as p:
        yield p


@pytest.fixture
async def started() -> AsyncIterator[list[Running]]:
    running: list[Running] = []
    yield running
    for r in running:
        await r.stop()


async def redis_gateway(
    started: list[Running],
    upstream: Upstream,
    tmp_path: Path,
    prefix: str,
    url: str = REDIS_URL,
    on_unavailable: str = "reject",
    budgets: str = "[{tokens: 100000, per: day}]",
    ledger_url: str = "",
) -> Running:
    """A gateway whose budgets live in Redis at `url` under `prefix` (and whose ledger is in
    PostgreSQL at `ledger_url`, if given)."""
    settings = make_settings(upstream.url, tmp_path / "state", alpha_budgets=budgets)
    state = State(store=url, prefix=prefix, on_unavailable=on_unavailable, path=settings.state.path)
    ledger = LedgerSettings(url=ledger_url, flush_interval=0.05)
    settings = settings.model_copy(update={"state": state, "ledger": ledger})
    backends = build_backends(settings, clock=lambda: NOW)
    gw = Gateway(settings, clock=lambda: NOW, backends=backends)
    assert isinstance(backends.budget, RedisBudgetStore)
    backends.budget.on_error = gw.state_error
    running = await start_gateway(settings, gw)
    started.append(running)
    return running


async def post(gw: Running, key: str | None = None) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{gw.url}/v1/responses", json=BODY, headers=auth(key) if key else auth()) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.json()


async def get(url: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(url, headers=auth(ADMIN_KEY)) as r,
    ):
        return r.status, await r.text()


async def team_budgets(gw: Running, name: str) -> list[dict[str, Any]]:
    status, text = await get(f"{gw.admin_url}/admin/teams")
    assert status == 200, text
    teams: list[dict[str, Any]] = json.loads(text)["teams"]
    return next(t["budgets"] for t in teams if t["team"] == name)


async def rows_in(gw: Running, n: int) -> None:
    """Until the replica's ledger holds `n` records, whatever its backend."""
    for _ in range(200):
        if sum(r.requests for r in await gw.gw.reports.report(None, None, ())) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the ledger never held {n} records")


async def rows_after(gw: Running, n: int) -> list[dict[str, Any]]:
    """The ledger once it holds `n` records (each is appended after its answer is sent)."""
    for _ in range(200):
        rows = await ledger_rows(gw)
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.01)
    raise AssertionError(f"the ledger holds {len(rows)} records, not {n}")


async def test_a_requests_budget_counts_calls_through_redis(
    started: list[Running], upstream: Upstream, tmp_path: Path, prefix: str
) -> None:
    gw = await redis_gateway(
        started,
        upstream,
        tmp_path,
        prefix,
        budgets="[{requests: 2, per: minute}, {tokens: 100000, per: day}]",
    )
    assert [(await post(gw))[0] for _ in range(2)] == [200, 200]
    status, headers, body = await post(gw)
    assert status == 429 and body["error"]["code"] == "budget_exceeded"
    assert "'minute:requests'" in body["error"]["message"]
    assert 1 <= int(headers["retry-after"]) <= 30
    minute = (await team_budgets(gw, "alpha"))[0]
    assert (minute["unit"], minute["limit"], minute["used"], minute["remaining"]) == (
        "requests",
        2,
        2,
        0,
    )
    rows = await rows_after(gw, 3)
    assert [r["status"] for r in rows] == [200, 200, 429]
    # a second replica on the same prefix sees the same minute, full
    other = await redis_gateway(
        started,
        upstream,
        tmp_path / "b",
        prefix,
        budgets="[{requests: 2, per: minute}, {tokens: 100000, per: day}]",
    )
    assert (await post(other))[0] == 429


async def test_reject_answers_503_while_redis_does_not_answer(
    started: list[Running], upstream: Upstream, tmp_path: Path, prefix: str
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    gw = await redis_gateway(started, upstream, tmp_path, prefix, url=dead)
    status, headers, body = await post(gw)
    assert status == 503
    assert body["error"]["type"] == "server_error"
    assert body["error"]["code"] == "state_unavailable"
    assert int(headers["retry-after"]) >= 1
    # a team without budgets needs no counters: served
    beta = dict(BODY, model="garda-beta-mini")
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{gw.url}/v1/responses", json=beta, headers=auth(BETA_KEY)) as r,
    ):
        assert r.status == 200
    for url in (gw.url, gw.admin_url):
        status, text = await get(f"{url}/readyz")
        assert status == 503 and "state_unavailable" in text
    status, text = await get(f"{gw.admin_url}/admin/teams")
    assert status == 503 and "state_unavailable" in text
    status, metrics = await get(f"{gw.admin_url}/metrics")
    assert status == 200  # a scrape never fails for the store
    assert 'gateway_state_errors_total{operation="budget_reserve"} 1.0' in metrics
    rows = await rows_after(gw, 2)
    assert [(r["team"], r["status"], r["attempts"]) for r in rows] == [
        ("alpha", 503, 0),
        ("beta", 200, 1),
    ]


async def test_admit_serves_unchecked_and_corrects_counters_once_redis_is_back(
    started: list[Running], upstream: Upstream, tmp_path: Path, prefix: str
) -> None:
    proxy = RedisProxy()  # Redis is away when the gateway starts
    gw = await redis_gateway(
        started, upstream, tmp_path, prefix, url=proxy.redis_url, on_unavailable="admit"
    )
    assert (await get(f"{gw.url}/readyz"))[0] == 200  # admitting: ready
    for _ in range(2):
        status, headers, _ = await post(gw)
        assert status == 200 and "x-gateway-budget-remaining-tokens" not in headers
    rows = await rows_after(gw, 2)
    charged = [r["charged_tokens"] for r in rows]
    assert len(charged) == 2 and all(c > 0 for c in charged)  # charged as if held
    await proxy.start()
    try:
        status, headers, _ = await post(gw)
        assert status == 200 and "x-gateway-budget-remaining-tokens" in headers
        rows = await rows_after(gw, 3)  # its record lands once the answer is sent
        spent = sum(r["charged_tokens"] for r in rows)
        alpha = await team_budgets(gw, "alpha")
        assert (alpha[0]["used"], alpha[0]["reserved"]) == (spent, 0)
        status, metrics = await get(f"{gw.admin_url}/metrics")
        assert 'gateway_state_errors_total{operation="budget_reserve"} 2.0' in metrics
    finally:
        await proxy.stop()


@pytest.mark.postgres
async def test_replicas_rebuild_a_flushed_redis_from_their_shared_ledger(
    started: list[Running], upstream: Upstream, tmp_path: Path, prefix: str
) -> None:
    budgets = "[{requests: 3, per: minute}, {tokens: 100000, per: day}]"
    async with postgres_database() as ledger_url:
        a, b = [
            await redis_gateway(
                started, upstream, tmp_path / name, prefix, budgets=budgets, ledger_url=ledger_url
            )
            for name in ("a", "b")
        ]
        assert [(await post(a))[0] for _ in range(2)] == [200, 200]
        await rows_in(a, 2)
        await a.gw.ledger.flush()  # in PostgreSQL, where replica b reads it
        raw = redis.Redis.from_url(REDIS_URL)
        try:  # Redis loses this test's keys (a FLUSHALL for everybody else's)
            keys = [k async for k in raw.scan_iter(match=f"{prefix}*")]
            assert keys and await raw.delete(*keys)
        finally:
            await raw.aclose()
        spent = (await team_budgets(b, "alpha"))[1]["used"]
        assert spent > 0 and (await team_budgets(b, "alpha"))[0]["used"] == 2
        assert (await post(b))[0] == 200  # the third request of the minute
        assert (await post(a))[0] == 429  # the fourth, on either replica
