"""Retries, fallbacks, key pools and health, on real sockets with two mock upstreams."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from conftest import (
    ADMIN_KEY,
    ENV,
    Running,
    Upstream,
    auth,
    ledger_rows,
    start_app,
    start_gateway,
    start_upstream,
)

from gateway.config import loads
from gateway.mock_upstream.faults import make_fault
from gateway.upstream.health import key_id
from gateway.upstream.retry_budget import MIN_RETRIES

GOOD, GOOD2, BAD = "sk-good-key-0123456789", "sk-good-key-9876543210", "sk-bad-key-0123456789"

CONFIG = """
admin: {{host: 127.0.0.1, port: 0, key: ${{ADMIN_KEY}}}}
upstreams:
  primary: {{base_url: "{primary}", api_keys: {keys}, timeouts: {{connect: 1, first_byte: {first_byte}, idle: 5}}}}
  backup:
    base_url: "{backup}"
    api_key: sk-backup-0123456789
    model_map: {{nusantara-base: garda-beta-mini}}
routes:
  - models: ["nusantara-*"]
    upstreams: [primary, backup]
retries: {{attempts: {attempts}, backoff: {{base: 0.01, max: {max_wait}}}, budget: {budget}}}
health: {{eject_after: {eject_after}, eject_for: {eject_for}}}
teams:
  alpha:
    keys: ["${{ALPHA_KEY}}"]
    budgets: [{{tokens: 1000000, per: day}}]
prices: {{"*": {{input: 1.0, output: 2.0}}}}
cache: {{enabled: false}}
state: {{path: {state}}}
"""  # noqa: E501
BODY: dict[str, Any] = {"model": "nusantara-base", "input": "retry me", "max_output_tokens": 6}


@pytest.fixture
async def backup() -> AsyncIterator[Upstream]:
    up = await start_upstream()
    yield up
    await up.runner.cleanup()


async def resilient(
    primary: Upstream,
    backup: Upstream,
    state: Path,
    edit: tuple[str, str] = ("", ""),
    **kw: Any,
) -> Running:
    """A gateway routing nusantara-* to primary then backup; `edit` replaces a piece of the
    config text for the tests that need one setting the parameters do not reach."""
    params: dict[str, Any] = {
        "primary": primary.url,
        "backup": backup.url,
        "keys": f"[{GOOD}]",
        "first_byte": 5,
        "attempts": 3,
        "max_wait": 0.05,
        "budget": 0.2,
        "eject_after": 5,
        "eject_for": 30,
        "state": state,
    }
    params.update(kw)
    return await start_gateway(loads(CONFIG.format(**params).replace(*edit), ENV))


async def post(
    gw: Running, body: dict[str, Any], **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession(headers={**auth(), **headers}) as s,
        s.post(f"{gw.url}/v1/responses", json=body) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


async def direct(up: Upstream, body: dict[str, Any]) -> bytes:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{up.url}/v1/responses", json=body, headers={"x-mock-fault-id": "x"}) as r,
    ):
        return await r.read()


_MADE_UP = re.compile(rb'(resp|msg)_[0-9a-f]+|"(created_at|completed_at)":\d+')


def same_but_ids(a: bytes, b: bytes) -> bool:
    return _MADE_UP.sub(b"", a) == _MADE_UP.sub(b"", b) and len(a) > 1000


@pytest.mark.parametrize("fault", ["503", "reset", "429"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_fault_before_the_first_byte_is_retried_and_unseen(
    upstream: Upstream, backup: Upstream, tmp_path: Path, fault: str, stream: bool
) -> None:
    """An error answer is retried on the pool's next key, the same upstream; a connection that
    broke is the upstream's failure, so the route's next upstream gets the retry, and as the
    request was sent (the upstream may have billed it) that attempt is charged its estimate."""
    gw = await resilient(upstream, backup, tmp_path / "state", keys=f"[{GOOD}, {GOOD2}]")
    try:
        body = {**BODY, "stream": stream}
        upstream.state.faults.queue(make_fault(fault), count=1)
        status, headers, raw = await post(gw, body)
        assert status == 200
        answered = backup if fault == "reset" else upstream
        name = "backup" if fault == "reset" else "primary"
        assert headers["x-gateway-attempts"] == "2" and headers["x-gateway-upstream"] == name
        assert len(upstream.state.requests) + len(backup.state.requests) == 2
        sent = orjson.loads(answered.state.requests[-1].body)
        if stream:  # byte-identical but for the ids and times the mock makes up per answer
            assert same_but_ids(raw, await direct(answered, sent))
            assert b"response.completed" in raw
        else:
            assert orjson.loads(raw)["status"] == "completed"
        (row,) = await ledger_rows(gw)
        assert (row["attempts"], row["upstream"], row["status"]) == (2, name, 200)
        real = row["input_tokens"] + row["output_tokens"]
        assert row["output_tokens"] == 6
        if fault == "reset":
            estimate = -(-len(json.dumps(body)) // 4) + BODY["max_output_tokens"]
            assert (row["charged_tokens"], row["estimated"]) == (estimate + real, 1)
        else:
            assert (row["charged_tokens"], row["estimated"]) == (real, 0)
    finally:
        await gw.stop()


async def test_retry_after_is_waited_for(
    upstream: Upstream, backup: Upstream, tmp_path: Path
) -> None:
    """The key rests for the upstream's retry-after and is the only way for this model (no
    route names it): the retry waits for the rest to end."""
    gw = await resilient(upstream, backup, tmp_path / "state", max_wait=2.0)
    try:
        upstream.state.faults.queue(make_fault(429, 1), count=1)
        started = time.monotonic()
        status, headers, _ = await post(gw, {**BODY, "model": "gpt-4o-mini"})
        took = time.monotonic() - started
        assert status == 200 and headers["x-gateway-upstream"] == "primary"
        assert headers["x-gateway-attempts"] == "2" and took >= 1.0
        # a retry-after longer than backoff.max is not waited for: the client gets the 429
        upstream.state.faults.queue(make_fault(429, 5), count=1)
        status, headers, _ = await post(gw, {**BODY, "model": "gpt-4o-mini"})
        assert status == 429 and headers["retry-after"] == "5"
    finally:
        await gw.stop()


async def test_a_stream_cut_after_its_first_bytes_is_never_retried(
    upstream: Upstream, backup: Upstream, tmp_path: Path
) -> None:
    gw = await resilient(upstream, backup, tmp_path / "state")
    try:
        upstream.state.faults.queue(make_fault("cut", 3), count=1)
        status, headers, raw = await post(gw, {**BODY, "stream": True})
        assert status == 200 and headers["x-gateway-attempts"] == "1"
        assert b'"code":"upstream_stream_interrupted"' in raw
        assert len(upstream.state.requests) == 1 and backup.state.requests == []
    finally:
        await gw.stop()


async def test_fallback_to_the_next_upstream_with_its_model_name(
    upstream: Upstream, backup: Upstream, tmp_path: Path
) -> None:
    gw = await resilient(upstream, backup, tmp_path / "state", attempts=2)
    try:
        upstream.state.faults.queue(make_fault(502), count=1)
        status, headers, raw = await post(gw, BODY)
        assert status == 200 and headers["x-gateway-upstream"] == "backup"
        assert orjson.loads(backup.state.requests[0].body)["model"] == "garda-beta-mini"
        assert orjson.loads(raw)["model"] == "garda-beta-mini"
        (row,) = await ledger_rows(gw)
        assert (row["model"], row["upstream"], row["attempts"]) == ("nusantara-base", "backup", 2)
    finally:
        await gw.stop()


async def admin(gw: Running, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{gw.admin_url}{path}", headers=auth(ADMIN_KEY)) as r,
    ):
        assert r.status == 200
        return await r.json() if path.startswith("/admin") else await r.text()


async def test_a_refused_key_leaves_the_pool_after_its_first_401(
    upstream: Upstream, backup: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.state.faults.refuse(BAD)
    gw = await resilient(upstream, backup, tmp_path / "state", keys=f"[{BAD}, {GOOD}]")
    try:
        for _ in range(6):
            status, headers, _ = await post(gw, BODY)
            assert status == 200 and headers["x-gateway-upstream"] == "primary"
        used = upstream.state.keys_used()
        assert used.count(BAD) == 1 and used.count(GOOD) == 6  # out after its first 401
        view = await admin(gw, "/admin/upstreams")
        primary = next(u for u in view["upstreams"] if u["upstream"] == "primary")
        assert primary["state"] == "healthy"  # the upstream stays in service
        keys = {k["key_id"]: k for k in primary["keys"]}
        assert keys[key_id(BAD)]["state"] == "ejected" and keys[key_id(BAD)]["reason"] == "auth"
        assert keys[key_id(GOOD)]["state"] == "healthy"
        metrics = await admin(gw, "/metrics")
        assert 'gateway_upstream_key_ejections_total{reason="auth",upstream="primary"} 1.0' in (
            metrics
        )
        text = orjson.dumps(view).decode() + metrics + capsys.readouterr().out
        assert BAD not in text and GOOD not in text
    finally:
        await gw.stop()


async def test_an_upstream_is_ejected_then_a_trial_brings_it_back(
    upstream: Upstream, backup: Upstream, tmp_path: Path
) -> None:
    gw = await resilient(
        upstream, backup, tmp_path / "state", attempts=2, eject_after=2, eject_for=0.5
    )
    try:
        upstream.state.faults.queue(make_fault(503), count=2)
        for _ in range(2):  # each fails on primary, then the backup answers
            status, headers, _ = await post(gw, BODY)
            assert status == 200 and headers["x-gateway-upstream"] == "backup"
        assert 'gateway_upstream_healthy{upstream="primary"} 0.0' in await admin(gw, "/metrics")
        calls = len(upstream.state.requests)
        status, headers, _ = await post(gw, BODY)  # primary is out: straight to the backup
        assert headers["x-gateway-upstream"] == "backup" and headers["x-gateway-attempts"] == "1"
        assert len(upstream.state.requests) == calls
        await asyncio.sleep(0.6)  # its time is up: the next request is its trial
        status, headers, _ = await post(gw, BODY)
        assert headers["x-gateway-upstream"] == "primary" and status == 200
        assert 'gateway_upstream_healthy{upstream="primary"} 1.0' in await admin(gw, "/metrics")
    finally:
        await gw.stop()


async def test_exhausted_attempts_give_the_upstreams_last_answer_and_charge_nothing(
    upstream: Upstream, backup: Upstream, tmp_path: Path
) -> None:
    gw = await resilient(upstream, backup, tmp_path / "state", attempts=3)
    try:
        upstream.state.faults.queue(make_fault(503), count=10)
        backup.state.faults.queue(make_fault(500), count=10)
        status, headers, raw = await post(gw, BODY)  # primary, backup, primary again
        assert status == 503 and headers["x-gateway-attempts"] == "3"
        assert headers["x-gateway-upstream"] == "primary"
        assert orjson.loads(raw)["error"]["code"] == "mock_fault"  # the upstream's own answer
        (row,) = await ledger_rows(gw)
        assert (row["charged_tokens"], row["cost_usd"], row["attempts"]) == (0, 0.0, 3)
        text = await admin(gw, "/metrics")
        for upstream_, outcome in (("primary", "retried"), ("backup", "retried")):
            assert f'{{outcome="{outcome}",upstream="{upstream_}"}} 1.0' in text
        assert 'gateway_upstream_attempts_total{outcome="failed",upstream="primary"} 1.0' in text
    finally:
        await gw.stop()


async def test_without_retries_one_attempt(
    upstream: Upstream, backup: Upstream, tmp_path: Path
) -> None:
    gw = await resilient(upstream, backup, tmp_path / "state", ("retries:", "# retries:"))
    try:
        upstream.state.faults.queue(make_fault("reset"), count=1)
        status, headers, _ = await post(gw, BODY)
        assert status == 502 and headers["x-gateway-attempts"] == "1"
        assert backup.state.requests == []
    finally:
        await gw.stop()


async def test_the_retry_budget_bounds_calls_to_a_failing_upstream(
    upstream: Upstream, backup: Upstream, tmp_path: Path
) -> None:
    gw = await resilient(
        upstream, backup, tmp_path / "state", attempts=3, budget=0.1, eject_after=1000
    )
    try:
        upstream.state.faults.queue(make_fault(503), count=1000)
        backup.state.faults.queue(make_fault(503), count=1000)
        results = [await post(gw, BODY) for _ in range(40)]
        assert {r[0] for r in results} == {503}
        calls = len(upstream.state.requests) + len(backup.state.requests)
        # 40 first attempts, and at most 0.1 x 40 + 3 retries within the 10 s window
        assert 40 <= calls <= 40 + 0.1 * 40 + MIN_RETRIES
    finally:
        await gw.stop()


async def test_a_timeout_after_sending_is_charged_its_estimate_and_the_answer_its_usage(
    backup: Upstream, tmp_path: Path
) -> None:
    """A first byte that never came may still be billed: that attempt is charged the
    reservation's estimate, the attempt that answered its real usage."""

    async def slow(request: web.Request) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(1.0)  # past first_byte
        return web.json_response({})

    url, runner = await start_app(slow)
    try:
        primary = Upstream(url, backup.state, runner)
        gw = await resilient(primary, backup, tmp_path / "state", first_byte=0.3)
        try:
            status, headers, _ = await post(gw, BODY)
            assert status == 200 and headers["x-gateway-attempts"] == "2"
            (row,) = await ledger_rows(gw)
            # the reservation: the body as aiohttp sends it, a quarter token a byte, and output
            estimate = -(-len(json.dumps(BODY)) // 4) + BODY["max_output_tokens"]
            real = row["input_tokens"] + row["output_tokens"]  # the backup's answer
            assert row["upstream"] == "backup" and real == 2 + 6
            assert (row["charged_tokens"], row["estimated"]) == (estimate + real, 1)
        finally:
            await gw.stop()
    finally:
        await runner.cleanup()


async def test_a_mixed_run_with_faults_charges_exactly_what_was_billed(
    upstream: Upstream, backup: Upstream, tmp_path: Path
) -> None:
    gw = await resilient(
        upstream, backup, tmp_path / "state", keys=f"[{GOOD}, {GOOD2}]", budget=1.0
    )
    try:
        billed = 0
        for i in range(30):
            fault = ("503", "429", "500", "502", None)[i % 5]  # answers: none billed
            if fault is not None:
                (upstream if i % 2 else backup).state.faults.queue(make_fault(fault), count=1)
            stream = i % 3 == 0
            body = {**BODY, "input": f"mixed {i}", "stream": stream}
            status, _, raw = await post(gw, body)
            assert status == 200, raw
            if stream:
                done = next(
                    line for line in raw.split(b"\n") if b'"type":"response.completed"' in line
                )
                usage = orjson.loads(done[len(b"data: ") :])["response"]["usage"]
            else:
                usage = orjson.loads(raw)["usage"]
            billed += usage["total_tokens"]
        rows = await ledger_rows(gw)
        assert len(rows) == 30 and not any(r["estimated"] for r in rows)
        assert sum(r["charged_tokens"] for r in rows) == billed
        assert sum(r["attempts"] for r in rows) > 30  # faults were retried
        team = (await admin(gw, "/admin/teams"))["teams"][0]["budgets"][0]
        assert team["used"] == billed and team["reserved"] == 0
    finally:
        await gw.stop()


async def test_timeouts_are_retried_only_while_the_budget_holds_another_estimate(
    backup: Upstream, tmp_path: Path
) -> None:
    """Each attempt that timed out after sending is charged an estimate, so a retry of one
    first holds another estimate; when the budget has no room, the client gets the timeout."""

    async def slow(request: web.Request) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(1.0)
        return web.json_response({})

    url, runner = await start_app(slow)
    estimate = -(-len(json.dumps(BODY)) // 4) + BODY["max_output_tokens"]
    try:
        primary = Upstream(url, backup.state, runner)
        limit = ("tokens: 1000000", f"tokens: {2 * estimate + 1}")
        gw = await resilient(
            primary, primary, tmp_path / "state", limit, first_byte=0.2, max_wait=0.01, budget=10
        )
        try:
            results = await asyncio.gather(post(gw, BODY), post(gw, BODY))
            assert [r[0] for r in results] == [504, 504]
            assert [r[1]["x-gateway-attempts"] for r in results] == ["1", "1"]
            team = (await admin(gw, "/admin/teams"))["teams"][0]["budgets"][0]
            assert team["used"] == 2 * estimate <= team["limit"] and team["reserved"] == 0
        finally:
            await gw.stop()
    finally:
        await runner.cleanup()


async def test_a_4xx_listed_in_on_is_retried(
    upstream: Upstream, backup: Upstream, tmp_path: Path
) -> None:
    gw = await resilient(
        upstream, backup, tmp_path / "s", ("budget: 1}", "budget: 1, on: [408]}"),
        keys=f"[{GOOD}, {GOOD2}]", attempts=2, budget=1,
    )  # fmt: skip
    try:
        upstream.state.faults.queue(make_fault(408), count=1)
        status, headers, _ = await post(gw, BODY)
        assert (status, headers["x-gateway-attempts"]) == (200, "2")
    finally:
        await gw.stop()


async def test_an_answer_from_further_down_the_route_is_not_cached_for_the_first(
    upstream: Upstream, backup: Upstream, tmp_path: Path
) -> None:
    cache = ("cache: {enabled: false}", "cache: {enabled: true}")
    gw = await resilient(upstream, backup, tmp_path / "s", cache, attempts=2)
    try:
        upstream.state.faults.queue(make_fault(503), count=1)
        status, headers, _ = await post(gw, BODY)
        assert (status, headers["x-gateway-upstream"]) == (200, "backup")
        status, headers, raw = await post(gw, BODY)  # primary is fine: its own answer
        assert headers["x-gateway-cache"] == "miss" and orjson.loads(raw)["model"] == BODY["model"]
        status, headers, _ = await post(gw, BODY)
        assert headers["x-gateway-cache"] == "hit"
    finally:
        await gw.stop()


async def test_other_posts_are_not_sent_twice(
    upstream: Upstream, backup: Upstream, tmp_path: Path
) -> None:
    """Retrying an error answer means sending the request again: only generations (which the
    retries are for) and reads are; a batch or a file upload is not."""
    gw = await resilient(upstream, backup, tmp_path / "state", keys=f"[{GOOD}, {GOOD2}]")
    try:
        upstream.state.faults.queue(make_fault(502), count=1)
        async with (
            aiohttp.ClientSession(headers=auth()) as s,
            s.post(f"{gw.url}/v1/batches", json={"input_file_id": "f"}) as r,
        ):
            assert r.status == 502 and r.headers["x-gateway-attempts"] == "1"
        assert len(upstream.state.requests) == 1
    finally:
        await gw.stop()
