"""The inspector in a real browser: Debian's headless chromium, driven by Selenium.

A gateway runs on real sockets with every request captured; the official openai SDK makes a
few requests (one streamed, one JSON, one carrying markup in its prompt); then the page is
driven as an engineer would: key entered, requests listed, one opened, its output read, the
hostile body shown as text, a replay shown beside the original. No request may leave
127.0.0.1 and the page may log no JavaScript error. The screenshot is saved under the test's
tmp_path and, when `INSPECTOR_SCREENSHOT` is set, to that path too.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
from conftest import ADMIN_KEY, ALPHA_KEY, Running, Upstream, make_settings, start_gateway

from gateway.settings import Capture

CHROMIUM = os.environ.get("GATEWAY_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("GATEWAY_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2"> what now?'
TRACE_URL = "http://jaeger.internal:16686/trace/{trace_id}"


def _missing() -> str:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} is absent: install Debian's chromium and chromium-driver"
    return ""


pytestmark = pytest.mark.skipif(bool(_missing()), reason=_missing() or "-")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")


@dataclass
class Made:
    streamed: str  # request id
    streamed_text: str
    plain: str
    plain_text: str
    hostile: str


@pytest.fixture
async def running(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Running]:
    base = make_settings(
        upstream.url,
        tmp_path / "state",
        cache="true",
        alpha_budgets="[{tokens: 20000, per: day}, {usd: 0.002, per: month}]",
        beta_budgets="[{requests: 50, per: hour}]",
    )
    settings = base.model_copy(
        update={
            "capture": Capture.model_validate({"enabled": True, "sample_ratio": 1.0}),
            "telemetry": base.telemetry.model_copy(update={"trace_url": TRACE_URL}),
        }
    )
    gw = await start_gateway(settings)
    yield gw
    await gw.stop()


async def make_requests(running: Running) -> Made:
    async with openai.AsyncOpenAI(
        base_url=f"{running.url}/v1", api_key=ALPHA_KEY, max_retries=0
    ) as client:
        streamed = await client.responses.with_raw_response.create(
            model="nusantara-base",
            input="Explain what an egress gateway does",
            max_output_tokens=24,
            stream=True,
            extra_headers={"x-gateway-user": "dina", "x-gateway-tags": "env=staging,app=chat"},
        )
        text = ""
        async for ev in streamed.parse():
            if ev.type == "response.output_text.delta":
                text += ev.delta
        plain = await client.responses.with_raw_response.create(
            model="nusantara-base",
            input="Name three uses of a request ledger",
            max_output_tokens=16,
            extra_headers={"x-gateway-user": "arif"},
        )
        hostile = await client.responses.with_raw_response.create(
            model="nusantara-base", input=HOSTILE, max_output_tokens=8
        )
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=6
        )
    await running.gw.ledger.flush()
    await running.gw.captures.flush()
    return Made(
        streamed.headers["x-request-id"],
        text,
        plain.headers["x-request-id"],
        plain.parse().output_text,
        hostile.headers["x-request-id"],
    )


def browser() -> Any:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # the tests may run as root, in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1600,1300",
        "--no-proxy-server",
        # nothing but 127.0.0.1 resolves: a request for anything else fails
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--no-first-run",
        "--force-color-profile=srgb",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def drive(admin_url: str, made: Made, shots: list[Path]) -> dict[str, Any]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    try:
        wait = WebDriverWait(driver, 8)

        def until(check: Callable[[], Any], what: str) -> Any:
            return wait.until(lambda _: check(), message=what)

        def text(css: str) -> str:
            # read in one script: the pane may be rebuilt between a lookup and a read
            found = driver.execute_script(
                "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", css
            )
            return str(found)

        def open_row(request_id: str) -> None:
            driver.find_element(By.CSS_SELECTOR, f'tr[data-id="{request_id}"]').click()
            until(lambda: request_id in text("#detail .rid"), f"{request_id} opened")

        driver.get(f"{admin_url}/admin/ui")
        key = until(lambda: driver.find_element(By.ID, "key"), "the key is asked for")
        assert not driver.find_elements(By.CSS_SELECTOR, "#rows tr")  # no data before the key
        key.send_keys(ADMIN_KEY)
        driver.find_element(By.ID, "key-submit").click()
        until(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#rows tr[data-id]")) >= 4, "list")
        listed = [
            tr.get_attribute("data-id")
            for tr in driver.find_elements(By.CSS_SELECTOR, "#rows tr[data-id]")
        ]
        assert listed[1:4] == [made.hostile, made.plain, made.streamed]  # newest first

        user = driver.find_element(By.CSS_SELECTOR, '#filters input[name="user"]')
        user.send_keys("dina\n")  # a filter: only that user's request
        until(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#rows tr[data-id]")) == 1, "dina")
        assert driver.find_element(By.CSS_SELECTOR, "#rows tr").get_attribute("data-id") == (
            made.streamed
        )
        driver.find_element(By.ID, "clear").click()
        until(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#rows tr[data-id]")) >= 4, "all")

        open_row(made.streamed)  # a stream: its assembled text
        until(lambda: text("#output") == made.streamed_text, "the streamed output text")
        assert "Open trace" in text("#detail a.trace")

        open_row(made.hostile)  # markup in a captured body is text, never markup
        until(lambda: "<script>window.pwned=1</script>" in text("#request-body"), "markup as text")
        assert "<img src=x onerror=" in text("#request-body")
        assert not driver.find_elements(By.CSS_SELECTOR, "#detail script, #detail img")
        assert driver.execute_script("return window.pwned === undefined")

        open_row(made.plain)  # a JSON answer: its output text
        until(lambda: text("#output") == made.plain_text, "the JSON output text")
        driver.find_element(By.ID, "replay").click()
        until(lambda: text("#replay-output") != "", "the replay's answer")
        replayed = {
            "original": text("#replay-original"),
            "replay": text("#replay-output"),
            "head": text(".compare-head"),
        }
        new_id = until(
            lambda: driver.execute_script(
                "const a = document.querySelector('.compare-head a'); return a && a.textContent"
            ),
            "the replay's request id",
        )
        # the replay is a request of its own: listed at once, marked as a replay when opened
        until(lambda: driver.find_elements(By.CSS_SELECTOR, f'tr[data-id="{new_id}"]'), "listed")
        driver.save_screenshot(str(shots[0]))

        driver.find_element(By.CSS_SELECTOR, '.tab[data-view="overview"]').click()
        until(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#budgets .budget")) == 3, "bars")
        until(lambda: "healthy" in text("#upstreams"), "upstream health")
        driver.save_screenshot(str(shots[1]))

        driver.find_element(By.CSS_SELECTOR, '.tab[data-view="requests"]').click()
        trace_href = driver.find_element(By.CSS_SELECTOR, "#detail a.trace").get_attribute("href")
        open_row(new_id)
        until(lambda: f"replay of {made.plain}" in text("#detail .detail-head"), "replay_of")

        # a link to a request opens it; the key is not asked again in this browser session
        driver.get(f"{admin_url}/admin/ui#{made.streamed}")
        driver.refresh()
        until(lambda: made.streamed in text("#detail .rid"), "the linked request")
        assert not driver.find_element(By.ID, "login").is_displayed()
        return {
            "replayed": replayed,
            "trace_href": trace_href,
            "url": driver.current_url,
            "stored_key": driver.execute_script("return Object.values(sessionStorage)"),
            "console": driver.get_log("browser"),
            "network": [e["message"] for e in driver.get_log("performance")],
            "resources": driver.execute_script(
                "return performance.getEntriesByType('resource').map(e => e.name)"
            ),
        }
    finally:
        driver.quit()


def requested_urls(performance_log: list[str]) -> list[str]:
    import json

    urls = []
    for raw in performance_log:
        message = json.loads(raw)["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


async def test_the_inspector_in_a_browser(running: Running, tmp_path: Path) -> None:
    made = await make_requests(running)
    shots = [tmp_path / "inspector.png", tmp_path / "inspector-overview.png"]
    seen = await asyncio.to_thread(drive, running.admin_url, made, shots)

    assert seen["replayed"]["replay"] == seen["replayed"]["original"] == made.plain_text
    assert "same output" in seen["replayed"]["head"]
    assert seen["trace_href"].startswith("http://jaeger.internal:16686/trace/")
    assert ADMIN_KEY not in seen["url"] and seen["stored_key"] == [ADMIN_KEY]
    severe = [e for e in seen["console"] if e["level"] == "SEVERE"]
    assert severe == [], severe
    urls = requested_urls(seen["network"]) + seen["resources"]
    assert urls and all(urlsplit(u).hostname == "127.0.0.1" for u in urls), urls
    assert all(ADMIN_KEY not in u for u in urls)
    for shot in shots:
        assert shot.stat().st_size > 10_000
    if os.environ.get("INSPECTOR_SCREENSHOT"):
        target = Path(os.environ["INSPECTOR_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shots[0], target)
        shutil.copyfile(shots[1], target.with_name(f"{target.stem}-overview{target.suffix}"))


def refuse(admin_url: str) -> dict[str, Any]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    try:
        driver.get(f"{admin_url}/admin/ui")
        wait = WebDriverWait(driver, 8)
        wait.until(lambda _: driver.find_element(By.ID, "key")).send_keys("not-the-key")
        driver.find_element(By.ID, "key-submit").click()
        wait.until(lambda _: driver.find_element(By.ID, "login-error").text, "a refusal")
        return {
            "error": driver.find_element(By.ID, "login-error").text,
            "asked": driver.find_element(By.ID, "key").is_displayed(),
            "listed": driver.find_element(By.ID, "view-requests").is_displayed(),
            "stored": driver.execute_script("return sessionStorage.length"),
            "console": driver.get_log("browser"),
        }
    finally:
        driver.quit()


async def test_a_wrong_key_is_refused_and_not_kept(running: Running) -> None:
    seen = await asyncio.to_thread(refuse, running.admin_url)
    assert "admin key" in seen["error"] and seen["asked"] and not seen["listed"]
    assert seen["stored"] == 0
    # the browser reports the refused call itself; the page's script logs nothing
    assert all("status of 401" in e["message"] for e in seen["console"]), seen["console"]
