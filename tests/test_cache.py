"""Cache keys, entry encoding and the memory store's eviction order. No server.

What every cache store and single-flight registry does is in tests/contract."""

from __future__ import annotations

from gateway.cache.entry import CacheEntry
from gateway.cache.key import cache_key, canonical_json
from gateway.cache.store import MemoryCacheStore
from gateway.usage import Usage


def entry(body: bytes = b"{}", team: str = "a", created: float = 0.0) -> CacheEntry:
    return CacheEntry(
        200,
        (("content-type", "application/json"),),
        body,
        False,
        team,
        "m",
        Usage(1, 2, 3),
        created,
    )


def test_key_is_canonical_and_scoped() -> None:
    a = {"model": "m", "input": [{"role": "user", "content": "x"}], "temperature": 0.5}
    b = {"temperature": 0.5, "input": [{"content": "x", "role": "user"}], "model": "m"}
    assert canonical_json(a) == canonical_json(b)
    assert b" " not in canonical_json(a)
    assert cache_key("team:x", "up", a) == cache_key("team:x", "up", b)
    assert cache_key("team:x", "up", a) != cache_key("team:y", "up", a)
    assert cache_key("team:x", "up", a) != cache_key("team:x", "other", a)
    assert cache_key("t", "u", {**a, "stream": True}) != cache_key("t", "u", a)


def test_a_known_body_has_a_known_key() -> None:
    # CONTRACT section 5: sha256(scope NUL upstream NUL canonical JSON). Entries written by
    # one version are found by the next only while this holds: a changed format must be seen.
    body = {
        "model": "gpt-4o",
        "input": [{"role": "user", "content": "h\u00e9llo"}],
        "temperature": 0.5,
        "stream": False,
    }
    assert canonical_json(body) == (
        b'{"input":[{"content":"h\xc3\xa9llo","role":"user"}],'
        b'"model":"gpt-4o","stream":false,"temperature":0.5}'
    )
    assert cache_key("team:alpha", "openai", body) == (
        "a3599b7f43fa72f3559122d8e10f0c981aace5aeab435873453364e05f0896f5"
    )


def test_scope_and_upstream_are_kept_apart() -> None:
    assert cache_key("team:a", "bopenai", {}) != cache_key("team:ab", "openai", {})


def test_entry_roundtrip() -> None:
    e = CacheEntry(
        200,
        (("content-type", "text/event-stream"),),
        b"event: x\r\ndata: y\r\n\r\n",
        True,
        "team",
        "model",
        Usage(5, 6, 11, 1, 2),
        123.5,
    )
    assert CacheEntry.from_bytes(e.to_bytes()) == e


async def test_byte_bound_evicts_least_recently_used() -> None:
    store = MemoryCacheStore(ttl=600, max_bytes=3 * (1000 + 250), max_entry_bytes=2000)
    for k in ("a", "b", "c"):
        assert await store.put(k, entry(b"x" * 1000))
    assert await store.get("a") is not None  # a is now the most recently used
    await store.put("d", entry(b"x" * 1000))
    assert await store.get("b") is None
    assert all([await store.get(k) for k in ("a", "c", "d")])
    assert (await store.stats()).bytes <= 3 * 1250
