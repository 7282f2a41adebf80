"""Faults at the edges of a request's life: a reload or a stop that lands while a request is
still under way (uploading, waiting for its upstream, or whose client has left), an upstream
that stalls a model listing, and two reloads at once."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import web
from conftest import (
    ALPHA_KEY,
    ENV,
    Running,
    Upstream,
    auth,
    ledger_rows,
    make_settings,
    start_app,
    start_gateway,
)

from gateway.backends import LEDGER_FILE
from gateway.config import loads
from gateway.upstream.client import UpstreamClient

# -- helpers ---------------------------------------------------------------------------------


async def until(check: Callable[[], bool], within: float = 2.0, what: str = "") -> None:
    """Wait, a loop turn at a time, until `check()` holds; fail after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what or check}"
        await asyncio.sleep(0.01)


def port_of(running: Running) -> int:
    return int(running.url.rsplit(":", 1)[1])


async def raw_exchange(
    port: int,
    head: bytes,
    first: bytes,
    rest: bytes,
    between: Callable[[], Awaitable[None]],
    read_timeout: float = 5.0,
) -> bytes:
    """Send a request head and the first part of its body, await `between`, send the rest,
    then read everything the server sends until it closes (or `read_timeout` passes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + first)
        await writer.drain()
        await between()
        writer.write(rest)
        await writer.drain()
        data = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(65536), read_timeout):
                data += chunk
        return data
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-cased names) and body of one HTTP/1.1 answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        decoded, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2 :]
        body = decoded
    return int(status_line.split(" ", 2)[1]), headers, body


def request_head(method: str, path: str, length: int) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {ALPHA_KEY}\r\nConnection: close\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def ledger_file_rows(state: Path) -> list[dict[str, Any]]:
    """The ledger's rows as written to disk (for after a stop, when the ledger is closed)."""
    with contextlib.closing(sqlite3.connect(state / LEDGER_FILE)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM ledger ORDER BY id")]


# -- a reload while an admitted request still uploads its body ------------------------------


async def reload_mid_upload(
    running: Running, upstream: Upstream, state: Path, method: str, path: str, body: bytes
) -> tuple[int, bytes, UpstreamClient]:
    """Send `body` in two parts; between them, once the request is admitted (and has read its
    policy snapshot), reload with the same upstream under a new name: its client is retired."""
    gw = running.gw
    old = gw.policy.upstreams["mock"]

    async def reload() -> None:
        # admitted: the envelope counted it and the handler, in the same loop turn, read the
        # policy; it now waits for the rest of the body
        await until(lambda: gw.inflight == 1, what="the request to be admitted")
        await gw.reload(make_settings(upstream.url, state, upstream_name="m2"))
        assert list(gw.policy.upstreams) == ["m2"]

    raw = await raw_exchange(
        port_of(running), request_head(method, path, len(body)), body[:1], body[1:], reload
    )
    status, _, answer = split_response(raw)
    return status, answer, old


async def test_reload_during_upload_keeps_the_admitted_requests_upstream(
    upstream: Upstream, tmp_path: Path
) -> None:
    """A request admitted before a reload runs to its end on its snapshot's upstream client,
    even though the reload retired that client while the body was still arriving."""
    state = tmp_path / "state"
    running = await start_gateway(make_settings(upstream.url, state))
    try:
        body = orjson.dumps({"model": "nusantara-base", "input": "hi", "max_output_tokens": 8})
        status, answer, old = await reload_mid_upload(
            running, upstream, state, "POST", "/v1/responses", body
        )
        assert status == 200, answer
        data = orjson.loads(answer)
        assert data["object"] == "response" and data["status"] == "completed"
        assert data["usage"]["output_tokens"] > 0
        rows = await ledger_rows(running)
        assert [(r["upstream"], r["status"]) for r in rows] == [("mock", 200)]
        # the retired pool closes once the last request that held it has ended
        await until(lambda: not old.started, what="the retired client to close")
    finally:
        await running.stop()


async def test_reload_during_upload_keeps_a_model_listings_upstream(
    upstream: Upstream, tmp_path: Path
) -> None:
    """`GET /v1/models` with a (slow) body: the listing comes from the snapshot's client."""
    state = tmp_path / "state"
    running = await start_gateway(make_settings(upstream.url, state))
    try:
        status, answer, old = await reload_mid_upload(
            running, upstream, state, "GET", "/v1/models", b"{}"
        )
        assert status == 200, answer
        ids = {m["id"] for m in orjson.loads(answer)["data"]}
        assert "nusantara-base" in ids
        await until(lambda: not old.started, what="the retired client to close")
    finally:
        await running.stop()


# -- a stop while a request whose client has left still waits for its upstream --------------


async def test_stop_waits_for_a_request_whose_client_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner's stop gives a handler whose connection is gone its grace, then neither
    awaits nor cancels it: the Gateway's close must wait for it before closing the ledger, or
    the request's record (and its cost) is lost."""
    entered, answer = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await request.read()
        entered.set()
        await asyncio.wait_for(answer.wait(), 10)  # a long generation, within first_byte
        usage = {"input_tokens": 7, "output_tokens": 9, "total_tokens": 16}
        return web.json_response(
            {"id": "resp_slow", "object": "response", "status": "completed", "usage": usage}
        )

    url, up_runner = await start_app(slow)
    state = tmp_path / "state"
    running = await start_gateway(make_settings(url, state, first_byte=10, drain=2), stop_grace=0.1)
    gw = running.gw
    ledger_closing = asyncio.Event()
    real_close = gw.ledger.close

    async def close() -> None:
        ledger_closing.set()
        await real_close()

    monkeypatch.setattr(gw.ledger, "close", close)
    try:
        body = orjson.dumps({"model": "nusantara-base", "input": "x"})
        _, writer = await asyncio.open_connection("127.0.0.1", port_of(running))
        writer.write(request_head("POST", "/v1/responses", len(body)) + body)
        await writer.drain()
        await asyncio.wait_for(entered.wait(), 2)
        writer.close()  # the client gives up; the gateway keeps the request (and its cost)
        await writer.wait_closed()
        server = running.runner.server
        assert server is not None
        await until(
            lambda: all(c.transport is None for c in server.connections),
            what="the gateway to see the client leave",
        )
        assert gw.inflight == 1

        stop = asyncio.ensure_future(running.stop())
        # the ledger must stay open while the request waits for its upstream (drain_timeout
        # is 2 s): a stop that does not wait closes it now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ledger_closing.wait(), 0.5)
        closed_under_the_request = ledger_closing.is_set()
        answer.set()
        await asyncio.wait_for(stop, 5)
        assert not closed_under_the_request, "the stop closed the ledger under a running request"
    finally:
        answer.set()
        await up_runner.cleanup()
    rows = ledger_file_rows(state)
    assert len(rows) == 1, "the request's ledger record was lost in the stop"
    assert (rows[0]["team"], rows[0]["model"]) == ("alpha", "nusantara-base")
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (7, 9)


# -- a stream whose first byte comes after the drain's deadline -----------------------------

CREATED = (
    b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
    b'"response":{"id":"resp_late","object":"response","status":"in_progress"}}\n\n'
)


async def test_a_stream_starting_after_the_drain_deadline_is_cut(tmp_path: Path) -> None:
    """A request admitted before a drain whose upstream stream starts only after the drain's
    deadline is cut as it starts, with the `shutting_down` error event, instead of being
    truncated later by the runner's stop."""
    entered, first_byte, finish = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def late_start(request: web.Request) -> web.StreamResponse:
        await request.read()
        entered.set()
        await asyncio.wait_for(first_byte.wait(), 10)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(CREATED)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(finish.wait(), 10)  # then nothing: a long generation
        return resp

    url, up_runner = await start_app(late_start)
    state = tmp_path / "state"
    running = await start_gateway(make_settings(url, state, first_byte=10, idle=10))
    gw = running.gw
    got = bytearray()

    async def client() -> int:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                running.url + "/v1/responses",
                json={"model": "nusantara-base", "input": "hi", "stream": True},
                headers=auth(ALPHA_KEY),
            ) as r,
        ):
            with contextlib.suppress(aiohttp.ClientPayloadError):  # a truncated stream
                async for chunk in r.content.iter_any():
                    got.extend(chunk)
            return r.status

    within = 0.1
    with structlog.testing.capture_logs() as logs:
        reading = asyncio.ensure_future(client())
        try:
            await asyncio.wait_for(entered.wait(), 2)  # admitted, waiting for the first byte
            gw.draining = True  # what `gateway serve` does on SIGTERM
            drain = asyncio.ensure_future(gw.drain(within))
            # the drain's deadline passes (a drain that cuts nothing has returned by then)
            await asyncio.wait({drain}, timeout=within + 0.3)
            first_byte.set()  # the stream starts now: after the cut
            await asyncio.wait_for(drain, 3)
            await running.stop()
            status = await asyncio.wait_for(reading, 5)
        finally:
            first_byte.set()
            finish.set()
            reading.cancel()
            await up_runner.cleanup()
    assert status == 200
    text = bytes(got)
    assert b"shutting_down" in text, f"the stream ended without the error event: {text[-300:]!r}"
    assert text.endswith(b"\n\n"), text[-200:]
    last = text.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"event: error\ndata: "), text[-300:]
    event = orjson.loads(last.split(b"data: ", 1)[1])
    assert event["type"] == "error" and event["code"] == "shutting_down"
    lines = [e for e in logs if e["event"] == "request"]
    assert [(e["status"], e["stream"], e["error"]) for e in lines] == [(200, True, "shutting_down")]
    rows = ledger_file_rows(state)
    assert [(r["status"], r["stream"]) for r in rows] == [(200, 1)]


# -- GET /v1/models with an upstream that stalls mid-body ------------------------------------

TWO_UPSTREAMS = """
listen: {{host: 127.0.0.1, port: 0}}
admin: {{host: 127.0.0.1, port: 0}}
limits: {{drain_timeout: 1}}
upstreams:
  stalled:
    base_url: {stalled}
    models: ["stalled-*"]
    timeouts: {{connect: 1, first_byte: 1, idle: {idle}}}
  mock:
    base_url: {healthy}
    models: ["*"]
    timeouts: {{connect: 1, first_byte: 1, idle: {idle}}}
teams:
  alpha:
    keys: ["${{ALPHA_KEY}}"]
    models: ["*"]
state: {{path: {state}}}
"""


async def stalling_upstream(
    entered: asyncio.Event, release: asyncio.Event
) -> tuple[str, web.AppRunner]:
    """Sends its head and the start of its body in time, then nothing until `release`."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b'{"object":"list","data":[')
        entered.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 10)
        return resp

    return await start_app(handler)


async def timed_models(running: Running, within: float) -> tuple[int | None, bytes, float]:
    """`GET /v1/models`: status (None when no answer came within `within` s), body, seconds."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        try:
            async with s.get(
                running.url + "/v1/models",
                headers=auth(ALPHA_KEY),
                timeout=aiohttp.ClientTimeout(total=within),
            ) as r:
                return r.status, await r.read(), time.monotonic() - t0
        except TimeoutError:
            return None, b"", time.monotonic() - t0


async def test_models_listing_gives_up_on_a_stalled_upstream(
    upstream: Upstream, tmp_path: Path
) -> None:
    """One upstream stalls its listing mid-body: the answer comes after its idle timeout,
    with the healthy upstream's models."""
    idle = 0.5
    entered, release = asyncio.Event(), asyncio.Event()
    url, up_runner = await stalling_upstream(entered, release)
    text = TWO_UPSTREAMS.format(stalled=url, healthy=upstream.url, idle=idle, state=tmp_path)
    running = await start_gateway(loads(text, ENV))
    try:
        status, body, waited = await timed_models(running, idle + 1.0)
        assert entered.is_set()  # the stalled upstream was asked
    finally:
        release.set()
        await up_runner.cleanup()  # first: a listing still reading it ends now
        await running.stop()
    assert status is not None, f"GET /v1/models got no answer in {waited:.1f} s (idle: {idle})"
    assert status == 200, body
    ids = {m["id"] for m in orjson.loads(body)["data"]}
    assert ids == {"nusantara-base", "garda-beta-mini", "gpt-4o-mini"}
    assert waited < idle + 0.5


async def test_models_listing_fails_cleanly_when_its_only_upstream_stalls(
    tmp_path: Path,
) -> None:
    """The only upstream stalls: a clean 502 after its idle timeout, not an endless wait."""
    idle = 0.5
    entered, release = asyncio.Event(), asyncio.Event()
    url, up_runner = await stalling_upstream(entered, release)
    running = await start_gateway(make_settings(url, tmp_path / "state", first_byte=1, idle=idle))
    try:
        status, body, waited = await timed_models(running, idle + 1.0)
        assert entered.is_set()
    finally:
        release.set()
        await up_runner.cleanup()  # first: a listing still reading it ends now
        await running.stop()
    assert status is not None, f"GET /v1/models got no answer in {waited:.1f} s (idle: {idle})"
    assert status == 502, body
    assert orjson.loads(body)["error"]["code"] == "upstream_unavailable"
    assert waited < idle + 0.5


# -- two reloads at once ---------------------------------------------------------------------


async def test_concurrent_reloads_leave_no_orphaned_pool(
    upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGHUP and POST /admin/reload together: each reload replaces the clients the previous
    one installed, so every pool but the current policy's is closed."""
    state = tmp_path / "state"
    running = await start_gateway(make_settings(upstream.url, state))
    gw = running.gw
    original = gw.policy.upstreams["mock"]
    made: list[UpstreamClient] = []
    real_start = UpstreamClient.start

    async def start(self: UpstreamClient) -> None:
        made.append(self)
        await asyncio.sleep(0)  # a start may yield to the loop: another reload runs meanwhile
        await real_start(self)

    try:
        monkeypatch.setattr(UpstreamClient, "start", start)
        await asyncio.wait_for(
            asyncio.gather(
                gw.reload(make_settings(upstream.url, state, upstream_name="a")),
                gw.reload(make_settings(upstream.url, state, upstream_name="b")),
            ),
            5,
        )
        monkeypatch.undo()
        current = gw.policy.upstreams
        assert list(current) == ["b"]
        assert {c.name for c in made} == {"a", "b"}
        orphans = [c.name for c in [original, *made] if c is not current["b"] and c.started]
        assert orphans == [], "a reload's pool was dropped without being closed"
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                running.url + "/v1/responses",
                json={"model": "nusantara-base", "input": "hi"},
                headers=auth(ALPHA_KEY),
            ) as r,
        ):
            assert r.status == 200
        rows = await ledger_rows(running)
        assert [(r["upstream"], r["status"]) for r in rows] == [("b", 200)]
    finally:
        await running.stop()
        for client in made:  # whatever a failed run left open
            await client.close()
