"""The mock upstream's stateful faults: next-N errors, resets and cuts, 429 retry-after,
refused and required keys, the fail ratio, per-key observation and the CLI flags."""

from __future__ import annotations

import asyncio
import errno
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import free_port, wait_listening
from pytest_aiohttp import AiohttpClient

from gateway import cli
from gateway.mock_upstream import (
    MOCK_STATE,
    Fault,
    Faults,
    MockOptions,
    create_mock_app,
    start_mock,
)

MODEL = "nusantara-base"
BODY: dict[str, Any] = {"model": MODEL, "input": "hi"}
BAD_KEY = "sk-refused-0123456789abcdef"

Client = TestClient[web.Request, web.Application]


async def _client(aiohttp_client: AiohttpClient, **options: Any) -> Client:
    return await aiohttp_client(create_mock_app(MockOptions(**options)))


async def _status(
    client: Client,
    headers: Mapping[str, str] | None = None,
    *,
    path: str = "/v1/responses",
    body: dict[str, Any] | None = None,
) -> int:
    async with client.post(path, json=body or BODY, headers=headers) as resp:
        await resp.read()
        return resp.status


async def _statuses(client: Client, n: int, headers: Mapping[str, str] | None = None) -> list[int]:
    return [await _status(client, headers) for _ in range(n)]


async def _control(client: Client, method: str, path: str, body: Any = None) -> Any:
    async with client.request(method, path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------- /mock/faults


async def test_next_n_fail_then_the_mock_is_healthy(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    view = await _control(client, "POST", "/mock/faults", {"status": 503, "count": 2})
    assert view["faults"] == [{"status": 503, "count": 2, "path": "/v1/", "key": None}]

    async with client.post("/v1/responses", json=BODY) as resp:
        assert resp.status == 503
        assert resp.headers["x-request-id"].startswith("req_")
        assert "retry-after" not in resp.headers
        err = (await resp.json())["error"]
    assert err == {
        "message": "Mock fault 503.",
        "type": "server_error",
        "param": None,
        "code": "mock_fault",
    }
    assert (await _control(client, "GET", "/mock/faults"))["faults"][0]["count"] == 1
    assert await _statuses(client, 3) == [503, 200, 200]
    assert (await _control(client, "GET", "/mock/faults"))["faults"] == []


async def test_queued_faults_scoped_by_key_and_path(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    await _control(client, "POST", "/mock/faults", {"status": 500, "key": "k-b"})
    await _control(client, "POST", "/mock/faults", {"status": 502, "path": "/v1/chat/"})
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}

    assert await _status(client, _bearer("k-a")) == 200
    assert await _status(client) == 200
    assert await _status(client, _bearer("k-a"), path="/v1/chat/completions", body=chat) == 502
    assert await _status(client, _bearer("k-a"), path="/v1/chat/completions", body=chat) == 200
    assert await _status(client, {"x-api-key": "k-b"}) == 500  # x-api-key counts too
    assert await _status(client, _bearer("k-b")) == 200

    # Queued faults are served in order; one request takes one fault.
    await _control(client, "POST", "/mock/faults", {"status": 501})
    await _control(client, "POST", "/mock/faults", {"status": 504})
    assert await _statuses(client, 3) == [501, 504, 200]


async def test_control_show_clear_and_refuse_bad_bodies(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    state = client.app[MOCK_STATE]
    assert await _control(client, "GET", "/mock/faults") == {
        "faults": [],
        "fail_first": [],
        "fail_ratio": 0.0,
        "fail_status": None,
        "refused_keys": 0,
        "required_keys": 0,
    }
    await _control(client, "POST", "/mock/faults", {"status": "reset", "count": 3, "key": "k"})
    await _control(client, "POST", "/mock/faults", {"status": "cut", "path": "/v1/models"})
    await _control(client, "POST", "/mock/faults", {"status": 429, "retry_after": 5, "key": "k"})
    assert await _status(client, {"x-mock-fail-first": "500:1", "x-mock-fault-id": "t"}) == 500
    view = await _control(client, "GET", "/mock/faults")
    assert view["faults"] == [
        {"status": "reset", "count": 3, "path": "/v1/", "key": "k"},
        {"status": "cut", "cut_after": 1, "count": 1, "path": "/v1/models", "key": None},
        {"status": 429, "retry_after": 5, "count": 1, "path": "/v1/", "key": "k"},
    ]
    assert view["fail_first"] == [{"fault_id": "t", "spec": "500:1", "seen": 1}]

    cleared = await _control(client, "DELETE", "/mock/faults")
    assert cleared["faults"] == [] and cleared["fail_first"] == []
    assert state.faults.armed is False
    assert await _status(client, {"x-mock-fail-first": "500:1", "x-mock-fault-id": "t"}) == 500

    for bad in [
        {"count": 1},
        {"status": 200},
        {"status": "teapot"},
        {"status": True},
        {"status": 503, "count": 0},
        {"status": 503, "count": "2"},
        {"status": 503, "cut_after": 1},
        {"status": "reset", "retry_after": 1},
        {"status": "cut", "retry_after": 1},
        {"status": 429, "retry_after": -1},
        {"status": 503, "path": "v1/"},
        {"status": 503, "key": ""},
        {"status": 503, "colour": "red"},
        [{"status": 503}],
    ]:
        async with client.post("/mock/faults", json=bad) as resp:
            assert resp.status == 400, bad
            assert (await resp.json())["error"]["code"] in ("mock_bad_fault", "invalid_json")
    assert (await _control(client, "GET", "/mock/faults"))["faults"] == []
    # Control requests are neither recorded nor faulted.
    assert all(r.path.startswith("/v1/") for r in state.requests)
    assert not any(call.endswith("/mock/faults") for call in state.calls)


# ---------------------------------------------------------------- x-mock-fail-first


async def test_fail_first_header_counts_per_fault_id(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    a = {"x-mock-fail-first": "503:2", "x-mock-fault-id": "test-a"}
    b = {"x-mock-fail-first": "503:2", "x-mock-fault-id": "test-b"}
    assert await _statuses(client, 3, a) == [503, 503, 200]
    assert await _statuses(client, 3, b) == [503, 503, 200]  # its own counter
    assert await _status(client, a) == 200
    assert await _status(client, {**a, "x-mock-fail-first": "502:1"}) == 502  # another spec
    assert await _statuses(client, 2, {"x-mock-fail-first": "503:1"}) == [503, 200]  # no id

    # A stream request fails the same way, before any event.
    stream = {**BODY, "stream": True}
    c = {"x-mock-fail-first": "500:1", "x-mock-fault-id": "test-c"}
    assert [await _status(client, c, body=stream) for _ in range(2)] == [500, 200]


@pytest.mark.parametrize(
    "spec", ["503", "503:0", "503:x", "200:1", "600:1", "teapot:1", "reset:1:2", "429:1:-1", ""]
)
async def test_fail_first_header_malformed_is_a_400(
    aiohttp_client: AiohttpClient, spec: str
) -> None:
    client = await _client(aiohttp_client)
    async with client.post("/v1/responses", json=BODY, headers={"x-mock-fail-first": spec}) as r:
        assert r.status == 400
        message = (await r.json())["error"]["message"]
    assert message.startswith("x-mock-fail-first: ")


async def test_429_carries_the_chosen_retry_after(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    await _control(client, "POST", "/mock/faults", {"status": 429, "count": 1, "retry_after": 7})
    headers = {"x-mock-fail-first": "429:1:2", "x-mock-fault-id": "ra"}
    for retry_after in ("7", "2", None):  # the queued fault first, then the header's
        async with client.post("/v1/responses", json=BODY, headers=headers) as resp:
            assert resp.headers.get("retry-after") == retry_after
            if retry_after is not None:
                assert resp.status == 429
                assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
            else:
                assert resp.status == 200

    # Without an argument there is no retry-after; x-mock-status: 429 keeps its "1".
    async with client.post("/v1/responses", json=BODY, headers={"x-mock-fail-first": "429:1"}) as r:
        assert r.status == 429 and "retry-after" not in r.headers
    async with client.post("/v1/responses", json=BODY, headers={"x-mock-status": "429"}) as r:
        assert r.status == 429 and r.headers["retry-after"] == "1"
    # Any error status may carry one.
    async with client.post(
        "/v1/responses", json=BODY, headers={"x-mock-fail-first": "503:1:4"}
    ) as r:
        assert r.status == 503 and r.headers["retry-after"] == "4"


# ---------------------------------------------------------------- connection faults


@pytest.fixture
async def mock_url() -> AsyncIterator[str]:
    runner, port = await start_mock("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _raw_answer(url: str, headers: str) -> bytes:
    """Every byte the mock sends back to one raw HTTP request (b"" if none)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        body = b'{"model":"nusantara-base","input":"hi"}'
        writer.write(
            b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + headers.encode()
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
        try:
            return await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            return b""
    finally:
        writer.close()


@pytest.mark.parametrize("kind", ["reset", "close"])
async def test_reset_and_close_come_before_any_byte(mock_url: str, kind: str) -> None:
    expected: type[aiohttp.ClientError] = (
        aiohttp.ClientOSError if kind == "reset" else aiohttp.ServerDisconnectedError
    )
    headers = {"x-mock-fail-first": f"{kind}:2", "x-mock-fault-id": kind}
    async with aiohttp.ClientSession() as session:
        with pytest.raises(expected) as caught:
            async with session.post(mock_url + "/v1/responses", json=BODY, headers=headers):
                pass
        if kind == "reset":
            assert isinstance(caught.value, aiohttp.ClientOSError)
            assert caught.value.errno == errno.ECONNRESET
        raw_headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        assert await _raw_answer(mock_url, raw_headers) == b""  # not one byte came back
        async with session.post(mock_url + "/v1/responses", json=BODY, headers=headers) as resp:
            assert resp.status == 200  # the third request with this header value

        async with session.post(mock_url + "/mock/faults", json={"status": kind}) as resp:
            assert resp.status == 200
        with pytest.raises(expected):
            async with session.post(mock_url + "/v1/responses", json=BODY):
                pass
        async with session.post(mock_url + "/v1/responses", json=BODY) as resp:
            assert resp.status == 200


async def test_cut_sends_the_first_bytes_then_closes(mock_url: str) -> None:
    stream = {**BODY, "stream": True}
    async with aiohttp.ClientSession() as session:
        headers = {"x-mock-fail-first": "cut:1:2", "x-mock-fault-id": "cut"}
        async with session.post(mock_url + "/v1/responses", json=stream, headers=headers) as resp:
            assert resp.status == 200
            received = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in resp.content.iter_any():
                    received += chunk
        assert received.count(b"event: ") == 2
        assert b"event: response.created" in received

        headers = {"x-mock-fail-first": "cut:1", "x-mock-fault-id": "cut-json"}
        async with session.post(mock_url + "/v1/responses", json=BODY, headers=headers) as resp:
            assert resp.status == 200 and resp.content_length
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        async with session.post(mock_url + "/v1/responses", json=BODY, headers=headers) as resp:
            assert (await resp.json())["status"] == "completed"

        async with session.post(mock_url + "/mock/faults", json={"status": "cut"}) as resp:
            assert resp.status == 200
        async with session.post(mock_url + "/v1/responses", json=stream) as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()


# ---------------------------------------------------------------- keys


async def test_refused_key_gets_401_without_the_key(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client, refused_keys=(BAD_KEY,))
    for headers in (_bearer(BAD_KEY), {"x-api-key": BAD_KEY}):
        async with client.post("/v1/responses", json=BODY, headers=headers) as resp:
            assert resp.status == 401
            text = await resp.text()
            err = (await resp.json())["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
        assert BAD_KEY not in text and BAD_KEY[:12] not in text and BAD_KEY[-8:] not in text
    assert await _status(client, _bearer("sk-good")) == 200
    assert await _status(client) == 200  # no key at all: not refused

    # A refused request takes no fault: the next good one gets it.
    fail = {"x-mock-fail-first": "503:1", "x-mock-fault-id": "refused"}
    assert await _status(client, {**_bearer(BAD_KEY), **fail}) == 401
    assert await _status(client, {**_bearer("sk-good"), **fail}) == 503

    # Refused at run time, and no longer.
    other = "sk-later-refused"
    assert await _control(client, "POST", "/mock/keys/refuse", {"key": other}) == {
        "refused_keys": 2
    }
    assert await _status(client, _bearer(other)) == 401
    await _control(client, "DELETE", "/mock/keys/refuse", {"key": other})
    assert await _status(client, _bearer(other)) == 200
    for bad in ({}, {"key": ""}, {"key": 1}, {"key": "a", "b": 1}):
        async with client.post("/mock/keys/refuse", json=bad) as resp:
            assert resp.status == 400


async def test_required_keys_refuse_every_other_key(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client, required_keys=("k1", "k2"))
    assert await _status(client, _bearer("k1")) == 200
    assert await _status(client, {"x-api-key": "k2"}) == 200
    async with client.post("/v1/responses", json=BODY, headers=_bearer("k3-other")) as resp:
        assert resp.status == 401
        err = (await resp.json())["error"]
    assert err["code"] == "invalid_api_key" and "k3-other" not in err["message"]
    async with client.post("/v1/responses", json=BODY) as resp:
        assert resp.status == 401
        assert "didn't provide an API key" in (await resp.json())["error"]["message"]


async def test_keys_used_and_counted_in_order(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client, refused_keys=("b",))
    state = client.app[MOCK_STATE]
    for headers in (
        _bearer("a"),
        _bearer("b"),
        {"x-api-key": "a"},
        {},
        {"authorization": "Basic x"},
    ):
        await _status(client, headers)
    await _control(client, "GET", "/mock/faults")
    assert state.keys_used() == ["a", "b", "a", None, None]
    assert state.key_counts() == {"a": 2, "b": 1, None: 2}
    assert [r.key for r in state.requests] == state.keys_used()


# ---------------------------------------------------------------- server-wide options


async def test_fail_ratio_is_evenly_spread(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client, fail_ratio=0.25, fail_status="502")
    assert await _statuses(client, 8) == [200, 200, 200, 502] * 2
    client = await _client(aiohttp_client, fail_ratio=1.0, fail_status="429:3")
    async with client.post("/v1/responses", json=BODY) as resp:
        assert resp.status == 429 and resp.headers["retry-after"] == "3"
    for bad in ({"fail_ratio": 1.5}, {"fail_ratio": -0.1}, {"fail_status": "200"}):
        with pytest.raises(ValueError):
            MockOptions(**bad)


async def test_no_fault_configured_never_consults_the_faults(
    aiohttp_client: AiohttpClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_: object) -> None:
        raise AssertionError("Faults.decide ran without any fault configured")

    client = await _client(aiohttp_client)
    assert client.app[MOCK_STATE].faults.armed is False
    monkeypatch.setattr(Faults, "decide", boom)
    assert await _status(client) == 200
    assert await _status(client, body={**BODY, "stream": True}) == 200


async def test_faults_queued_in_process(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    faults = client.app[MOCK_STATE].faults
    faults.queue(Fault(503, retry_after=1), count=2, key="k")
    assert await _status(client, _bearer("other")) == 200
    assert await _statuses(client, 3, _bearer("k")) == [503, 503, 200]
    faults.refuse("k")
    assert await _status(client, _bearer("k")) == 401


# ---------------------------------------------------------------- CLI


def test_cli_fault_flags_parse() -> None:
    args = cli.build_parser().parse_args(["mock-upstream"])
    assert (args.refuse_key, args.require_key, args.fail_ratio, args.fail_status) == (
        [],
        [],
        0.0,
        "503",
    )
    argv = ["mock-upstream", "--refuse-key", "a", "--refuse-key", "b", "--require-key", "c"]
    args = cli.build_parser().parse_args([*argv, "--fail-ratio", "0.1", "--fail-status", "reset"])
    assert (args.refuse_key, args.require_key, args.fail_ratio, args.fail_status) == (
        ["a", "b"],
        ["c"],
        0.1,
        "reset",
    )


@pytest.mark.parametrize("argv", [["--fail-ratio", "2"], ["--fail-status", "200"]])
def test_cli_rejects_bad_fault_flags(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["mock-upstream", "--port", "0", *argv]) == 2
    assert capsys.readouterr().err.startswith("gateway mock-upstream: ")


async def test_cli_flags_reach_the_running_mock() -> None:
    port = free_port()
    argv = ["--port", str(port), "--refuse-key", BAD_KEY, "--fail-ratio", "0.5"]
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "gateway", "mock-upstream", *argv, "--fail-status", "429:3"],
        stdout=subprocess.DEVNULL,
    )
    try:
        await asyncio.to_thread(wait_listening, port)
        url = f"http://127.0.0.1:{port}/v1/responses"
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=BODY, headers=_bearer(BAD_KEY)) as resp:
                assert resp.status == 401
            seen = []
            for _ in range(4):
                async with session.post(url, json=BODY, headers=_bearer("sk-ok")) as resp:
                    seen.append((resp.status, resp.headers.get("retry-after")))
        assert seen == [(200, None), (429, "3")] * 2
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
