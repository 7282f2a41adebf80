"""The one redactor: keys found in free text (prompts, errors, captures) become `[REDACTED]`.

Three kinds of key are found:

- secrets the gateway holds in clear (upstream keys, the admin key), by value, anywhere;
- client keys, which the config holds only as SHA-256 digests: every key-like token of the
  text is hashed and looked up, so a client key is found by value without the gateway ever
  holding it;
- common key shapes (OpenAI, Anthropic, AWS, Google, GitHub, Slack, `gw-` keys, `Bearer`),
  plus any extra regular expressions the operator adds.

There is deliberately no "long random-looking token" rule: response and message ids, UUIDs,
trace ids and digests would all match it.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from hashlib import sha256

from gateway.settings import Settings

__all__ = ["MARK", "MIN_TOKEN", "SHAPES", "Redactor"]

MARK = "[REDACTED]"

# Client keys shorter than this are not looked for by digest: hashing every short word of a
# prompt costs time and a key that short is guessable anyway.
MIN_TOKEN = 8

# Key shapes. All share one guard, compiled in front of them: a shape never starts inside a
# longer word ("risk-assessment-..." holds no `sk-` key). One guard behind a look-ahead on
# the first letter, not one guard per shape: 3 ms instead of 48 ms on 100 KB of words.
SHAPES: tuple[str, ...] = (
    r"sk-[A-Za-z0-9_\-]{20,}",  # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-)
    r"gw-[A-Za-z0-9_\-]{20,}",  # `gateway keys new`: gw- + token_urlsafe(32)
    r"(?:AKIA|ASIA)[0-9A-Z]{16}(?![0-9A-Za-z])",  # AWS access key id
    r"AIza[0-9A-Za-z_\-]{35}",  # Google API key
    r"gh[pousr]_[A-Za-z0-9]{36,}",  # GitHub tokens
    r"github_pat_[A-Za-z0-9_]{22,}",  # GitHub fine-grained token
    r"xox[abposr]-[A-Za-z0-9\-]{10,}",  # Slack
    r"[Bb]earer\s+[A-Za-z0-9._~+/=\-]{8,}",  # whatever follows `Bearer`
)
# ...unless that word is a JSON escape: `\nsk-...` is a key at the start of a line
_GUARD = r"(?:(?<![A-Za-z0-9])|(?<=\\[nrtbf])|(?<=\\u[0-9A-Fa-f]{4}))"
# Every shape starts with one of these letters: keep in step with SHAPES.
_FIRST = "ABbgsx"
# ...and contains one of these: a text with none of them (and none of the held secrets)
# skips the shapes' regex, which costs about 30 µs per KB. Keep in step with SHAPES. None
# holds whitespace or a character that ends a token, so each lies inside one token.
_ANCHORS = (
    "sk-",
    "gw-",
    "AKIA",
    "ASIA",
    "AIza",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "xox",
    "earer",
)
# Tokens of at most _PLAIN_CHARS found to hold no client key and no anchor are remembered, at
# most _PLAIN_TOKENS of them: most words of a prompt or a header recur request after request,
# and a text made only of remembered tokens is not searched at all.
_PLAIN_CHARS = 64
_PLAIN_TOKENS = 16384
# So are the pieces between double quotes (a JSON document's strings and what lies between
# them) found to hold no token of concern, up to _PIECE_CHARS each and _PIECES of them: a
# conversation sends its earlier messages, its instructions and its tools again every turn.
_PIECE_CHARS = 2048
_PIECES = 2048
# the characters that end a token (as `_TOKEN` reads them), as str.split sees whitespace
_CUT = "\"'`<>()[]{},;|\\"
_CUT_TOKENS = str.maketrans(dict.fromkeys(_CUT, " "))
# `many` joins texts with this: no token, key shape or held secret crosses it (a text or a
# secret holding a NUL is redacted on its own instead)
_JOIN = "\n\x00\n"

# A token ends at whitespace, quotes, brackets, commas and backslashes: keys do not contain
# them, and JSON or prose puts them around a key.
_TOKEN = re.compile(r"[^\s\"'`<>()\[\]{},;|\\]{" + str(MIN_TOKEN) + ",}")
# Inside a token these may be glue ("key=...", "...key.", "?k=...&") or part of a key
# (base64 `/`, `+`, `=`): the token is cut into pieces at them and runs of pieces are tried.
_SOFT = re.compile(r"[.:=&?/@!#+*%$~^]")
# A key glued to its neighbours is found only if it spans at most _MAX_SPAN pieces, and only
# in tokens cut at most _MAX_PIECES times: past that a token is a blob (base64 image data has
# a `/` or `+` every few characters) and trying every run would cost seconds per megabyte.
_MAX_SPAN = 4
_MAX_PIECES = 64
# JSON (and Python) escapes glue a letter to the key that follows: `\nKEY`, `\u00a0KEY`.
_ESCAPE = re.compile(r"u[0-9A-Fa-f]{4}|[nrtbf/]")


class Redactor:
    """Replaces every key it can recognise in a text with `[REDACTED]`."""

    __slots__ = (
        "_anchors",
        "_digests",
        "_extra",
        "_joinable",
        "_known",
        "_pieces",
        "_plain",
        "_wide",
    )

    def __init__(
        self,
        values: Iterable[str] = (),
        digests: Iterable[bytes] = (),
        extra: tuple[str, ...] = (),
    ) -> None:
        # a key that starts with another key is tried first, so it is replaced whole: in
        # reverse order every string comes before its prefixes
        literals = sorted({v for v in values if v}, reverse=True)
        shapes = f"(?=[{_FIRST}]){_GUARD}(?:{'|'.join(SHAPES)})"
        self._known = re.compile("|".join([*(re.escape(v) for v in literals), shapes]))
        # a held secret with whitespace or a token's end in it may span tokens: looked for
        # in the whole text; every other anchor lies inside one token
        self._wide = tuple(v for v in literals if len(v.split()) != 1 or set(v) & set(_CUT))
        self._anchors = (*(v for v in literals if v not in self._wide), *_ANCHORS)
        self._joinable = not any("\x00" in v or "\n" in v for v in literals)
        # tokens seen to hold no client key and no anchor: words, ids and header values that
        # recur in every request ("application/json", a model's name); forgotten when full
        self._plain: dict[str, None] = {}
        self._pieces: dict[str, None] = {}  # the same for whole pieces between quotes
        self._digests = frozenset(digests)
        # compiled apart from the rest: their group numbers and flags must not clash
        self._extra = tuple(re.compile(p) for p in extra)

    @classmethod
    def from_settings(cls, settings: Settings) -> Redactor:
        """The gateway's one redactor: its upstream and admin keys, its client keys' digests,
        and the operator's `capture.redact` patterns. Errors, spans, trace content and
        captures all go through it, so they redact alike."""
        return cls(
            settings.secrets(),
            (d for team in settings.teams for d in team.key_digests),
            settings.capture.redact,
        )

    def __call__(self, text: str) -> str:
        client, known = self._screen(text)
        if client:
            text = self._client_keys(text)
        if known:
            text = self._known.sub(MARK, text)
        for pattern in self._extra:
            text = pattern.sub(MARK, text)
        return text

    def many(self, texts: Sequence[str]) -> list[str]:
        """`[self(t) for t in texts]`, in one pass over the texts joined: one screen for all
        of them, instead of one per text. The operator's patterns still see each text alone."""
        joined = _JOIN.join(texts)
        if not self._joinable or joined.count("\x00") != len(texts) - 1:
            return [self(t) for t in texts]
        client, known = self._screen(joined)
        if client:
            joined = self._client_keys(joined)
        if known:
            joined = self._known.sub(MARK, joined)
        if not self._extra and not client and not known:
            return list(texts)
        out = joined.split(_JOIN)
        if len(out) != len(texts):  # cannot happen: nothing replaced crosses `_JOIN`
            return [self(t) for t in texts]
        for pattern in self._extra:
            out = [pattern.sub(MARK, t) for t in out]
        return out

    def _screen(self, text: str) -> tuple[bool, bool]:
        """A quick pass: whether the text may hold a client key (`_client_keys` finds every
        one it would, and may find more), and whether it holds an anchor of `_known` (held
        secrets, key shapes). Tokens are cut by C code, as `_client_keys` cuts them; one that
        could follow a backslash (`\\nKEY`) is tried as if it did, which only adds
        candidates. Only tokens not seen before are looked at: most texts hold none, and then
        no regex runs."""
        known = any(map(text.__contains__, self._wide))
        # a double quote ends a token: the text's tokens are its pieces' tokens
        pieces = set(text.split('"')).difference(self._pieces)
        if not pieces:
            return False, known
        plain = self._plain
        tokens = set(" ".join(pieces).translate(_CUT_TOKENS).split()).difference(plain)
        if not tokens:
            _remember(self._pieces, pieces, _PIECE_CHARS, _PIECES)
            return False, known
        # an anchor lies inside one token: look for them in the new tokens only
        new = " ".join(tokens)
        anchors = [a for a in self._anchors if a in new]
        client, digests = False, bool(self._digests)
        for token in tokens:
            if (
                digests
                and len(token) >= MIN_TOKEN
                and self._spans(token, _ESCAPE.match(token) is not None)
            ):
                client = True
            elif len(token) <= _PLAIN_CHARS and not (anchors and _has_any(token, anchors)):
                if len(plain) >= _PLAIN_TOKENS:
                    plain.clear()  # atomic under the GIL: a caller on another thread is safe
                plain[token] = None
        if not client and not anchors:
            _remember(self._pieces, pieces, _PIECE_CHARS, _PIECES)
        return client, known or bool(anchors)

    def _client_keys(self, text: str) -> str:
        found = [
            (start + a, start + b)
            for m in _TOKEN.finditer(text)
            for start in (m.start(),)
            for a, b in self._spans(m.group(), escaped=text[start - 1 : start] == "\\")
        ]
        if not found:
            return text
        # what lies between the keys, joined by the mark
        cuts = [0, *itertools.chain.from_iterable(found), len(text)]
        return MARK.join(text[cuts[i] : cuts[i + 1]] for i in range(0, len(cuts), 2))

    def _spans(self, token: str, escaped: bool) -> list[tuple[int, int]]:
        """The parts of a token that hash to a client key's digest, in order, not overlapping."""
        digests = self._digests
        raw = token.encode() if token.isascii() else _utf8(token)
        if sha256(raw).digest() in digests:
            return [(0, len(token))]
        if not escaped and _SOFT.search(token) is None:  # one piece: most ids and words
            return []
        seps = [s.span() for s in _SOFT.finditer(token)]
        if (not seps and not escaped) or len(seps) > _MAX_PIECES:
            return []
        ascii_only = len(raw) == len(token)  # then a str offset is a byte offset
        # piece k runs from starts[k] to ends[k]; a candidate is a run of up to _MAX_SPAN pieces
        starts = [0, *(b for _, b in seps)]
        ends = [*(a for a, _ in seps), len(token)]
        firsts = [(a, k) for k, a in enumerate(starts)]
        if escaped and (e := _ESCAPE.match(token)):
            firsts.insert(1, (e.end(), 0))  # `\nKEY` in JSON text: the token reads "nKEY"
        found: list[tuple[int, int]] = []
        done = 0  # where the last key found ends: the next one starts there or later
        for a, k in firsts:
            if a < done:
                continue
            for b in ends[k : k + _MAX_SPAN]:
                if b - a < MIN_TOKEN or b - a == len(token):
                    continue
                part = raw[a:b] if ascii_only else _utf8(token[a:b])
                if sha256(part).digest() in digests:
                    found.append((a, b))
                    done = b
                    break
        return found


def _remember(seen: dict[str, None], texts: Iterable[str], longest: int, most: int) -> None:
    for text in texts:
        if len(text) <= longest:
            if len(seen) >= most:
                seen.clear()  # atomic under the GIL: a caller on another thread is safe
            seen[text] = None


def _has_any(token: str, anchors: list[str]) -> bool:
    return any(map(token.__contains__, anchors))


def _utf8(text: str) -> bytes:
    # surrogateescape: how aiohttp decodes a header's bytes, so digests match `auth.py`'s
    try:
        return text.encode(errors="surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no header could carry: never a key
        return text.encode(errors="surrogatepass")
