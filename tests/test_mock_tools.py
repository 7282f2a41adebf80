"""The mock upstream's tool calls: when it calls one, its arguments and usage, both APIs' shapes."""

from __future__ import annotations

import math
import re
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from gateway.mock_upstream import MockOptions, create_mock_app

MODEL = "nusantara-base"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
ASK = "What is the weather in Jakarta? Use get_weather."


def _call_order(arguments: str) -> list[str]:
    """The events of a streamed function call: the arguments go 4 characters a delta."""
    return [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * math.ceil(len(arguments) / 4),
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]


Client = TestClient[web.Request, web.Application]


async def _client(aiohttp_client: AiohttpClient, **options: Any) -> Client:
    return await aiohttp_client(create_mock_app(MockOptions(**options)))


def _datas(raw: bytes) -> list[tuple[str | None, bytes]]:
    """(event name, data) per SSE event; LF or CRLF line endings."""
    events: list[tuple[str | None, bytes]] = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = block.split(b"\n")
        names = [line[7:].decode() for line in lines if line.startswith(b"event: ")]
        data = [line[6:] for line in lines if line.startswith(b"data: ")]
        if data:
            events.append((names[0] if names else None, b"\n".join(data)))
    return events


def _events(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for name, data in _datas(raw):
        if data != b"[DONE]":
            payload = orjson.loads(data)
            assert name == payload["type"]
            out.append(payload)
    return out


def _chunks(raw: bytes) -> list[dict[str, Any]]:
    datas = [data for _, data in _datas(raw)]
    assert datas[-1] == b"[DONE]"
    return [orjson.loads(d) for d in datas[:-1]]


async def _post(client: Client, path: str, body: dict[str, Any], **headers: str) -> Any:
    async with client.post(path, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        if body.get("stream"):
            assert resp.content_type == "text/event-stream"
            return await resp.read()
        return await resp.json()


def _hdr(**knobs: str | int) -> dict[str, str]:
    return {"x-mock-" + k.replace("_", "-"): str(v) for k, v in knobs.items()}


def _call_tokens(name: str, arguments: str) -> int:
    return max(1, math.ceil(len(name + arguments) / 4))


def _kinds(data: dict[str, Any]) -> list[str]:
    return [item["type"] for item in data["output"]]


# ---------------------------------------------------------------- Responses


async def test_json_function_call(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    body = {"model": MODEL, "input": ASK, "instructions": "Be brief.", "tools": [WEATHER]}
    data = await _post(client, "/v1/responses", body)

    assert data["status"] == "completed" and data["tools"] == [WEATHER]
    [item] = data["output"]
    assert item["type"] == "function_call" and item["status"] == "completed"
    assert re.fullmatch(r"fc_[0-9a-f]+", item["id"])
    assert re.fullmatch(r"call_[0-9a-f]+", item["call_id"])
    assert item["name"] == "get_weather"
    args = orjson.loads(item["arguments"])
    assert list(args) == ["city", "unit"] and args["unit"] == "celsius"
    assert re.fullmatch(r"[a-z]+", args["city"])
    assert item["arguments"] == orjson.dumps(args).decode()  # compact

    output = _call_tokens("get_weather", item["arguments"])
    inputs = math.ceil((len(ASK) + len("Be brief.")) / 4)
    assert data["usage"] == {
        "input_tokens": inputs,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": inputs + output,
    }

    again = await _post(client, "/v1/responses", body)
    assert again["output"][0]["arguments"] == item["arguments"]  # deterministic
    assert again["output"][0]["call_id"] != item["call_id"]

    knobs = _hdr(reasoning_tokens=5, cached_tokens=2, output_tokens=1)
    usage = (await _post(client, "/v1/responses", {**body, "max_output_tokens": 1}, **knobs))[
        "usage"
    ]
    assert usage["output_tokens"] == output + 5  # the call is never shortened
    assert usage["output_tokens_details"] == {"reasoning_tokens": 5}
    assert usage["input_tokens_details"] == {"cached_tokens": 2}


async def test_streamed_function_call(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    body = {"model": MODEL, "input": ASK, "tools": [WEATHER], "stream": True}
    raw = await _post(client, "/v1/responses", body)
    assert b"[DONE]" not in raw
    events = _events(raw)
    arguments = events[-1]["response"]["output"][0]["arguments"]

    assert [e["type"] for e in events] == _call_order(arguments)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["status"] == "in_progress"
    added = events[2]["item"]
    assert added["arguments"] == "" and added["status"] == "in_progress"
    assert added["name"] == "get_weather" and events[2]["output_index"] == 0
    deltas = [e for e in events if e["type"].endswith(".delta")]
    assert all(e["item_id"] == added["id"] and e["output_index"] == 0 for e in deltas)
    assert "".join(e["delta"] for e in deltas) == arguments
    done = events[-3]
    assert done["item_id"] == added["id"] and done["output_index"] == 0
    assert done["name"] == "get_weather" and done["arguments"] == arguments
    item = events[-2]["item"]
    assert item == {**added, "arguments": arguments, "status": "completed"}
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"] == [item]
    assert final["usage"]["output_tokens"] == _call_tokens("get_weather", arguments)
    usage = final["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]

    plain = await _post(client, "/v1/responses", {**body, "stream": False})
    assert plain["output"][0]["arguments"] == arguments and plain["usage"] == usage


async def test_stream_knobs_on_a_function_call(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    body = {"model": MODEL, "input": ASK, "tools": [WEATHER], "stream": True}
    plain = await _post(client, "/v1/responses", {**body, "stream": False})
    order = _call_order(plain["output"][0]["arguments"])

    raw = await _post(client, "/v1/responses", body, **_hdr(done=1, crlf=1))
    assert raw.endswith(b"data: [DONE]\r\n\r\n") and raw.count(b"\n") == raw.count(b"\r\n")
    assert [e["type"] for e in _events(raw)] == order

    events = _events(await _post(client, "/v1/responses", body, **_hdr(error_event="flat")))
    assert [e["type"] for e in events] == [*order[:5], "error"]  # after two deltas
    assert events[-1]["sequence_number"] == 5

    for status in ("incomplete", "failed"):
        events = _events(await _post(client, "/v1/responses", body, **_hdr(response_status=status)))
        assert events[-1]["type"] == "response." + status
        assert events[-1]["response"]["output"][0]["status"] == "incomplete"

    start = time.monotonic()
    await _post(client, "/v1/responses", body, **_hdr(ttft_ms=200))
    assert time.monotonic() - start >= 0.2
    start = time.monotonic()
    await _post(client, "/v1/responses", body, **_hdr(tokens_per_s=100))
    gaps = order.count("response.function_call_arguments.delta") - 1
    assert time.monotonic() - start >= gaps / 100  # 10 ms between deltas

    async with client.post("/v1/responses", json=body, headers=_hdr(cut_after=4)) as resp:
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in resp.content.iter_any():
                received += chunk
    assert [e["type"] for e in _events(received)] == order[:4]


async def test_tool_result_last_gets_text(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    first = await _post(client, "/v1/responses", {"model": MODEL, "input": ASK, "tools": [WEATHER]})
    call = first["output"][0]
    result = {"type": "function_call_output", "call_id": call["call_id"], "output": "Sunny, 31C"}
    items = [{"role": "user", "content": ASK}, call, result]
    for choice in ("auto", "required", {"type": "function", "name": "get_weather"}):
        body = {"model": MODEL, "input": items, "tools": [WEATHER], "tool_choice": choice}
        data = await _post(client, "/v1/responses", body)
        assert _kinds(data) == ["message"]
        assert data["usage"]["input_tokens"] == math.ceil((len(ASK) + len("Sunny, 31C")) / 4)
    other = {**result, "output": "Rain, 24C"}
    body = {"model": MODEL, "input": [*items[:2], other], "tools": [WEATHER]}
    changed = await _post(client, "/v1/responses", body)
    assert changed["output"][0]["content"] != data["output"][0]["content"]  # the result counts

    # A later user turn that names the tool again gets a call; one that does not, text.
    reply = data["output"][0]
    later = [*items, reply, {"role": "user", "content": "Thanks!"}]
    assert _kinds(await _post(client, "/v1/responses", {**body, "input": later})) == ["message"]
    again = [*later, {"role": "user", "content": "And tomorrow? get_weather again"}]
    kinds = _kinds(await _post(client, "/v1/responses", {**body, "input": again}))
    assert kinds == ["function_call"]


HI = {"role": "user", "content": "hi"}
TIME_PART = {"type": "input_text", "text": "get_time"}


def _part(kind: str, text: str) -> dict[str, str]:
    return {"type": kind, "text": text}


@pytest.mark.parametrize(
    ("request_input", "instructions", "called"),
    [
        ("use get_weather.", None, "get_weather"),
        ("get_weather", None, "get_weather"),
        ("(get_weather)", None, "get_weather"),
        ("use get_weather_now", None, None),  # not the whole word
        ("use my_get_weather", None, None),
        ("use Get_Weather", None, None),  # case-sensitive
        ("what time is it? get_time, then get_weather", None, "get_weather"),  # tools order
        ("the time: get_time", None, "get_time"),
        ("hello", "Always use get_weather.", None),  # instructions do not count
        ([{"role": "system", "content": "use get_weather"}, HI], None, None),
        ([{"role": "assistant", "content": [_part("output_text", "get_weather")]}, HI], None, None),
        ([{"type": "message", "role": "user", "content": [TIME_PART]}], None, "get_time"),
    ],
)
async def test_naming_rule(
    aiohttp_client: AiohttpClient, request_input: Any, instructions: str | None, called: str | None
) -> None:
    client = await _client(aiohttp_client)
    body = {"model": MODEL, "input": request_input, "tools": [WEATHER, TIME]}
    if instructions:
        body["instructions"] = instructions
    data = await _post(client, "/v1/responses", body)
    names = [item.get("name") for item in data["output"] if item["type"] == "function_call"]
    assert names == ([called] if called else [])


async def test_tool_shapes_and_choice(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    base = {"model": MODEL, "input": ASK}

    async def called(**body: Any) -> str | None:
        data = await _post(client, "/v1/responses", {**base, **body})
        return data["output"][0].get("name")

    assert await called() is None  # no tools
    assert await called(tools=[{"type": "web_search"}]) is None  # only function tools count
    assert await called(tools=[CHAT_WEATHER]) == "get_weather"  # the nested shape too
    assert await called(tools=[WEATHER], tool_choice="none") is None
    assert await called(tools=[WEATHER], tool_choice="auto") == "get_weather"
    assert await called(input="hello", tools=[TIME, WEATHER], tool_choice="required") == "get_time"
    forced = {"type": "function", "name": "get_time"}
    assert await called(tools=[WEATHER, TIME], tool_choice=forced) == "get_time"
    unknown = {"type": "function", "name": "nope"}
    assert await called(tools=[WEATHER, TIME], tool_choice=unknown) == "get_weather"


async def test_arguments_from_the_schema(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer"},
            "ratio": {"type": "number"},
            "alerts": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "nothing": {"type": "null"},
            "kind": {"const": "forecast"},
            "place": {"$ref": "#/$defs/Place"},
            "maybe": {"anyOf": [{"type": "null"}, {"type": "integer"}]},
            "either": {"type": ["null", "boolean"]},
            "optional": {"type": "string"},
        },
        "required": [
            *("unit", "city", "days", "ratio", "alerts", "tags"),
            *("nothing", "kind", "place", "maybe", "either"),
        ],
        "$defs": {"Place": {"properties": {"lat": {"type": "number"}, "name": {}}}},
    }
    tool = {"type": "function", "name": "forecast", "parameters": schema}
    bare = {"type": "function", "name": "ping"}
    body = {"model": MODEL, "input": "forecast", "tools": [tool]}
    item = (await _post(client, "/v1/responses", body))["output"][0]
    args = orjson.loads(item["arguments"])
    assert list(args) == schema["required"]
    city, name = args.pop("city"), args["place"].pop("name")
    assert re.fullmatch("[a-z]+", city) and re.fullmatch("[a-z]+", name)
    assert args == {
        "unit": "celsius",
        "days": 1,
        "ratio": 1.5,
        "alerts": True,
        "tags": [],
        "nothing": None,
        "kind": "forecast",
        "place": {"lat": 1.5},
        "maybe": 1,
        "either": True,
    }

    data = await _post(client, "/v1/responses", {**body, "input": "ping", "tools": [bare]})
    assert data["output"][0]["arguments"] == "{}"
    assert data["usage"]["output_tokens"] == _call_tokens("ping", "{}")

    # A schema that refers to itself ends in null after a few levels; nonsense types are words.
    tree = {"properties": {"child": {"$ref": "#"}, "odd": {"type": {}}}}
    body = {**body, "input": "tree", "tools": [{**bare, "name": "tree", "parameters": tree}]}
    args = orjson.loads((await _post(client, "/v1/responses", body))["output"][0]["arguments"])
    assert re.fullmatch("[a-z]+", args["odd"])
    depth = 0
    while args is not None:
        args, depth = args["child"], depth + 1
    assert 1 < depth < 10


# ---------------------------------------------------------------- Chat Completions


def _chat(content: str = ASK, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
    return {"model": MODEL, "messages": messages, "tools": [CHAT_WEATHER], **extra}


async def test_chat_json_tool_call(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    data = await _post(client, "/v1/chat/completions", _chat())
    [choice] = data["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] is None
    [call] = message["tool_calls"]
    assert re.fullmatch(r"call_[0-9a-f]+", call["id"]) and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    arguments = call["function"]["arguments"]
    assert orjson.loads(arguments)["unit"] == "celsius"
    inputs = math.ceil((len("Be brief.") + len(ASK)) / 4)
    output = _call_tokens("get_weather", arguments)
    usage = data["usage"]
    assert usage["prompt_tokens"] == inputs and usage["completion_tokens"] == output
    assert usage["total_tokens"] == inputs + output

    # The tool's answer last: text, which takes the result into account.
    result = {"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 31C"}
    body = _chat()
    body["messages"] += [{"role": "assistant", "content": None, "tool_calls": [call]}, result]
    text = await _post(client, "/v1/chat/completions", body)
    assert text["choices"][0]["finish_reason"] == "stop"
    assert isinstance(text["choices"][0]["message"]["content"], str)
    assert "tool_calls" not in text["choices"][0]["message"]
    assert text["usage"]["prompt_tokens"] == math.ceil((9 + len(ASK) + len("Sunny, 31C")) / 4)

    none = await _post(client, "/v1/chat/completions", _chat(tool_choice="none"))
    assert none["choices"][0]["finish_reason"] == "stop"
    forced = {"type": "function", "function": {"name": "get_weather"}}
    data = await _post(client, "/v1/chat/completions", _chat("hello", tool_choice=forced))
    assert data["choices"][0]["finish_reason"] == "tool_calls"
    system_only = await _post(client, "/v1/chat/completions", _chat("hello"))
    assert system_only["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("include_usage", [True, False])
async def test_chat_streamed_tool_call(aiohttp_client: AiohttpClient, include_usage: bool) -> None:
    client = await _client(aiohttp_client)
    body = _chat(stream=True)
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    chunks = _chunks(await _post(client, "/v1/chat/completions", body))
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    first = chunks[0]["choices"][0]["delta"]
    [call] = first["tool_calls"]
    assert first["role"] == "assistant" and first["content"] is None
    assert call["index"] == 0 and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": ""}
    assert re.fullmatch(r"call_[0-9a-f]+", call["id"])

    tail = 2 if include_usage else 1
    pieces = [c["choices"][0]["delta"]["tool_calls"] for c in chunks[1:-tail]]
    assert all(len(p) == 1 and p[0]["index"] == 0 for p in pieces)
    arguments = "".join(p[0]["function"]["arguments"] for p in pieces)
    assert len(pieces) == math.ceil(len(arguments) / 4)
    finish = chunks[-tail]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "tool_calls"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-tail])

    plain = await _post(client, "/v1/chat/completions", {**body, "stream": False})
    assert plain["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == arguments
    if include_usage:
        assert all(c["usage"] is None for c in chunks[:-1])
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
        assert plain["usage"]["completion_tokens"] == _call_tokens("get_weather", arguments)
    else:
        assert all("usage" not in c for c in chunks)

    raw = await _post(client, "/v1/chat/completions", body, **_hdr(error_event="nested"))
    datas = [orjson.loads(d) for _, d in _datas(raw)]
    assert len(datas) == 1 + 2 + 1 and datas[-1]["error"]["code"] == "server_error"
