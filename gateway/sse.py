"""Incremental Server-Sent Events decoder: bytes in, events out. Pure, no I/O.

Follows the WHATWG parsing rules the OpenAI SDK uses: LF, CR and CRLF line ends (also split
across chunks), `:` comments, one optional space after the colon, multi-line `data` joined
with LF, a blank line dispatches, an event without data is not dispatched, and an
unterminated event at end of stream is discarded.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str | None
    data: bytes
    id: str | None = None


class SSEDecoder:
    __slots__ = ("_buf", "_data", "_event", "_id", "_pending_cr")

    def __init__(self) -> None:
        self._buf = b""
        self._pending_cr = False
        self._event: str | None = None
        self._data: list[bytes] = []
        self._id: str | None = None

    def terminator(self) -> bytes:
        """What to send before appending an event of one's own to the bytes fed so far:
        line breaks that end a partial line and an undispatched event, if there is one."""
        # one LF ends a partial line, or is what a reader takes as the second half of a CRLF
        # whose CR ended the bytes (never both: after a CR no partial line is left)
        out = b"\n" if self._buf or self._pending_cr else b""
        if self._buf or self._data or self._event is not None:
            out += b"\n"
        return out

    def between_events(self) -> bool:
        """Whether everything fed so far ended an event: no partial line, field or CR."""
        return not (self._buf or self._data or self._pending_cr) and self._event is None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []  # nothing read: a CR that ended the last chunk still waits for its LF
        if self._pending_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]  # the LF of a CRLF split across chunks
        # a CR at the very end may be the first half of a CRLF split across chunks
        self._pending_cr = chunk[-1:] == b"\r"
        buf = self._buf + chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        events: list[SSEEvent] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(SSEEvent(self._event, b"\n".join(self._data), self._id))
                self._event = None
                self._data = []
                continue
            # a comment (`:` first) has an empty field name: ignored like any unknown field
            name, sep, value = line.partition(b":")
            if sep and value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._data.append(value)
            elif name == b"event":
                self._event = value.decode(errors="replace")
            elif name == b"id" and b"\0" not in value:
                self._id = value.decode(errors="replace")
            # `retry` and unknown fields carry nothing the gateway needs
        return events
