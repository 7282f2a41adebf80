"""The inspector's files on the admin listener (`GET /admin/ui`), without a browser: what is
served, with which headers, and the one field the page needs from the API (`trace_url`)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import ADMIN_KEY, Running, Upstream, auth, make_settings, start_gateway

from gateway.inspector import FILES
from gateway.settings import Capture

PAGES = {
    "/admin/ui": "text/html",
    "/admin/ui/inspector.css": "text/css",
    "/admin/ui/inspector.js": "text/javascript",
    "/admin/ui/icon.svg": "image/svg+xml",
}


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers or {}) as r:
        return r.status, r.headers, await r.read()


@pytest.mark.parametrize(("path", "content_type"), PAGES.items())
async def test_each_file_is_served_with_its_type_and_strict_headers(
    gateway: Running, path: str, content_type: str
) -> None:
    status, headers, body = await get(gateway.admin_url + path)  # no admin key
    assert status == 200 and body
    assert headers["content-type"].split(";")[0] == content_type
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    "path",
    [
        "/admin/ui/",
        "/admin/ui/index.html",
        "/admin/ui/nope.js",
        "/admin/ui/../admin.py",
        "/admin/ui/%2e%2e/admin.py",
        "/admin/ui/__init__.py",
        "/admin/ui/inspector.js/x",
    ],
)
async def test_only_the_known_files_are_served(gateway: Running, path: str) -> None:
    status, _, body = await get(gateway.admin_url + path)
    assert status == 404
    assert b"import" not in body


def test_the_page_names_only_its_own_files() -> None:
    """No CDN, no inline script or style, no inline event handler: what the CSP allows."""
    here = Path(__file__).parent.parent / "gateway" / "inspector"
    html = (here / "index.html").read_text()
    assert not re.search(r"https?://", html)
    assert not re.search(r"<script>|<style|\son[a-z]+=|style=", html)
    assert set(re.findall(r'(?:src|href)="/admin/ui/([^"]+)"', html)) <= set(FILES)
    script = (here / "inspector.js").read_text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "eval(" not in script and "document.write" not in script
    assert not re.search(r"https?://", script)
    assert "localStorage" not in script  # the key lives for the browser session only


async def test_the_page_needs_no_key_but_its_data_does(gateway: Running) -> None:
    status, _, body = await get(gateway.admin_url + "/admin/ui")
    assert status == 200 and b"inspector.js" in body
    for path in ("/admin/requests", "/admin/teams", "/admin/cache", "/admin/upstreams"):
        status, _, _ = await get(gateway.admin_url + path)
        assert status == 401
        status, _, _ = await get(gateway.admin_url + path, auth(ADMIN_KEY))
        assert status == 200


async def test_the_page_is_not_on_the_client_listener(gateway: Running) -> None:
    status, _, _ = await get(gateway.url + "/admin/ui")
    assert status == 404


@pytest.fixture
async def traced(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Running]:
    """A gateway that captures every request and links traces to a (made-up) Jaeger."""
    base = make_settings(upstream.url, tmp_path / "state")
    settings = base.model_copy(
        update={
            "capture": Capture.model_validate({"enabled": True, "sample_ratio": 1.0}),
            "telemetry": base.telemetry.model_copy(
                update={"trace_url": "http://jaeger.test:16686/trace/{trace_id}"}
            ),
        }
    )
    running = await start_gateway(settings)
    yield running
    await running.stop()


async def one(running: Running, request_id: str) -> dict[str, Any]:
    for _ in range(50):  # the capture is written off the request path
        status, _, raw = await get(
            f"{running.admin_url}/admin/requests/{request_id}", auth(ADMIN_KEY)
        )
        assert status == 200
        found: dict[str, Any] = orjson.loads(raw)
        if found["capture"] is not None:
            return found
        await running.gw.captures.flush()
        await asyncio.sleep(0.02)
    raise AssertionError("no capture was stored")


async def send(running: Running) -> tuple[str, str]:
    body = {"model": "nusantara-base", "input": "hi", "max_output_tokens": 8}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{running.url}/v1/responses", json=body, headers=auth()) as r,
    ):
        await r.read()
        return r.headers["x-request-id"], r.headers["x-gateway-trace-id"]


async def test_a_captured_request_links_to_its_trace(traced: Running) -> None:
    request_id, trace_id = await send(traced)
    found = await one(traced, request_id)
    assert found["capture"]["trace_id"] == trace_id
    assert found["trace_url"] == f"http://jaeger.test:16686/trace/{trace_id}"


async def test_no_trace_link_without_trace_url(gateway: Running) -> None:
    request_id, _ = await send(gateway)
    await gateway.gw.ledger.flush()
    status, _, raw = await get(f"{gateway.admin_url}/admin/requests/{request_id}", auth(ADMIN_KEY))
    assert status == 200 and orjson.loads(raw)["trace_url"] is None


async def test_an_uncaptured_request_links_to_its_trace_too(
    upstream: Upstream, tmp_path: Path
) -> None:
    base = make_settings(upstream.url, tmp_path / "state")
    telemetry = base.telemetry.model_copy(update={"trace_url": "http://t.test/{trace_id}"})
    running = await start_gateway(base.model_copy(update={"telemetry": telemetry}))
    try:
        request_id, trace_id = await send(running)
        await running.gw.ledger.flush()
        status, _, raw = await get(
            f"{running.admin_url}/admin/requests/{request_id}", auth(ADMIN_KEY)
        )
        found = orjson.loads(raw)
        assert status == 200 and found["capture"] is None
        assert found["trace_id"] == trace_id and len(trace_id) == 32
        assert found["trace_url"] == f"http://t.test/{trace_id}"
    finally:
        await running.stop()
