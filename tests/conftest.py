"""Shared fixtures: the mock upstream and gateways on real 127.0.0.1 sockets."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from servers import postgres_missing, redis_missing

from gateway.app import create_admin_app, create_app, make_runner
from gateway.config import Settings, loads
from gateway.ledger.sqlite import SqliteLedger
from gateway.listener import LimitedSite
from gateway.mock_upstream import MOCK_STATE, MockOptions, MockState, create_mock_app
from gateway.runtime import Gateway

ALPHA_KEY = "key-alpha-0123456789"
BETA_KEY = "key-beta-0123456789"
ADMIN_KEY = "admin-key-0123456789"
UPSTREAM_KEY = "sk-upstream-secret-0123456789abcdef"

BASE_CONFIG = """
listen: {{host: 127.0.0.1, port: 0}}
admin: {{host: 127.0.0.1, port: 0, key: ${{ADMIN_KEY}}}}
limits:
  max_body_bytes: {max_body}
  default_max_output_tokens: 64
  drain_timeout: {drain}
  header_timeout: {header_timeout}
  body_timeout: {body_timeout}
  max_connections: {max_connections}{limits_extra}
upstreams:
  {upstream_name}:
    base_url: {upstream}
    api_key: ${{UPSTREAM_KEY}}
    auth_header: {auth_header}{upstream_extra}
    models: {models}
    timeouts: {{connect: 1, first_byte: {first_byte}, idle: {idle}}}
teams:
  alpha:
    keys: ["${{ALPHA_KEY}}"]
    models: ["*"]
    budgets: {alpha_budgets}
  beta:
    keys: ["${{BETA_KEY}}"]
    models: ["garda-*"]
    budgets: {beta_budgets}
prices:
  nusantara-base: {{input: 0.10, cached_input: 0.025, output: 0.40}}
  "*": {{input: 1.0, output: 2.0}}
cache: {{enabled: {cache}, ttl: 600, max_bytes: 10000000, scope: team}}
state: {{store: local, path: {state}}}
"""

ENV = {
    "ALPHA_KEY": ALPHA_KEY,
    "BETA_KEY": BETA_KEY,
    "ADMIN_KEY": ADMIN_KEY,
    "UPSTREAM_KEY": UPSTREAM_KEY,
}


def wait_listening(port: int, timeout: float = 20.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port (a server subprocess)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


def bound_socket() -> socket.socket:
    """A listening-ready socket on a free port, held open: no other process can take it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def serve_on_free_port(runner: web.AppRunner) -> int:
    sock = bound_socket()
    await web.SockSite(runner, sock).start()
    port: int = sock.getsockname()[1]
    return port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_settings(
    upstream: str, state: Path, env: dict[str, str] | None = None, **kw: Any
) -> Settings:
    params: dict[str, Any] = {
        "upstream": upstream,
        "upstream_name": "mock",
        "state": str(state),
        "auth_header": "authorization",
        "first_byte": 5,
        "idle": 5,
        "models": '["*"]',
        "drain": 5,
        "max_body": 1_000_000,
        "header_timeout": 10,
        "body_timeout": 30,
        "max_connections": 10000,
        "cache": "false",
        "alpha_budgets": "[]",
        "beta_budgets": "[]",
        "limits_extra": "",  # more lines under `limits:`, each "\n  name: value"
        "upstream_extra": "",  # more lines under the upstream, each "\n    name: value"
    }
    params.update(kw)
    return loads(BASE_CONFIG.format(**params), ENV if env is None else env)


@dataclass
class Upstream:
    url: str
    state: MockState
    runner: web.AppRunner


@dataclass
class Running:
    gw: Gateway
    url: str
    admin_url: str
    runner: web.AppRunner
    admin_runner: web.AppRunner

    async def stop(self) -> None:
        await self.admin_runner.cleanup()
        await self.runner.cleanup()


async def start_upstream(options: MockOptions | None = None) -> Upstream:
    app = create_mock_app(options or MockOptions())
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    port = await serve_on_free_port(runner)
    return Upstream(f"http://127.0.0.1:{port}", app[MOCK_STATE], runner)


async def start_gateway(
    settings: Settings, gw: Gateway | None = None, *, stop_grace: float = 2
) -> Running:
    """A gateway on real sockets; `stop_grace` is the client listener's stop grace (what
    `gateway serve` sets to STOP_GRACE)."""
    gw = gw or Gateway(settings)
    runner = make_runner(create_app(gw), shutdown_timeout=stop_grace)
    admin_runner = make_runner(create_admin_app(gw))
    await runner.setup()
    await admin_runner.setup()
    sock = bound_socket()
    await LimitedSite(runner, sock=sock, max_connections=settings.limits.max_connections).start()
    port: int = sock.getsockname()[1]
    admin_port = await serve_on_free_port(admin_runner)
    return Running(
        gw, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", runner, admin_runner
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def start_app(handler: Handler, **runner_kw: Any) -> tuple[str, web.AppRunner]:
    """A one-handler upstream of a test's own making, answering every path."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, **{"shutdown_timeout": 0.5, **runner_kw})
    await runner.setup()
    port = await serve_on_free_port(runner)
    return f"http://127.0.0.1:{port}", runner


@pytest.fixture
def mock_upstream_process() -> Iterator[str]:
    """`gateway mock-upstream` as its own process, for gateways run as processes too."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "mock-upstream", "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    wait_listening(port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = await start_upstream()
    yield up
    await up.runner.cleanup()


GatewayFactory = Callable[..., Awaitable[Running]]


@pytest.fixture
async def gateway_factory(upstream: Upstream, tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Start gateways in front of the shared mock upstream; all are stopped at the end."""
    started: list[Running] = []

    async def factory(upstream_url: str | None = None, **kw: Any) -> Running:
        settings = make_settings(upstream_url or upstream.url, tmp_path / "state", **kw)
        running = await start_gateway(settings)
        started.append(running)
        return running

    yield factory
    for running in started:
        await running.stop()


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory) -> Running:
    return await gateway_factory()


async def ledger_rows(running: Running) -> list[dict[str, Any]]:
    """Every ledger record written so far, as dicts by column name (SQLite ledger)."""
    ledger = running.gw.ledger
    assert isinstance(ledger, SqliteLedger)
    await ledger.flush()
    rows = await ledger._run(ledger._query, "SELECT * FROM ledger ORDER BY id", ())
    names = [c[1] for c in await ledger._run(ledger._query, "PRAGMA table_info(ledger)", ())]
    return [dict(zip(names, r, strict=True)) for r in rows]


def auth(key: str = ALPHA_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests of a server-backed store skip, with the reason, where that server is absent."""
    missing = {"redis": redis_missing, "postgres": postgres_missing}
    found: dict[str, str] = {}
    for item in items:
        for marker, why in missing.items():
            if item.get_closest_marker(marker) is None:
                continue
            if marker not in found:
                found[marker] = why()
            if found[marker]:
                item.add_marker(pytest.mark.skip(reason=found[marker]))
