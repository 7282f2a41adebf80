"""Masking upstream keys in an SSE stream, also a key split across the delta events whose
text a client concatenates. Pure: bytes in, bytes out, no I/O. See `gateway.masking` for the
masked form and for the raw, escaped and header maskers this builds on."""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import orjson

from gateway.masking import MASK, Keys, decode_literal, secrets_of, splice
from gateway.usage import TERMINAL_RESPONSE_EVENTS

__all__ = ["SSEMasker"]

# a blank line ends an SSE event; a lone CR counts as a line end as soon as it is seen
_BLANK = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
# the value of a `data` field (`data` alone is a field with an empty value), if at a line start
_DATA = re.compile(rb"data(?::(?: ?)([^\r\n]*))?(?=[\r\n]|\Z)")
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\],:]', re.S)
_TEXT_FIELDS = re.compile(rb'"(?:delta|choices)"\s*:')
_CHAT_TEXT_FIELDS: Final = ("content", "refusal", "reasoning_content", "reasoning")
_ENDS_ALL: Final = TERMINAL_RESPONSE_EVENTS | {"error"}


class _Event:
    """One complete SSE event, `sent` of its bytes already with the client."""

    __slots__ = ("raw", "sent")

    def __init__(self, raw: bytes, sent: int) -> None:
        self.raw, self.sent = raw, sent


JsonPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class _Part:
    """The last `n` characters of the string at `path` in an event's data; `event` is None
    once the event is with the client (such a part is never rewritten)."""

    event: _Event | None
    path: JsonPath
    n: int


@dataclass(frozen=True, slots=True)
class _Tail:
    """The end of one channel's text: more of a key than its masked form shows, which the
    channel's next delta could complete. Its events are held back."""

    text: str
    parts: tuple[_Part, ...]


class SSEMasker:
    """Masks keys in an SSE stream fed as raw chunks: raw bytes, escaped JSON strings, and keys
    split across the deltas of one channel (a Responses output, a Chat choice's content or
    tool call arguments).

    Bytes pass through unchanged and at once unless they could be (part of) a key:
    - the end of a chunk that could start a key or a core waits for the next chunk;
    - an unfinished event waits for its end if it holds an escape that could spell a key's
      character, or a string that ends with more of a key than `mask()` shows or that could
      continue a soft start (below);
    - a complete event whose channel text then ends with more of a key than `mask()` shows is
      held, with every event after it, until that channel's next delta shows whether the key
      follows (then each held and new event's part of it is rewritten) or the channel ends.
    A string ending with no more of a key than the mask shows (`s`, `sk`, `sk-`) is a *soft
    start*: never held or rewritten, only remembered (for any channel, so no decoding) so
    that a delta continuing it is decoded. Other events are not JSON-decoded.
    """

    __slots__ = ("_alarm", "_buf", "_cont", "_escaped", "_queue", "_s", "_sent", "_soft", "_tails")

    def __init__(self, keys: Keys) -> None:
        self._s = secrets_of(keys)
        self._buf = b""  # the unfinished event, from its first byte
        self._sent = 0  # bytes of it already with the client
        self._queue: deque[_Event] = deque()  # complete events held back, in order
        self._tails: dict[tuple[Any, ...], _Tail] = {}  # per channel
        self._soft: frozenset[str] = frozenset()
        self._cont: re.Pattern[bytes] | None = None  # a string value continuing a soft start
        # searches that find nothing in a chunk needing no closer look (see `Secrets.watch`)
        self._alarm = self._s.watch(self._soft)[1] if self._s.keys else None
        self._escaped = self._s.escape_search

    def feed(self, chunk: bytes) -> bytes:
        alarm = self._alarm
        if alarm is None or not chunk:
            return chunk
        # the fast path, for a chunk that follows what is all with the client: it holds no core,
        # no escape that could spell a key's character, no string ending with a hard or new
        # start of a key or continuing a remembered soft start, and does not end with what could
        # start a key (as `_suspect` and `_soft_ends` find, which a chunk failing any of these
        # checks goes through)
        buf = self._buf
        if self._queue or self._sent != len(buf):
            return self._feed(chunk)
        s = self._s
        for core in s.cores:
            if chunk.find(core) >= 0:  # not `in`, which tries the core as an int first
                return self._feed(chunk)
        for search in alarm:
            if search(chunk) is not None:
                return self._feed(chunk)
        if (
            (0x5C in chunk and self._escaped(chunk))
            or (chunk[-1] in s.trail and s.held(chunk))
            or (buf and (cont := self._cont) and cont.search(buf[-16:] + chunk[:16]))
        ):
            return self._feed(chunk)
        # keep the unfinished event's bytes: none when the chunk ends an event as the last of its
        # blank lines (with CRs, `_event_ends` pairs a run of line ends from its start)
        if buf or not (
            (chunk.endswith(b"\n\n") and 0x0D not in chunk)
            or (chunk.endswith(b"\r\n\r\n") and (len(chunk) == 4 or chunk[-5] not in b"\r\n"))
        ):
            self._advance(chunk)
        return chunk

    def _feed(self, chunk: bytes) -> bytes:
        """A chunk that the checks in `feed` do not clear: the fast path as exactly decided."""
        if not self._queue and self._sent == len(self._buf) and not self._suspect(chunk):
            ends = self._soft_ends(chunk)
            # a soft start new to this chunk may be continued later in the same chunk
            if ends is not None and not (self._remember(ends) and self._suspect(chunk)):
                self._advance(chunk)
                return chunk
        return self._slow(chunk)

    def flush(self) -> bytes:
        """Everything held, at the end of the stream (an unfinished event masked as well as its
        bytes allow)."""
        out = [ev.raw[ev.sent :] for ev in self._queue]
        unsent = self._s.mask_raw(self._buf[self._sent :])
        if b"\\" in unsent and self._s.escapes(unsent):
            unsent = self._s.mask_literals(unsent)
        out.append(unsent)
        self._queue.clear()
        self._tails.clear()
        self._buf, self._sent = b"", 0
        return b"".join(out)

    def _suspect(self, data: bytes) -> bool:
        """Whether the bytes hold a core, an escape that could spell a key's character, a
        string continuing a soft start, or end with what could start a key."""
        s = self._s
        for core in s.cores:
            if core in data:
                return True
        return (
            self._continued(self._buf, data)
            or (b"\\" in data and s.escapes(data))
            or s.held(data) > 0
        )

    def _continued(self, before: bytes, data: bytes) -> bool:
        """Whether a string value in `data`, which follows `before` in its event, starts with
        what carries on a soft start (also across the boundary, up to some JSON spacing)."""
        cont = self._cont
        return cont is not None and (
            cont.search(data) is not None
            or (bool(before) and cont.search(before[-16:] + data[:16]) is not None)
        )

    def _soft_ends(self, data: bytes) -> list[str] | None:
        """The soft starts that strings in the bytes end with; None if one ends with more."""
        s = self._s
        ends = []
        for start in s.string_ends(data):
            if s.hard(start):
                return None
            ends.append(start.decode("utf-8", "replace"))
        return ends

    def _remember(self, soft: list[str]) -> bool:
        """Add soft starts; whether there were new ones."""
        if not soft or self._soft.issuperset(soft):
            return False
        self._soft = self._soft.union(soft)
        self._cont, self._alarm = self._s.watch(self._soft)
        return True

    def _advance(self, chunk: bytes) -> None:
        """Keep the unfinished event's bytes (all sent) for when a later chunk needs it whole."""
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            ends = _event_ends(buf)
            end = ends[-1] if ends else 0
        else:
            i = buf.rfind(b"\n\n")
            end = i + 2 if i >= 0 else 0
        self._buf = buf[end:] if end else buf
        self._sent = len(self._buf)

    def _slow(self, chunk: bytes) -> bytes:
        s = self._s
        data = self._buf + chunk
        start, sent = 0, self._sent
        for end in _event_ends(data):
            self._process(_Event(data[start:end], sent))
            start, sent = end, 0
        out = self._release()
        partial = data[start:]
        unsent = partial[sent:]
        masked = s.mask_raw(unsent)
        if masked is not unsent:
            partial, unsent = partial[:sent] + masked, masked
        if unsent and not self._queue:
            ends = self._soft_ends(unsent)
            if not (ends is None or self._needs_whole(partial, sent) or self._remember(ends)):
                n = len(unsent) - s.held(unsent)
                out.append(unsent[:n])
                sent += n
        self._buf, self._sent = partial, sent
        return b"".join(out)

    def _needs_whole(self, partial: bytes, sent: int) -> bool:
        """Whether an unfinished event must be complete before more of it goes out: an escape
        could spell a key, or a string could continue a soft start (then rewriting may be
        needed anywhere in what is not sent)."""
        unsent = partial[sent:]
        return (b"\\" in unsent and self._s.escapes(unsent)) or self._continued(
            partial[:sent], unsent
        )

    def _process(self, ev: _Event) -> None:
        s = self._s
        unsent = ev.raw[ev.sent :]
        masked = s.mask_raw(unsent)
        if masked is not unsent:
            ev.raw = ev.raw[: ev.sent] + masked
        escaped = b"\\" in ev.raw and s.escapes(ev.raw)
        if escaped:
            data, spans = _data(ev.raw)
            new = s.mask_literals(data)
            if new is not data:
                ev.raw = _with_data(ev.raw, spans, new)
        self._queue.append(ev)
        ends = self._soft_ends(ev.raw)
        if (
            escaped
            or ends is None
            or self._tails  # events are held back: any event may end or continue a tail
            or (self._cont is not None and self._cont.search(ev.raw) is not None)
        ):
            self._observe(ev)
        else:
            self._remember(ends)

    def _observe(self, ev: _Event) -> None:
        """Follow the channels' text through a decoded event."""
        data, _ = _data(ev.raw)
        if data.strip() == b"[DONE]":
            self._tails.clear()
            return
        if not (self._tails or _TEXT_FIELDS.search(data)):
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if isinstance(obj, dict):
            texts, ends = _stream_texts(obj)
            for channel, path, text in texts:
                self._extend(channel, ev, path, text)
            for prefix in ends:
                for channel in [c for c in self._tails if c[: len(prefix)] == prefix]:
                    del self._tails[channel]

    def _extend(self, channel: tuple[Any, ...], ev: _Event, path: JsonPath, text: str) -> None:
        if not text:
            return
        old = self._tails.pop(channel, None)
        if old is not None:
            prev, parts = old.text, old.parts
        else:  # a soft start this text continues, from whichever channel
            prev = max((t for t in self._soft if self._s.continues(t, text)), key=len, default="")
            parts = (_Part(None, (), len(prev)),) if prev else ()
        parts = (*parts, _Part(ev, path, len(text)))
        combined = prev + text
        spans = self._s.core_spans(combined)
        if spans:
            _rewrite(parts, spans)
        rest = combined[spans[-1][1] :] if spans else combined
        tail, hard = self._s.tail(rest)
        if not hard:
            self._remember([tail] if tail else [])
            return
        keep, need = [], len(tail)
        for part in reversed(parts):
            take = min(part.n, need)
            keep.append(_Part(part.event, part.path, take))
            need -= take
            if not need:
                break
        self._tails[channel] = _Tail(tail, tuple(reversed(keep)))

    def _release(self) -> list[bytes]:
        pinned = {id(p.event) for t in self._tails.values() for p in t.parts if p.event}
        out = []
        while self._queue and id(self._queue[0]) not in pinned:
            ev = self._queue.popleft()
            out.append(ev.raw[ev.sent :])
        return out


def _rewrite(parts: tuple[_Part, ...], spans: list[tuple[int, int]]) -> None:
    """Mask character ranges of a channel text that runs across the parts' strings: `****`
    where a range starts (in the first part that can still change), the rest removed."""
    edits: dict[int, tuple[_Event, list[tuple[JsonPath, int, int, int, bytes]]]] = {}
    for a, b in spans:
        pos, placed = 0, False
        for part in parts:
            lo, hi = max(a, pos), min(b, pos + part.n)
            if lo < hi and part.event is not None:
                edit = (part.path, part.n, lo - pos, hi - pos, b"" if placed else MASK)
                edits.setdefault(id(part.event), (part.event, []))[1].append(edit)
                placed = True
            pos += part.n
    for ev, items in edits.values():
        data, spans_ = _data(ev.raw)
        for path in dict.fromkeys(p for p, *_ in items):
            at = _string_at(data, path)
            if at is None:
                continue
            a, b = at
            content = data[a:b]
            text, offsets = decode_literal(content)
            cut = [
                (offsets[len(text) - n + lo], offsets[len(text) - n + hi], new)
                for p, n, lo, hi, new in sorted(items, key=lambda e: e[2])
                if p == path and n <= len(text)
            ]
            data = data[:a] + splice(content, cut) + data[b:]
        ev.raw = _with_data(ev.raw, spans_, data)


def _event_ends(data: bytes) -> list[int]:
    """Where each complete event in the bytes ends (after its blank line)."""
    if b"\r" in data:
        return [m.end() for m in _BLANK.finditer(data)]
    ends, i = [], data.find(b"\n\n")
    while i >= 0:
        ends.append(i + 2)
        i = data.find(b"\n\n", i + 2)
    return ends


def _data(raw: bytes) -> tuple[bytes, list[tuple[int, int]]]:
    """An event's data (its `data` lines joined with LF) and where each line's value is."""
    spans = [
        m.span(1) if m.start(1) >= 0 else (m.end(), m.end())
        for m in _DATA.finditer(raw)
        if not m.start() or raw[m.start() - 1] in b"\r\n"
    ]
    return b"\n".join(raw[a:b] for a, b in spans), spans


def _with_data(raw: bytes, spans: list[tuple[int, int]], data: bytes) -> bytes:
    """`raw` with its data lines' values replaced by the lines of `data`; everything else (field
    names, comments, line ends) stays byte for byte."""
    values = data.split(b"\n")
    if len(values) != len(spans):  # rewrites stay inside strings: never happens
        return raw
    return splice(raw, [(a, b, v) for (a, b), v in zip(spans, values, strict=True)])


def _string_at(data: bytes, path: JsonPath) -> tuple[int, int] | None:
    """Where the content of the string value at `path` is in JSON text (the last one, as a
    decoder keeps the last of duplicate keys)."""
    found = None
    where: list[Any] = []  # the key or index within each open container
    is_object: list[bool] = []
    want_key = False
    for m in _JSON_TOKEN.finditer(data):
        c = data[m.start()]
        if c == 0x22:
            if want_key:
                where[-1] = orjson.loads(m.group())
                want_key = False
            elif tuple(where) == path:
                found = (m.start() + 1, m.end() - 1)
        elif c in b"{[":
            is_object.append(c == 0x7B)
            where.append(None if c == 0x7B else 0)
            want_key = c == 0x7B
        elif c in b"}]":
            if is_object:
                is_object.pop()
                where.pop()
            want_key = False
        elif c == 0x2C and is_object:
            if is_object[-1]:
                want_key = True
            else:
                where[-1] += 1
    return found


def _scalar(value: Any) -> str | int | None:
    return value if isinstance(value, str | int) else None


def _stream_texts(
    obj: dict[str, Any],
) -> tuple[list[tuple[tuple[Any, ...], JsonPath, str]], list[tuple[Any, ...]]]:
    """The delta texts an event adds to its channels (Responses `*.delta`, Chat and legacy
    Completions choices), and the prefixes of the channels it ends."""
    texts: list[tuple[tuple[Any, ...], JsonPath, str]] = []
    ends: list[tuple[Any, ...]] = []
    kind = obj.get("type")
    if isinstance(kind, str):
        index = _scalar(obj.get("output_index"))
        delta = obj.get("delta")
        if kind.endswith(".delta") and isinstance(delta, str):
            channel: tuple[Any, ...] = ("r", index, kind, _scalar(obj.get("item_id")))
            channel += (_scalar(obj.get("content_index")), _scalar(obj.get("summary_index")))
            texts.append((channel, ("delta",), delta))
        elif kind in _ENDS_ALL:
            ends.append(())
        elif kind.endswith(".done"):
            ends.append(("r", index) if index is not None else ("r",))
    choices = obj.get("choices")
    for pos, choice in enumerate(choices if isinstance(choices, list) else ()):
        if not isinstance(choice, dict):
            continue
        idx = _scalar(choice.get("index", pos))
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for field in _CHAT_TEXT_FIELDS:
                if isinstance(value := delta.get(field), str):
                    texts.append((("c", idx, field), ("choices", pos, "delta", field), value))
            calls = delta.get("tool_calls")
            for tpos, call in enumerate(calls if isinstance(calls, list) else ()):
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(args := fn.get("arguments"), str):
                    channel = ("c", idx, "tool", _scalar(call.get("index", tpos)))
                    path: JsonPath = ("choices", pos, "delta", "tool_calls", tpos)
                    texts.append((channel, (*path, "function", "arguments"), args))
            fn = delta.get("function_call")
            if isinstance(fn, dict) and isinstance(args := fn.get("arguments"), str):
                path = ("choices", pos, "delta", "function_call", "arguments")
                texts.append((("c", idx, "function_call"), path, args))
        if isinstance(value := choice.get("text"), str):
            texts.append((("c", idx, "text"), ("choices", pos, "text"), value))
        if choice.get("finish_reason") is not None:
            ends.append(("c", idx))
    return texts, ends
