"""A Chat Completions stream without its usage chunk, for a client that did not ask for it.

The gateway asks every Chat Completions stream for its usage (`stream_options.include_usage`),
which adds a last chunk with `"choices": []` and the usage. A client that did not ask for it
must not get it: the usual `chunk.choices[0]` loop fails on it. This filter passes every other
byte through as it came and hands the usage chunk to the caller instead. Pure: bytes in.

Events are passed on whole: the bytes after the last complete event wait for its end, which
delays nothing a client can use (an SSE reader acts on an event only once it has ended).
"""

from __future__ import annotations

import re

import orjson

# the blank line that ends an event: two line ends, each LF, CR or CRLF (a CR at the very end
# of the bytes so far counts as one: a LF after it starts the next block, an empty line)
_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
# what the usage chunk's data holds (either is enough to look closer: its lines may split one);
# a quote inside a JSON string is escaped, so these only match the keys themselves
_NO_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]|"usage"\s*:\s*\{')
# a usage chunk is a few hundred bytes: an unfinished event longer than this is not one, and
# goes on at once rather than being held (bounded memory, no quadratic re-scanning)
HELD_MAX = 64 * 1024


def _complete(buf: bytes) -> int:
    """Where the bytes of complete events end in `buf` (0 when none ended)."""
    if b"\r" not in buf:
        end = buf.rfind(b"\n\n")
        return end + 2 if end >= 0 else 0
    last = 0
    for m in _END.finditer(buf):
        last = m.end()
    return last


def _blocks(whole: bytes) -> list[bytes]:
    """Complete events, each with the blank line that ends it, then what follows the last
    (empty when nothing does)."""
    out, start = [], 0
    for m in _END.finditer(whole):
        out.append(whole[start : m.end()])
        start = m.end()
    out.append(whole[start:])
    return out


def is_usage_chunk(block: bytes) -> bool:
    """An event whose data is a chunk with no choices and a usage object."""
    # the space after `data:` and a bare `data` line (an empty one) only add JSON whitespace
    data = [line[5:] for line in block.splitlines() if line.startswith(b"data:")]
    try:
        obj = orjson.loads(b"\n".join(data))
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)


def _withheld(block: bytes) -> bool:
    """The usage chunk, looked at closely only when its keys show in the raw bytes."""
    return _NO_CHOICES.search(block) is not None and is_usage_chunk(block)


class UsageChunkFilter:
    __slots__ = ("_rest", "withheld")

    def __init__(self) -> None:
        self._rest = b""  # the bytes of an event not ended yet
        self.withheld: list[bytes] = []  # usage chunks taken out, for the caller to read

    def feed(self, data: bytes) -> bytes:
        """What the client gets of `data`: complete events, the usage chunk taken out."""
        buf = self._rest + data  # no copy when nothing was held
        end = _complete(buf)
        whole, self._rest = buf[:end], buf[end:]
        if len(self._rest) > HELD_MAX:
            whole, self._rest = buf, b""
        if _NO_CHOICES.search(whole) is None:
            return whole
        kept = []
        for block in _blocks(whole):
            if _withheld(block):
                self.withheld.append(block)
            else:
                kept.append(block)
        return b"".join(kept)

    def flush(self) -> bytes:
        """The stream ended: an event it left unfinished goes on as it is (a reader drops it,
        unless the gateway ends it with an error event of its own), except the usage chunk,
        which is withheld with the blank line it lacked."""
        rest, self._rest = self._rest, b""
        if _withheld(rest):
            self.withheld.append(rest + b"\n\n")
            return b""
        return rest
