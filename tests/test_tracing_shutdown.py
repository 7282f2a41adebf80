"""A trace collector that accepts and never answers: exit stays quick, the span queue bounded."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import free_port, wait_listening
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from gateway.redact import Redactor
from gateway.settings import Telemetry, Traces
from gateway.telemetry.tracing import Tracing

KEY = "shutdown-test-key-0123456789"
CONFIG = """
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin_port}}}
upstreams:
  mock: {{base_url: "{upstream}"}}
teams:
  alpha: {{keys: ["sha256:{digest}"]}}
state: {{path: {state}}}
telemetry: {{traces: {{endpoint: "{collector}"}}}}
"""


@pytest.fixture
def hung_collector() -> Iterator[str]:
    """An OTLP endpoint that accepts every connection and never sends a byte back."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            held.append(conn)  # read nothing, answer nothing

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(timeout=2)
    for conn in held:
        conn.close()
    server.close()


def respond(url: str) -> int:
    req = urllib.request.Request(
        f"{url}/v1/responses",
        data=json.dumps({"model": "nusantara-base", "input": "hi"}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        with e:
            return e.code


def test_sigterm_exits_quickly_with_a_hung_collector(
    mock_upstream_process: str, hung_collector: str, tmp_path: Path
) -> None:
    port = free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        CONFIG.format(
            port=port,
            admin_port=free_port(),
            upstream=mock_upstream_process,
            digest=hashlib.sha256(KEY.encode()).hexdigest(),
            state=tmp_path / "state",
            collector=hung_collector,
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port)
        url = f"http://127.0.0.1:{port}"
        # 2 spans a request: enough for several export batches to wait behind the hung one
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(respond, [url] * 2000))
        assert statuses.count(200) == 2000
        time.sleep(1.5)  # past the processor's schedule delay: an export is now stuck
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert code == 0
    assert took < 8, f"SIGTERM took {took:.1f} s with a hung collector"


class StuckExporter(SpanExporter):
    """Blocks every export until released, like a collector that never answers."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exported = 0
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        self.release.wait(timeout=30)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass  # like closing a requests session: a send already blocked stays blocked


def test_queue_is_bounded_and_ending_a_span_never_blocks() -> None:
    exporter = StuckExporter()
    tracing = Tracing.from_settings(Telemetry(traces=Traces(sample_ratio=1.0)), exporter)
    try:
        for _ in range(50):  # bounded wait for the first export to be stuck
            tracing.tracer.start_span("warm-up").end()
            if exporter.calls:
                break
            time.sleep(0.05)
        started = time.monotonic()
        for n in range(5000):
            tracing.tracer.start_span(f"s{n}", attributes={"n": n, "pad": "x" * 100}).end()
        assert time.monotonic() - started < 2.0  # a full queue drops, never waits
    finally:
        exporter.release.set()
        tracing.shutdown()
    # all that was exported after the release had fit in the queue: a few hundred spans at most,
    # a few MB even with content (the burst of 5000 was mostly dropped)
    assert exporter.exported <= 1024


def test_content_attributes_are_bounded() -> None:
    exporter = StuckExporter()
    exporter.release.set()
    tracing = Tracing.from_settings(
        Telemetry(traces=Traces(sample_ratio=1.0, capture_content=True)), exporter
    )
    try:
        attrs = tracing.content_attributes({"input": "y" * 1_000_000}, Redactor())
        span = tracing.tracer.start_span("big", attributes=attrs)
        span.end()
        recorded = getattr(span, "attributes", {})
        assert 0 < len(recorded["gen_ai.input.messages"]) <= 16 * 1024
    finally:
        tracing.shutdown()


def test_shutdown_is_bounded_when_the_export_hangs() -> None:
    exporter = StuckExporter()
    tracing = Tracing.from_settings(Telemetry(traces=Traces(sample_ratio=1.0)), exporter)
    for n in range(2000):
        tracing.tracer.start_span(f"s{n}").end()
    for _ in range(50):
        if exporter.calls:
            break
        time.sleep(0.05)
    started = time.monotonic()
    try:
        tracing.shutdown()
        took = time.monotonic() - started
    finally:
        exporter.release.set()
    assert took < 5.0  # the SDK alone would wait 30 s for the stuck export
