"""The canonical cache key (CONTRACT section 5). Pure."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson


def canonical_json(body: Any) -> bytes:
    """Sorted keys, no insignificant whitespace: equal requests give equal bytes."""
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def cache_key(scope: str, upstream: str, body: Any) -> str:
    h = hashlib.sha256(scope.encode())
    h.update(b"\0")
    h.update(upstream.encode())
    h.update(b"\0")
    h.update(canonical_json(body))
    return h.hexdigest()
