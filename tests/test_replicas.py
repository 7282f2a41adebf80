"""Two gateway processes sharing one Redis and one PostgreSQL ledger, as replicas behind a load
balancer run: budgets, the cache, single-flight and response ownership hold across them, and
neither a replica's restart nor the loss of every Redis key resets a budget.

Each test has its own Redis key prefix and its own PostgreSQL database, removed afterwards; the
mock upstream runs in the test process, on a real socket, so its call counts can be read.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis
from conftest import Upstream, free_port, start_upstream
from forwarder import Forwarder
from servers import REDIS_URL, postgres_database, redis_prefix

from gateway.mock_upstream import MockOptions

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

ALPHA = "replica-alpha-0123456789"
BETA = "replica-beta-0123456789"
ADMIN = "replica-admin-0123456789"
UPSTREAM_KEY = "sk-replica-upstream-0123456789"
BODY: dict[str, Any] = {"model": "nusantara-base", "input": "hello there", "max_output_tokens": 20}
CONFIG = """
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin_port}, key: ${{ADMIN_KEY}}}}
limits: {{drain_timeout: 5}}
upstreams:
  mock:
    base_url: {upstream}
    api_key: ${{UPSTREAM_KEY}}
    timeouts: {{connect: 2, first_byte: 20, idle: 20}}
teams:
  alpha:
    keys: ["sha256:{alpha}"]
    budgets: [{{tokens: {budget}, per: day}}]
  beta:
    keys: ["sha256:{beta}"]
prices:
  "*": {{input: 1.0, output: 2.0}}
cache: {{enabled: true, ttl: 600, scope: team}}
state: {{store: "{store}", prefix: "{prefix}", on_unavailable: {on_unavailable}, path: {state}}}
ledger: {{url: "{ledger}", flush_interval: 0.1}}
telemetry: {{logs: {{level: warning}}}}
"""


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 20) -> None:
    """Until `check` holds (polled: what it reads has no event to wait on)."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.2)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Replica:
    port: int
    admin_port: int
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> None:
        env = {**os.environ, "ADMIN_KEY": ADMIN, "UPSTREAM_KEY": UPSTREAM_KEY}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    async def ready(self, session: aiohttp.ClientSession) -> None:
        async with asyncio.timeout(30):
            while True:
                assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
                try:
                    async with session.get(f"{self.admin}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)


@dataclass
class Cluster:
    upstream: Upstream
    prefix: str
    ledger: str
    replicas: list[Replica] = field(default_factory=list)


@asynccontextmanager
async def cluster(
    tmp_path: Path, budget: int = 1_000_000, on_unavailable: str = "reject", store: str = ""
) -> AsyncIterator[Cluster]:
    upstream = await start_upstream(MockOptions())
    try:
        async with redis_prefix() as prefix, postgres_database() as ledger:
            found = Cluster(upstream, prefix, ledger)
            for i in range(2):
                port, admin_port = free_port(), free_port()
                cfg = tmp_path / f"replica{i}.yaml"
                cfg.write_text(
                    CONFIG.format(
                        port=port,
                        admin_port=admin_port,
                        upstream=upstream.url,
                        alpha=digest(ALPHA),
                        beta=digest(BETA),
                        budget=budget,
                        store=store or REDIS_URL,
                        prefix=prefix,
                        on_unavailable=on_unavailable,
                        state=tmp_path / f"state{i}",
                        ledger=ledger,
                    )
                )
                found.replicas.append(Replica(port, admin_port, cfg, tmp_path / f"replica{i}.log"))
            try:
                async with aiohttp.ClientSession() as session:
                    for replica in found.replicas:
                        replica.start()
                    for replica in found.replicas:
                        await replica.ready(session)
                yield found
            finally:
                for replica in found.replicas:
                    replica.stop()
    finally:
        await upstream.runner.cleanup()


def auth(key: str = ALPHA) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], key: str = ALPHA
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(f"{url}/v1/responses", json=body, headers=auth(key)) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


async def ledger_rows(url: str) -> list[dict[str, Any]]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return [dict(r) for r in await conn.fetch("SELECT * FROM ledger ORDER BY ts")]
    finally:
        await conn.close()


async def teams(session: aiohttp.ClientSession, replica: Replica) -> Any:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with session.get(f"{replica.admin}/admin/teams", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def alpha_window(found: Any) -> dict[str, Any]:
    [team] = [t for t in found["teams"] if t["team"] == "alpha"]
    [window] = team["budgets"]
    return dict(window)


async def settled(session: aiohttp.ClientSession, found: Cluster, n: int) -> list[dict[str, Any]]:
    """The ledger once it holds `n` records from both replicas (they flush every 0.1 s)."""
    async with asyncio.timeout(20):
        while len(rows := await ledger_rows(found.ledger)) < n:  # noqa: ASYNC110 (a table)
            await asyncio.sleep(0.1)
    return rows


async def test_budget_holds_across_replicas_under_concurrency(tmp_path: Path) -> None:
    async with cluster(tmp_path, budget=40 * 26) as found, aiohttp.ClientSession() as session:
        a, b = found.replicas
        answers = await asyncio.gather(
            *(post(session, (a, b)[i % 2].url, {**BODY, "input": f"q{i}"}) for i in range(200))
        )
        statuses = [status for status, _, _ in answers]
        ok = [orjson_loads(body) for status, _, body in answers if status == 200]
        assert set(statuses) <= {200, 429}, statuses
        billed = sum(r["usage"]["input_tokens"] + r["usage"]["output_tokens"] for r in ok)
        rows = await settled(session, found, 200)
        charged = sum(r["charged_tokens"] for r in rows)
        # the ledger holds what the upstream billed, exactly, and never more than the budget
        assert charged == billed and charged <= 40 * 26
        # no false refusals: each admitted request held its estimate, and as many were admitted
        # as the budget holds estimates of
        estimate = -(-len(b'{"model":"nusantara-base","input":"q100","max_output_tokens":20}') // 4)
        assert len(ok) >= (40 * 26) // (estimate + 20), len(ok)
        # both replicas answered, and both see the same window
        assert {r["upstream"] for r in rows} == {"mock"}
        seen = [alpha_window(await teams(session, r)) for r in found.replicas]
        assert seen[0] == seen[1] and seen[0]["used"] == charged and seen[0]["reserved"] == 0


async def stored(session: aiohttp.ClientSession, replica: Replica, entries: int) -> None:
    """Once the shared cache holds `entries` answers: a leader stores its answer just after
    its client got the last byte, and until then an identical request joins its flight."""
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with asyncio.timeout(10):
        while True:
            async with session.get(f"{replica.admin}/admin/cache", headers=headers) as resp:
                if (await resp.json())["entries"] >= entries:
                    return
            await asyncio.sleep(0.02)


def orjson_loads(body: bytes) -> Any:
    import orjson

    return orjson.loads(body)


async def test_cache_and_single_flight_are_shared(tmp_path: Path) -> None:
    async with cluster(tmp_path) as found, aiohttp.ClientSession() as session:
        a, b = found.replicas
        body = {**BODY, "input": "cache me"}
        first = await post(session, a.url, body)
        await stored(session, a, 1)
        again = await post(session, b.url, body)
        assert first[1]["x-gateway-cache"] == "miss" and again[1]["x-gateway-cache"] == "hit"
        assert first[2] == again[2]
        stream = {**body, "stream": True}
        s1 = await post(session, a.url, stream)
        await stored(session, a, 2)
        s2 = await post(session, b.url, stream)
        assert s2[1]["x-gateway-cache"] == "hit" and s1[2] == s2[2]  # byte-identical
        # identical requests arriving at both at once: one upstream call, a stream included
        calls = found.upstream.state.calls["POST /v1/responses"]
        slow = {**BODY, "input": "together", "stream": True}
        headers = {**auth(), "x-mock-ttft-ms": "400"}
        results = await asyncio.gather(
            *(session.post(f"{r.url}/v1/responses", json=slow, headers=headers) for r in (a, b))
        )
        bodies = [await r.read() for r in results]
        kinds = sorted(r.headers["x-gateway-cache"] for r in results)
        for r in results:
            r.release()
        assert kinds == ["coalesced", "miss"] and bodies[0] == bodies[1]
        assert found.upstream.state.calls["POST /v1/responses"] == calls + 1


async def test_a_response_made_through_one_replica_is_read_through_the_other(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path) as found, aiohttp.ClientSession() as session:
        a, b = found.replicas
        status, _, body = await post(session, a.url, {**BODY, "store": True})
        assert status == 200
        rid = orjson_loads(body)["id"]
        async with session.get(f"{b.url}/v1/responses/{rid}", headers=auth()) as resp:
            assert resp.status == 200
        async with session.get(f"{b.url}/v1/responses/{rid}", headers=auth(BETA)) as resp:
            assert resp.status == 404


async def test_a_restart_and_a_lost_redis_leave_budgets_as_they_were(tmp_path: Path) -> None:
    async with cluster(tmp_path, budget=100_000) as found, aiohttp.ClientSession() as session:
        a, b = found.replicas
        for i in range(6):
            assert (await post(session, (a, b)[i % 2].url, {**BODY, "input": f"r{i}"}))[0] == 200
        rows = await settled(session, found, 6)
        before = alpha_window(await teams(session, a))
        assert before["used"] == sum(r["charged_tokens"] for r in rows) > 0
        a.stop()  # a replica restarts
        a.start()
        await a.ready(session)
        assert alpha_window(await teams(session, a))["used"] == before["used"]
        client = redis.Redis.from_url(REDIS_URL)  # Redis loses every key of this deployment
        try:
            keys = [k async for k in client.scan_iter(match=f"{found.prefix}*", count=500)]
            assert keys
            await client.delete(*keys)
        finally:
            await client.aclose()
        for replica in (a, b):
            assert alpha_window(await teams(session, replica))["used"] == before["used"]
        # and the budget goes on counting from there
        assert (await post(session, b.url, {**BODY, "input": "after"}))[0] == 200
        rows = await settled(session, found, 7)
        assert alpha_window(await teams(session, a))["used"] == sum(
            r["charged_tokens"] for r in rows
        )


@pytest.mark.parametrize("mode", ["reject", "admit"])
async def test_redis_down(tmp_path: Path, mode: str) -> None:
    proxy = Forwarder(6379)  # a Redis the test can stop and start
    await proxy.start()
    try:
        async with (
            cluster(
                tmp_path, budget=100_000, on_unavailable=mode, store=proxy.url(REDIS_URL)
            ) as found,
            aiohttp.ClientSession() as session,
        ):
            a, b = found.replicas
            assert (await post(session, a.url, {**BODY, "input": "before"}))[0] == 200
            await proxy.stop()
            status, headers, body = await post(session, b.url, {**BODY, "input": "during"})
            async with session.get(f"{b.admin}/readyz") as resp:
                ready = resp.status
            if mode == "reject":
                assert status == 503 and b"state_unavailable" in body and "retry-after" in headers
                assert ready == 503
            else:
                assert status == 200 and headers.get("x-gateway-cache") == "bypass"
                assert ready == 200
            await proxy.start()

            async def served() -> bool:
                return (await post(session, b.url, {**BODY, "input": "after"}))[0] == 200

            await eventually(served)  # recovered without a restart
            rows = await settled(session, found, 3)
            # every request recorded, the refused one too (in whatever order they finished)
            statuses = sorted(r["status"] for r in rows)
            assert statuses == (
                [200] * (len(rows) - 1) + [503] if mode == "reject" else [200] * len(rows)
            )

            async def corrected() -> bool:
                # counters corrected from the ledger once Redis is back
                charged = sum(r["charged_tokens"] for r in await ledger_rows(found.ledger))
                return bool(alpha_window(await teams(session, a))["used"] == charged)

            await eventually(corrected)
    finally:
        if proxy.running:
            await proxy.stop()
