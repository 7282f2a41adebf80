"""Ledger record type and the protocol every ledger backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

GROUP_KEYS = ("team", "model", "day")


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    """One finished request. Token fields hold what the upstream reported for this request.

    A cache hit made no upstream call: its token fields and cost are 0 and `saved_tokens`
    holds the tokens the cached answer originally cost.
    """

    ts: float  # unix seconds when the request finished
    request_id: str
    team: str
    key_id: str  # short hash of the client key, never the key
    model: str
    upstream: str
    route: str
    status: int
    stream: bool
    cache: str  # hit | miss | bypass | coalesced | "" (not cacheable)
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    charged_tokens: int  # tokens charged to the team's token budgets
    cost_usd: float  # USD charged to the team's usd budgets
    estimated: bool  # no usage arrived; charged_tokens is the reservation estimate
    duration_ms: float
    ttft_ms: float | None
    saved_tokens: int = 0
    response_id: str = ""  # the id of a response this request created (POST /v1/responses)


@dataclass(frozen=True, slots=True)
class Charge:
    """What a team was charged since some instant: used to rebuild budget windows at start."""

    tokens: int
    usd: float


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One row of the usage report; group fields absent from `by` are empty strings."""

    team: str
    model: str
    day: str
    requests: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_usd: float
    saved_tokens: int
    estimated_requests: int


class Ledger(Protocol):
    """Append-only store of ledger records. `append` never blocks the event loop."""

    async def start(self) -> None: ...

    def append(self, record: LedgerRecord) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...

    async def charged_since(self, since: float) -> dict[str, Charge]:
        """Per team: charged tokens and cost of records with ts >= since."""
        ...

    async def owner(self, response_id: str) -> tuple[str, str] | None:
        """(team, upstream) of the request that created `response_id`, if one did."""
        ...

    async def report(
        self, since: float | None, until: float | None, by: Sequence[str]
    ) -> list[ReportRow]: ...
