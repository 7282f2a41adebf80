"""The `gateway` command as a user runs it: serve with reload, demo, usage, requests."""

from __future__ import annotations

import asyncio
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
from contract.ledger_samples import mixed_records

from gateway.ledger.sqlite import SqliteLedger


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
                headers={
                    "Authorization": "Bearer k",
                    "x-gateway-user": f"user-{i % 2}",
                    "x-gateway-tags": f"env={'prod' if i else 'dev'}",
                },
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
    by_user = json.loads(usage("--by", "user,tag:env", "--format", "json"))["rows"]
    assert [(r["user"], r["tag:env"], r["requests"]) for r in by_user] == [
        ("user-0", "dev", 1),
        ("user-0", "prod", 1),
        ("user-1", "prod", 1),
    ]


def run_requests(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "requests", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_requests_lists_the_ledger_newest_first(tmp_path: Path) -> None:
    async def write() -> None:
        ledger = SqliteLedger(tmp_path / "state" / "ledger.sqlite3")
        await ledger.start()
        for r in mixed_records():
            ledger.append(r)
        await ledger.close()

    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        CONFIG.format(
            port=1,
            admin_port=2,
            upstream="http://127.0.0.1:9",
            digest=hashlib.sha256(b"k").hexdigest(),
            state=tmp_path / "state",
        )
    )
    missing = run_requests(cfg)
    assert missing.returncode == 1 and "no ledger" in missing.stderr
    asyncio.run(write())

    table = run_requests(cfg).stdout.splitlines()
    assert table[0].split() == [
        "time",
        "request_id",
        "team",
        "user",
        "model",
        "status",
        "tokens",
        "cost_usd",
        "ms",
        "captured",
        "tags",
    ]
    assert [line.split()[1] for line in table[1:]] == [f"req-{n}" for n in (5, 4, 3, 2, 1, 0)]
    assert all(line.split()[9] == "no" for line in table[1:])
    assert table[-1].split()[-1] == "env=prod,feature=search"

    def listed(*args: str) -> list[str]:
        done = run_requests(cfg, "--format", "json", *args)
        assert done.returncode == 0, done.stderr
        return [r["request_id"] for r in json.loads(done.stdout)["requests"]]

    assert listed("--user", "alice") == ["req-4", "req-0"]
    assert listed("--tag", "env=prod") == ["req-2", "req-0"]
    assert listed("--tag", "env=prod", "--tag", "feature=search") == ["req-0"]
    assert listed("--status", "5xx") == ["req-4"]
    assert listed("--team", "ads", "--limit", "2") == ["req-5", "req-3"]
    assert listed("--model", "nusantara-pro", "--since", "2025-03-02") == ["req-5", "req-4"]
    assert listed("--until", "2025-03-02") == ["req-1", "req-0"]
    record = json.loads(run_requests(cfg, "--format", "json", "--limit", "1").stdout)
    assert record["requests"][0]["captured"] is False and record["next_cursor"]
    for bad in (["--tag", "env:prod"], ["--status", "600"], ["--limit", "501"]):
        done = run_requests(cfg, *bad)
        assert done.returncode == 2 and done.stderr.startswith("gateway requests: ")


_GC_PROBE = """
import asyncio, gc, sys
from gateway import config
from gateway.cli_run import run_gateway

async def main() -> None:
    stop = asyncio.Event()
    print(gc.get_threshold()[0], flush=True)

    def ready() -> None:
        print(gc.get_threshold()[0], flush=True)
        stop.set()

    await run_gateway(config.load(sys.argv[1]), "127.0.0.1", int(sys.argv[2]), announce=False,
                      ready=ready, stop=stop)

asyncio.run(main())
"""


def test_a_server_process_raises_the_collectors_threshold(tmp_path: Path) -> None:
    """Requests in flight hold a few hundred objects each: under the default threshold the
    collector would scan them again every request or two."""
    port = free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        CONFIG.format(
            port=port,
            admin_port=free_port(),
            upstream="http://127.0.0.1:9",
            digest=hashlib.sha256(b"k").hexdigest(),
            state=tmp_path / "state",
        )
    )
    out = subprocess.run(
        [sys.executable, "-c", _GC_PROBE, str(cfg), str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    # CPython's default before, the server's once it serves
    assert [line for line in out if line.isdigit()] == ["700", "10000"]
