"""The capture rule's draw and the writer's bounds: a full queue drops and counts, old
captures are deleted, and drafts are rendered off the request path."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from gateway.capture.draft import Draft, Row, render
from gateway.capture.rule import CaptureRule
from gateway.capture.sqlite import SqliteCaptures
from gateway.capture.tap import SLACK, CaptureTap
from gateway.capture.writer import CaptureWriter
from gateway.redact import MARK, Redactor
from gateway.settings import Capture
from gateway.telemetry.metrics import Metrics


def rule(ratio: float, seed: int = 7, **kw: object) -> CaptureRule:
    cfg = Capture.model_validate({"enabled": True, "sample_ratio": ratio, "errors": False, **kw})
    return CaptureRule(cfg, random.Random(seed).random)


def admitted(r: CaptureRule, n: int = 10_000) -> int:
    return sum(r.admit("alpha", "POST", "/v1/responses", {}) is not None for _ in range(n))


def test_ratio_zero_never_and_one_always() -> None:
    assert admitted(rule(0.0)) == 0
    assert admitted(rule(1.0)) == 10_000


def test_a_seeded_draw_samples_its_share_and_repeats() -> None:
    first = admitted(rule(0.25, seed=3))
    assert 2300 < first < 2700
    assert admitted(rule(0.25, seed=3)) == first  # the same seed, the same requests


def test_with_errors_on_every_request_gets_a_tap_but_only_the_drawn_are_sampled() -> None:
    cfg = Capture.model_validate({"enabled": True, "sample_ratio": 0.5, "errors": True})
    r = CaptureRule(cfg, random.Random(1).random)
    taps = [r.admit("alpha", "POST", "/", {}) for _ in range(1000)]
    assert all(t is not None for t in taps)
    assert 400 < sum(t.sampled for t in taps if t is not None) < 600


def test_the_tap_holds_the_cap_plus_slack_and_marks_the_cut() -> None:
    tap = CaptureTap(True, 10, "POST", "/", {})
    tap.head(200, {})
    for _ in range(200):
        tap.chunk(b"abcdefgh")
    assert tap.cut and tap.size == 10 + SLACK
    whole = CaptureTap(True, 10, "POST", "/", {})
    whole.chunk(b"0123456789")
    assert not whole.cut


def test_a_key_across_the_cut_is_redacted_not_half_kept() -> None:
    key = "sk-" + "k" * 40
    body = b"x" * 89 + b" " + key.encode() + b" " + b"y" * 200
    tap = CaptureTap(True, 100, "POST", "/", {})
    tap.head(200, {})
    tap.chunk(body)
    doc = orjson.loads(render(draft(tap, Redactor()))[4])
    assert doc["answer"]["body"] == "x" * 89 + " " + MARK and doc["answer"]["body_cut"]


def draft(tap: CaptureTap, redactor: Redactor, rid: str = "req-1", ts: float = 100.0) -> Draft:
    return Draft(
        request_id=rid,
        ts=ts,
        team="alpha",
        trace_id="0" * 32,
        reason="sampled",
        tap=tap,
        body=b'{"input": "hi"}',
        body_size=15,
        status=tap.status,
        error=None,
        streamed=False,
        started=0.0,
        ended=0.0,
        attempts=(),
        redactor=redactor,
    )


def a_tap() -> CaptureTap:
    tap = CaptureTap(True, 1000, "POST", "/v1/responses", {"authorization": "Bearer x"})
    tap.head(200, {"content-type": "application/json"})
    tap.chunk(b'{"ok": true}')
    return tap


async def test_a_full_queue_drops_and_counts_never_waits(tmp_path: Path) -> None:
    metrics = Metrics(10)
    writer = CaptureWriter(
        SqliteCaptures(tmp_path / "l.sqlite3"), metrics, 60.0, lambda: 100.0, max_queued=2
    )
    # not started: nothing drains the queue
    results = [writer.submit(draft(a_tap(), Redactor(), f"req-{i}")) for i in range(5)]
    assert results == [True, True, False, False, False]
    assert metrics.captures_dropped._value.get() == 3
    assert metrics.captures.labels("sampled")._value.get() == 2
    await writer.start()
    await writer.close()


async def test_captures_older_than_retention_are_deleted(tmp_path: Path) -> None:
    now = [1000.0]
    writer = CaptureWriter(
        SqliteCaptures(tmp_path / "l.sqlite3"), Metrics(10), 60.0, lambda: now[0], purge_every=3600
    )
    await writer.start()
    try:
        writer.submit(draft(a_tap(), Redactor(), "old", ts=1000.0))
        writer.submit(draft(a_tap(), Redactor(), "new", ts=1050.0))
        await writer.flush()
        now[0] = 1070.0  # "old" is 70 s old, "new" 20 s
        assert await writer.purge() == 1
        assert await writer.capture("old") is None
        found = await writer.capture("new")
        assert found is not None
        assert found["request"]["headers"] == []  # authorization is never stored
    finally:
        await writer.close()


class DownStore:
    """A database that is away: every call fails, once each, and is counted."""

    def __init__(self) -> None:
        self.writes = 0

    async def start(self) -> None:
        raise OSError("down")

    async def close(self) -> None:
        return None

    async def write(self, rows: Sequence[Row]) -> None:
        self.writes += 1
        raise OSError("down")

    async def purge(self, before: float) -> int:
        raise OSError("down")

    async def capture(self, request_id: str) -> dict[str, Any] | None:
        return None

    async def captured(self, request_ids: Sequence[str]) -> frozenset[str]:
        return frozenset()


async def test_closing_with_the_store_down_tries_once_and_drops_the_rest() -> None:
    metrics, store = Metrics(10), DownStore()
    writer = CaptureWriter(store, metrics, 60.0, lambda: 100.0, interval=3600)
    await writer.start()  # the store does not start: logged, the writer runs all the same
    for i in range(250):
        writer.submit(draft(a_tap(), Redactor(), f"req-{i}"))
    await writer.close()
    assert store.writes <= 2  # the batch the task was writing, and one at close
    assert metrics.captures_dropped._value.get() == 250
    assert writer.queued == 0


def test_header_bytes_that_are_not_utf8_still_render() -> None:
    # aiohttp hands a header byte 0xff over as U+DCFF; JSON cannot carry a lone surrogate
    tap = CaptureTap(True, 1000, "POST", "/v1/responses", {"x-odd": "caf\udcff"})
    tap.head(200, {})
    doc = orjson.loads(render(draft(tap, Redactor()))[4])
    assert doc["request"]["headers"] == [["x-odd", "caf\ufffd"]]


async def test_a_draft_that_cannot_render_costs_itself_not_its_batch(tmp_path: Path) -> None:
    metrics = Metrics(10)
    writer = CaptureWriter(SqliteCaptures(tmp_path / "l.sqlite3"), metrics, 60.0, lambda: 100.0)
    await writer.start()
    try:
        broken = a_tap()
        broken.parts = [None]  # type: ignore[list-item]  # b"".join fails
        writer.submit(draft(a_tap(), Redactor(), "good"))
        writer.submit(draft(broken, Redactor(), "broken"))
        await writer.flush()
        assert await writer.capture("good") is not None
        assert await writer.capture("broken") is None
        assert metrics.captures_dropped._value.get() == 1
    finally:
        await writer.close()


def test_each_stored_text_is_redacted_as_if_alone() -> None:
    # render redacts all of a capture's texts in one call: no key shape may reach from one
    # text into the next ("Bearer" ending one header, a token starting the next)
    key = "sk-" + "k" * 40
    r = Redactor(extra=(r"PIN \d{4}",))
    tap = CaptureTap(
        True,
        1000,
        "POST",
        f"/v1/responses?k={key}",
        {"x-a": "Bearer", "x-b": "abcdefgh12345", "x-c": f"PIN 1234 {key}"},
    )
    tap.head(200, {"x-d": "Bearer", "x-e": "token-after-bearer"})
    tap.chunk(orjson.dumps({"output": f"your key: {key}"}))
    d = dataclasses.replace(draft(tap, r), body=b'{"x": "\\u0073k-' + b"k" * 40 + b'"}')
    doc = orjson.loads(render(d)[4])
    assert doc["request"]["path"] == f"/v1/responses?k={MARK}"
    assert doc["request"]["headers"] == [
        ["x-a", "Bearer"],
        ["x-b", "abcdefgh12345"],
        ["x-c", f"{MARK} {MARK}"],
    ]
    assert doc["answer"]["headers"] == [["x-d", "Bearer"], ["x-e", "token-after-bearer"]]
    assert doc["answer"]["body"] == orjson.dumps({"output": f"your key: {MARK}"}).decode()
    assert doc["request"]["body"] == orjson.dumps({"x": MARK}).decode()  # the escape is undone


def test_a_body_without_an_escape_is_stored_as_sent_and_still_redacted() -> None:
    key = "sk-" + "k" * 40
    sent = b'{ "input" : "my key is ' + key.encode() + b'",\n  "model": "m" }'
    tap = a_tap()
    d = dataclasses.replace(draft(tap, Redactor()), body=sent, body_size=len(sent))
    stored = orjson.loads(render(d)[4])["request"]["body"]
    assert stored == sent.decode().replace(key, MARK)  # its whitespace kept, the key not
