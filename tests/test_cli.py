"""The `gateway` command as a user runs it: serve with reload, demo, usage."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import free_port


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    json_body: object = None,
    timeout: float = 10,
) -> Reply:
    """A plain blocking HTTP call, for tests driving a gateway in another process."""
    data = None if json_body is None else json.dumps(json_body).encode()
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={**(headers or {}), **({"content-type": "application/json"} if data else {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:
        with e:
            return Reply(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


CONFIG = """
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin_port}, key: admin-secret}}
upstreams:
  mock: {{base_url: "{upstream}"}}
teams:
  alpha: {{keys: ["sha256:{digest}"]}}
state: {{path: {state}}}
"""


def post(
    url: str, headers: dict[str, str] | None = None, json: object = None, timeout: float = 10
) -> Reply:
    return call("POST", url, headers, json, timeout)


def wait_ready(url: str) -> None:
    for _ in range(200):
        try:
            if call("GET", f"{url}/readyz", timeout=1).status_code == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} never became ready")


def status_with(url: str, key: str) -> int:
    r = post(
        f"{url}/v1/responses",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "nusantara-base", "input": "hi"},
        timeout=10,
    )
    return r.status_code


def test_reload_by_sighup_and_admin_api(mock_upstream_process: str, tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    cfg = tmp_path / "gw.yaml"

    def write(key: str) -> None:
        cfg.write_text(
            CONFIG.format(
                port=port,
                admin_port=admin_port,
                upstream=mock_upstream_process,
                digest=hashlib.sha256(key.encode()).hexdigest(),
                state=tmp_path / "state",
            )
        )

    write("first-key")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)], stdout=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        assert status_with(url, "first-key") == 200
        write("second-key")
        proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if status_with(url, "second-key") == 200:
                break
            time.sleep(0.05)
        assert status_with(url, "second-key") == 200 and status_with(url, "first-key") == 401
        write("third-key")
        r = post(
            f"http://127.0.0.1:{admin_port}/admin/reload",
            headers={"Authorization": "Bearer admin-secret"},
        )
        assert r.status_code == 200 and r.json() == {"reloaded": True}
        assert status_with(url, "third-key") == 200
        cfg.write_text("upstreams: {}\n")  # a broken file is refused, the old config stays
        r = post(
            f"http://127.0.0.1:{admin_port}/admin/reload",
            headers={"Authorization": "Bearer admin-secret"},
        )
        assert r.status_code == 400 and r.json()["reloaded"] is False
        assert any("upstreams" in p for p in r.json()["problems"])
        assert status_with(url, "third-key") == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_demo_runs_and_answers(tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "demo",
            "--port",
            str(port),
            "--admin-port",
            str(admin_port),
            "--state",
            str(tmp_path / "demo"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        banner = ""
        while "Try it" not in banner:
            line = proc.stdout.readline()
            assert line, banner
            banner += line
        key = next(w for w in banner.split() if w.startswith("demo-search-"))
        support = next(w for w in banner.split() if w.startswith("demo-support-"))
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        r = post(
            f"{url}/v1/responses",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "nusantara-base", "input": "hi", "max_output_tokens": 8},
            timeout=10,
        )
        assert r.status_code == 200 and r.json()["status"] == "completed"
        assert int(r.headers["x-gateway-budget-remaining-tokens"]) < 20000
        r = post(
            f"{url}/v1/responses",
            headers={"Authorization": f"Bearer {support}"},
            json={"model": "nusantara-base", "input": "hi"},
            timeout=10,
        )
        assert r.status_code == 403
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0
    report = subprocess.run(
        [sys.executable, "-m", "gateway", "usage", "--config", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert report.returncode == 1 and "none.yaml" in report.stderr


def test_usage_report_formats(tmp_path: Path, mock_upstream_process: str) -> None:
    port, admin_port = free_port(), free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        CONFIG.format(
            port=port,
            admin_port=admin_port,
            upstream=mock_upstream_process,
            digest=hashlib.sha256(b"k").hexdigest(),
            state=tmp_path / "state",
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)], stdout=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        for i, model in enumerate(("nusantara-base", "nusantara-base", "garda-beta-mini")):
            post(
                f"{url}/v1/responses",
                headers={"Authorization": "Bearer k"},
                json={"model": model, "input": f"hello {i}", "max_output_tokens": 10},
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0

    def usage(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "usage", "--config", str(cfg), *args],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    table = usage("--by", "model", "--format", "table")
    assert "garda-beta-mini" in table and table.splitlines()[-1].startswith("TOTAL")
    data = json.loads(usage("--by", "team,model", "--format", "json"))
    rows = {r["model"]: r for r in data["rows"]}
    assert rows["nusantara-base"]["requests"] == 2 and rows["garda-beta-mini"]["requests"] == 1
    assert rows["nusantara-base"]["output_tokens"] == 20
    csv_text = usage("--by", "day", "--format", "csv", "--since", "2020-01-01")
    assert csv_text.splitlines()[0].startswith("day,requests")
    assert usage("--since", "2999-01-01", "--format", "json").count('"requests"') <= 1
