"""Where captures live: one protocol, implemented on the ledger's database (SQLite or
PostgreSQL), and read back by request id for the search API."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from gateway.capture.draft import Row

TABLE = "captures"


class CaptureStore(Protocol):
    async def start(self) -> None:
        """Open the database and create the table if absent."""
        ...

    async def close(self) -> None: ...

    async def write(self, rows: Sequence[Row]) -> None:
        """Insert rendered captures, in one transaction."""
        ...

    async def purge(self, before: float) -> int:
        """Delete captures whose ts is older than `before`; how many were deleted."""
        ...

    async def capture(self, request_id: str) -> dict[str, Any] | None:
        """The stored capture of `request_id` (the newest, should a client have sent the
        same id twice), or None."""
        ...

    async def captured(self, request_ids: Sequence[str]) -> frozenset[str]:
        """Which of `request_ids` have a capture (for a page of the request list)."""
        ...
