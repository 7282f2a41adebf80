"""Deterministic output text and usage.

Owns: the 64-word vocabulary (plain and pre-encoded as JSON), pulling the input texts out of
a Responses or Chat Completions body, token counting, and ``generate``: output words from a
hash of the input, so the same input always gets the same words and usage.
``input_tokens = max(1, ceil(chars / 4))`` over instructions plus every input text;
``output_tokens = N + reasoning`` where ``N`` is the number of words produced.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from gateway.mock_upstream.knobs import header_int

__all__ = [
    "FIRST_JSON",
    "REST_JSON",
    "Generated",
    "chat_texts",
    "content_texts",
    "generate",
    "input_tokens",
    "input_usage",
    "pick_word",
    "requested_tokens",
    "responses_texts",
]

# like a real model's output limit; keeps a silly request bounded
_MAX_OUTPUT_TOKENS: Final = 131_072

# 64 words, so a byte of hash output picks one uniformly with `b % 64`.
_WORDS: Final = (
    "the", "quick", "river", "flows", "past", "green", "rice", "fields", "under", "a",
    "warm", "island", "sky", "where", "small", "boats", "carry", "spice", "and", "tea",
    "to", "busy", "harbor", "towns", "every", "morning", "light", "falls", "on", "old",
    "stone", "temples", "while", "children", "sing", "songs", "about", "the", "sea", "wind",
    "mountain", "forest", "garden", "market", "bridge", "lantern", "story", "silver", "gold",
    "ocean", "rain", "cloud", "sun", "moon", "star", "path", "home", "friend", "quiet",
    "bright", "gentle", "swift", "clear", "deep",
)  # fmt: skip
# Indexed by a hash byte: the first word of a text, then every later word (with its space).
_FIRST: Final = tuple(_WORDS[b % 64] for b in range(256))
_REST: Final = tuple(" " + w for w in _FIRST)
FIRST_JSON: Final = tuple(orjson.dumps(w) for w in _FIRST)
REST_JSON: Final = tuple(orjson.dumps(w) for w in _REST)


@dataclass(frozen=True, slots=True)
class Generated:
    digest: bytes  # one byte per output word
    text: str
    input_tokens: int
    cached_tokens: int
    reasoning_tokens: int

    @property
    def output_tokens(self) -> int:
        return len(self.digest) + self.reasoning_tokens


def content_texts(content: Any, out: list[str]) -> None:
    """Append the texts of a message's `content`: a string, or the parts that have a text."""
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(text := part.get("text"), str):
                out.append(text)


def responses_texts(body: Mapping[str, Any]) -> list[str]:
    texts: list[str] = []
    if isinstance(instructions := body.get("instructions"), str):
        texts.append(instructions)
    items = body.get("input")
    if isinstance(items, str):
        texts.append(items)
    elif isinstance(items, list):
        for item in items:
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, dict):
                content_texts(item.get("content"), texts)
                if isinstance(output := item.get("output"), str):  # function_call_output
                    texts.append(output)
    return texts


def chat_texts(body: Mapping[str, Any]) -> list[str]:
    texts: list[str] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                content_texts(message.get("content"), texts)
    return texts


def input_tokens(texts: list[str]) -> int:
    return max(1, math.ceil(sum(map(len, texts)) / 4))


def pick_word(seed: str) -> str:
    """One word of the vocabulary, picked by a hash of `seed`."""
    return _FIRST[hashlib.shake_128(seed.encode("utf-8", "surrogatepass")).digest(1)[0]]


def input_usage(request: web.Request, texts: list[str]) -> tuple[int, int, int]:
    """Input, cached and reasoning tokens: the input's count and the x-mock-* knobs."""
    n_input = input_tokens(texts)
    cached = min(max(header_int(request, "x-mock-cached-tokens") or 0, 0), n_input)
    reasoning = max(header_int(request, "x-mock-reasoning-tokens") or 0, 0)
    return n_input, cached, reasoning


def requested_tokens(body: Mapping[str, Any], keys: tuple[str, ...], default: int) -> int:
    for key in keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def generate(request: web.Request, texts: list[str], requested: int) -> Generated:
    """Deterministic words from a hash of the input; knobs from the x-mock-* headers."""
    count = header_int(request, "x-mock-output-tokens")
    count = min(max(requested if count is None else count, 0), _MAX_OUTPUT_TOKENS)
    digest = (
        hashlib.shake_128("\x1f".join(texts).encode("utf-8", "surrogatepass")).digest(count)
        if count
        else b""
    )
    text = _FIRST[digest[0]] + "".join(map(_REST.__getitem__, digest[1:])) if digest else ""
    return Generated(digest, text, *input_usage(request, texts))
