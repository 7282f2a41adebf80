"""`POST /admin/requests/{id}/replay`: a captured request sent again as its team, through the
whole pipeline but never the cache, charged and marked as a replay in the ledger."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import sys
import time
import types
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from conftest import (
    ADMIN_KEY,
    ALPHA_KEY,
    BETA_KEY,
    Running,
    Upstream,
    auth,
    free_port,
    ledger_rows,
    make_settings,
    start_app,
    start_gateway,
)

from gateway.backends import LEDGER_FILE
from gateway.capture import writer as capture_writer
from gateway.cli_replay import DIFF_LINES, _message, output_diff, side_by_side
from gateway.cli_run import shut_down
from gateway.output_text import from_sse
from gateway.settings import Capture
from gateway.telemetry.metrics import Metrics

BODY = {"model": "nusantara-base", "input": "Tell me about the harbor.", "max_output_tokens": 24}
RESPONSES = "POST /v1/responses"


async def gateway_with(
    upstream: Upstream, tmp_path: Path, capture: dict[str, Any] | None = None, **kw: Any
) -> Running:
    settings = make_settings(upstream.url, tmp_path / "state", **kw)
    if capture is not None:
        cfg = Capture.model_validate({"enabled": True, "sample_ratio": 1.0, **capture})
        settings = settings.model_copy(update={"capture": cfg})
    return await start_gateway(settings)


@pytest.fixture
async def running(upstream: Upstream, tmp_path: Path) -> Any:
    gw = await gateway_with(upstream, tmp_path, {}, alpha_budgets="[{tokens: 100000, per: day}]")
    yield gw
    await gw.stop()


async def send(
    gateway: Running, body: dict[str, Any], key: str = ALPHA_KEY, **headers: str
) -> tuple[str, bytes, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{gateway.url}/v1/responses", json=body, headers={**auth(key), **headers}) as r,
    ):
        raw = await r.read()
        assert r.status == 200, raw
        return r.headers["x-request-id"], raw, {k.lower(): v for k, v in r.headers.items()}


async def replay(gateway: Running, request_id: str, key: str = ADMIN_KEY) -> tuple[int, Any]:
    await asyncio.sleep(0.05)  # the original's finish runs just after its last byte
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{gateway.admin_url}/admin/requests/{request_id}/replay", headers=auth(key)) as r,
    ):
        return r.status, await r.json()


async def row_of(gateway: Running, request_id: str) -> dict[str, Any]:
    rows = [r for r in await ledger_rows(gateway) if r["request_id"] == request_id]
    assert len(rows) == 1
    return rows[0]


async def test_a_json_request_replayed_gives_the_same_answer_and_is_charged(
    running: Running, upstream: Upstream
) -> None:
    original, raw, _ = await send(running, BODY, **{"x-gateway-user": "ana"})
    text = orjson.loads(raw)["output"][0]["content"][0]["text"]
    assert upstream.state.calls[RESPONSES] == 1
    status, got = await replay(running, original)
    assert status == 200, got
    assert upstream.state.calls[RESPONSES] == 2  # sent again, not answered from anywhere
    assert got["replay_of"] == original and got["request_id"] != original
    assert got["status"] == 200 and got["error"] is None and not got["streamed"]
    assert got["output"] == text == got["original"]["output"]  # the mock is deterministic
    assert got["usage"] == got["original"]["usage"] and got["usage"]["output_tokens"] > 0
    assert got["cost_usd"] == got["original"]["cost_usd"] > 0
    assert got["latency_ms"] > 0 and got["original"]["status"] == 200
    assert orjson.loads(got["body"])["output"][0]["content"][0]["text"] == text
    new = await row_of(running, got["request_id"])
    old = await row_of(running, original)
    # its own record: the team's, charged as the original was, attributed alike, a replay
    assert new["replay_of"] == original and old["replay_of"] == ""
    assert new["team"] == "alpha" and new["user"] == "ana" and new["key_id"] == old["key_id"]
    assert new["charged_tokens"] == old["charged_tokens"] > 0
    assert new["first_byte_ms"] is not None and 0 < new["first_byte_ms"] <= new["duration_ms"]
    # the budget counted both
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{running.admin_url}/admin/teams", headers=auth(ADMIN_KEY)) as r,
    ):
        teams = await r.json()
    alpha = next(t for t in teams["teams"] if t["team"] == "alpha")
    assert alpha["budgets"][0]["used"] == 2 * old["charged_tokens"]


async def test_a_streamed_request_replayed_gives_the_same_text(
    running: Running, upstream: Upstream
) -> None:
    original, raw, headers = await send(running, {**BODY, "stream": True})
    assert headers["content-type"].startswith("text/event-stream")
    status, got = await replay(running, original)
    assert status == 200, got
    assert got["streamed"] and got["original"]["streamed"] and got["body"] is None
    assert got["output"] and got["output"] == got["original"]["output"]
    assert got["output"] == from_sse(raw)  # what the client assembled
    assert got["usage"] == got["original"]["usage"]
    assert (await row_of(running, got["request_id"]))["stream"] == 1


async def test_a_replay_never_comes_from_the_cache(upstream: Upstream, tmp_path: Path) -> None:
    gateway = await gateway_with(upstream, tmp_path, {}, cache="true")
    try:
        original, _, first = await send(gateway, BODY)
        _, _, second = await send(gateway, BODY)
        assert (first["x-gateway-cache"], second["x-gateway-cache"]) == ("miss", "hit")
        assert upstream.state.calls[RESPONSES] == 1
        status, got = await replay(gateway, original)
        assert status == 200 and got["status"] == 200
        assert upstream.state.calls[RESPONSES] == 2
        assert (await row_of(gateway, got["request_id"]))["cache"] == "bypass"
        # nor stored in it: a third identical request is still the first answer's hit
        _, _, third = await send(gateway, BODY)
        assert third["x-gateway-cache"] == "hit" and upstream.state.calls[RESPONSES] == 2
    finally:
        await gateway.stop()


async def test_a_replay_of_a_replay_names_the_one_it_replays(running: Running) -> None:
    original, _, _ = await send(running, BODY)
    _, first = await replay(running, original)
    status, second = await replay(running, first["request_id"])
    assert status == 200 and second["replay_of"] == first["request_id"]
    assert second["output"] == first["output"]


async def test_a_replay_is_refused_by_the_team_budget(upstream: Upstream, tmp_path: Path) -> None:
    gateway = await gateway_with(upstream, tmp_path, {}, alpha_budgets="[{requests: 1, per: day}]")
    try:
        original, _, _ = await send(gateway, BODY)
        status, got = await replay(gateway, original)
        # the admin call worked; the replayed request was refused as any request would be
        assert status == 200
        assert got["status"] == 429 and got["error"] == "budget_exceeded"
        assert orjson.loads(got["body"])["error"]["code"] == "budget_exceeded"
        assert upstream.state.calls[RESPONSES] == 1
        assert (await row_of(gateway, got["request_id"]))["replay_of"] == original
    finally:
        await gateway.stop()


async def test_unknown_uncaptured_and_unauthorised(upstream: Upstream, tmp_path: Path) -> None:
    gateway = await gateway_with(upstream, tmp_path)  # capture off
    try:
        original, _, _ = await send(gateway, BODY)
        status, got = await replay(gateway, original)
        assert status == 409 and got["error"]["code"] == "not_captured"
        for unknown in ("req_nope", "a%20b", "x" * 200):
            status, got = await replay(gateway, unknown)
            assert status == 404 and got["error"]["code"] == "not_found"
        status, got = await replay(gateway, original, key="wrong-admin-key")
        assert status == 401
        assert upstream.state.calls[RESPONSES] == 1
    finally:
        await gateway.stop()


async def test_a_cut_body_is_not_sent(upstream: Upstream, tmp_path: Path) -> None:
    gateway = await gateway_with(upstream, tmp_path, {"max_body_bytes": 64})
    try:
        original, _, _ = await send(gateway, {**BODY, "input": "long " * 100})
        status, got = await replay(gateway, original)
        assert status == 409 and got["error"]["code"] == "capture_cut"
        assert upstream.state.calls[RESPONSES] == 1
    finally:
        await gateway.stop()


async def test_only_generations_are_replayed(running: Running, upstream: Upstream) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{running.url}/v1/models", headers=auth()) as r,
    ):
        assert r.status == 200
        listing = r.headers["x-request-id"]
    status, got = await replay(running, listing)
    assert status == 409 and got["error"]["code"] == "not_replayable"


async def test_a_redacted_body_is_sent_as_stored_and_flagged(
    upstream: Upstream, tmp_path: Path
) -> None:
    gateway = await gateway_with(upstream, tmp_path, {"redact": [r"acct-\d+"]})
    try:
        original, _, _ = await send(gateway, {**BODY, "input": "my account is acct-12345"})
        status, got = await replay(gateway, original)
        assert status == 200 and got["redacted_input"] is True
        sent = upstream.state.requests[-1].body
        assert b"acct-12345" not in sent and b"[REDACTED]" in sent
    finally:
        await gateway.stop()


async def test_the_original_attribution_and_headers_go_again_without_credentials(
    running: Running, upstream: Upstream
) -> None:
    original, _, _ = await send(
        running,
        BODY,
        **{"x-gateway-tags": "feature=search", "openai-beta": "x", "x-request-id": "mine-1"},
    )
    assert original == "mine-1"
    status, got = await replay(running, original)
    assert status == 200 and got["request_id"] != "mine-1"
    sent = upstream.state.requests[-1]
    assert sent.headers.get("openai-beta") == "x"
    assert ALPHA_KEY not in str(sent.headers) and "mine-1" not in str(sent.headers)
    new = await row_of(running, got["request_id"])
    assert orjson.loads(new["tags"]) == {"feature": "search"}


async def test_a_removed_team_is_not_replayed(running: Running) -> None:
    original, _, _ = await send(running, BODY)
    settings = running.gw.policy.settings
    teams = tuple(t for t in settings.teams if t.name != "alpha")
    await running.gw.reload(settings.model_copy(update={"teams": teams}))
    status, got = await replay(running, original)
    assert status == 409 and got["error"]["code"] == "team_unknown"


async def gateway_cli(*args: str, key: str | None = ADMIN_KEY) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    if key is not None:
        env["GATEWAY_ADMIN_KEY"] = key
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_gateway_replay_prints_both_answers(running: Running) -> None:
    original, _, _ = await send(running, BODY)
    await asyncio.sleep(0.05)
    code, out, err = await gateway_cli("replay", original, "--admin", running.admin_url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["captured", "replayed"]
    assert lines[1].split()[1] == original and lines[1].split()[2].startswith("req_")
    assert lines[2].split() == ["status", "200", "200"]
    assert "output text: the same" in out
    code, out, err = await gateway_cli(
        "replay", original, "--admin", running.admin_url, "--format", "json"
    )
    assert code == 0 and orjson.loads(out)["replay_of"] == original


async def test_gateway_replay_says_what_went_wrong(running: Running) -> None:
    code, _, err = await gateway_cli("replay", "req_nope", "--admin", running.admin_url)
    assert code == 1 and "404: not_found" in err
    code, _, err = await gateway_cli("replay", "req_nope", "--admin", running.admin_url, key="bad")
    assert code == 1 and "401" in err
    code, _, err = await gateway_cli("replay", "req_nope", "--admin", running.admin_url, key=None)
    assert code == 2 and "admin key" in err
    code, _, err = await gateway_cli("replay", "x", "--admin", "ftp://h")
    assert code == 2
    closed = f"http://127.0.0.1:{free_port()}"
    code, _, err = await gateway_cli("replay", "req_nope", "--admin", closed)
    assert code == 1 and "cannot reach" in err and ADMIN_KEY not in err
    # credentials in the URL: one line, and the password is not printed
    with_password = running.admin_url.replace("http://", "http://ops:hunter2@")
    code, _, err = await gateway_cli("replay", "req_nope", "--admin", with_password)
    assert code == 1 and err.count("\n") == 1 and "hunter2" not in err and "Traceback" not in err


def test_the_diff_shows_what_changed() -> None:
    assert output_diff("same", "same") == "output text: the same (4 characters)"
    diff = output_diff("The harbor at dawn is quiet.", "The harbor at dusk is loud.")
    assert diff.startswith("output text differs:")
    assert "-The harbor at dawn is quiet." in diff and "+The harbor at dusk is loud." in diff
    long_old = " ".join(["word"] * 40 + ["alpha"] + ["word"] * 40)
    long_new = long_old.replace("alpha", "omega")
    changed = [ln for ln in output_diff(long_old, long_new).splitlines() if ln[:1] in "+-"]
    # a long one-line output is compared in wrapped pieces: only the piece that changed shows
    assert len([ln for ln in changed if not ln.startswith(("---", "+++"))]) == 2


async def test_no_replay_during_a_drain(running: Running, upstream: Upstream) -> None:
    original, _, _ = await send(running, BODY)
    running.gw.draining = True
    try:
        status, got = await replay(running, original)
    finally:
        running.gw.draining = False
    assert status == 503 and got["error"]["code"] == "shutting_down"
    assert upstream.state.calls[RESPONSES] == 1


async def test_first_byte_is_recorded_for_streams_and_refusals(running: Running) -> None:
    streamed, _, _ = await send(running, {**BODY, "stream": True})
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{running.url}/v1/responses", data=b"{not json", headers=auth()) as r,
    ):
        assert r.status == 400
        refused = r.headers["x-request-id"]
    for request_id in (streamed, refused):
        row = await row_of(running, request_id)
        assert row["first_byte_ms"] is not None
        assert 0 < row["first_byte_ms"] <= row["duration_ms"]
    # a stream's head goes out before its last byte, and before its first token
    row = await row_of(running, streamed)
    assert row["first_byte_ms"] <= row["ttft_ms"]


async def test_a_shared_request_id_never_replays_one_teams_capture_as_another(
    upstream: Upstream, tmp_path: Path
) -> None:
    """A client-sent x-request-id can be another team's too: the newest record of the id
    (beta's, not captured) is not paired with alpha's capture, neither to replay nor to show."""
    gateway = await gateway_with(upstream, tmp_path, {"teams": ["alpha"]})
    try:
        mini = {**BODY, "model": "garda-beta-mini"}  # a model both teams may use
        secret = {**mini, "input": "ALPHA-CONFIDENTIAL plan"}
        assert (await send(gateway, secret, ALPHA_KEY, **{"x-request-id": "job-42"}))[0] == "job-42"
        await send(gateway, {**mini, "input": "beta hello"}, BETA_KEY, **{"x-request-id": "job-42"})
        calls = upstream.state.calls[RESPONSES]
        status, got = await replay(gateway, "job-42")
        assert status == 409 and got["error"]["code"] == "not_captured"
        assert upstream.state.calls[RESPONSES] == calls
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{gateway.admin_url}/admin/requests/job-42", headers=auth(ADMIN_KEY)) as r,
        ):
            shown = await r.json()
        assert shown["team"] == "beta" and shown["capture"] is None
    finally:
        await gateway.stop()


async def test_a_request_refused_before_its_body_was_read_is_not_sent_empty(
    upstream: Upstream, tmp_path: Path
) -> None:
    gateway = await gateway_with(upstream, tmp_path, {"sample_ratio": 0.0, "errors": True})
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{gateway.url}/v1/responses", json=BODY, headers=auth(BETA_KEY)) as r,
        ):
            assert r.status == 403  # beta may not use this model
            original = r.headers["x-request-id"]
        status, got = await replay(gateway, original)
        assert status == 409 and got["error"]["code"] == "body_not_captured"
        assert upstream.state.calls[RESPONSES] == 0
    finally:
        await gateway.stop()


async def test_a_request_of_a_revoked_key_is_not_sent_again(
    upstream: Upstream, tmp_path: Path
) -> None:
    gateway = await gateway_with(upstream, tmp_path, {})
    try:
        original, _, _ = await send(gateway, BODY)
        settings = gateway.gw.policy.settings
        rotated = (hashlib.sha256(b"key-alpha-rotated-0123").digest(),)
        teams = tuple(
            t.model_copy(update={"key_digests": rotated}) if t.name == "alpha" else t
            for t in settings.teams
        )
        await gateway.gw.reload(settings.model_copy(update={"teams": teams}))
        status, got = await replay(gateway, original)
        assert status == 409 and got["error"]["code"] == "key_revoked"
        assert upstream.state.calls[RESPONSES] == 1
    finally:
        await gateway.stop()


async def test_a_replay_is_held_to_the_current_body_limit(
    upstream: Upstream, tmp_path: Path
) -> None:
    gateway = await gateway_with(upstream, tmp_path, {})
    try:
        original, _, _ = await send(gateway, {**BODY, "input": "x" * 4000})
        settings = gateway.gw.policy.settings
        limits = settings.limits.model_copy(update={"max_body_bytes": 1000})
        await gateway.gw.reload(settings.model_copy(update={"limits": limits}))
        status, got = await replay(gateway, original)
        assert status == 200 and got["status"] == 413 and got["error"] == "request_too_large"
        assert upstream.state.calls[RESPONSES] == 1
    finally:
        await gateway.stop()


async def test_a_graceful_stop_keeps_the_record_of_a_replay_under_way(tmp_path: Path) -> None:
    """The admin listener closes before the Gateway: a replay still waiting on its upstream
    ends, and its ledger record is written, while the ledger is open."""
    calls = 0

    async def slow_after_first(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        await request.read()
        if calls > 1:  # the replay: past the drain and the client listener's stop grace
            await asyncio.sleep(5)
        body = orjson.dumps(
            {
                "id": f"resp_{calls}",
                "object": "response",
                "status": "completed",
                "model": "nusantara-base",
                "output": [],
                "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
            }
        )
        return web.Response(body=body, content_type="application/json")

    url, up_runner = await start_app(slow_after_first)
    gateway = await gateway_with(
        Upstream(url, None, up_runner),  # type: ignore[arg-type]
        tmp_path,
        {},
        drain=0.5,
        first_byte=20,
        idle=20,
    )
    try:
        original, _, _ = await send(gateway, BODY)
        replaying = asyncio.ensure_future(replay(gateway, original))
        await asyncio.sleep(0.5)  # the replay waits on the upstream
        await shut_down(gateway.gw, gateway.runner, gateway.admin_runner)
        await asyncio.gather(replaying, return_exceptions=True)
    finally:
        await up_runner.cleanup()
    with sqlite3.connect(tmp_path / "state" / LEDGER_FILE) as conn:
        rows = conn.execute("SELECT replay_of FROM ledger").fetchall()
    assert (original,) in rows


async def test_a_read_while_a_batch_is_written_waits_for_it(monkeypatch: Any) -> None:
    """Two readers: the second must not find the queue empty and read the store before the
    batch the first one's flush is writing lands in it."""

    class SlowStore:
        def __init__(self) -> None:
            self.rows: dict[str, str] = {}

        async def start(self) -> None: ...

        async def close(self) -> None: ...

        async def write(self, rows: Any) -> None:
            await asyncio.sleep(0.2)
            self.rows.update((r[0], r[4]) for r in rows)

        async def purge(self, before: float) -> int:
            return 0

        async def capture(self, request_id: str) -> Any:
            doc = self.rows.get(request_id)
            return orjson.loads(doc) if doc else None

        async def captured(self, ids: Any) -> frozenset[str]:
            return frozenset(i for i in ids if i in self.rows)

    monkeypatch.setattr(
        capture_writer,
        "_render_all",
        lambda batch: [(d.request_id, 0.0, "alpha", "sampled", "{}") for d in batch],
    )
    w = capture_writer.CaptureWriter(SlowStore(), Metrics(100), 3600, lambda: 0.0, interval=60)
    w.submit(types.SimpleNamespace(request_id="req_1", reason="sampled"))  # type: ignore[arg-type]
    first = asyncio.ensure_future(w.capture("req_1"))
    await asyncio.sleep(0.05)  # the first reader's flush is writing the batch
    assert await w.capture("req_1") is not None
    assert await first is not None


def test_the_cli_shows_control_characters_never_sends_them_to_the_terminal() -> None:
    evil = "fine\x1b]52;c;ZWNobyBwd25lZA==\x07\x1b[2J\x1b[Houtput text: the same\u202e"
    old = {"request_id": "req_old", "status": 200, "latency_ms": 1.0, "usage": None}
    old |= {"cost_usd": 0.0, "streamed": False, "output": "fine"}
    result = {**old, "request_id": "req_new", "error": None, "output": evil, "original": old}
    printed = side_by_side(result)
    assert not any(c in printed for c in "\x1b\x07\u202e")
    assert "\\x1b]52;c;" in printed  # written out, so the operator sees what came
    assert "\x1b" not in _message("<html>\x1b]0;owned\x07\x1b[31mBad gateway</html>")


def test_the_diff_of_a_long_repeating_output_is_bounded() -> None:
    n = 12000
    old = "\n".join(f"row {i % 300}" for i in range(n))
    new = "\n".join(f"row {(i * 7) % 300}" for i in range(n))
    started = time.process_time()
    shown = output_diff(old, new)
    assert f"the first {DIFF_LINES} lines" in shown.splitlines()[0]
    # a bound, not a timing target: without one this diff takes about 10 s of CPU
    assert time.process_time() - started < 5
