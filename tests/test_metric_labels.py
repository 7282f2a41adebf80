"""The `model` label: only models the config names, sane, capped; junk from clients is `other`."""

from __future__ import annotations

import asyncio
import random
import string
from pathlib import Path

import aiohttp
from conftest import GatewayFactory, auth, make_settings
from prometheus_client.parser import text_string_to_metric_families

from gateway.telemetry.metrics import ModelLabels, named_models

JUNK = (
    "x" * 5000,
    "gpt\x00evil",
    "nusantara-base\x00",
    "n\u00e9ant",
    "line\nbreak",
    "a" * 129,
)


def test_only_named_models_keep_their_name() -> None:
    labels = ModelLabels(100, ["*", "gpt-4o*", "claude-?-opus", "nusantara-base"])
    assert labels("nusantara-base") == "nusantara-base"
    assert labels("gpt-4o-mini") == "gpt-4o-mini"
    assert labels("claude-3-opus") == "claude-3-opus"
    assert labels("made-up") == "other"  # only the catch-all matches it
    assert labels("") == "unknown"


def test_a_pattern_of_only_wildcards_names_nothing() -> None:
    labels = ModelLabels(100, ["*", "**", "?*", "[a-z]*", "[!x]?*"])
    assert [labels(m) for m in ("gpt-4o", "a", "zz", "nusantara-base")] == ["other"] * 4


def test_values_that_are_not_sane_are_other_even_if_a_glob_matches() -> None:
    labels = ModelLabels(100, ["*x*", "gpt*", "nusantara-*", "n*", "line*", "a*"])
    assert [labels(m) for m in JUNK] == ["other"] * len(JUNK)
    assert labels("a" * 128) == "a" * 128  # the longest sane value
    assert labels("gpt 4") == "gpt 4"  # printable ASCII includes the space


def test_distinct_values_are_capped() -> None:
    labels = ModelLabels(2, ["gpt-*"])
    assert [labels(f"gpt-{n}") for n in range(4)] == ["gpt-0", "gpt-1", "other", "other"]
    assert labels("gpt-1") == "gpt-1"  # already given: stays


def test_known_patterns_follow_a_reload() -> None:
    labels = ModelLabels(100, ["old-model"])
    assert labels("old-model") == "old-model"
    assert labels("new-model") == "other"
    labels.know(["new-*"])
    assert labels("new-model") == "new-model"
    assert labels("old-model") == "old-model"  # labels already given may stay
    assert labels("old-model-2") == "other"


def test_named_models_are_upstream_patterns_and_prices(tmp_path: Path) -> None:
    settings = make_settings("http://127.0.0.1:1", tmp_path, models='["gpt-4o*", "*"]')
    assert sorted(named_models(settings)) == ["*", "*", "gpt-4o*", "nusantara-base"]


# --- end to end ------------------------------------------------------------------------------


async def scrape(session: aiohttp.ClientSession, admin_url: str) -> str:
    async with session.get(f"{admin_url}/metrics") as r:
        assert r.status == 200
        return await r.text()


def model_labels(text: str) -> set[str]:
    return {
        s.labels["model"]
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if "model" in s.labels
    }


async def test_junk_models_leave_metrics_small(gateway_factory: GatewayFactory) -> None:
    running = await gateway_factory()
    rng = random.Random(7)
    names = {"".join(rng.choices(string.ascii_lowercase, k=12)) for _ in range(500)}
    sem = asyncio.Semaphore(20)

    async def send(s: aiohttp.ClientSession, model: str) -> None:
        body = {"model": model, "input": "hi", "max_output_tokens": 8}
        async with sem, s.post(f"{running.url}/v1/responses", json=body, headers=auth()) as r:
            await r.read()

    async with aiohttp.ClientSession() as s:
        await send(s, "nusantara-base")
        await send(s, "warm-up-junk")
        before = await scrape(s, running.admin_url)
        await asyncio.gather(*(send(s, m) for m in (*JUNK, *sorted(names))))
        after = await scrape(s, running.admin_url)

        assert model_labels(after) == {"nusantara-base", "other"}
        assert len(after) - len(before) < 2000  # counts grew, series did not
        assert len(after) < 100_000
        assert "xxxxxxxxxx" not in after and "\\x00" not in after and "evil" not in after
        assert not any(n in after for n in names)

        # a reload that names a model by a glob: the label follows
        settings = running.gw.settings
        upstream = settings.upstreams[0].model_copy(update={"models": ("gpt-4o*", "*")})
        await running.gw.reload(settings.model_copy(update={"upstreams": (upstream,)}))
        await send(s, "gpt-4o-mini")
        await send(s, "still-junk")
        labels = model_labels(await scrape(s, running.admin_url))
        assert labels == {"nusantara-base", "gpt-4o-mini", "other"}
