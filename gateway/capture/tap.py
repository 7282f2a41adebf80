"""The capture tap: keeps what the client got, up to a cap, until the request's end.

It holds references to the relayed chunks (no copies) until the cap; past it the body is
marked cut. `SLACK` bytes beyond the cap are kept too, so that a key straddling the cut is
still whole when the writer redacts it; the writer cuts the redacted text at the cap.
"""

from __future__ import annotations

from collections.abc import Mapping

# longer than any key the redactor knows: a key cut in half would escape redaction
SLACK = 512


class CaptureTap:
    """One request's capture in the making: what it asked and, once relayed, its answer."""

    __slots__ = (
        "cap",
        "complete",
        "cut",
        "headers",
        "method",
        "parts",
        "request_headers",
        "sampled",
        "size",
        "status",
        "target",
    )

    def __init__(
        self,
        sampled: bool,
        cap: int,
        method: str,
        target: str,
        request_headers: Mapping[str, str],
    ) -> None:
        self.sampled = sampled  # drawn by the sample ratio (else kept only if it fails)
        self.cap = cap  # max_body_bytes
        self.method, self.target = method, target
        self.request_headers = request_headers
        self.status = 0  # 0: no answer was relayed (the envelope's error may follow)
        self.headers: Mapping[str, str] = {}
        self.parts: list[bytes] = []
        self.size = 0  # bytes kept
        self.cut = False
        self.complete = False

    def head(self, status: int, headers: Mapping[str, str]) -> None:
        self.status, self.headers = status, headers

    def chunk(self, data: bytes) -> None:
        room = self.cap + SLACK - self.size
        if room <= 0:
            self.cut = True
            return
        if len(data) > room:
            data = data[:room]  # the one copy, bounded by SLACK plus what is left
            self.cut = True
        self.parts.append(data)
        self.size += len(data)

    async def end(self, complete: bool) -> None:
        self.complete = complete

    def answered(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        """The gateway's own answer (an error the envelope sends) when nothing was relayed."""
        if self.status:
            return
        self.head(status, headers)
        self.chunk(body)
        self.complete = True
