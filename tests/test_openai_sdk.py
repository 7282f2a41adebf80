"""The official openai SDK gets the same results through the gateway as from the upstream."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
from conftest import ALPHA_KEY, Running, Upstream

ARGS: dict[str, Any] = {
    "model": "nusantara-base",
    "input": "Write a haiku about gateways",
    "max_output_tokens": 20,
}


def sync_results(base_url: str, key: str) -> tuple[str, Any, list[str], str]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0) as client:
        resp = client.responses.create(**ARGS)
        events = []
        text = ""
        with client.responses.stream(**ARGS) as stream:
            for ev in stream:
                events.append(ev.type)
                if ev.type == "response.output_text.delta":
                    text += ev.delta
            final = stream.get_final_response()
        assert final.output_text == text
        return resp.output_text, resp.usage.model_dump() if resp.usage else None, events, text


async def async_results(base_url: str, key: str) -> tuple[str, Any, list[str], Any]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0) as client:
        resp = await client.responses.create(**ARGS)
        events: list[str] = []
        usage = None
        stream = await client.responses.create(**ARGS, stream=True)
        async for ev in stream:
            events.append(ev.type)
            if ev.type == "response.completed":
                usage = ev.response.usage.model_dump() if ev.response.usage else None
        chat = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=6
        )
        models = sorted([m.id async for m in client.models.list()])
        assert chat.usage is not None and chat.usage.completion_tokens == 6
        return resp.output_text, usage, events, (chat.choices[0].message.content, models)


async def test_sync_sdk_same_through_gateway(gateway: Running, upstream: Upstream) -> None:
    direct = await asyncio.to_thread(sync_results, upstream.url, "anything")
    via = await asyncio.to_thread(sync_results, gateway.url, ALPHA_KEY)
    assert via == direct
    assert via[1]["output_tokens"] == 20 and via[3]


async def test_async_sdk_same_through_gateway(gateway: Running, upstream: Upstream) -> None:
    direct = await async_results(upstream.url, "anything")
    via = await async_results(gateway.url, ALPHA_KEY)
    assert via == direct
    assert via[2][-1] == "response.completed" and via[1]["total_tokens"] > 20


async def test_sdk_errors_map_to_sdk_exceptions(gateway: Running) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key="wrong", max_retries=0
    ) as bad:
        try:
            await bad.responses.create(**ARGS)
        except openai.AuthenticationError as e:
            assert e.code == "invalid_api_key"
        else:
            raise AssertionError("expected AuthenticationError")
