"""Routes: model globs to an ordered list of upstreams, and `model_map` renaming a model for an
upstream that knows it by another name (the body sent is rewritten, the client's is not)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import (
    ALPHA_KEY,
    ENV,
    Running,
    Upstream,
    auth,
    free_port,
    ledger_rows,
    start_gateway,
    start_upstream,
)
from prometheus_client import generate_latest

from gateway.config import ConfigError, loads
from gateway.jsonbody import with_model
from gateway.routing import Router

CONFIG = """
admin: {{host: 127.0.0.1, port: 0, key: ${{ADMIN_KEY}}}}
upstreams:
  primary: {{base_url: "{primary}", api_key: k1}}
  backup:
    base_url: "{backup}"
    api_key: k2
    model_map: {{nusantara-base: garda-beta-mini}}
  other: {{base_url: "{backup}", api_key: k3, models: ["gpt-*"]}}
routes:
  - models: ["nusantara-*"]
    upstreams: [primary, backup]
{retries}
teams:
  alpha: {{keys: ["${{ALPHA_KEY}}"]}}
prices: {{"*": {{input: 1.0, output: 2.0}}}}
state: {{path: {state}}}
"""
BODY: dict[str, Any] = {"model": "nusantara-base", "input": "route me", "max_output_tokens": 6}


@pytest.fixture
async def backup() -> AsyncIterator[Upstream]:
    up = await start_upstream()
    yield up
    await up.runner.cleanup()


async def routed(primary: str, backup: Upstream, state: Path, retries: str = "") -> Running:
    text = CONFIG.format(primary=primary, backup=backup.url, state=state, retries=retries)
    return await start_gateway(loads(text, ENV))


async def test_a_dead_first_upstream_falls_back_with_the_model_renamed(
    backup: Upstream, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: refused before any byte
    gw = await routed(dead, backup, tmp_path / "state", "retries: {attempts: 2}")
    try:
        async with aiohttp.ClientSession(headers=auth()) as s:
            async with s.post(f"{gw.url}/v1/responses", json=BODY) as r:
                assert r.status == 200
                answer = await r.json()
            async with s.post(f"{gw.url}/v1/responses", json={**BODY, "stream": True}) as r:
                assert r.status == 200
                streamed = await r.read()
        assert answer["status"] == "completed" and answer["model"] == "garda-beta-mini"
        assert b"event: response.completed" in streamed
        sent = [orjson.loads(q.body) for q in backup.state.requests]
        assert [b["model"] for b in sent] == ["garda-beta-mini", "garda-beta-mini"]
        assert sent[0] == {**BODY, "model": "garda-beta-mini"}  # nothing else changed
        assert [q.headers["authorization"] for q in backup.state.requests] == ["Bearer k2"] * 2
        rows = await ledger_rows(gw)
        # the client's model is what is recorded and priced; the answering upstream is named
        assert [(r["model"], r["upstream"], r["status"]) for r in rows] == [
            ("nusantara-base", "backup", 200)
        ] * 2
        assert rows[0]["output_tokens"] == 6 and rows[0]["cost_usd"] > 0
        # the attempt that found nobody listening is labelled with its own 502, not the 200
        # the backup gave the client
        text = generate_latest(gw.gw.metrics.registry).decode()
        assert 'status="502",upstream="primary"} 2.0' in text
        assert 'status="200",upstream="primary"' not in text
    finally:
        await gw.stop()


async def test_the_first_upstream_of_a_route_serves_when_it_is_up(
    backup: Upstream, upstream: Upstream, tmp_path: Path
) -> None:
    gw = await routed(upstream.url, backup, tmp_path / "state")
    try:
        async with aiohttp.ClientSession(headers=auth()) as s:
            async with s.post(f"{gw.url}/v1/responses", json=BODY) as r:
                assert r.status == 200 and (await r.json())["model"] == "nusantara-base"
            # a model no route names takes the first upstream whose models match
            gpt = {**BODY, "model": "gpt-4o-mini"}
            async with s.post(f"{gw.url}/v1/responses", json=gpt) as r:
                assert r.status == 200
        assert orjson.loads(upstream.state.requests[0].body)["model"] == "nusantara-base"
        assert len(upstream.state.requests) == 2  # primary's models are "*": it comes first
        assert backup.state.requests == []
    finally:
        await gw.stop()


async def test_an_upstream_error_answer_is_not_a_fallback(
    backup: Upstream, upstream: Upstream, tmp_path: Path
) -> None:
    """Without `retries` a request makes one attempt: the first upstream's answer is it."""
    gw = await routed(upstream.url, backup, tmp_path / "state")
    try:
        async with (
            aiohttp.ClientSession(headers={**auth(ALPHA_KEY), "x-mock-status": "503"}) as s,
            s.post(f"{gw.url}/v1/responses", json=BODY) as r,
        ):
            assert r.status == 503
        assert backup.state.requests == []
    finally:
        await gw.stop()


def test_router_takes_the_first_matching_route_then_the_upstreams() -> None:
    router = Router(
        [("a", ["*"]), ("b", ["gpt-*"])],
        [(["nusantara-*"], ["b", "a"]), (["nusantara-pro"], ["a"]), (["x-?"], ["b"])],
    )
    assert router.route("nusantara-pro") == ("b", "a")  # the first route that matches
    assert router.route("x-1") == ("b",)
    assert router.route("x-12") == ("a",)  # no route: the first upstream whose models match
    assert Router([("b", ["gpt-*"])]).route("claude") == ()


def test_with_model_renames_whatever_the_case_of_the_key() -> None:
    assert orjson.loads(with_model(b'{"Model":"a","input":"x"}', "b")) == {
        "Model": "b",
        "input": "x",
    }
    assert with_model(b"not json", "b") == b"not json"
    assert with_model(b"[1]", "b") == b"[1]"


DIGEST = "sha256:" + "0" * 64


@pytest.mark.parametrize(
    ("routes", "problem"),
    [
        (
            "[{models: ['*'], upstreams: [a, b, a]}]",
            [
                "routes[0].upstreams[1]: no upstream named 'b' (upstreams: a)",
                "routes[0].upstreams[2]: 'a' is listed twice",
            ],
        ),
        (
            "[{models: [], upstreams: [a]}]",
            ["routes[0].models: must be a non-empty list of glob patterns (got [])"],
        ),
        (
            "[{models: ['*']}]",
            ["routes[0].upstreams: is required: a non-empty list of upstream names"],
        ),
        ("{a: 1}", ["routes: must be a list (got a mapping)"]),
    ],
)
def test_routes_are_checked(routes: str, problem: list[str]) -> None:
    text = f'upstreams: {{a: {{base_url: "http://a"}}}}\nroutes: {routes}\n'
    text += f'teams: {{t: {{keys: ["{DIGEST}"]}}}}\n'
    with pytest.raises(ConfigError) as e:
        loads(text, {})
    assert e.value.problems == problem


def test_model_map_is_checked() -> None:
    text = 'upstreams: {a: {base_url: "http://a", model_map: {m: ""}}}\n'
    text += f'teams: {{t: {{keys: ["{DIGEST}"]}}}}\n'
    with pytest.raises(ConfigError) as e:
        loads(text, {})
    assert e.value.problems == [
        "upstreams.a.model_map: 'm' must map to a non-empty model name (a string)"
    ]
