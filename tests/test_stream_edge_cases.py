"""Stream relay edge cases, each on real sockets against a hand-written upstream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from conftest import ALPHA_KEY, UPSTREAM_KEY, GatewayFactory, auth, start_app

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

USAGE = {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}
BODY = {"model": "nusantara-base", "input": "hi", "max_output_tokens": 50, "stream": True}


def ev(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: ".encode() + orjson.dumps(payload) + b"\n\n"


def completed(seq: int) -> bytes:
    resp = {
        "id": "resp_1",
        "object": "response",
        "model": "nusantara-base",
        "status": "completed",
        "output": [],
        "usage": USAGE,
    }
    return ev(
        "response.completed",
        {"type": "response.completed", "sequence_number": seq, "response": resp},
    )


def created() -> bytes:
    resp = {
        "id": "resp_1",
        "object": "response",
        "model": "nusantara-base",
        "status": "in_progress",
        "output": [],
    }
    return ev(
        "response.created", {"type": "response.created", "sequence_number": 0, "response": resp}
    )


def delta(seq: int, text: str) -> bytes:
    return ev(
        "response.output_text.delta",
        {"type": "response.output_text.delta", "sequence_number": seq, "delta": text},
    )


def parse_sse(raw: bytes) -> list[tuple[str | None, bytes]]:
    """A WHATWG-style SSE parse (what the OpenAI SDK does), LF line ends."""
    out: list[tuple[str | None, bytes]] = []
    name: str | None = None
    data: list[bytes] = []
    for line in raw.replace(b"\r\n", b"\n").split(b"\n"):
        if not line:
            if data:
                out.append((name, b"\n".join(data)))
            name, data = None, []
            continue
        if line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        value = value[1:] if value.startswith(b" ") else value
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode()
    return out


async def ledger_rows(gw: Any) -> list[Any]:
    await gw.gw.ledger.flush()
    return await gw.gw.ledger._run(
        gw.gw.ledger._query,
        "SELECT charged_tokens, estimated, stream, status FROM ledger ORDER BY ts",
        (),
    )


async def test_drain_when_client_left_before_upstream_headers(
    gateway_factory: GatewayFactory,
) -> None:
    """A client that gives up before the upstream's headers arrive is charged the real usage:
    the gateway drains the upstream's stream and charges its 7 tokens, not the estimate."""
    finished = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(0.5)  # first byte (the head) only after the client is gone
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        try:
            await resp.prepare(request)
            for chunk in (created(), delta(1, "a"), completed(2)):
                await resp.write(chunk)
                await asyncio.sleep(0.05)
            await resp.write_eof()
        except ConnectionError:
            pass  # the gateway hung up on us: it did not drain
        finally:
            finished.set()
        return resp

    url, runner = await start_app(slow)
    try:
        gw = await gateway_factory(url, alpha_budgets="[{tokens: 100000, per: day}]")
        async with aiohttp.ClientSession() as s:
            try:
                async with s.post(
                    f"{gw.url}/v1/responses",
                    json=BODY,
                    headers=auth(),
                    timeout=aiohttp.ClientTimeout(total=0.15),
                ) as r:
                    await r.read()
            except TimeoutError:
                pass
        await asyncio.wait_for(finished.wait(), 5)
        await asyncio.sleep(0.3)
        rows = await ledger_rows(gw)
        assert len(rows) == 1
        charged, estimated, _, _ = rows[0]
        assert (charged, estimated) == (7, 0), f"charged {charged} estimated={estimated}"
    finally:
        await runner.cleanup()


async def test_interrupted_mid_event_still_ends_with_a_parseable_error_event(
    gateway_factory: GatewayFactory,
) -> None:
    """When the upstream dies half-way through an event, the stream still ends with an
    `upstream_stream_interrupted` `error` event that an SSE client parses as an event of its
    own, so the client learns that the answer is incomplete."""

    async def breaks(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(created() + delta(1, "hello"))
        half = delta(2, "world")
        await resp.write(half[: len(half) // 2])
        await asyncio.sleep(0.1)
        assert request.transport is not None
        request.transport.close()  # chunked body never completed: the stream broke
        return resp

    url, runner = await start_app(breaks)
    try:
        gw = await gateway_factory(url)
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{gw.url}/v1/responses", json=BODY, headers=auth()) as r,
        ):
            raw = await r.read()
        assert b"upstream_stream_interrupted" in raw  # the gateway appends its event...
        events = parse_sse(raw)
        name, data = events[-1]
        # ...and a client sees it as an event of its own
        assert name == "error", f"last event is {name!r}: {data!r}"
        assert orjson.loads(data)["code"] == "upstream_stream_interrupted"
    finally:
        await runner.cleanup()


async def test_upstream_key_echoed_in_a_stream_is_masked(gateway_factory: GatewayFactory) -> None:
    """The gateway's upstream key is masked in streamed error events too (status 200, SSE), so
    an upstream that echoes it never hands it to a client."""

    async def echo(request: web.Request) -> web.StreamResponse:
        await request.read()
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(created())
        await resp.write(
            ev(
                "error",
                {
                    "type": "error",
                    "code": "invalid_api_key",
                    "message": f"Incorrect API key provided: {key}",
                    "param": None,
                    "sequence_number": 1,
                },
            )
        )
        await resp.write_eof()
        return resp

    url, runner = await start_app(echo)
    try:
        gw = await gateway_factory(url)
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{gw.url}/v1/responses", json=BODY, headers=auth()) as r,
        ):
            raw = await r.read()
        assert b"Incorrect API key provided" in raw
        assert UPSTREAM_KEY.encode() not in raw, "the upstream key reached the client"
    finally:
        await runner.cleanup()


async def test_stream_follower_when_upstream_answers_json(gateway_factory: GatewayFactory) -> None:
    """When two identical `stream: true` requests coalesce and the upstream ignores `stream`,
    answering with a JSON body, the follower gets the same 200 answer as the leader."""

    async def json_always(request: web.Request) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(0.3)
        return web.json_response(
            {
                "id": "resp_j",
                "object": "response",
                "status": "completed",
                "model": "nusantara-base",
                "output": [],
                "usage": USAGE,
            }
        )

    url, runner = await start_app(json_always)
    try:
        gw = await gateway_factory(url, cache="true")

        async def one() -> tuple[int, bytes, str]:
            try:
                async with (
                    aiohttp.ClientSession() as s,
                    s.post(f"{gw.url}/v1/responses", json=BODY, headers=auth()) as r,
                ):
                    return r.status, await r.read(), r.headers.get("x-gateway-cache", "")
            except aiohttp.ClientResponseError as e:  # e.g. an "HTTP/1.1 0" status line
                return -1, str(e).encode(), "unparseable response"

        first = asyncio.ensure_future(one())
        await asyncio.sleep(0.1)
        second = await one()
        assert (await first)[0] == 200
        assert second[0] == 200, f"follower got {second}"
    finally:
        await runner.cleanup()


async def test_upstream_heartbeats_after_terminal_event_do_not_keep_the_stream_open(
    gateway_factory: GatewayFactory,
) -> None:
    """After the terminal event the upstream gets a bounded grace period (POST_TERMINAL_GRACE)
    to close the stream, however many `: ping` comments it sends: the client's stream ends, and
    the request is settled and recorded, promptly."""
    pinging = 8.0

    async def pings(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(created() + delta(1, "a") + completed(2))
        loop = asyncio.get_running_loop()
        end = loop.time() + pinging
        try:
            while loop.time() < end:
                await asyncio.sleep(0.5)
                await resp.write(b": ping\n\n")
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    url, runner = await start_app(pings)
    try:
        gw = await gateway_factory(url)
        loop = asyncio.get_running_loop()
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{gw.url}/v1/responses", json=BODY, headers=auth()) as r,
        ):
            t_terminal = None
            async for line in r.content:
                if line.startswith(b"event: response.completed"):
                    t_terminal = loop.time()
            assert t_terminal is not None
            held = loop.time() - t_terminal
        assert held < 6.0, f"the client's stream stayed open {held:.1f} s after the terminal event"
    finally:
        await runner.cleanup()


async def test_chat_ttft_with_spaced_json(gateway_factory: GatewayFactory) -> None:
    """Time to first token is recorded for a Chat stream whatever the upstream's JSON spacing
    (here Python's default `"content": "Hi"`), so the ledger, the log and the TTFT metric cover
    every upstream."""
    import json

    def chunk(delta_: dict[str, Any], reason: str | None, usage: Any = None) -> bytes:
        obj: dict[str, Any] = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "model": "nusantara-base",
            "choices": [{"index": 0, "delta": delta_, "finish_reason": reason}],
        }
        if usage is not None:
            obj = {**obj, "choices": [], "usage": usage}
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk({"role": "assistant", "content": ""}, None))
        await asyncio.sleep(0.05)
        await resp.write(chunk({"content": "Hi"}, None))
        await resp.write(chunk({}, "stop"))
        await resp.write(
            chunk({}, None, {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4})
        )
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    url, runner = await start_app(chat)
    try:
        gw = await gateway_factory(url)
        body = {
            "model": "nusantara-base",
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        }
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{gw.url}/v1/chat/completions", json=body, headers=auth()) as r,
        ):
            assert r.status == 200
            await r.read()
        await gw.gw.ledger.flush()
        rows = await gw.gw.ledger._run(
            gw.gw.ledger._query,
            "SELECT input_tokens, output_tokens, ttft_ms FROM ledger",
            (),
        )
        assert len(rows) == 1 and rows[0][:2] == (3, 1)  # usage was read fine
        assert rows[0][2] is not None, "no time to first token for a stream with output"
    finally:
        await runner.cleanup()


async def test_json_body_idle_timeout_is_not_a_total_timeout(
    gateway_factory: GatewayFactory,
) -> None:
    """`timeouts.idle` bounds the gap between reads of a non-SSE body, not its total time: a
    slow but steady body (/v1/audio/speech, a file download, a large JSON) arrives in full."""

    async def trickle(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "audio/mpeg"})
        await resp.prepare(request)
        try:
            for _ in range(8):  # 8 x 0.3 s = 2.4 s in all, never more than 0.3 s idle
                await resp.write(b"\xff\xfb" * 512)
                await asyncio.sleep(0.3)
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    url, runner = await start_app(trickle)
    try:
        gw = await gateway_factory(url, idle=1)
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"{gw.url}/v1/audio/speech",
                json={"model": "nusantara-base", "input": "hi", "voice": "x"},
                headers=auth(),
            ) as r,
        ):
            body = await r.read()
            assert r.status == 200, (r.status, body[:200])
            assert len(body) == 8 * 1024
    finally:
        await runner.cleanup()


async def test_stalled_leader_client_does_not_stall_coalesced_followers(
    gateway_factory: GatewayFactory,
) -> None:
    """A leader's client that stops reading but keeps its connection open does not hold up the
    coalesced followers: they still receive the complete stream."""
    big = "x" * 16384

    async def firehose(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        try:
            await resp.prepare(request)
            await resp.write(created())
            for i in range(1, 3000):  # ~50 MB: more than the socket buffers can absorb
                await resp.write(delta(i, big))
            await resp.write(completed(3000))
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    url, runner = await start_app(firehose)
    try:
        gw = await gateway_factory(url, cache="true", idle=30)
        payload = orjson.dumps(BODY)
        host, port = gw.url.split("//")[1].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.transport.set_write_buffer_limits(0)
        writer.write(
            b"POST /v1/responses HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + ALPHA_KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
        )
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the leader's client got the head, then stalls
        reader._transport.pause_reading()  # type: ignore[attr-defined]

        async def follower() -> bytes:
            async with (
                aiohttp.ClientSession() as s,
                s.post(f"{gw.url}/v1/responses", json=BODY, headers=auth()) as r,
            ):
                assert r.headers.get("x-gateway-cache") == "coalesced"
                return await r.read()

        try:
            raw = await asyncio.wait_for(follower(), 8)
        except TimeoutError:
            raw = b""
        finally:
            writer.close()
        assert b"response.completed" in raw, "the follower stalled with the leader's client"
    finally:
        await runner.cleanup()


async def test_client_gone_while_writes_are_backpressured_still_drains(
    gateway_factory: GatewayFactory,
) -> None:
    """A client that leaves while the gateway is blocked writing to it (its socket is full) is
    handled like any departed client: the upstream stream is drained, the real usage charged,
    and the request recorded with the upstream's 200."""
    big = "x" * 16384
    done = asyncio.Event()

    async def firehose(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        try:
            await resp.prepare(request)
            await resp.write(created())
            for i in range(1, 3000):  # ~50 MB
                await resp.write(delta(i, big))
            await resp.write(completed(3000))
            await resp.write_eof()
        except ConnectionError:
            pass
        finally:
            done.set()
        return resp

    url, runner = await start_app(firehose)
    try:
        gw = await gateway_factory(
            url, idle=30, drain=10, alpha_budgets="[{tokens: 100000000, per: day}]"
        )
        payload = orjson.dumps(BODY)
        host, port = gw.url.split("//")[1].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /v1/responses HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + ALPHA_KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
        )
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        reader._transport.pause_reading()  # type: ignore[attr-defined]
        await asyncio.sleep(1.0)  # the gateway is now blocked writing to us
        writer.transport.abort()  # and we go away
        await asyncio.wait_for(done.wait(), 15)
        await asyncio.sleep(0.3)
        await gw.gw.ledger.flush()
        rows = await gw.gw.ledger._run(
            gw.gw.ledger._query,
            "SELECT status, charged_tokens, estimated FROM ledger",
            (),
        )
        assert rows == [(200, 7, 0)], rows
    finally:
        await runner.cleanup()
