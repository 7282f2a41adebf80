"""Two gateways sharing one Redis prefix and one upstream, as two replicas would (CONTRACT
section 9): the cache, single-flight and response ownership work through either, a leader
that loses Redis mid-stream ends its followers' streams cleanly, and Redis going away only
bypasses the cache until it is back."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import (
    ADMIN_KEY,
    ALPHA_KEY,
    BETA_KEY,
    Running,
    Upstream,
    auth,
    make_settings,
    start_gateway,
)
from forwarder import Forwarder
from servers import REDIS_URL, redis_prefix

from gateway.runtime import Gateway
from gateway.settings import Cache, State

pytestmark = pytest.mark.redis

BODY: dict[str, Any] = {"model": "garda-beta-mini", "input": "share me", "max_output_tokens": 16}
CALLS = "POST /v1/responses"

Start = Callable[..., Awaitable[Running]]


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    async with redis_prefix() as p:
        yield p


@pytest.fixture
async def forwarder() -> AsyncIterator[Forwarder]:
    fwd = Forwarder(6379)
    await fwd.start()
    yield fwd
    await fwd.stop()


@pytest.fixture
async def replica(upstream: Upstream, tmp_path: Path, prefix: str) -> AsyncIterator[Start]:
    """Start a gateway on the shared Redis prefix (each with a ledger of its own, so that only
    Redis can tell one about the other's responses)."""
    started: list[Running] = []

    async def start(redis_url: str = REDIS_URL, **cache: Any) -> Running:
        path = tmp_path / f"replica{len(started)}"
        base = make_settings(upstream.url, path, cache="true")
        settings = base.model_copy(
            update={
                "state": State(store=redis_url, prefix=prefix, path=str(path)),
                "cache": Cache(**{"ttl": 600, "max_bytes": 10_000_000, **cache}),
            }
        )
        running = await start_gateway(settings, Gateway(settings))
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stop()


async def post(
    url: str, body: dict[str, Any], key: str = ALPHA_KEY, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/v1/responses", json=body, headers={**auth(key), **headers}) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


async def admin(running: Running, method: str, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as s,
        s.request(
            method, running.admin_url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as r,
    ):
        assert r.status == 200
        return await r.json()


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_cached_through_one_is_a_hit_on_the_other(
    replica: Start, upstream: Upstream, stream: bool
) -> None:
    a, b = await replica(), await replica()
    body = {**BODY, "stream": stream}
    _, ha, first = await post(a.url, body)
    _, hb, again = await post(b.url, body)
    assert (ha["x-gateway-cache"], hb["x-gateway-cache"]) == ("miss", "hit")
    assert again == first  # a stream byte for byte
    assert int(hb["age"]) >= 0
    assert upstream.state.calls[CALLS] == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_identical_requests_at_both_at_once_make_one_upstream_call(
    replica: Start, upstream: Upstream, stream: bool
) -> None:
    a, b = await replica(), await replica()
    body = {**BODY, "stream": stream}
    slow = {"x-mock-ttft-ms": "400"}
    results = await asyncio.gather(
        *(post(gw.url, body, **slow) for _ in range(10) for gw in (a, b))
    )
    assert upstream.state.calls[CALLS] == 1
    assert {r[0] for r in results} == {200}
    assert len({r[2] for r in results}) == 1  # 20 identical answers
    kinds = sorted(r[1]["x-gateway-cache"] for r in results)
    assert kinds.count("miss") == 1 and kinds.count("coalesced") == 19


async def test_a_response_made_through_one_is_readable_through_the_other_by_its_team_only(
    replica: Start,
) -> None:
    a, b = await replica(), await replica()
    status, _, raw = await post(a.url, BODY, **{"cache-control": "no-store"})
    assert status == 200
    rid = json.loads(raw)["id"]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{b.url}/v1/responses/{rid}", headers=auth(ALPHA_KEY)) as r:
            assert r.status == 200 and (await r.json())["id"] == rid
        async with s.get(f"{b.url}/v1/responses/{rid}", headers=auth(BETA_KEY)) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "not_found"
        async with s.get(f"{b.url}/v1/responses/resp_nobody", headers=auth(ALPHA_KEY)) as r:
            assert r.status == 404


async def test_a_leader_cut_off_mid_stream_ends_its_followers_cleanly(
    replica: Start, forwarder: Forwarder, upstream: Upstream
) -> None:
    a = await replica(forwarder.url(REDIS_URL))  # leads, and loses Redis mid-stream
    b = await replica()
    body = {**BODY, "stream": True, "max_output_tokens": 60}
    slow = {"x-mock-tokens-per-s": "20"}  # three seconds of stream
    leader = asyncio.ensure_future(post(a.url, body, **slow))
    await asyncio.sleep(0.3)
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{b.url}/v1/responses", json=body, headers=auth(ALPHA_KEY)) as r,
    ):
        assert r.headers["x-gateway-cache"] == "coalesced"
        first = await r.content.readany()
        assert first.startswith(b"event: response.created")
        t0 = time.monotonic()
        await forwarder.stop()
        rest = await asyncio.wait_for(r.read(), 10)
    assert time.monotonic() - t0 < 5  # the lease (3 s) ran out, then the stream ended
    assert b'"code":"upstream_stream_interrupted"' in rest
    assert b"response.completed" not in rest
    status, _, whole = await leader  # the leader's own client got its whole answer
    assert status == 200 and b"response.completed" in whole
    assert upstream.state.calls[CALLS] == 1


async def test_purge_by_team_through_either(replica: Start) -> None:
    a, b = await replica(), await replica()
    alpha = {**BODY, "model": "nusantara-base"}
    await post(a.url, alpha, ALPHA_KEY)
    await post(a.url, BODY, BETA_KEY)
    assert (await admin(b, "GET", "/admin/cache"))["entries"] == 2
    assert (await admin(b, "DELETE", "/admin/cache?team=alpha"))["purged"] == 1
    assert (await post(a.url, alpha, ALPHA_KEY))[1]["x-gateway-cache"] == "miss"
    assert (await post(a.url, BODY, BETA_KEY))[1]["x-gateway-cache"] == "hit"


async def test_max_bytes_bounds_what_all_replicas_store_together(replica: Start) -> None:
    a, b = await replica(max_bytes=6000), await replica(max_bytes=6000)
    for n in range(8):
        await post((a, b)[n % 2].url, {**BODY, "input": f"question {n}"})
    stats = await admin(a, "GET", "/admin/cache")
    assert 0 < stats["bytes"] <= 6000 and stats["entries"] < 8
    assert stats == {
        **stats,
        **{k: (await admin(b, "GET", "/admin/cache"))[k] for k in ("entries", "bytes")},
    }
    assert (await post(b.url, {**BODY, "input": "question 7"}))[1]["x-gateway-cache"] == "hit"
    assert (await post(b.url, {**BODY, "input": "question 0"}))[1]["x-gateway-cache"] == "miss"


async def test_redis_down_bypasses_the_cache_and_it_comes_back_by_itself(
    replica: Start, forwarder: Forwarder, upstream: Upstream
) -> None:
    a = await replica(forwarder.url(REDIS_URL))
    assert (await post(a.url, BODY))[1]["x-gateway-cache"] == "miss"
    assert (await post(a.url, BODY))[1]["x-gateway-cache"] == "hit"
    await forwarder.stop()
    t0 = time.monotonic()
    for _ in range(3):
        status, headers, _ = await post(a.url, BODY)
        assert status == 200 and headers["x-gateway-cache"] == "bypass"
    assert time.monotonic() - t0 < 2  # no request waits out Redis for long
    errors = a.gw.metrics.registry.get_sample_value(
        "gateway_state_errors_total", {"operation": "cache_get"}
    )
    assert errors is not None and errors >= 3
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{a.admin_url}/metrics") as r:  # a scrape does not need Redis
            assert r.status == 200 and "gateway_state_errors_total" in await r.text()
        admin_auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with s.get(f"{a.admin_url}/admin/cache", headers=admin_auth) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "state_unavailable"
    await forwarder.start()
    deadline, bypassed = time.monotonic() + 5, 3
    while (await post(a.url, BODY))[1]["x-gateway-cache"] != "hit":
        assert time.monotonic() < deadline, "the cache never came back"
        bypassed += 1
        await asyncio.sleep(0.2)
    assert upstream.state.calls[CALLS] == 1 + bypassed  # a hit calls no upstream
