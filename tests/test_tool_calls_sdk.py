"""Tool calls through the gateway, as the official SDKs make them: the openai SDK's streamed
Responses function calls and Chat tool-call deltas, and an OpenAI Agents SDK agent running a
function tool to the end, streamed and not."""

from __future__ import annotations

import math
from typing import Any

import openai
import orjson
import pytest
from agents import (
    Agent,
    OpenAIResponsesModel,
    OpenAIResponsesWSModel,
    RunItemStreamEvent,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from conftest import ALPHA_KEY, GatewayFactory, Running, Upstream, ledger_rows

MODEL = "nusantara-base"
ASK = "What is the weather in Jakarta? use get_weather"
PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER: Any = {"type": "function", "name": "get_weather", "parameters": PARAMETERS, "strict": True}
CHAT_WEATHER: Any = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": PARAMETERS, "strict": True},
}


def _client(base_url: str, key: str = ALPHA_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)


async def _responses_call(base_url: str, key: str) -> tuple[str, str, Any]:
    """A streamed Responses function call: (name, arguments, usage), checked on the way."""
    async with _client(base_url, key) as client:
        stream = await client.responses.create(model=MODEL, input=ASK, tools=[WEATHER], stream=True)
        deltas: list[str] = []
        done: Any = None
        final: Any = None
        async for event in stream:
            if event.type == "response.function_call_arguments.delta":
                deltas.append(event.delta)
            elif event.type == "response.function_call_arguments.done":
                done = event
            elif event.type == "response.completed":
                final = event.response
        assert done is not None and final is not None
        assert done.arguments == "".join(deltas)
        [item] = final.output
        assert item.type == "function_call" and item.arguments == done.arguments
        assert item.name == "get_weather" and item.call_id.startswith("call_")

        # The stream helper assembles the same call and parses its arguments (a strict tool).
        async with client.responses.stream(model=MODEL, input=ASK, tools=[WEATHER]) as helper:
            response = await helper.get_final_response()
        [same] = response.output
        assert same.type == "function_call" and same.arguments == item.arguments
        return item.name, item.arguments, final.usage.model_dump()


async def test_openai_sdk_streamed_function_call(gateway: Running, upstream: Upstream) -> None:
    via = await _responses_call(gateway.url, ALPHA_KEY)
    assert via == await _responses_call(upstream.url, "anything")
    name, arguments, usage = via
    assert orjson.loads(arguments).keys() == {"city"}
    assert usage["output_tokens"] == math.ceil(len(name + arguments) / 4)


async def test_openai_sdk_chat_tool_call_from_deltas(gateway: Running) -> None:
    async with _client(gateway.url) as client:
        messages: Any = [{"role": "user", "content": ASK}]
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=[CHAT_WEATHER],
            stream=True,
            stream_options={"include_usage": True},
        )
        calls: dict[int, dict[str, str]] = {}
        finish = usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                for delta in choice.delta.tool_calls or ():
                    call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                    call["id"] += delta.id or ""
                    if delta.function is not None:
                        call["name"] += delta.function.name or ""
                        call["arguments"] += delta.function.arguments or ""
        assert finish == "tool_calls" and list(calls) == [0]
        call = calls[0]
        assert call["id"].startswith("call_") and call["name"] == "get_weather"
        assert orjson.loads(call["arguments"]).keys() == {"city"}
        assert usage is not None
        assert usage.completion_tokens == math.ceil(len(call["name"] + call["arguments"]) / 4)

        # The SDK's own stream helper assembles the same call.
        async with client.chat.completions.stream(
            model=MODEL, messages=messages, tools=[CHAT_WEATHER]
        ) as helper:
            completion = await helper.get_final_completion()
        [assembled] = completion.choices[0].message.tool_calls or []
        assert assembled.function.arguments == call["arguments"]
        assert assembled.function.parsed_arguments == orjson.loads(call["arguments"])


# ---------------------------------------------------------------- the Agents SDK


def _agent(client: openai.AsyncOpenAI, cities: list[str], websocket: bool = False) -> Agent[Any]:
    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        cities.append(city)
        return f"Sunny and 31C in {city}"

    kind = OpenAIResponsesWSModel if websocket else OpenAIResponsesModel
    model = kind(model=MODEL, openai_client=client)
    return Agent(name="weather", instructions="Be brief.", tools=[get_weather], model=model)


def _check_upstream_saw_the_result(upstream: Upstream, city: str) -> None:
    """The agent's two requests: the question, then the question, the call and its output."""
    posts = [r for r in upstream.state.requests if (r.method, r.path) == ("POST", "/v1/responses")]
    assert len(posts) == 2
    first, second = (orjson.loads(r.body) for r in posts)
    assert first["tools"][0]["name"] == "get_weather"
    *_, call, output = second["input"]
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    assert orjson.loads(call["arguments"]) == {"city": city}
    assert output == {
        "type": "function_call_output",
        "call_id": call["call_id"],
        "output": f"Sunny and 31C in {city}",
    }


async def _check_ledger(gateway: Running, usages: list[Any], stream: bool) -> None:
    rows = await ledger_rows(gateway)
    assert [(r["team"], r["status"], r["stream"]) for r in rows] == [("alpha", 200, stream)] * 2
    seen = [(u.input_tokens, u.output_tokens) for u in usages]
    assert [(r["input_tokens"], r["output_tokens"]) for r in rows] == seen


async def test_agents_sdk_runs_a_function_tool(gateway: Running, upstream: Upstream) -> None:
    set_tracing_disabled(True)  # the SDK would otherwise export traces to OpenAI
    cities: list[str] = []
    async with _client(gateway.url) as client:
        result = await Runner.run(_agent(client, cities), ASK)

    [city] = cities  # the tool ran once, with the mock's arguments
    _check_upstream_saw_the_result(upstream, city)
    assert isinstance(result.final_output, str) and result.final_output
    call, answer = (r.usage for r in result.raw_responses)
    assert call.output_tokens == math.ceil(len("get_weather" + f'{{"city":"{city}"}}') / 4)
    assert answer.output_tokens == len(result.final_output.split(" "))
    await _check_ledger(gateway, [call, answer], stream=False)


async def test_agents_sdk_streamed_run(gateway: Running, upstream: Upstream) -> None:
    set_tracing_disabled(True)
    cities: list[str] = []
    async with _client(gateway.url) as client:
        result = Runner.run_streamed(_agent(client, cities), ASK)
        items = [
            event.name
            async for event in result.stream_events()
            if isinstance(event, RunItemStreamEvent)
        ]

    assert items == ["tool_called", "tool_output", "message_output_created"]
    [city] = cities
    _check_upstream_saw_the_result(upstream, city)
    assert isinstance(result.final_output, str) and result.final_output
    await _check_ledger(gateway, [r.usage for r in result.raw_responses], stream=True)


@pytest.mark.parametrize("extra", ["", "\n    websocket: native"], ids=["bridge", "native"])
async def test_agents_sdk_websocket_model(
    gateway_factory: GatewayFactory, upstream: Upstream, extra: str
) -> None:
    """The Agents SDK's WebSocket model: both turns of the run on one Responses WebSocket."""
    set_tracing_disabled(True)
    gateway = await gateway_factory(upstream_extra=extra)
    cities: list[str] = []
    async with _client(gateway.url) as client:
        agent = _agent(client, cities, websocket=True)
        result = await Runner.run(agent, ASK)
        await agent.model.close()  # type: ignore[union-attr]
    [city] = cities
    _check_upstream_saw_the_result(upstream, city)
    assert isinstance(result.final_output, str) and result.final_output
    rows = await ledger_rows(gateway)
    assert [(r["status"], r["transport"]) for r in rows] == [(200, "websocket")] * 2
    seen = [(r.usage.input_tokens, r.usage.output_tokens) for r in result.raw_responses]
    assert [(r["input_tokens"], r["output_tokens"]) for r in rows] == seen
