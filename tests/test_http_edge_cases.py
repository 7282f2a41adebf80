"""Request and response header handling and error shapes at the HTTP edge, on real sockets."""

from __future__ import annotations

import asyncio
import gzip
import logging

import aiohttp
import orjson
import pytest
from aiohttp import web
from conftest import (
    ALPHA_KEY,
    GatewayFactory,
    Running,
    Upstream,
    auth,
    start_app,
)

RESP = {"model": "nusantara-base", "input": "Tell me a story", "max_output_tokens": 12}


async def raw_request(url: str, head: bytes, body: bytes) -> bytes:
    host, port = url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


def split_response(raw: bytes) -> tuple[int, bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


async def test_gzip_request_body_is_forwarded_consistently(
    gateway_factory: GatewayFactory,
) -> None:
    """A gzip-encoded request body reaches the upstream either still gzip-encoded or without a
    `Content-Encoding: gzip` header: what the upstream receives always matches what it is told,
    so clients may compress their requests."""
    seen: list[tuple[str | None, bytes]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        raw = await request.read()  # auto_decompress is off: these are the bytes on the wire
        seen.append((request.headers.get("content-encoding"), raw[:2]))
        return web.json_response(
            {
                "id": "resp_g",
                "object": "response",
                "status": "completed",
                "model": "nusantara-base",
                "output": [],
                "usage": {"input_tokens": 1, "output_tokens": 1},
            }
        )

    url, runner = await start_app(handler, auto_decompress=False)
    try:
        gw = await gateway_factory(url)
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"{gw.url}/v1/responses",
                data=gzip.compress(orjson.dumps(RESP)),
                headers={**auth(), "content-type": "application/json", "content-encoding": "gzip"},
            ) as r,
        ):
            assert r.status == 200
        ((encoding, magic),) = seen
        # either the body is re-sent as gzip, or the header is not claimed
        assert encoding != "gzip" or magic == b"\x1f\x8b", (encoding, magic)
    finally:
        await runner.cleanup()


async def test_response_headers_named_in_connection_are_dropped(
    gateway_factory: GatewayFactory,
) -> None:
    """Headers the upstream names in its `Connection` header are hop-by-hop (RFC 9110 7.6.1)
    and are not passed on to the client, so upstream-internal details do not leak."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response(
            {"object": "list", "data": []},
            headers={"Connection": "X-Upstream-Hop", "X-Upstream-Hop": "lb-internal-10.0.0.7"},
        )

    url, runner = await start_app(handler)
    try:
        gw = await gateway_factory(url)
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{gw.url}/v1/files", headers=auth()) as r,
        ):
            assert r.status == 200
            assert "X-Upstream-Hop" not in r.headers, r.headers.get("X-Upstream-Hop")
    finally:
        await runner.cleanup()


async def test_invalid_host_header_gives_an_openai_error(gateway: Running) -> None:
    """A request whose Host header carries an invalid port gets an OpenAI-style JSON error, not
    a plain-text 500: every error a client receives from the gateway is one it can parse."""
    body = orjson.dumps(RESP)
    raw = await raw_request(
        gateway.url,
        b"POST /v1/responses HTTP/1.1\r\nHost: example.com:99999\r\n"
        b"Authorization: Bearer " + ALPHA_KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\n",
        body,
    )
    status, head, _ = split_response(raw)
    assert status != 500, head.decode(errors="replace")
    assert b"application/json" in head.lower() or status < 400


async def test_non_utf8_api_key_is_401_not_500(gateway: Running) -> None:
    """An API key containing a byte that is not UTF-8 is simply an unknown key: the client gets
    a 401 `invalid_api_key`, not a 500 internal error."""
    body = orjson.dumps(RESP)
    raw = await raw_request(
        gateway.url,
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer key-alpha-\xff\r\nContent-Type: application/json\r\n",
        body,
    )
    status, _, payload = split_response(raw)
    assert status == 401, payload
    assert orjson.loads(payload)["error"]["code"] == "invalid_api_key"


async def test_undecodable_request_body_is_400_not_500(gateway: Running) -> None:
    """A request body that cannot be decoded (bad gzip, a truncated chunked body) is the
    client's error: it gets a 400, not a 500 internal error."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{gateway.url}/v1/responses",
            data=b"this is not gzip",
            headers={**auth(), "content-type": "application/json", "content-encoding": "gzip"},
        ) as r,
    ):
        body = await r.read()
        assert r.status == 400, (r.status, body)


async def test_malformed_request_does_not_log_the_client_key(
    gateway: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """A request the HTTP parser rejects (here a stray control byte after the key in
    `Authorization`) gets a 400, and the client's API key appears in no log line: logs must
    never hold a client's credentials."""
    caplog.set_level(logging.DEBUG)
    head = (
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + ALPHA_KEY.encode() + b"\x01\r\n"
        b"Content-Type: application/json\r\n"
    )
    raw = await raw_request(gateway.url, head, b"{}")
    assert raw.startswith(b"HTTP/1.") and b" 400 " in raw.split(b"\r\n", 1)[0]
    await asyncio.sleep(0.1)
    assert ALPHA_KEY not in caplog.text, "the client key was logged"


@pytest.mark.parametrize(
    "path", [b"/v1/../admin", b"/v1/%2e%2e/admin", b"/v1/foo/%2E%2E/%2E%2E/x", b"/v1/./models"]
)
async def test_dot_segments_never_reach_the_upstream(
    gateway: Running, upstream: Upstream, path: bytes
) -> None:
    """A path that the upstream would resolve outside /v1 is refused: it would otherwise reach
    any endpoint of the provider with the gateway's own key."""
    raw = await raw_request(
        gateway.url,
        b"GET "
        + path
        + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + ALPHA_KEY.encode()
        + b"\r\n",
        b"",
    )
    assert b" 404 " in raw.split(b"\r\n", 1)[0] and b'"code":"not_found"' in raw
    assert upstream.state.requests == []
