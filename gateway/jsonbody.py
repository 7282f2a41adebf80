"""Decoding a request body as JSON within one nesting limit. Pure, no I/O.

orjson decodes up to 1024 levels but encodes only 254, and the gateway re-encodes bodies (the
cache key, the Chat stream rewrite): a body between those depths would fail deep in the
pipeline. One limit, checked right after decoding, refuses it up front.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


class TooDeep(ValueError):
    pass


class AmbiguousKeys(ValueError):
    """Two top-level keys that differ only in case: some upstreams (Go's encoding/json, so
    Ollama) match keys without regard to case and take the last, others take the exact one,
    so `{"model": "a", "MODEL": "b"}` would be checked as one model and served as another."""


def loads(body: bytes, max_depth: int) -> Any:
    """Decode `body`; raises orjson.JSONDecodeError, or TooDeep past `max_depth` levels."""
    obj = orjson.loads(body)
    # every level opens a bracket: a body with few brackets cannot be deep (a C-speed count
    # that spares the walk for almost every request)
    if body.count(b"[") + body.count(b"{") > max_depth and depth(obj) > max_depth:
        raise TooDeep(f"deeper than {max_depth} levels")
    return obj


def depth(obj: Any) -> int:
    """Nesting depth of a decoded JSON value: a scalar is 0, `[]` and `{}` are 1."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        level += 1
        deepest = max(deepest, level)
        stack.extend((child, level) for child in children if isinstance(child, dict | list))
    return deepest


def fields(obj: dict[str, Any]) -> dict[str, Any]:
    """A body's top-level fields by lower-cased name, as a case-insensitive upstream reads
    them; raises AmbiguousKeys if two names differ only in case."""
    out = {k.lower(): v for k, v in obj.items()}
    if len(out) != len(obj):
        seen: dict[str, str] = {}
        for k in obj:
            if k.lower() in seen:
                name = k.lower()[:40]
                raise AmbiguousKeys(f"two top-level fields named {name!r} differ only in case")
            seen[k.lower()] = k
    return out


def with_model(body: bytes, model: str) -> bytes:
    """A JSON object body with its top-level `model` (whatever the case of its name) set to
    `model`; any other body as it is. Decoded by the standard library, whose integers have no
    size limit and whose floats print back as they were read, so no other value changes."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return body
    if not isinstance(obj, dict):
        return body
    key = next((k for k in obj if k.lower() == "model"), "model")
    obj[key] = model
    # escaped non-ASCII: the same text, and a lone surrogate cannot break the encoding
    return json.dumps(obj, separators=(",", ":")).encode()
