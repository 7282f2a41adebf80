"""Masking the upstream keys an upstream echoes back: in headers, JSON bodies and SSE streams.

Pure: bytes and strings in, bytes and strings out, no I/O.

A key shows as `mask(key)`: its first 3 characters (none for a key of 12 or fewer) and `****`.
What is replaced is the key's *core*, everything after the characters the mask shows, wherever
it appears: a whole key masks to exactly `mask(key)`, and a core echoed without its well-known
prefix (`sk-`) is masked too. Masking sees what a client sees: raw bytes, JSON string values
with their escapes decoded (`sk\\u002d...`), and in a stream, the text a client concatenates
from delta events (a key split across two deltas).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Final, TypeAlias
from urllib.parse import unquote

__all__ = [
    "Secrets",
    "StreamMasker",
    "mask",
    "mask_body",
    "mask_headers",
    "mask_secrets",
    "secrets_of",
]

# a compiled regex's bound search method
Search: TypeAlias = Callable[[bytes], re.Match[bytes] | None]

MASK: Final = b"****"
_MASK_TEXT: Final = "****"
_SHOWN: Final = 3
# one JSON string literal, escapes included
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_SHORT_ESCAPES: Final = {
    ord('"'): '"',
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_ESCAPED_BYTE: Final = tuple(re.escape(bytes([b])) for b in range(256))
# the end of a JSON string value: a quote that no colon follows (an object's key has one)
_VALUE_END = re.compile(rb'"(?!\s*:)')
_RUN: Final = 64  # prefix lengths a fast-path regex spells out before falling back to a literal


def shown(secret: bytes) -> int:
    """How many leading characters of `secret` its masked form keeps."""
    return _SHOWN if len(secret) > 12 else 0


def mask(secret: bytes) -> bytes:
    return secret[: shown(secret)] + MASK


class Secrets:
    """The keys to mask, with what the maskers look for precomputed."""

    __slots__ = (
        "_ends",
        "_escape",
        "_watch",
        "chars",
        "cores",
        "keys",
        "text_cores",
        "texts",
        "trail",
    )

    def __init__(self, secrets: tuple[bytes, ...]) -> None:
        keys = sorted({s for s in secrets if s}, key=len, reverse=True)
        self.keys = tuple(keys)
        self.cores = tuple(k[shown(k) :] for k in keys)
        self.texts = tuple(k.decode("utf-8", "replace") for k in keys)
        self.text_cores = tuple(c.decode("utf-8", "replace") for c in self.cores)
        self.chars = frozenset("".join(self.texts))
        self._escape: re.Pattern[bytes] | None = None
        self._ends: tuple[tuple[bytes, re.Pattern[bytes]], ...] | None = None
        self._watch: dict[frozenset[str], tuple[re.Pattern[bytes] | None, tuple[Search, ...]]] = {}
        # bytes a chunk can end with while being the start of a key or a core
        self.trail = frozenset(b"".join(keys))

    def mask_raw(self, data: bytes) -> bytes:
        """Every core in the bytes replaced; the same object back when there is none."""
        for core in self.cores:
            if core in data:
                data = data.replace(core, MASK)
        return data

    def mask_text(self, text: str) -> str:
        for core in self.text_cores:
            if core in text:
                text = text.replace(core, _MASK_TEXT)
        return text

    def held(self, data: bytes) -> int:
        """How many trailing bytes could be the start of a key or a core (to hold back)."""
        if not data or data[-1] not in self.trail:
            return 0
        best = 0
        for p in (*self.keys, *self.cores):
            for k in range(min(len(p) - 1, len(data)), best, -1):
                if data.endswith(p[:k]):
                    best = k
                    break
        return best

    def escapes(self, data: bytes) -> bool:
        """Whether a JSON escape in the bytes could stand for a character of a key (an escape
        cut off at the end could)."""
        return self.escape_search(data) is not None

    @property
    def escape_search(self) -> Search:
        """A search that finds what `escapes` looks for."""
        if self._escape is None:  # built on first use: most answers never need it
            self._escape = _escape_pattern(self.chars)
        return self._escape.search

    def core_spans(self, text: str) -> list[tuple[int, int]]:
        """Where cores occur in a text, as merged [start, end) character ranges."""
        found: list[tuple[int, int]] = []
        for core in self.text_cores:
            i = text.find(core)
            while i >= 0:
                found.append((i, i + len(core)))
                i = text.find(core, i + 1)
        found.sort()
        merged: list[tuple[int, int]] = []
        for a, b in found:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
            else:
                merged.append((a, b))
        return merged

    def mask_escaped(self, content: bytes) -> bytes:
        """JSON string content (no quotes) with cores in its decoded value replaced."""
        text, offsets = decode_literal(content)
        spans = self.core_spans(text)
        if not spans:
            return content
        return splice(content, [(offsets[a], offsets[b], MASK) for a, b in spans])

    def mask_literals(self, data: bytes) -> bytes:
        """Cores hidden behind escapes in JSON string literals replaced, only in the literals
        that hold such an escape."""
        edits: list[tuple[int, int, bytes]] = []
        for m in _STRING.finditer(data):
            a, b = m.start() + 1, m.end() - 1
            content = data[a:b]
            if b"\\" in content and self.escapes(content):
                masked = self.mask_escaped(content)
                if masked is not content:
                    edits.append((a, b, masked))
        return splice(data, edits) if edits else data

    def tail(self, text: str) -> tuple[str, bool]:
        """The longest end of `text` that is a key's proper prefix, and whether it is longer
        than what that key's masked form shows (then the text must be held back)."""
        longest, hard = 0, False
        for key, raw in zip(self.texts, self.keys, strict=True):
            start = max(0, len(text) - len(key) + 1)
            i = text.find(key[0], start)
            while i >= 0:
                if key.startswith(text[i:]):
                    n = len(text) - i
                    longest = max(longest, n)
                    hard = hard or n > shown(raw)
                    break
                i = text.find(key[0], i + 1)
        return (text[len(text) - longest :] if longest else ""), hard

    def string_ends(self, data: bytes) -> list[bytes]:
        """For each JSON string value in the bytes (a quote no colon follows: not an object's
        key) that ends with a key's proper prefix, that prefix (the longest): the text of a
        delta that the next delta could complete into the key.

        One regex per key finds them, skipping from one occurrence of the key's first byte to
        the next: it spells out prefixes up to `_RUN` bytes (a regex for every prefix of a
        long key nests too deep for Python's parser), so bytes holding a longer prefix are
        scanned string by string instead."""
        ends = self._ends
        if ends is None:
            ends = self._ends = tuple(
                (
                    k[: _RUN + 1],
                    re.compile(
                        re.escape(k[:1])
                        + _optional_run(k[1 : min(len(k) - 1, _RUN)])
                        + rb'"(?!\s*:)'
                    ),
                )
                for k in self.keys
                if len(k) > 1
            )
        best: dict[int, int] = {}
        for longer, pattern in ends:
            if data.find(longer) >= 0:
                return self._string_ends_scan(data)
            for m in pattern.finditer(data):
                q = m.end() - 1
                if m.end() - 1 - m.start() > best.get(q, 0):
                    best[q] = q - m.start()
        return [data[q - best[q] : q] for q in sorted(best)]

    def _string_ends_scan(self, data: bytes) -> list[bytes]:
        """`string_ends`, string by string."""
        found = []
        for m in _VALUE_END.finditer(data):
            q = m.start()
            longest = 0
            for key in self.keys:
                lo = max(0, q - len(key) + 1)
                p = data.find(key[:1], lo, q)
                while p != -1 and q - p > longest:
                    if key.startswith(data[p:q]):
                        longest = q - p  # the first (leftmost) hit is the longest
                        break
                    p = data.find(key[:1], p + 1, q)
            if longest:
                found.append(data[q - longest : q])
        return found

    def hard(self, start: bytes) -> bool:
        """Whether a key's start is longer than that key's masked form shows."""
        return any(k.startswith(start) and len(start) > shown(k) for k in self.keys)

    def continues(self, start: str, text: str) -> bool:
        """Whether `text` carries on a key after its first characters `start`."""
        joined = start + text[:1]
        return any(k.startswith(joined) for k in self.texts)

    def continuation(self, starts: frozenset[str]) -> re.Pattern[bytes] | None:
        """A regex for a JSON string value that starts with what follows one of `starts` in a
        key (keys of objects, followed by a colon, start no value)."""
        nexts = {
            k[len(t)].encode()
            for t in starts
            for k in self.texts
            if len(t) < len(k) and k.startswith(t)
        }
        if not nexts:
            return None
        alts = b"|".join(re.escape(c) for c in sorted(nexts))
        return re.compile(rb':\s*"(?:' + alts + b")")

    def watch(self, soft: frozenset[str]) -> tuple[re.Pattern[bytes] | None, tuple[Search, ...]]:
        """For the remembered soft starts `soft`: `continuation(soft)`, and searches that
        together find something in any bytes holding a string value ending with a key's proper
        prefix that is hard or not in `soft`, or a string value continuing one of `soft` (and
        sometimes in other bytes: `"` and a character that continues a soft start, also as an
        object's key). Each is a regex with a literal start, which a search skips to quickly.
        Built once per set of soft starts."""
        found = self._watch.get(soft)
        if found is None:
            if len(self._watch) >= 64:  # a bound, never reached with ordinary keys
                self._watch.clear()
            cont = self.continuation(soft)
            searches = tuple(re.compile(source).search for source in self._alarm_sources(soft))
            if cont is not None:  # its literal start, a colon, is rarer than any byte of a key
                searches += (cont.search,)
            found = self._watch[soft] = (cont, searches)
        return found

    def _alarm_sources(self, soft: frozenset[str]) -> list[bytes]:
        # Each thing to find is written from one of its bytes on, its *anchor*: lookbehinds
        # for what comes before (the anchor included), then the rest. One regex per anchor
        # byte: a search skips from one occurrence of it to the next, so one scan of the bytes
        # does for all that share it.
        alts: dict[int, list[bytes]] = {}

        def add(before: bytes, looks: list[bytes], rest: bytes = b"") -> None:
            alt = b"|".join(b"(?<=" + look + b")" for look in looks)
            alts.setdefault(before[-1], []).append((b"(?:" + alt + b")" if looks else b"") + rest)

        for key in self.keys:
            # a string value ending with a proper prefix that is not a remembered soft start
            # (as `_soft_ends` finds), one run of consecutive lengths at a time
            start = 0
            for n in range(1, len(key) + 1):
                if n < len(key) and (
                    n > _SHOWN
                    or self.hard(key[:n])
                    or key[:n].decode("utf-8", "replace") not in soft
                ):
                    start = start or n
                elif start:
                    before = key[:start]
                    # nested optional groups stay shallow (Python's regex parser recurses on
                    # them); a longer prefix holds the run's first _RUN bytes: find those
                    last = min(n - 1, start + _RUN)
                    end = _optional_run(key[start:last]) + rb'"(?!\s*:)'
                    add(before, [re.escape(before)] if start > 1 else [], end)
                    if last < n - 1:
                        longer = key[: last + 1]
                        add(longer, [re.escape(longer)])
                    start = 0
        # (a string value carrying on a soft start: `watch` searches with `continuation`)
        return [_ESCAPED_BYTE[x] + b"(?:" + b"|".join(alts[x]) + b")" for x in sorted(alts)]


def _optional_run(run: bytes) -> bytes:
    """A regex for every prefix of `run`, the empty one included: (?:r0(?:r1)?)?"""
    if not run:
        return b""
    return b"(?:" + b"(?:".join(map(_ESCAPED_BYTE.__getitem__, run)) + b")?" * len(run)


def _escape_pattern(chars: frozenset[str]) -> re.Pattern[bytes]:
    """A regex for a JSON escape of one of `chars` (either case of hex), a surrogate when one
    of them needs a pair, or an escape cut off at the end of the bytes."""
    alts = [rb"(?:u[0-9a-f]{0,3})?\Z"]
    hexes = [b"%04x" % ord(c) for c in sorted(chars) if ord(c) <= 0xFFFF]
    if hexes:
        alts.append(b"u(?:" + b"|".join(hexes) + b")")
    if any(ord(c) > 0xFFFF for c in chars):
        alts.append(b"ud[89a-f]")
    short = bytes(k for k, v in _SHORT_ESCAPES.items() if v in chars)
    if short:
        alts.append(b"[" + re.escape(short) + b"]")
    return re.compile(rb"\\(?:" + b"|".join(alts) + b")", re.I)


def splice(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """`data` with non-overlapping [start, end) ranges replaced, edits in order."""
    out, last = [], 0
    for a, b, new in edits:
        out += [data[last:a], new]
        last = b
    out.append(data[last:])
    return b"".join(out)


def decode_literal(content: bytes) -> tuple[str, list[int]]:
    """JSON string content decoded, with the byte offset of each character (and of the end)."""
    chars: list[str] = []
    offsets: list[int] = []
    i, n = 0, len(content)
    while i < n:
        offsets.append(i)
        b = content[i]
        if b == 0x5C and i + 1 < n:
            e = content[i + 1]
            cp = _hex(content[i + 2 : i + 6]) if e == 0x75 else -1
            if cp < 0:
                chars.append(_SHORT_ESCAPES.get(e, chr(e)))
                i += 2
                continue
            i += 6
            if 0xD800 <= cp < 0xDC00 and content[i : i + 2] == b"\\u":
                low = _hex(content[i + 2 : i + 6])
                if 0xDC00 <= low < 0xE000:
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00)
                    i += 6
            chars.append(chr(cp))
            continue
        width = 1 if b < 0x80 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4
        chars.append(content[i : i + width].decode("utf-8", "replace")[:1] or "\ufffd")
        i += width
    offsets.append(n)
    return "".join(chars), offsets


def _hex(digits: bytes) -> int:
    if len(digits) != 4:
        return -1
    try:
        return int(digits, 16)
    except ValueError:
        return -1


Keys = Secrets | tuple[bytes, ...]


def secrets_of(keys: Keys) -> Secrets:
    """The precomputed form: build it once per set of keys (the gateway does, per config)."""
    return keys if isinstance(keys, Secrets) else Secrets(keys)


def mask_secrets(body: bytes, keys: Keys) -> bytes:
    """Any echoed key in raw bytes replaced by its masked form."""
    s = secrets_of(keys)
    return s.mask_raw(body) if s.keys else body


def mask_body(body: bytes, keys: Keys) -> bytes:
    """A JSON body with every echoed key masked, also one spelt with JSON escapes. Only a body
    with an escape that could stand for a key's character has its string literals decoded, and
    only the literals that hold a key are rewritten."""
    s = secrets_of(keys)
    if not s.keys:
        return body
    body = s.mask_raw(body)
    if b"\\" in body and s.escapes(body):
        body = s.mask_literals(body)
    return body


def mask_headers(headers: Mapping[str, str], keys: Keys) -> dict[str, str]:
    """Header names and values with every echoed key masked, also one spelt with JSON or
    percent escapes (a value is then replaced by its decoded, masked form)."""
    s = secrets_of(keys)
    if not s.keys:
        return dict(headers)
    return {_mask_header(s, k): _mask_header(s, v) for k, v in headers.items()}


def _mask_header(s: Secrets, value: str) -> str:
    value = s.mask_text(value)
    if "\\" in value:
        raw = value.encode("utf-8", "surrogateescape")
        masked = s.mask_escaped(raw)
        if masked is not raw:
            value = masked.decode("utf-8", "surrogateescape")
    if "%" in value:
        decoded = unquote(value)
        if s.mask_text(decoded) != decoded:
            value = s.mask_text(decoded)
    return value


class StreamMasker:
    """Masks keys in a byte stream whose chunks may split a key anywhere.

    A chunk's tail is held back only while it could be the start of a key or of a core, so in
    practice (chunks ending in a line break) nothing is delayed.
    """

    __slots__ = ("_held", "_s")

    def __init__(self, keys: Keys) -> None:
        self._s = secrets_of(keys)
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self._s.keys:
            return chunk
        data = self._s.mask_raw(self._held + chunk if self._held else chunk)
        hold = self._s.held(data)
        self._held = data[len(data) - hold :] if hold else b""
        return data[: len(data) - hold]

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held
