"""Ledger record types and the protocols every ledger backend implements: a writer, a reader."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # search's types hold records: imported for annotations only
    from gateway.ledger.search import Cursor, Found, Page, RequestFilter

GROUP_KEYS = ("team", "model", "day", "user")  # and `tag:KEY` for any tag key
TAG_PREFIX = "tag:"


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
    attempts: int = 0  # upstream calls made (`upstream` is the one that answered, or the last)
    transport: str = "http"  # http | websocket (a response.create on a WebSocket connection)
    user: str = ""  # who the request is for (x-gateway-user, else the body's user), redacted
    # its tags as canonical JSON (`Attribution.tags_text`: sorted keys, no spaces), "" for none
    tags: str = ""
    replay_of: str = ""  # the request id this request replays, "" when it is no replay
    # ms from the request's start to the head of its answer (the client's first byte)
    first_byte_ms: float | None = None
    trace_id: str = ""  # 32 hex: the request's trace (`x-gateway-trace-id`)


@dataclass(frozen=True, slots=True)
class Charge:
    """What a team was charged since some instant: used to rebuild budget windows at start.

    `requests` counts the team's records in that time that called an upstream for a named
    model (`attempts > 0` and a non-empty `model`): cache hits and refusals do not count.
    """

    tokens: int
    usd: float
    requests: int = 0


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One row of the usage report; group fields absent from `by` are empty strings, and so
    is the user or a tag of records that have none. `tags` holds (key, value) for each
    `tag:KEY` of `by`, in `by` order."""

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
    user: str = ""
    tags: tuple[tuple[str, str], ...] = ()

    def group(self, key: str) -> str:
        """The row's value for a group key of `by` (`team`, ..., `user` or `tag:KEY`)."""
        if key.startswith(TAG_PREFIX):
            return dict(self.tags).get(key[len(TAG_PREFIX) :], "")
        value: str = getattr(self, key)
        return value


class LedgerWriter(Protocol):
    """Append-only store of ledger records, written off the event loop.

    Lifecycle: `start`, then any number of `append` and `flush`, then `close`. Records are
    written in the order appended. A backend states how long a record may wait before it is
    durable (what a kill -9 can lose); a graceful `close` loses none.
    """

    @property
    def pending(self) -> int:
        """Records appended but not yet durable (for `gateway_ledger_pending_records`)."""
        ...

    async def start(self) -> None:
        """Open the storage (creating it if absent) and start writing in the background.
        Calling it again does nothing."""
        ...

    def append(self, record: LedgerRecord) -> None:
        """Queue one record and return at once: never waits and never does I/O, and a
        failing storage never makes it raise (records wait for the next write). Raises
        RuntimeError after `close`: a record appended then would be lost."""
        ...

    async def flush(self) -> None:
        """Make every record appended so far durable; raises if the write fails (the records
        stay queued for the next attempt)."""
        ...

    async def close(self) -> None:
        """Flush everything, stop writing and release the storage. Calling it again does
        nothing."""
        ...


class ReportReader(Protocol):
    """Reads over the ledger, valid between the writer's `start` and `close`.

    Every read sees each record appended before it through the writer it is served with,
    written or still queued, and what other processes have written to the same storage.
    """

    async def charged_since(self, since: float) -> dict[str, Charge]:
        """Per team: charged tokens, cost and requests (see `Charge`) of records with
        ts >= since; teams without such records are absent."""
        ...

    async def owner(self, response_id: str) -> tuple[str, str] | None:
        """(team, upstream) of the first request that recorded `response_id`; None for an
        unknown or empty id."""
        ...

    async def report(
        self, since: float | None, until: float | None, by: Sequence[str]
    ) -> list[ReportRow]:
        """Usage rows over ts in [since, until) (None: unbounded), one per group of `by`
        (team, model, day in UTC, user, or `tag:KEY` for the value of tag KEY; ValueError for
        any other key), sorted by the group keys in the order `by` names them, by code point;
        fields not grouped by are empty strings, and records without a user or without the
        tag group under "". No records, no rows (not one row of zeros)."""
        ...


class RequestReader(Protocol):
    """Finds requests in the ledger (`GET /admin/requests`, `gateway requests`); valid and
    seeing what `ReportReader` says."""

    async def requests(self, where: RequestFilter, limit: int, before: Cursor | None) -> Page:
        """At most `limit` records matching `where`, newest first (by ts, then write order),
        strictly before `before` (None: from the newest). A walk from the first page through
        each `next_cursor` sees every matching record that existed when it began exactly
        once, whatever is appended meanwhile (newer records sort before the walk's start)."""
        ...

    async def request(self, request_id: str) -> Found | None:
        """The newest record of `request_id`; None for an unknown id."""
        ...


class CaptureReader(Protocol):
    """Captured request and answer bodies (CONTRACT section 11), by request id."""

    async def capture(self, request_id: str) -> Mapping[str, Any] | None:
        """The capture of `request_id`, None when its bodies were not kept."""
        ...

    async def captured(self, request_ids: Sequence[str]) -> frozenset[str]:
        """Which of `request_ids` have a capture."""
        ...


class LedgerReader(ReportReader, RequestReader, Protocol):
    """Every read over the ledger."""


class Ledger(LedgerWriter, LedgerReader, Protocol):
    """A backend that both writes the ledger and reads it (SQLite and PostgreSQL do)."""
