"""The mock upstream: response shapes, deterministic text and usage, SSE sequences, fault knobs."""

from __future__ import annotations

import asyncio
import math
import re
import signal
import subprocess
import sys
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from gateway.mock_upstream import MOCK_STATE, MockOptions, create_mock_app, start_mock

MODEL = "nusantara-base"
REQUEST_ID = re.compile(r"^req_[0-9a-f]{24}$")
RESPONSE_ID = re.compile(r"^resp_[0-9a-f]{48}$")

Client = TestClient[web.Request, web.Application]


async def _client(aiohttp_client: AiohttpClient, **options: Any) -> Client:
    return await aiohttp_client(create_mock_app(MockOptions(**options)))


def _events(raw: bytes) -> list[tuple[str | None, bytes]]:
    """(event name, data) per SSE event; comments skipped; LF or CRLF line endings."""
    events: list[tuple[str | None, bytes]] = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        name: str | None = None
        data: list[bytes] = []
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data.append(line[6:])
        if data:
            events.append((name, b"\n".join(data)))
    return events


def _json_events(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for name, data in _events(raw):
        payload = orjson.loads(data)
        assert name == payload["type"]
        out.append(payload)
    return out


async def _post_json(client: Client, path: str, body: dict[str, Any], **headers: str) -> Any:
    async with client.post(path, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert REQUEST_ID.match(resp.headers["x-request-id"])
        return await resp.json()


async def _post_raw(client: Client, path: str, body: dict[str, Any], **headers: str) -> bytes:
    async with client.post(path, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/event-stream"
        return await resp.read()


def _hdr(**knobs: str | int) -> dict[str, str]:
    return {"x-mock-" + k.replace("_", "-"): str(v) for k, v in knobs.items()}


# ---------------------------------------------------------------- Responses JSON


async def test_json_response_shape_and_usage(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    body = {"model": MODEL, "input": "Tell me about Java.", "instructions": "Be brief."}
    data = await _post_json(client, "/v1/responses", body)

    assert RESPONSE_ID.match(data["id"])
    assert data["object"] == "response"
    assert data["status"] == "completed"
    assert data["error"] is None and data["incomplete_details"] is None
    assert data["model"] == MODEL and data["instructions"] == "Be brief."
    assert data["completed_at"] >= data["created_at"]
    for key in ("parallel_tool_calls", "tools", "tool_choice", "top_p", "temperature", "text"):
        assert key in data
    [message] = data["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["id"].startswith("msg_")
    [part] = message["content"]
    assert part["type"] == "output_text"
    text = part["text"]
    assert len(text.split(" ")) == 16 and not text.startswith(" ")

    chars = len("Tell me about Java.") + len("Be brief.")
    assert data["usage"] == {
        "input_tokens": math.ceil(chars / 4),
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 16,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": math.ceil(chars / 4) + 16,
    }


async def test_output_token_count_and_usage_headers(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client, default_output_tokens=7)
    base = {"model": MODEL, "input": "x" * 40}

    data = await _post_json(client, "/v1/responses", base)
    assert len(data["output"][0]["content"][0]["text"].split()) == 7

    data = await _post_json(client, "/v1/responses", {**base, "max_output_tokens": 20})
    assert len(data["output"][0]["content"][0]["text"].split()) == 20
    assert data["usage"]["output_tokens"] == 20 and data["max_output_tokens"] == 20

    headers = _hdr(output_tokens=3, cached_tokens=4, reasoning_tokens=5)
    data = await _post_json(client, "/v1/responses", {**base, "max_output_tokens": 20}, **headers)
    assert len(data["output"][0]["content"][0]["text"].split()) == 3
    assert data["usage"] == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 4},
        "output_tokens": 8,
        "output_tokens_details": {"reasoning_tokens": 5},
        "total_tokens": 18,
    }

    data = await _post_json(client, "/v1/responses", base, **_hdr(cached_tokens=999))
    assert data["usage"]["input_tokens_details"]["cached_tokens"] == 10  # clamped to input


async def test_input_items_count_toward_input_tokens(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    items = [
        {"role": "user", "content": "abcd"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "efgh"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "ij"}]},
    ]
    data = await _post_json(client, "/v1/responses", {"model": MODEL, "input": items})
    assert data["usage"]["input_tokens"] == math.ceil(10 / 4)

    data = await _post_json(client, "/v1/responses", {"model": MODEL, "input": ""})
    assert data["usage"]["input_tokens"] == 1  # never 0

    count = await _post_json(client, "/v1/responses/input_tokens", {"model": MODEL, "input": items})
    assert count == {"object": "response.input_tokens", "input_tokens": 3}


async def test_same_request_same_text_new_ids(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    body = {"model": MODEL, "input": "What is the capital of Indonesia?"}
    first = await _post_json(client, "/v1/responses", body)
    second = await _post_json(client, "/v1/responses", body)
    other = await _post_json(client, "/v1/responses", {**body, "input": "Something else"})

    assert first["output"][0]["content"] == second["output"][0]["content"]
    assert first["usage"] == second["usage"]
    assert first["id"] != second["id"]
    assert first["output"][0]["id"] != second["output"][0]["id"]
    assert first["output"][0]["content"] != other["output"][0]["content"]

    # A new app instance (a restarted mock) answers the same way.
    client2 = await _client(aiohttp_client)
    third = await _post_json(client2, "/v1/responses", body)
    assert third["output"][0]["content"] == first["output"][0]["content"]


async def test_invalid_json_and_unknown_model(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    async with client.post("/v1/responses", data=b"{not json") as resp:
        assert resp.status == 400
        assert REQUEST_ID.match(resp.headers["x-request-id"])
        assert await resp.json() == {
            "error": {
                "message": "We could not parse the JSON body of your request.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_json",
            }
        }
    async with client.post("/v1/responses", json={"model": "nope", "input": "hi"}) as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
        assert error["code"] == "model_not_found" and error["param"] is None
    async with client.post("/v1/chat/completions", json={"model": "nope"}) as resp:
        assert resp.status == 404


async def test_status_overrides_json(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    body = {"model": MODEL, "input": "hi"}
    data = await _post_json(client, "/v1/responses", body, **_hdr(response_status="incomplete"))
    assert data["status"] == "incomplete"
    assert data["incomplete_details"] == {"reason": "max_output_tokens"}
    assert data["usage"]["output_tokens"] == 16

    data = await _post_json(client, "/v1/responses", body, **_hdr(response_status="failed"))
    assert data["status"] == "failed"
    assert data["error"]["code"] == "server_error" and data["error"]["message"]


async def test_background_is_queued_without_usage(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    data = await _post_json(
        client, "/v1/responses", {"model": MODEL, "input": "hi", "background": True}
    )
    assert data["status"] == "queued" and data["background"] is True
    assert data["usage"] is None and data["output"] == []


# ---------------------------------------------------------------- Responses streaming

STREAM_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 5,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


async def test_stream_sequence_text_and_usage(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    body = {"model": MODEL, "input": "Stream me a story", "max_output_tokens": 5}
    raw = await _post_raw(client, "/v1/responses", {**body, "stream": True})
    assert b"[DONE]" not in raw and b"\r\n" not in raw
    events = _json_events(raw)

    assert [e["type"] for e in events] == STREAM_ORDER
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    created, final = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress" and created["usage"] is None
    assert created["id"] == final["id"]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    text = "".join(deltas)
    assert not deltas[0].startswith(" ") and all(d.startswith(" ") for d in deltas[1:])
    assert events[-4]["type"] == "response.output_text.done" and events[-4]["text"] == text
    assert final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == text
    assert final["usage"]["output_tokens"] == 5

    plain = await _post_json(client, "/v1/responses", body)
    assert plain["output"][0]["content"][0]["text"] == text
    assert plain["usage"] == final["usage"]


@pytest.mark.parametrize("status", ["incomplete", "failed"])
async def test_stream_status_overrides(aiohttp_client: AiohttpClient, status: str) -> None:
    client = await _client(aiohttp_client)
    body = {"model": MODEL, "input": "hi", "stream": True}
    events = _json_events(
        await _post_raw(client, "/v1/responses", body, **_hdr(response_status=status))
    )
    last = events[-1]
    assert last["type"] == f"response.{status}"
    assert last["response"]["status"] == status
    assert last["response"]["usage"]["output_tokens"] == 16


async def test_stream_done_crlf_and_comments(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    body = {"model": MODEL, "input": "hi", "stream": True, "max_output_tokens": 11}

    raw = await _post_raw(client, "/v1/responses", body, **_hdr(done=1))
    assert raw.endswith(b"}\n\ndata: [DONE]\n\n")

    raw = await _post_raw(client, "/v1/responses", body, **_hdr(crlf=1))
    assert b"\r\n" in raw and raw.count(b"\n") == raw.count(b"\r\n")
    assert [e["type"] for e in _json_events(raw)][-1] == "response.completed"

    raw = await _post_raw(client, "/v1/responses", body, **_hdr(comments=1))
    assert raw.startswith(b": keep-alive\n\n")
    assert raw.count(b": keep-alive\n\n") == 3  # before the first event, after deltas 5 and 10
    assert len(_json_events(raw)) == 4 + 11 + 4


@pytest.mark.parametrize("shape", ["flat", "nested"])
async def test_stream_error_event(aiohttp_client: AiohttpClient, shape: str) -> None:
    client = await _client(aiohttp_client)
    body = {"model": MODEL, "input": "hi", "stream": True}
    events = _json_events(await _post_raw(client, "/v1/responses", body, **_hdr(error_event=shape)))
    types = [e["type"] for e in events]
    delta = "response.output_text.delta"
    assert types == [*STREAM_ORDER[:4], delta, delta, "error"]  # the error follows 2 deltas
    error = events[-1]
    assert error["sequence_number"] == 6
    assert "usage" not in error
    if shape == "flat":
        assert error == {
            "type": "error",
            "code": "server_error",
            "message": "boom",
            "param": None,
            "sequence_number": 6,
        }
    else:
        assert error == {
            "type": "error",
            "error": {
                "type": "server_error",
                "code": "server_error",
                "message": "boom",
                "param": None,
            },
            "sequence_number": 6,
        }


async def test_stream_cut_after_breaks_the_body(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    body = {"model": MODEL, "input": "hi", "stream": True}
    async with client.post("/v1/responses", json=body, headers=_hdr(cut_after=5)) as resp:
        assert resp.status == 200
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in resp.content.iter_any():
                received += chunk
    events = _json_events(received)
    assert [e["type"] for e in events] == [*STREAM_ORDER[:5]]

    # The mock itself keeps serving after cutting a connection.
    data = await _post_json(client, "/v1/responses", {"model": MODEL, "input": "hi"})
    assert data["status"] == "completed"


async def test_stream_timing_knobs(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    body = {"model": MODEL, "input": "hi", "stream": True, "max_output_tokens": 6}

    start = time.monotonic()
    await _post_raw(client, "/v1/responses", body, **_hdr(ttft_ms=200))
    assert time.monotonic() - start >= 0.2

    start = time.monotonic()
    await _post_raw(client, "/v1/responses", body, **_hdr(tokens_per_s=50))
    assert time.monotonic() - start >= 5 / 50  # 6 deltas, 5 gaps of 20 ms

    start = time.monotonic()
    raw = await _post_raw(client, "/v1/responses", body, **_hdr(hold_open_ms=200))
    assert time.monotonic() - start >= 0.2
    assert _json_events(raw)[-1]["type"] == "response.completed"


async def test_ttft_option_delays_json_and_first_delta(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client, ttft_ms=150)
    start = time.monotonic()
    await _post_json(client, "/v1/responses", {"model": MODEL, "input": "hi"})
    assert time.monotonic() - start >= 0.15

    body = {"model": MODEL, "input": "hi", "stream": True}
    async with client.post("/v1/responses", json=body) as resp:
        start = time.monotonic()
        seen: list[str] = []
        async for line in resp.content:
            if line.startswith(b"event: "):
                seen.append(line[7:].strip().decode())
                if seen[-1] == "response.output_text.delta":
                    break
        assert time.monotonic() - start >= 0.1  # headers came first, the first delta later
        assert seen[:4] == STREAM_ORDER[:4]


async def test_retrieve_stream(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    async with client.get("/v1/responses/resp_abc?stream=true") as resp:
        events = _json_events(await resp.read())
    assert [e["type"] for e in events][-1] == "response.completed"
    assert events[-1]["response"]["id"] == "resp_abc"


# ---------------------------------------------------------------- other Responses routes


async def test_response_subresources(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    async with client.get("/v1/responses/resp_123") as resp:
        data = await resp.json()
    assert data["id"] == "resp_123" and data["status"] == "completed"
    assert data["usage"]["input_tokens"] == 2 and data["usage"]["output_tokens"] == 16

    async with client.delete("/v1/responses/resp_123") as resp:
        assert await resp.json() == {"id": "resp_123", "object": "response", "deleted": True}

    async with client.post("/v1/responses/resp_123/cancel") as resp:
        data = await resp.json()
    assert data["id"] == "resp_123" and data["status"] == "cancelled"

    async with client.get("/v1/responses/resp_123/input_items") as resp:
        data = await resp.json()
    [item] = data["data"]
    assert item["content"] == [{"type": "input_text", "text": "hello"}]
    assert data["first_id"] == data["last_id"] == item["id"] and data["has_more"] is False

    for method, path in [
        ("GET", "/v1/responses/abc"),
        ("DELETE", "/v1/responses/abc"),
        ("POST", "/v1/responses/abc/cancel"),
        ("GET", "/v1/responses/abc/input_items"),
    ]:
        async with client.request(method, path) as resp:
            assert resp.status == 404, (method, path)
            assert REQUEST_ID.match(resp.headers["x-request-id"])
            assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_models(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client, models=("a-model", "org/b-model"))
    async with client.get("/v1/models") as resp:
        data = await resp.json()
    assert data == {
        "object": "list",
        "data": [
            {"id": "a-model", "object": "model", "created": 1700000000, "owned_by": "mock"},
            {"id": "org/b-model", "object": "model", "created": 1700000000, "owned_by": "mock"},
        ],
    }
    async with client.get("/v1/models/org/b-model") as resp:
        assert (await resp.json())["id"] == "org/b-model"
    async with client.get("/v1/models/gpt-4o") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "model_not_found"


async def test_catch_all_echo(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    async with client.put("/v1/files/abc?purpose=x", data=b"123") as resp:
        assert resp.status == 200
        assert REQUEST_ID.match(resp.headers["x-request-id"])
        data = await resp.json()
    assert data["object"] == "mock.echo"
    assert data["method"] == "PUT" and data["path"] == "/v1/files/abc"


# ---------------------------------------------------------------- Chat Completions


async def test_chat_json(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    messages = [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": [{"type": "text", "text": "Hello!"}]},
    ]
    body = {"model": MODEL, "messages": messages, "max_tokens": 4}
    data = await _post_json(client, "/v1/chat/completions", body, **_hdr(reasoning_tokens=2))
    assert data["object"] == "chat.completion" and data["model"] == MODEL
    [choice] = data["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split(" ")) == 4
    prompt = math.ceil(len("Be nice.Hello!") / 4)
    assert data["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 6,
        "total_tokens": prompt + 6,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 2,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    # max_completion_tokens wins over max_tokens.
    body = {**body, "max_completion_tokens": 2}
    data = await _post_json(client, "/v1/chat/completions", body)
    assert data["usage"]["completion_tokens"] == 2


def _chat_chunks(raw: bytes) -> tuple[list[dict[str, Any]], list[bytes]]:
    events = _events(raw)
    assert all(name is None for name, _ in events)
    datas = [data for _, data in events]
    return [orjson.loads(d) for d in datas if d != b"[DONE]"], datas


async def test_chat_stream_with_usage(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    raw = await _post_raw(client, "/v1/chat/completions", body)
    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    chunks, datas = _chat_chunks(raw)
    assert datas[-1] == b"[DONE]" and len(chunks) == 1 + 3 + 1 + 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 3
    assert usage_chunk["usage"]["prompt_tokens"] == 2

    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks[1:4])
    plain = await _post_json(client, "/v1/chat/completions", {**body, "stream": False})
    assert plain["choices"][0]["message"]["content"] == text
    assert plain["usage"] == usage_chunk["usage"]


async def test_chat_stream_without_usage(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    chunks, datas = _chat_chunks(await _post_raw(client, "/v1/chat/completions", body))
    assert datas[-1] == b"[DONE]"
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(chunks) == 1 + 16 + 1


async def test_chat_stream_cut_and_crlf(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with client.post("/v1/chat/completions", json=body, headers=_hdr(cut_after=2)) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()

    raw = await _post_raw(client, "/v1/chat/completions", body, **_hdr(crlf=1))
    assert raw.endswith(b"data: [DONE]\r\n\r\n") and raw.count(b"\n") == raw.count(b"\r\n")


# ---------------------------------------------------------------- faults and recording


@pytest.mark.parametrize(
    ("status", "etype"),
    [(500, "server_error"), (503, "server_error"), (400, "invalid_request_error")],
)
async def test_status_fault(aiohttp_client: AiohttpClient, status: int, etype: str) -> None:
    client = await _client(aiohttp_client)
    body = {"model": MODEL, "input": "hi", "stream": True}
    async with client.post("/v1/responses", json=body, headers=_hdr(status=status)) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        assert "retry-after" not in resp.headers
        error = (await resp.json())["error"]
    assert error["type"] == etype and error["code"] == "mock_error" and error["param"] is None


async def test_status_fault_429_has_retry_after(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    async with client.get("/v1/models", headers=_hdr(status=429)) as resp:
        assert resp.status == 429
        assert resp.headers["retry-after"] == "1"
        assert REQUEST_ID.match(resp.headers["x-request-id"])
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_echo_key_fault(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    body = {"model": MODEL, "input": "hi"}
    headers = {"authorization": "Bearer sk-upstream-secret", **_hdr(echo_key=1)}
    async with client.post("/v1/responses", json=body, headers=headers) as resp:
        assert resp.status == 401
        error = (await resp.json())["error"]
    assert error["message"] == "Incorrect API key provided: sk-upstream-secret"
    assert error["code"] == "invalid_api_key"

    headers = {"x-api-key": "nk-other-secret", **_hdr(echo_key=1)}
    async with client.post("/v1/responses", json=body, headers=headers) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["message"].endswith(": nk-other-secret")


async def test_first_byte_delay(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    start = time.monotonic()
    async with client.get("/v1/models", headers=_hdr(first_byte_delay_ms=200)) as resp:
        assert time.monotonic() - start >= 0.2  # the status line itself was late
        assert resp.status == 200
        await resp.read()

    async def headers_only() -> None:
        async with client.get("/v1/models", headers=_hdr(first_byte_delay_ms=1000)):
            pass

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(headers_only(), 0.2)


async def test_records_every_request(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    state = client.app[MOCK_STATE]
    headers = {"Authorization": "Bearer sk-up", "X-Custom": "Yes"}
    await _post_json(client, "/v1/responses?trace=1", {"model": MODEL, "input": "hi"}, **headers)
    async with client.get("/v1/models", headers=_hdr(status=500)) as resp:
        assert resp.status == 500
    async with client.get("/v1/models") as resp:
        assert resp.status == 200

    assert [(r.method, r.path) for r in state.requests] == [
        ("POST", "/v1/responses?trace=1"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models"),
    ]
    first = state.requests[0]
    assert first.headers["authorization"] == "Bearer sk-up"
    assert first.headers["x-custom"] == "Yes"
    assert all(name == name.lower() for name in first.headers)
    assert orjson.loads(first.body) == {"model": MODEL, "input": "hi"}
    assert state.requests[1].headers["x-mock-status"] == "500"
    assert state.calls == {"POST /v1/responses": 1, "GET /v1/models": 2}


async def test_recording_is_bounded(
    aiohttp_client: AiohttpClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.mock_upstream.state._MAX_RECORDED", 3)
    client = await _client(aiohttp_client)
    for i in range(5):
        async with client.get(f"/v1/models?i={i}") as resp:
            assert resp.status == 200
    state = client.app[MOCK_STATE]
    assert [r.path for r in state.requests] == [f"/v1/models?i={i}" for i in (2, 3, 4)]
    assert state.calls["GET /v1/models"] == 5


# ---------------------------------------------------------------- real sockets


async def test_start_mock_on_a_real_socket() -> None:
    runner, port = await start_mock(port=0, options=MockOptions(models=("m1",)))
    try:
        assert port > 0
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/v1/models") as resp,
        ):
            assert resp.status == 200
            assert [m["id"] for m in (await resp.json())["data"]] == ["m1"]
    finally:
        await runner.cleanup()


def test_run_mock_serves_until_sigterm() -> None:
    code = (
        "from gateway.mock_upstream import MockOptions, run_mock; "
        "run_mock('127.0.0.1', 0, MockOptions())"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"mock upstream listening on (http://127\.0\.0\.1:\d+/v1)\n", line)
        assert match, line

        async def fetch() -> Any:
            async with (
                aiohttp.ClientSession() as session,
                session.get(match.group(1) + "/models") as resp,
            ):
                return await resp.json()

        assert [m["id"] for m in asyncio.run(fetch())["data"]] == list(MockOptions().models)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


async def test_openai_sdk_reads_the_mock() -> None:
    openai = pytest.importorskip("openai")
    runner, port = await start_mock()
    sdk = openai.AsyncOpenAI(api_key="sk-x", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
    try:
        plain = await sdk.responses.create(model=MODEL, input="hello", max_output_tokens=5)
        assert len(plain.output_text.split()) == 5 and plain.usage.total_tokens == 7
        assert REQUEST_ID.match(plain._request_id)
        stream = await sdk.responses.create(
            model=MODEL, input="hello", max_output_tokens=5, stream=True
        )
        events = [event async for event in stream]
        assert events[-1].type == "response.completed"
        assert events[-1].response.output_text == plain.output_text
        chunks = await sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = [chunk.usage async for chunk in chunks][-1]
        assert usage is not None and usage.completion_tokens == 16
    finally:
        await sdk.close()
        await runner.cleanup()
