"""A graceful stop as a load balancer and a streaming client see it, on a real process."""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from conftest import free_port, wait_listening

KEY = "graceful-key-0123456789"
CONFIG = """
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin_port}}}
limits: {{drain_timeout: {drain}}}
upstreams:
  mock: {{base_url: "{upstream}"}}
teams:
  alpha: {{keys: ["sha256:{digest}"]}}
state: {{path: {state}}}
"""


def start(tmp_path: Path, upstream: str, drain: float) -> tuple[subprocess.Popen[bytes], int, int]:
    port, admin_port = free_port(), free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        CONFIG.format(
            port=port,
            admin_port=admin_port,
            drain=drain,
            upstream=upstream,
            digest=hashlib.sha256(KEY.encode()).hexdigest(),
            state=tmp_path / "state",
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)], stdout=subprocess.PIPE
    )
    wait_listening(port)
    wait_listening(admin_port)
    return proc, port, admin_port


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post(
    port: int,
    body: dict[str, Any],
    headers: dict[str, str],
    opened: list[http.client.HTTPConnection],
) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    opened.append(conn)
    conn.request(
        "POST",
        "/v1/responses",
        body=json.dumps(body),
        headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json", **headers},
    )
    return conn.getresponse()


def log_lines(out: bytes) -> list[dict[str, Any]]:
    lines = []
    for raw in out.splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


def test_drain_is_visible_and_cut_streams_end_with_an_error_event(
    mock_upstream_process: str, tmp_path: Path
) -> None:
    proc, port, admin_port = start(tmp_path, mock_upstream_process, drain=2)
    opened: list[http.client.HTTPConnection] = []
    try:
        # a stream that would take ~40 s: 200 tokens at 5 tokens/s
        stream = post(
            port,
            {"model": "nusantara-base", "input": "long", "stream": True, "max_output_tokens": 200},
            {"x-mock-tokens-per-s": "5"},
            opened,
        )
        assert stream.status == 200
        first = stream.read1(65536)
        assert b"response.created" in first
        body: list[bytes] = [first]
        failure: list[BaseException] = []

        def read_rest() -> None:
            try:
                body.append(stream.read())  # raises IncompleteRead on a truncated chunked body
            except BaseException as e:
                failure.append(e)

        reader = threading.Thread(target=read_rest)
        reader.start()
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)

        # during the drain both listeners answer: /readyz 503, new requests 503 shutting_down
        seen_ready = []
        for _ in range(20):
            seen_ready.append(get(admin_port, "/readyz")[0])
            if seen_ready[-1] == 503:
                break
            time.sleep(0.05)
        assert seen_ready[-1] == 503
        assert get(port, "/readyz")[0] == 503
        refused = post(port, {"model": "nusantara-base", "input": "late"}, {}, opened)
        assert refused.status == 503 and refused.getheader("retry-after")
        assert json.loads(refused.read())["error"]["code"] == "shutting_down"

        reader.join(timeout=15)
        assert not reader.is_alive() and not failure
        text = b"".join(body)
        assert text.endswith(b"\n\n")
        last = text.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        assert last.startswith(b"event: error\ndata: ")
        event = json.loads(last.split(b"data: ", 1)[1])
        assert event["type"] == "error" and event["code"] == "shutting_down"
        assert isinstance(event["sequence_number"], int)

        out, _ = proc.communicate(timeout=15)
        elapsed = time.monotonic() - stopped_at
        assert proc.returncode == 0
        assert 2 <= elapsed < 8  # the drain waited drain_timeout, then cut and stopped
    finally:
        for conn in opened:
            conn.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    requests = [e for e in log_lines(out) if e.get("event") == "request"]
    streamed = [e for e in requests if e["stream"]]
    assert len(streamed) == 1 and streamed[0]["error"] == "shutting_down"
    assert any(e["status"] == 503 and e["error"] == "shutting_down" for e in requests)


def test_a_stop_with_nothing_in_flight_is_quick(mock_upstream_process: str, tmp_path: Path) -> None:
    proc, _, _ = start(tmp_path, mock_upstream_process, drain=30)
    try:
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
        assert proc.returncode == 0 and time.monotonic() - stopped_at < 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
