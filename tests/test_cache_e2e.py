"""The response cache end to end: coalescing, replay, isolation, what is never cached."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from conftest import (
    ADMIN_KEY,
    ALPHA_KEY,
    BETA_KEY,
    GatewayFactory,
    Running,
    Upstream,
    auth,
    make_settings,
    start_gateway,
)

from gateway.backends import build_backends
from gateway.cache.store import MemoryCacheStore
from gateway.runtime import Gateway

BODY: dict[str, Any] = {"model": "garda-beta-mini", "input": "cache me", "max_output_tokens": 16}
CALLS = "POST /v1/responses"


@pytest.fixture
async def cached(gateway_factory: GatewayFactory) -> Running:
    return await gateway_factory(cache="true")


async def fetch(
    url: str, body: dict[str, Any], key: str = ALPHA_KEY, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/v1/responses", json=body, headers={**auth(key), **headers}) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


@pytest.mark.parametrize("stream", [False, True])
async def test_100_identical_concurrent_requests_one_upstream_call(
    cached: Running, upstream: Upstream, stream: bool
) -> None:
    body = {**BODY, "stream": stream}
    results = await asyncio.gather(
        *(fetch(cached.url, body, **{"x-mock-ttft-ms": "300"}) for _ in range(100))
    )
    assert upstream.state.calls[CALLS] == 1
    assert {r[0] for r in results} == {200}
    assert len({r[2] for r in results}) == 1  # 100 identical results
    kinds = sorted(r[1]["x-gateway-cache"] for r in results)
    # one leads; the others follow it, or (arriving after its answer was stored, on a busy
    # machine) read that answer from the cache: either way, no second upstream call
    assert kinds.count("miss") == 1 and kinds.count("coalesced") + kinds.count("hit") == 99
    assert kinds.count("coalesced") > 0
    # and now it is stored
    status, headers, again = await fetch(cached.url, body)
    assert status == 200
    assert headers["x-gateway-cache"] == "hit" and again == results[0][2]
    assert int(headers["age"]) >= 0 and upstream.state.calls[CALLS] == 1


async def test_replayed_stream_is_byte_identical_and_sdk_reads_it(
    cached: Running, upstream: Upstream
) -> None:
    body = {**BODY, "stream": True}
    _, h1, first = await fetch(cached.url, body)
    _, h2, second = await fetch(cached.url, body)
    assert (h1["x-gateway-cache"], h2["x-gateway-cache"]) == ("miss", "hit")
    assert first == second and h2["content-type"].startswith("text/event-stream")
    async with openai.AsyncOpenAI(
        base_url=f"{cached.url}/v1", api_key=ALPHA_KEY, max_retries=0
    ) as client:
        stream = await client.responses.create(**body)
        events = [ev async for ev in stream]
    assert events[-1].type == "response.completed"
    text = "".join(ev.delta for ev in events if ev.type == "response.output_text.delta")
    assert text == events[-1].response.output_text
    assert upstream.state.calls[CALLS] == 1


async def test_teams_are_isolated_unless_shared(
    gateway_factory: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway_factory(cache="true")
    await fetch(gw.url, BODY, ALPHA_KEY)
    _, h, _ = await fetch(gw.url, BODY, BETA_KEY)
    assert h["x-gateway-cache"] == "miss" and upstream.state.calls[CALLS] == 2
    _, h, _ = await fetch(gw.url, BODY, ALPHA_KEY)
    assert h["x-gateway-cache"] == "hit"


async def test_shared_scope(upstream: Upstream, tmp_path: Path) -> None:
    settings = make_settings(upstream.url, tmp_path / "s", cache="true")
    shared = settings.model_copy(update={"cache": settings.cache.__class__(scope="shared")})
    gw = await start_gateway(shared)
    try:
        await fetch(gw.url, BODY, ALPHA_KEY)
        _, h, _ = await fetch(gw.url, BODY, BETA_KEY)
        assert h["x-gateway-cache"] == "hit" and upstream.state.calls[CALLS] == 1
    finally:
        await gw.stop()


@pytest.mark.parametrize(
    "fault",
    [
        {"x-mock-status": "500"},
        {"x-mock-status": "429"},
        {"x-mock-response-status": "incomplete"},
        {"x-mock-response-status": "failed"},
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_failures_never_served_from_cache(
    cached: Running, upstream: Upstream, fault: dict[str, str], stream: bool
) -> None:
    body = {**BODY, "stream": stream}
    await fetch(cached.url, body, **fault)
    _, h, _ = await fetch(cached.url, body)
    assert h["x-gateway-cache"] == "miss" and upstream.state.calls[CALLS] == 2


async def test_background_and_cache_control(cached: Running, upstream: Upstream) -> None:
    for _ in range(2):
        _, h, _ = await fetch(cached.url, {**BODY, "background": True})
        assert h["x-gateway-cache"] == "bypass"
    _, h, _ = await fetch(cached.url, BODY, **{"cache-control": "no-store"})
    assert h["x-gateway-cache"] == "bypass"
    _, h, _ = await fetch(cached.url, BODY)
    assert h["x-gateway-cache"] == "miss"  # no-store stored nothing
    _, h, _ = await fetch(cached.url, BODY, **{"cache-control": "no-cache"})
    assert h["x-gateway-cache"] == "bypass"  # skipped the lookup
    assert upstream.state.calls[CALLS] == 5


async def test_hits_are_not_charged_and_ledger_records_saved_tokens(
    gateway_factory: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway_factory(cache="true", alpha_budgets="[{tokens: 100000, per: day}]")
    await fetch(gw.url, BODY)
    _, h2, _ = await fetch(gw.url, BODY)
    _, h3, _ = await fetch(gw.url, BODY)
    assert h2["x-gateway-cache"] == h3["x-gateway-cache"] == "hit"
    await gw.gw.ledger.flush()
    report = await gw.gw.ledger.report(None, None, ("team",))
    row = report[0]
    spent = row.input_tokens + row.output_tokens
    assert row.requests == 3 and row.saved_tokens == 2 * spent > 0
    remaining = str(100000 - spent)  # only the miss was charged
    assert (
        h2["x-gateway-budget-remaining-tokens"]
        == h3["x-gateway-budget-remaining-tokens"]
        == remaining
    )


async def test_leader_failure_followers_call_alone(cached: Running, upstream: Upstream) -> None:
    leader = asyncio.ensure_future(
        fetch(cached.url, BODY, **{"x-mock-status": "500", "x-mock-first-byte-delay-ms": "300"})
    )
    await asyncio.sleep(0.1)
    followers = await asyncio.gather(*(fetch(cached.url, BODY) for _ in range(5)))
    assert (await leader)[0] == 500
    assert {f[0] for f in followers} == {200}
    assert upstream.state.calls[CALLS] == 6


async def test_stream_follower_disconnects_and_leader_client_leaves(
    cached: Running, upstream: Upstream
) -> None:
    body = {**BODY, "stream": True, "max_output_tokens": 30}
    slow = {"x-mock-tokens-per-s": "60"}

    async def quitter() -> None:
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{cached.url}/v1/responses", json=body, headers={**auth(), **slow}) as r,
        ):
            await r.content.readany()  # first bytes, then gone

    leader = asyncio.ensure_future(quitter())
    await asyncio.sleep(0.1)
    followers = [asyncio.ensure_future(fetch(cached.url, body, **slow)) for _ in range(4)]
    dropout = asyncio.ensure_future(quitter())
    await asyncio.gather(leader, dropout)
    results = await asyncio.gather(*followers)
    assert {r[1]["x-gateway-cache"] for r in results} == {"coalesced"}
    full = {r[2] for r in results}
    assert len(full) == 1 and next(iter(full)).rstrip().endswith(b"}")
    assert b"response.completed" in next(iter(full))
    assert upstream.state.calls[CALLS] == 1
    _, h, replayed = await fetch(cached.url, body)
    assert h["x-gateway-cache"] == "hit" and replayed == next(iter(full))


async def test_admin_cache_stats_and_purge(cached: Running) -> None:
    await fetch(cached.url, BODY)
    await fetch(cached.url, BODY)
    await fetch(cached.url, BODY, BETA_KEY)
    async with aiohttp.ClientSession(headers=auth(ADMIN_KEY)) as s:
        async with s.get(f"{cached.admin_url}/admin/cache") as r:
            stats = await r.json()
        assert (stats["entries"], stats["hits"], stats["misses"]) == (2, 1, 2)
        assert stats["bytes"] > 0
        async with s.delete(f"{cached.admin_url}/admin/cache?team=beta") as r:
            assert (await r.json())["purged"] == 1
        async with s.delete(f"{cached.admin_url}/admin/cache") as r:
            assert (await r.json())["purged"] == 1
        async with s.get(f"{cached.admin_url}/admin/cache") as r:
            assert (await r.json())["entries"] == 0
    async with aiohttp.ClientSession() as s, s.get(f"{cached.admin_url}/admin/cache") as r:
        assert r.status == 401


async def test_ttl_expiry_through_the_gateway(upstream: Upstream, tmp_path: Path) -> None:
    now = [1000.0]
    settings = make_settings(upstream.url, tmp_path / "s", cache="true")
    store = MemoryCacheStore(ttl=30, max_bytes=10**7, max_entry_bytes=10**6, clock=lambda: now[0])
    gw = await start_gateway(
        settings, Gateway(settings, backends=replace(build_backends(settings), cache=store))
    )
    try:
        await fetch(gw.url, BODY)
        now[0] += 29
        assert (await fetch(gw.url, BODY))[1]["x-gateway-cache"] == "hit"
        now[0] += 2
        assert (await fetch(gw.url, BODY))[1]["x-gateway-cache"] == "miss"
    finally:
        await gw.stop()
