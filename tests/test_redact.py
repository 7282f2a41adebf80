"""The one redactor: by value, by digest (client keys), by shape; and in exported spans."""

from __future__ import annotations

import hashlib
import random
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import (
    ADMIN_KEY,
    ALPHA_KEY,
    BETA_KEY,
    UPSTREAM_KEY,
    Upstream,
    make_settings,
    start_gateway,
)
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.redact import MARK, Redactor
from gateway.runtime import Gateway
from gateway.schema import hash_key
from gateway.settings import Telemetry, Traces
from gateway.telemetry.tracing import Tracing

CLIENT = "key-alpha-0123456789"  # held only as a digest
HELD = "upstream-secret-ABCDEFGH"  # held in clear, like an upstream key
GW_KEY = "gw-" + "Zq3_x-" * 7 + "a"  # the shape `gateway keys new` prints

SHAPED = (
    "sk-" + "A1b2C3d4" * 6,
    "sk-proj-" + "Xy9_" * 12,
    "sk-ant-api03-" + "Qw-e" * 20,
    GW_KEY,
    "AKIAIOSFODNN7EXAMPLE",
    "AIzaSyA-" + "b" * 31,
    "ghp_" + "R2d2" * 9,
    "github_pat_11ABCDEFG0" + "x_y" * 10,
    "xoxb-123456789012-abcdefABCDEF",
)
BENIGN = (
    "The quick brown fox jumps over the lazy dog; nevertheless, internationalization matters.",
    f"resp_{uuid.uuid4().hex} msg_{uuid.uuid4().hex} chatcmpl-{uuid.uuid4().hex[:24]}",
    f"request {uuid.uuid4()} trace 4bf92f3577b34da6a3ce929d0e0e4736 span 00f067aa0ba902b7",
    f"sha256:{hashlib.sha256(b'x').hexdigest()} commit 9f1c2e7d3b4a5f6e7d8c9b0a1f2e3d4c5b6a7f8e",
    "risk-assessment-framework-v2-final and task-0123456789abcdefghijkl and sk-learn",
    "def redact(self, text: str) -> str:  # see https://example.com/docs?page=2&lang=en",
    "image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGA",
)


@pytest.fixture
def redactor() -> Redactor:
    return Redactor([HELD], [hashlib.sha256(CLIENT.encode()).digest()])


@pytest.mark.parametrize(
    "text",
    [
        f"my key is {CLIENT}",
        f"my key is {CLIENT}.",
        f'{{"api_key": "{CLIENT}"}}',
        f"export GATEWAY_KEY={CLIENT}",
        f"curl 'https://gw.local/v1?key={CLIENT}&x=1'",
        f"x-api-key:{CLIENT}",
        f"({CLIENT})",
        f"clé→ {CLIENT} ←",
    ],
)
def test_a_client_key_held_as_a_digest_is_found_by_value(redactor: Redactor, text: str) -> None:
    for form in (text, orjson.dumps(text).decode(), orjson.dumps("\n" + text + "\t").decode()):
        out = redactor(form)
        assert CLIENT not in out and MARK in out


def test_a_key_after_a_json_escape_is_found(redactor: Redactor) -> None:
    for raw in (f"line\n{CLIENT}", f"tab\t{CLIENT}", f"nbsp\u00a0{CLIENT}", f"nul\x00{CLIENT}"):
        assert CLIENT not in redactor(orjson.dumps(raw).decode())


def test_text_that_is_not_valid_utf8_is_handled(redactor: Redactor) -> None:
    text = f"\ud800 {CLIENT} \udcff={CLIENT}.\ud800x"  # lone surrogates, as json.loads allows
    assert redactor(text) == f"\ud800 {MARK} \udcff={MARK}.\ud800x"


def test_held_secrets_are_found_anywhere(redactor: Redactor) -> None:
    assert redactor(f"xx{HELD}yy") == f"xx{MARK}yy"


@pytest.mark.parametrize("key", SHAPED)
def test_common_key_shapes(key: str) -> None:
    r = Redactor()
    for text in (
        key,
        f"key: {key}.",
        f'"{key}"',
        f"token={key}",
        orjson.dumps(f"\n{key}").decode(),
    ):
        assert key not in r(text), text


def test_bearer_tokens() -> None:
    assert Redactor()("Authorization: Bearer abc.def-ghi_jkl") == f"Authorization: {MARK}"


@pytest.mark.parametrize("text", BENIGN)
def test_ordinary_text_and_ids_are_left_alone(redactor: Redactor, text: str) -> None:
    assert redactor(text) == text


def test_extra_patterns() -> None:
    r = Redactor(extra=(r"(?i)internal-[0-9]{6}", r"\bPIN (\d{4})\b"))
    assert r("ticket INTERNAL-123456, PIN 1234 ok") == f"ticket {MARK}, {MARK} ok"


def test_from_settings_covers_upstream_admin_and_client_keys(tmp_path: Path) -> None:
    settings = make_settings("http://127.0.0.1:1", tmp_path)
    r = Redactor.from_settings(settings)
    text = f"{UPSTREAM_KEY} {ADMIN_KEY} {ALPHA_KEY} {BETA_KEY}"
    assert r(text) == " ".join([MARK] * 4)


def test_100_kb_is_redacted_quickly(redactor: Redactor) -> None:
    words = " ".join(secrets.token_urlsafe(8) for _ in range(9000))[:100_000]
    text = words[:50_000] + f" {CLIENT} " + words[50_000:]
    started = time.perf_counter()
    out = redactor(text)
    took = time.perf_counter() - started
    assert CLIENT not in out
    assert took < 1.0  # measured ~10 ms; the bound only catches a runaway


def test_a_held_secret_that_starts_with_another_is_replaced_whole() -> None:
    for values in (["secret-one", "secret-one-two"], ["secret-one-two", "secret-one"]):
        assert Redactor(values)("a secret-one-two b secret-one") == f"a {MARK} b {MARK}"


def test_from_settings_takes_the_capture_redact_patterns(tmp_path: Path) -> None:
    settings = make_settings("http://127.0.0.1:1", tmp_path)
    settings = settings.model_copy(
        update={"capture": settings.capture.model_copy(update={"redact": (r"PIN \d{4}",)})}
    )
    r = Redactor.from_settings(settings)
    assert r(f"PIN 1234 {ALPHA_KEY}") == f"{MARK} {MARK}"


def digests(*keys: str | bytes) -> list[bytes]:
    return [hashlib.sha256(k if isinstance(k, bytes) else k.encode()).digest() for k in keys]


def test_a_client_key_with_bytes_that_are_not_utf8_is_found_as_auth_reads_it() -> None:
    # a header byte 0xff reaches auth.py as U+DCFF (surrogateescape) and is hashed as 0xff
    r = Redactor(digests=digests(b"key-\xff-0123456789"))
    assert r("key is key-\udcff-0123456789 here") == f"key is {MARK} here"
    assert r("glued=key-\udcff-0123456789.") == f"glued={MARK}."


def test_keys_as_short_as_min_token_are_found_glued_and_shorter_ones_are_not_looked_for() -> None:
    r = Redactor(digests=digests("k1234567", "k123456"))
    assert r("key=k1234567&x=1") == f"key={MARK}&x=1"
    # shorter than MIN_TOKEN: not hashed at all (hashing every short word would cost time)
    assert r("key=k123456&x=1") == "key=k123456&x=1"
    assert r("x=k123456") == "x=k123456"


def test_a_glued_key_may_start_with_a_short_piece() -> None:
    r = Redactor(digests=digests("ab.cdefghij"))
    assert r("x=ab.cdefghij&y=1") == f"x={MARK}&y=1"


def test_glued_keys_next_to_each_other_are_all_found() -> None:
    r = Redactor(digests=digests("AAAA.BBBB", "CCCCCCCC"))
    assert r("AAAA.BBBB.CCCCCCCC") == f"{MARK}.{MARK}"
    assert r("x=AAAA.BBBB&y=CCCCCCCC&z=AAAA.BBBB") == f"x={MARK}&y={MARK}&z={MARK}"


def test_a_key_containing_another_is_replaced_whole_after_a_json_escape() -> None:
    r = Redactor(digests=digests("AAAAAAAA.BBBBBBBB", "BBBBBBBB"))
    assert r(orjson.dumps("\nAAAAAAAA.BBBBBBBB").decode()) == f'"\\n{MARK}"'


@pytest.mark.parametrize(("cuts", "found"), [(63, True), (64, True), (65, False)])
def test_a_token_cut_more_than_max_pieces_times_is_a_blob(cuts: int, found: bool) -> None:
    # base64 data has a soft separator every few characters: trying every run of its pieces
    # would cost seconds a megabyte, so such a token is not cut (a key in it stays)
    r = Redactor(digests=digests(CLIENT))
    text = "a/" * (cuts - 1) + CLIENT + "/"
    assert (r(text) == "a/" * (cuts - 1) + MARK + "/") is found
    assert (CLIENT in r(text)) is not found


# --- properties ------------------------------------------------------------------------------

SEPARATORS = list(" \n\t\"'`()[]{}<>,;|.:=&?/@!")
around = st.text(max_size=30)  # at most 30 glue characters a side: under the blob cut-off


@given(
    before=around, after=around, left=st.sampled_from(SEPARATORS), right=st.sampled_from(SEPARATORS)
)
def test_a_client_key_never_survives(before: str, after: str, left: str, right: str) -> None:
    r = Redactor(digests=[hashlib.sha256(CLIENT.encode()).digest()])
    text = before + left + CLIENT + right + after
    assert CLIENT not in r(text)
    assert CLIENT not in r(orjson.dumps({"content": text}).decode())


@given(before=st.text(), after=st.text())
def test_a_held_secret_never_survives(before: str, after: str) -> None:
    r = Redactor([HELD])
    assert HELD not in r(before + HELD + after)
    assert HELD not in r(orjson.dumps([before + HELD + after]).decode())


@given(
    before=around,
    after=around,
    left=st.sampled_from(SEPARATORS),
    right=st.sampled_from(SEPARATORS),
    key=st.sampled_from(SHAPED),
)
def test_a_shaped_key_never_survives(
    before: str, after: str, left: str, right: str, key: str
) -> None:
    assert key not in Redactor()(before + left + key + right + after)


@given(text=st.text())
def test_text_without_a_key_is_unchanged(text: str) -> None:
    r = Redactor([HELD], [hashlib.sha256(CLIENT.encode()).digest()])
    assert r(text) == text
    assert r(orjson.dumps(text).decode()) == orjson.dumps(text).decode()


@given(text=st.text(st.characters(exclude_categories=())))
def test_any_string_even_with_lone_surrogates_is_unchanged(text: str) -> None:
    r = Redactor([HELD], [hashlib.sha256(CLIENT.encode()).digest()])
    assert r(text) == text


# --- end to end: a prompt's keys never reach an exported span --------------------------------

NEW_KEY = "key-after-reload-0123456789"


def span_strings(exporter: InMemorySpanExporter) -> Iterator[str]:
    for span in exporter.get_finished_spans():
        yield span.name
        for value in (span.attributes or {}).values():
            if isinstance(value, str):
                yield value
            elif isinstance(value, tuple):
                yield from (v for v in value if isinstance(v, str))


async def respond(url: str, key: str, body: dict[str, Any]) -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"}) as r,
    ):
        await r.read()
        return r.status


async def test_keys_in_a_prompt_never_reach_an_exported_span(
    upstream: Upstream, tmp_path: Path
) -> None:
    settings = make_settings(upstream.url, tmp_path / "s")
    exporter = InMemorySpanExporter()
    tracing = Tracing.from_settings(
        Telemetry(traces=Traces(capture_content=True)), exporter=exporter
    )
    running = await start_gateway(settings, Gateway(settings, tracing=tracing))
    leaked = (ALPHA_KEY, BETA_KEY, UPSTREAM_KEY, ADMIN_KEY, GW_KEY, NEW_KEY)
    try:
        body = {
            "model": "nusantara-base",
            "max_output_tokens": 8,
            "instructions": f"never reveal {BETA_KEY}",
            "input": [
                {"role": "user", "content": f"my key is {ALPHA_KEY}.\n{ALPHA_KEY}"},
                {"role": "user", "content": [{"type": "input_text", "text": f"k={UPSTREAM_KEY}"}]},
                {"role": "user", "content": f'{{"admin": "{ADMIN_KEY}", "new": "{GW_KEY}"}}'},
                {"role": "user", "content": "see resp_0123456789abcdef for details"},
            ],
        }
        assert await respond(running.url, ALPHA_KEY, body) == 200
        running.gw.tracing.flush()
        texts = list(span_strings(exporter))
        content = [t for t in texts if t.startswith("[{")]
        assert len(content) == 2  # instructions and messages were captured
        assert any("resp_0123456789abcdef" in t for t in content)  # ids are not keys
        assert [key for key in leaked if any(key in t for t in texts)] == []
        assert sum(t.count("[REDACTED]") for t in content) == 6

        # a reload brings a new client key: the redactor follows
        team = settings.teams[0].model_copy(update={"key_digests": (hash_key(NEW_KEY),)})
        await running.gw.reload(settings.model_copy(update={"teams": (team, *settings.teams[1:])}))
        body = {"model": "nusantara-base", "max_output_tokens": 8, "input": f"now {NEW_KEY}"}
        assert await respond(running.url, NEW_KEY, body) == 200
        running.gw.tracing.flush()
        texts = list(span_strings(exporter))
        assert [key for key in leaked if any(key in t for t in texts)] == []
        assert any("now [REDACTED]" in t for t in texts)
        assert running.gw.redactor(f"x {NEW_KEY} y") == "x [REDACTED] y"
    finally:
        await running.stop()


def test_the_quick_pass_never_misses_a_client_key_the_full_pass_finds() -> None:
    # whatever glues the key to its neighbours, the quick pass says "maybe" whenever the full
    # pass would replace something: it may only skip texts that hold no client key
    key = "key-alpha-0123456789"
    r = Redactor(digests=digests(key))
    glue = ["", " ", "=", ":", "/", "?k=", "&", ".", "\\n", "\\u00a0", "\\t", '"', "'", "(", "\\"]
    rng = random.Random(5)
    for left in glue:
        for right in glue:
            noise = "".join(rng.choice("ab1.=/ ") for _ in range(rng.randint(0, 12)))
            text = f"{noise}{left}{key}{right}{noise}"
            if r._client_keys(text) != text:
                assert r._screen(text)[0], text
            # the quick passes change nothing: the result is the full passes' own
            assert r(text) == r._known.sub(MARK, r._client_keys(text)), text
    plain = "a prompt of ordinary words, with no key in it at all: harbor, dawn, 127.0.0.1:8080"
    assert not r._screen(plain)[0]


# --- the quick passes and `many` redact exactly what the full passes do ----------------------

PIECES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [CLIENT, HELD, *SHAPED, "Bearer", "bearer ", "abcdefgh12", "sk-", "earer", "\\n", "\\u00a0"]
    ),
    st.sampled_from([*SEPARATORS, "\n", "\x00", "\n\x00\n", "\\", " "]),
)
texts = st.lists(PIECES, max_size=12).map("".join)


def full_passes(r: Redactor, text: str) -> str:
    """What the redactor finds with no quick pass at all: every regex over the whole text."""
    text = r._known.sub(MARK, r._client_keys(text))
    for pattern in r._extra:
        text = pattern.sub(MARK, text)
    return text


def a_redactor() -> Redactor:
    return Redactor(
        [HELD, "held with, a space"], digests(CLIENT), extra=(r"PIN \d{4}", r"(?s)<<.*?>>")
    )


@given(seen=st.lists(texts, max_size=4), text=texts)
def test_the_quick_passes_never_change_what_is_redacted(seen: list[str], text: str) -> None:
    # the tokens remembered from earlier texts make no difference to a later one
    r = a_redactor()
    for earlier in seen:
        assert r(earlier) == full_passes(r, earlier)
    assert r(text) == full_passes(r, text)
    assert r(orjson.dumps(text).decode()) == full_passes(r, orjson.dumps(text).decode())


@given(batch=st.lists(texts, max_size=8))
def test_many_redacts_each_text_as_one_call_would(batch: list[str]) -> None:
    assert a_redactor().many(batch) == [full_passes(a_redactor(), t) for t in batch]
    assert Redactor().many(batch) == [Redactor()(t) for t in batch]


def test_many_never_lets_a_key_shape_reach_across_texts() -> None:
    r = Redactor()
    batch = ["auth: Bearer", "abcdefgh12345", "AKIAIOSFODNN7EXAMPLE", "x", "\\n", "ghp_" + "a" * 36]
    assert (
        r.many(batch)
        == [r(t) for t in batch]
        == [
            "auth: Bearer",
            "abcdefgh12345",
            MARK,
            "x",
            "\\n",
            MARK,
        ]
    )


def test_a_held_secret_with_a_newline_or_a_nul_is_found_text_by_text() -> None:
    for secret in ("line one\nline two", "nul\x00inside"):
        r = Redactor([secret])
        assert r.many([f"a {secret} b", "c", secret]) == [f"a {MARK} b", "c", MARK]
        assert r.many([secret[:5], secret[5:]]) == [secret[:5], secret[5:]]


def test_what_was_seen_clean_never_hides_a_key_later() -> None:
    r = a_redactor()
    conversation = orjson.dumps({"input": [{"role": "user", "content": "the harbor at dawn"}]})
    assert r(conversation.decode()) == conversation.decode()
    turn = orjson.dumps(
        {"input": [{"role": "user", "content": "the harbor at dawn"}, {"content": CLIENT}]}
    ).decode()
    for _ in range(2):  # a piece that held a key is not remembered as clean
        assert r(turn) == turn.replace(CLIENT, MARK)
    assert r(f"Bearer {CLIENT[:12]}") == MARK


def test_a_token_seen_clean_without_a_backslash_is_still_tried_after_one() -> None:
    # "nKEY" is no key, but after a backslash it reads as `\n` and KEY: the screen may only
    # remember a token as clean once it has been tried as if it followed one
    r = Redactor(digests=digests(CLIENT))
    assert r(f"x n{CLIENT} y") == f"x n{CLIENT} y"
    assert r(orjson.dumps(f"x\n{CLIENT} y").decode()) == orjson.dumps(f"x\n{MARK} y").decode()
