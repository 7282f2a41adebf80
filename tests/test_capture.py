"""Capture end to end: which requests are kept, what is kept of them, and that no key reaches
the store (the SQLite file is searched byte for byte)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from capture_upstream import handler
from conftest import (
    ADMIN_KEY,
    ALPHA_KEY,
    BETA_KEY,
    UPSTREAM_KEY,
    Running,
    auth,
    make_settings,
    start_app,
    start_gateway,
)
from servers import postgres_database

from gateway.capture.draft import Row
from gateway.capture.postgres import PostgresCaptures
from gateway.capture.sqlite import SqliteCaptures
from gateway.redact import MARK
from gateway.runtime import Gateway
from gateway.settings import Capture, Settings


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    url, runner = await start_app(handler)
    yield url
    await runner.cleanup()


def settings_with(url: str, state: Path, **capture: Any) -> Settings:
    base = make_settings(url, state, first_byte=kw_first_byte(capture))
    cfg = Capture.model_validate({"enabled": True, **capture})
    return base.model_copy(update={"capture": cfg})


def kw_first_byte(capture: dict[str, Any]) -> float:
    return float(capture.pop("first_byte", 5))


class Gw:
    """A gateway with capture on, and what it stored."""

    def __init__(self, running: Running, state: Path) -> None:
        self.running, self.state = running, state

    @property
    def gw(self) -> Gateway:
        return self.running.gw

    async def post(
        self, body: dict[str, Any] | bytes, key: str = ALPHA_KEY, **headers: str
    ) -> tuple[int, bytes, str]:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        hdrs = {**auth(key), "content-type": "application/json", **headers}
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{self.running.url}/v1/responses", data=data, headers=hdrs) as r,
        ):
            try:
                raw = await r.read()
            except aiohttp.ClientPayloadError:
                raw = b""
            return r.status, raw, r.headers["x-request-id"]

    async def capture(self, request_id: str) -> dict[str, Any] | None:
        await asyncio.sleep(0.05)  # the request's finish runs after its last byte
        return await self.gw.captures.capture(request_id)

    def counted(self, reason: str) -> float:
        return self.gw.metrics.captures.labels(reason)._value.get()

    async def stored_bytes(self) -> bytes:
        await self.gw.captures.flush()
        return b"".join(p.read_bytes() for p in self.state.glob("ledger.sqlite3*"))


@pytest.fixture
async def start(echo: str, tmp_path: Path) -> AsyncIterator[Any]:
    started: list[Running] = []

    async def start_(**capture: Any) -> Gw:
        state = tmp_path / f"state{len(started)}"
        running = await start_gateway(settings_with(echo, state, **capture))
        started.append(running)
        return Gw(running, state)

    yield start_
    for running in started:
        await running.stop()


def ask(text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "nusantara-base", "input": text, **extra}


async def test_a_sampled_request_keeps_request_answer_and_attempts(start: Any) -> None:
    g = await start(sample_ratio=1.0, errors=False)
    status, raw, rid = await g.post(ask("what is a gateway"), **{"x-note": "kept"})
    assert status == 200
    cap = await g.capture(rid)
    assert cap is not None
    assert cap["request_id"] == rid and cap["reason"] == "sampled" and cap["team"] == "alpha"
    req = cap["request"]
    assert req["method"] == "POST" and req["path"] == "/v1/responses"
    assert orjson.loads(req["body"]) == ask("what is a gateway")
    names = {k.lower() for k, _ in req["headers"]}
    assert "x-note" in names and "authorization" not in names
    ans = cap["answer"]
    assert ans["status"] == 200 and ans["complete"] and not ans["body_cut"]
    assert orjson.loads(ans["body"]) == orjson.loads(raw)
    assert [(a["upstream"], a["status"], a["outcome"]) for a in cap["attempts"]] == [
        ("mock", 200, "ok")
    ]
    assert cap["attempts"][0]["duration_ms"] > 0
    assert g.counted("sampled") == 1 and g.counted("error") == 0


async def test_ratio_zero_or_capture_off_keeps_nothing(start: Any, echo: str) -> None:
    g = await start(sample_ratio=0.0, errors=False)
    _, _, rid = await g.post(ask())
    assert await g.capture(rid) is None
    assert g.counted("sampled") == 0
    off = await start(enabled=False, sample_ratio=1.0)
    _, _, rid = await off.post(ask())
    assert await off.capture(rid) is None


async def test_only_teams_matching_the_globs_are_captured(start: Any) -> None:
    g = await start(sample_ratio=1.0, teams=["be*"])
    _, _, alpha = await g.post(ask())
    status, _, beta = await g.post({"model": "garda-1", "input": "hi"}, key=BETA_KEY)
    assert status == 200
    assert await g.capture(alpha) is None
    found = await g.capture(beta)
    assert found is not None and found["team"] == "beta"


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        pytest.param(ask(), {"x-test-status": "400"}, 400, id="upstream-4xx"),
        pytest.param(ask(), {"x-test-status": "503"}, 503, id="upstream-5xx"),
        pytest.param(b'{"model": ', {}, 400, id="gateway-4xx"),
        pytest.param(ask(), {"x-test-sleep": "1"}, 504, id="timeout"),
    ],
)
async def test_every_error_is_captured_though_not_sampled(
    start: Any, body: Any, headers: dict[str, str], status: int
) -> None:
    g = await start(sample_ratio=0.0, errors=True, first_byte=0.3)
    got, raw, rid = await g.post(body, **headers)
    assert got == status
    cap = await g.capture(rid)
    assert cap is not None and cap["reason"] == "error"
    assert cap["answer"]["status"] == status
    assert orjson.loads(cap["answer"]["body"]) == orjson.loads(raw)
    assert g.counted("error") == 1
    _, _, fine = await g.post(ask())
    assert await g.capture(fine) is None  # a success is not kept


async def test_an_interrupted_stream_is_captured_as_an_error(start: Any) -> None:
    g = await start(sample_ratio=0.0, errors=True)
    status, _, rid = await g.post(
        ask("a long answer that breaks", stream=True), **{"x-test-cut": "1"}
    )
    assert status == 200
    cap = await g.capture(rid)
    assert cap is not None and cap["reason"] == "error"
    assert cap["answer"]["complete"] is False
    assert cap["answer"]["output_text"] == "a long ans"  # two deltas, then the cut


async def test_a_stream_keeps_its_sse_bytes_as_relayed_and_its_text(start: Any) -> None:
    g = await start(sample_ratio=1.0)
    status, raw, rid = await g.post(ask("streamed words here", stream=True))
    assert status == 200
    cap = await g.capture(rid)
    assert cap is not None
    assert cap["answer"]["sse"] == raw.decode()
    assert cap["answer"]["output_text"] == "streamed words here"


async def test_bodies_over_the_cap_are_cut_and_marked(start: Any) -> None:
    g = await start(sample_ratio=1.0, max_body_bytes=200)
    _, raw, rid = await g.post(ask("x" * 1000))
    cap = await g.capture(rid)
    assert cap is not None
    req, ans = cap["request"], cap["answer"]
    assert req["body_cut"] is True and len(req["body"].encode()) == 200
    assert req["body_bytes"] == len(orjson.dumps(ask("x" * 1000)))
    assert ans["body_cut"] is True and len(ans["body"].encode()) == 200
    assert raw.decode().startswith(ans["body"])
    small = await start(sample_ratio=1.0, max_body_bytes=10_000)
    _, _, rid = await small.post(ask("short"))
    cap = await small.capture(rid)
    assert cap is not None and not cap["request"]["body_cut"] and not cap["answer"]["body_cut"]


SECRETS = (ALPHA_KEY, UPSTREAM_KEY, "acct-123456")


async def assert_nothing_secret_stored(g: Gw) -> None:
    stored = await g.stored_bytes()
    assert stored  # the captures are in the file
    for secret in SECRETS:
        assert secret.encode() not in stored


async def test_keys_in_prompt_header_and_answer_never_reach_the_store(start: Any) -> None:
    g = await start(sample_ratio=1.0, redact=[r"acct-[0-9]{6}"])
    prompt = f"my key is {ALPHA_KEY}, theirs {UPSTREAM_KEY}, account acct-123456"
    # a key in a header, and an answer that echoes every one of them
    status, _, rid = await g.post(ask(prompt), **{"x-note": ALPHA_KEY})
    assert status == 200
    cap = await g.capture(rid)
    assert cap is not None
    assert dict(cap["request"]["headers"])["x-note"] == MARK
    assert orjson.loads(cap["request"]["body"])["input"] == (
        f"my key is {MARK}, theirs {MARK}, account {MARK}"
    )
    assert MARK in cap["answer"]["body"]
    await assert_nothing_secret_stored(g)


async def test_a_key_split_across_stream_chunks_and_deltas_never_reaches_the_store(
    start: Any,
) -> None:
    g = await start(sample_ratio=1.0, redact=[r"acct-[0-9]{6}"])
    prompt = f"echo {ALPHA_KEY} and acct-123456"
    status, raw, rid = await g.post(ask(prompt, stream=True))
    assert status == 200 and ALPHA_KEY[:5].encode() in raw  # the client got its own key back
    cap = await g.capture(rid)
    assert cap is not None
    assert cap["answer"]["output_text"] == f"echo {MARK} and {MARK}"
    # only the joined text shows the key whole: the events are withheld
    assert cap["answer"]["sse"] is None and cap["answer"]["sse_withheld"]
    await assert_nothing_secret_stored(g)


async def test_an_upstream_key_split_across_chunks_is_stored_as_masked_for_the_client(
    start: Any,
) -> None:
    g = await start(sample_ratio=1.0)
    status, raw, rid = await g.post(ask("x", stream=True), **{"x-test-echo": f"k {UPSTREAM_KEY}"})
    assert status == 200 and UPSTREAM_KEY.encode() not in raw
    cap = await g.capture(rid)
    assert cap is not None
    assert cap["answer"]["sse"] == raw.decode()  # the masked bytes, as relayed
    assert UPSTREAM_KEY not in cap["answer"]["output_text"]
    stored = await g.stored_bytes()
    assert UPSTREAM_KEY.encode() not in stored


async def test_trace_content_and_captures_redact_alike(start: Any) -> None:
    g = await start(sample_ratio=1.0, redact=[r"acct-[0-9]{6}"])
    prompt = f"key {ALPHA_KEY} upstream {UPSTREAM_KEY} acct-123456 and sk-{'a' * 30}"
    _, _, rid = await g.post(ask(prompt))
    cap = await g.capture(rid)
    assert cap is not None
    policy = g.gw.policy
    attrs = g.gw.tracing.content_attributes(ask(prompt), policy.redactor)
    traced = orjson.loads(attrs["gen_ai.input.messages"])[0]["parts"][0]["content"]
    captured = orjson.loads(cap["request"]["body"])["input"]
    assert traced == captured == f"key {MARK} upstream {MARK} {MARK} and {MARK}"


async def test_a_cache_hit_is_captured_with_what_the_client_got(echo: str, tmp_path: Path) -> None:
    settings = settings_with(echo, tmp_path / "s", sample_ratio=1.0)
    settings = settings.model_copy(
        update={"cache": settings.cache.model_copy(update={"enabled": True})}
    )
    running = await start_gateway(settings)
    try:
        g = Gw(running, tmp_path / "s")
        await g.post(ask("cached"))
        status, raw, rid = await g.post(ask("cached"))
        assert status == 200
        cap = await g.capture(rid)
        assert cap is not None
        assert dict(cap["answer"]["headers"])["x-gateway-cache"] == "hit"
        assert orjson.loads(cap["answer"]["body"]) == orjson.loads(raw)
        assert cap["attempts"] == []
    finally:
        await running.stop()


class DownStore:
    """A capture store whose database is gone: every write fails."""

    async def start(self) -> None:
        raise OSError("down")

    async def close(self) -> None:
        return None

    async def write(self, rows: Sequence[Row]) -> None:
        raise OSError("down")

    async def purge(self, before: float) -> int:
        raise OSError("down")

    async def capture(self, request_id: str) -> dict[str, Any] | None:
        return None

    async def captured(self, request_ids: Sequence[str]) -> frozenset[str]:
        return frozenset()


async def test_a_store_that_is_down_costs_captures_never_requests(
    echo: str, tmp_path: Path
) -> None:
    settings = settings_with(echo, tmp_path / "s", sample_ratio=1.0)
    gw = Gateway(settings)
    gw.captures.store = DownStore()
    running = await start_gateway(settings, gw)
    try:
        g = Gw(running, tmp_path / "s")
        for _ in range(3):
            status, _, _ = await g.post(ask())
            assert status == 200
        await gw.captures.flush()
        assert gw.metrics.captures_dropped._value.get() == 3
    finally:
        await running.stop()


@pytest.mark.postgres
async def test_captures_land_in_the_postgres_ledger_database(echo: str, tmp_path: Path) -> None:
    async with postgres_database() as url:
        settings = settings_with(echo, tmp_path / "s", sample_ratio=1.0)
        settings = settings.model_copy(
            update={"ledger": settings.ledger.model_copy(update={"url": url})}
        )
        running = await start_gateway(settings)
        try:
            g = Gw(running, tmp_path / "s")
            _, _, rid = await g.post(ask(f"pg {ALPHA_KEY}"))
            assert isinstance(g.gw.captures.store, PostgresCaptures)
            await asyncio.sleep(0.05)
            await g.gw.captures.flush()
        finally:
            await running.stop()
        other = PostgresCaptures(url)  # another replica reads it
        try:
            cap = await other.capture(rid)
        finally:
            await other.close()
        assert cap is not None
        assert orjson.loads(cap["request"]["body"])["input"] == f"pg {MARK}"


def test_sqlite_is_the_default_store(tmp_path: Path) -> None:
    gw = Gateway(settings_with("http://127.0.0.1:1", tmp_path))
    assert isinstance(gw.captures.store, SqliteCaptures)


async def test_a_websocket_response_is_captured_like_a_stream(start: Any) -> None:
    g = await start(sample_ratio=1.0)
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{g.running.url}/v1/responses", headers=auth())
        event = {"type": "response.create", **ask(f"over a socket {ALPHA_KEY}")}
        await ws.send_str(orjson.dumps(event).decode())
        async with asyncio.timeout(10):
            while (orjson.loads((await ws.receive()).data))["type"] != "response.completed":
                pass
        await ws.close()
    await asyncio.sleep(0.1)
    await g.gw.captures.flush()
    store = g.gw.captures.store
    assert isinstance(store, SqliteCaptures)
    (rid,) = await store._run(
        lambda: [r[0] for r in store._connection().execute("SELECT request_id FROM captures")]
    )
    cap = await g.capture(rid)
    assert cap is not None and cap["request"]["method"] == "POST"
    assert orjson.loads(cap["request"]["body"])["input"] == f"over a socket {MARK}"
    assert cap["answer"]["output_text"] == f"over a socket {MARK}"
    await assert_nothing_secret_stored(g)


async def test_the_admin_api_shows_a_request_with_its_capture(start: Any) -> None:
    g = await start(sample_ratio=1.0)
    _, _, rid = await g.post(ask(f"admin sees {ALPHA_KEY}"))
    await asyncio.sleep(0.05)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{g.running.admin_url}/admin/requests/{rid}", headers=admin) as r:
            assert r.status == 200
            one = await r.json()
        async with s.get(f"{g.running.admin_url}/admin/requests?limit=5", headers=admin) as r:
            listed = (await r.json())["requests"]
    assert one["request_id"] == rid
    assert orjson.loads(one["capture"]["request"]["body"])["input"] == f"admin sees {MARK}"
    assert [(x["request_id"], x["captured"]) for x in listed] == [(rid, True)]
