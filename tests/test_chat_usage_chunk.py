"""A Chat Completions stream's usage chunk reaches only the clients that asked for it.

The gateway asks every Chat stream for its usage, to charge it exactly; a client that did not
ask must get the stream it would get from the provider, or the usual
`chunk.choices[0].delta.content` loop fails on the extra chunk.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import orjson
from aiohttp import web
from conftest import ALPHA_KEY, GatewayFactory, Upstream, auth, ledger_rows, start_app

CHAT: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Tell me about rivers"}],
    "max_tokens": 7,
}


def standard_loop(base_url: str, key: str) -> str:
    """The loop of the SDK's README, verbatim: every chunk's first choice."""
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0) as client:
        stream = client.chat.completions.create(**CHAT, stream=True)
        text = ""
        for chunk in stream:
            text += chunk.choices[0].delta.content or ""
        return text


def usage_loop(base_url: str, key: str, **extra: Any) -> tuple[str, list[Any]]:
    """A loop that reads the usage chunk where one comes."""
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0) as client:
        stream = client.chat.completions.create(**CHAT, stream=True, **extra)
        text, usages = "", []
        for chunk in stream:
            if chunk.usage is not None:
                usages.append(chunk.usage.model_dump())
                assert chunk.choices == []
                continue
            text += chunk.choices[0].delta.content or ""
        return text, usages


async def test_sdk_loop_without_stream_options_gets_no_usage_chunk(
    gateway_factory: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway_factory(alpha_budgets="[{tokens: 100000, per: day}]")
    direct = await asyncio.to_thread(standard_loop, upstream.url, "anything")
    via = await asyncio.to_thread(standard_loop, gw.url, ALPHA_KEY)
    assert via == direct and len(via.split()) == 7
    assert await asyncio.to_thread(usage_loop, gw.url, ALPHA_KEY) == (direct, [])
    # the gateway still asked for the usage, and charged it exactly
    sent = orjson.loads(upstream.state.requests[-1].body)
    assert sent["stream_options"] == {"include_usage": True}
    for row in await ledger_rows(gw):
        assert (row["output_tokens"], row["estimated"], row["status"]) == (7, 0, 200)
        assert row["input_tokens"] == direct_input_tokens()


def direct_input_tokens() -> int:
    return -(-len("Tell me about rivers") // 4)


async def test_sdk_loop_with_stream_options_gets_the_usage_chunk_unchanged(
    gateway_factory: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway_factory()
    asked = {"stream_options": {"include_usage": True}}
    direct = await asyncio.to_thread(usage_loop, upstream.url, "anything", **asked)
    via = await asyncio.to_thread(usage_loop, gw.url, ALPHA_KEY, **asked)
    assert via == direct
    assert via[1] == [
        {
            "completion_tokens": 7,
            "prompt_tokens": direct_input_tokens(),
            "total_tokens": 7 + direct_input_tokens(),
            "completion_tokens_details": via[1][0]["completion_tokens_details"],
            "prompt_tokens_details": via[1][0]["prompt_tokens_details"],
        }
    ]


async def test_include_usage_false_is_answered_like_no_stream_options(
    gateway_factory: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway_factory()
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": False}}
    async with (
        aiohttp.ClientSession(headers=auth()) as s,
        s.post(f"{gw.url}/v1/chat/completions", json=body) as r,
    ):
        raw = await r.read()
    assert r.status == 200 and b'"choices":[]' not in raw and raw.endswith(b"data: [DONE]\n\n")
    assert orjson.loads(upstream.state.requests[-1].body)["stream_options"] == {
        "include_usage": True
    }
    (row,) = await ledger_rows(gw)
    assert row["output_tokens"] == 7 and row["estimated"] == 0


HEAD = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}'
FINISH = b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}'


async def test_a_stream_cut_after_an_unfinished_usage_chunk(
    gateway_factory: GatewayFactory,
) -> None:
    """The client gets the content and the gateway's error event, never the usage chunk; the
    usage it carried is charged."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(HEAD + b"\n\n" + FINISH + b"\n\n")
        await resp.write(USAGE + b"\n")  # and the connection ends, the blank line never sent
        return resp

    url, runner = await start_app(handler)
    try:
        gw = await gateway_factory(url)
        body = {**CHAT, "stream": True}
        async with (
            aiohttp.ClientSession(headers=auth()) as s,
            s.post(f"{gw.url}/v1/chat/completions", json=body) as r,
        ):
            raw = await r.read()
        assert b'"choices":[]' not in raw and b'"usage":{' not in raw
        assert raw.startswith(HEAD + b"\n\n" + FINISH + b"\n\n")
        assert b"upstream_stream_interrupted" in raw
        (row,) = await ledger_rows(gw)
        assert (row["input_tokens"], row["output_tokens"], row["estimated"]) == (3, 1, 0)
    finally:
        await runner.cleanup()
