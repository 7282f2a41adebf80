"""A gateway whose ledger is PostgreSQL: exact usage in the table, and `gateway usage` on it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from conftest import auth, make_settings, start_gateway, start_upstream
from forwarder import Forwarder
from servers import postgres_database

from gateway.ledger.postgres import PostgresLedger
from gateway.settings import LedgerSettings

pytestmark = pytest.mark.postgres

USAGE_CONFIG = """
upstreams:
  mock: {{base_url: "http://127.0.0.1:9", models: ["*"]}}
teams:
  alpha: {{keys: ["sha256:{digest}"]}}
state: {{path: "{state}"}}
ledger: {{url: "{url}"}}
"""


async def completed_usage(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The usage of a streamed answer's response.completed event."""
    usage: dict[str, Any] = {}
    async for line in response.content:
        if line.startswith(b"data: ") and b'"response.completed"' in line:
            usage = json.loads(line[6:])["response"]["usage"]
    return usage


async def test_a_gateway_writes_exact_usage_to_postgres_and_gateway_usage_reads_it(
    tmp_path: Path,
) -> None:
    async with postgres_database() as url:
        upstream = await start_upstream()
        base = make_settings(upstream.url, tmp_path / "state")
        settings = base.model_copy(update={"ledger": LedgerSettings(url=url, flush_interval=0.05)})
        running = await start_gateway(settings)
        assert isinstance(running.gw.ledger, PostgresLedger)
        expected: list[tuple[str, bool, int, int]] = []
        try:
            async with aiohttp.ClientSession() as http:
                for i in range(2):
                    async with http.post(
                        f"{running.url}/v1/responses",
                        headers=auth(),
                        json={"model": "nusantara-base", "input": f"hello {i}"},
                    ) as r:
                        assert r.status == 200
                        body = await r.json()
                        u = body["usage"]
                        expected.append(
                            (
                                r.headers["x-request-id"],
                                False,
                                u["input_tokens"],
                                u["output_tokens"],
                            )
                        )
                async with http.post(
                    f"{running.url}/v1/responses",
                    headers={**auth(), "x-gateway-user": "pg-user", "x-gateway-tags": "env=pg"},
                    json={"model": "garda-beta-mini", "input": "stream me", "stream": True},
                ) as r:
                    assert r.status == 200
                    u = await completed_usage(r)
                    expected.append(
                        (r.headers["x-request-id"], True, u["input_tokens"], u["output_tokens"])
                    )
                for _ in range(200):  # written by the background writer, no flush asked
                    if running.gw.ledger.pending == 0:
                        break
                    await asyncio.sleep(0.02)
                async with http.get(f"{running.admin_url}/metrics") as m:
                    assert "gateway_ledger_pending_records 0.0" in await m.text()
        finally:
            await running.stop()
            await upstream.runner.cleanup()

        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch(
                "SELECT request_id, stream, input_tokens, output_tokens, team, status, attempts,"
                ' "user", tags FROM ledger ORDER BY id'
            )
        finally:
            await conn.close()
        assert [tuple(r)[:4] for r in rows] == expected
        assert {(r["team"], r["status"], r["attempts"]) for r in rows} == {("alpha", 200, 1)}
        assert all(e[2] > 0 and e[3] > 0 for e in expected)
        assert [(r["user"], r["tags"]) for r in rows] == [
            ("", ""),
            ("", ""),
            ("pg-user", '{"env":"pg"}'),
        ]

        cfg = tmp_path / "usage.yaml"
        cfg.write_text(
            USAGE_CONFIG.format(
                digest=hashlib.sha256(b"k").hexdigest(), state=tmp_path / "usage-state", url=url
            )
        )
        report = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway", "usage", "--config", str(cfg), "--by", "team,model"],
            capture_output=True,
            text=True,
            check=False,
        )
        report_json = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway", "usage", "--config", str(cfg), "--format", "json"],
            capture_output=True,
            text=True,
            check=False,
        )
        listed = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "gateway",
                "requests",
                "--config",
                str(cfg),
                "--tag",
                "env=pg",
                "--format",
                "json",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    assert listed.returncode == 0, listed.stderr
    [found] = json.loads(listed.stdout)["requests"]
    assert (found["request_id"], found["user"], found["tags"]) == (
        expected[2][0],
        "pg-user",
        {"env": "pg"},
    )
    assert report.returncode == 0, report.stderr
    assert "alpha  garda-beta-mini" in report.stdout and "alpha  nusantara-base" in report.stdout
    totals = json.loads(report_json.stdout)["totals"]
    assert totals["requests"] == 3
    assert totals["input_tokens"] == sum(e[2] for e in expected)
    assert totals["output_tokens"] == sum(e[3] for e in expected)


async def test_gateway_usage_says_when_the_ledger_database_is_unreachable(tmp_path: Path) -> None:
    cfg = tmp_path / "usage.yaml"
    cfg.write_text(
        USAGE_CONFIG.format(
            digest=hashlib.sha256(b"k").hexdigest(),
            state=tmp_path / "state",
            url="postgresql://gw:hunter2@127.0.0.1:9/gw",
        )
    )
    report = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway", "usage", "--config", str(cfg)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert report.returncode == 1
    assert report.stderr.startswith("gateway usage: cannot read the ledger: ")
    assert "hunter2" not in report.stderr and "Traceback" not in report.stderr


def pending_metric(text: str) -> float:
    (line,) = [x for x in text.splitlines() if x.startswith("gateway_ledger_pending_records ")]
    return float(line.split()[1])


async def test_postgres_down_keeps_the_gateway_ready_and_counts_what_waits(tmp_path: Path) -> None:
    async with postgres_database() as url:
        forwarder = Forwarder()
        await forwarder.start()
        upstream = await start_upstream()
        base = make_settings(upstream.url, tmp_path / "state")
        settings = base.model_copy(
            update={"ledger": LedgerSettings(url=forwarder.url(url), flush_interval=0.05)}
        )
        running = await start_gateway(settings)
        try:
            await forwarder.stop()
            async with aiohttp.ClientSession() as http:
                for i in range(3):
                    async with http.post(
                        f"{running.url}/v1/responses",
                        headers=auth(),
                        json={"model": "nusantara-base", "input": f"while down {i}"},
                    ) as r:
                        assert r.status == 200
                async with http.get(f"{running.admin_url}/readyz") as ready:
                    assert ready.status == 200
                async with http.get(f"{running.admin_url}/metrics") as m:
                    assert pending_metric(await m.text()) == 3

                await forwarder.start()
                for _ in range(500):  # retried within 5 s, without a restart
                    if running.gw.ledger.pending == 0:
                        break
                    await asyncio.sleep(0.02)
                async with http.get(f"{running.admin_url}/metrics") as m:
                    assert pending_metric(await m.text()) == 0
        finally:
            await running.stop()
            await upstream.runner.cleanup()
            if forwarder.running:
                await forwarder.stop()
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM ledger") == 3
        finally:
            await conn.close()
