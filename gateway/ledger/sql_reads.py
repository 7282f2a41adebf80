"""The ledger's reads, once for every SQL database: each is a query from `queries` in the
database's dialect, run by the ledger's own `_read` (which sees the records still queued in
this process, by flushing them first), and its rows made into the protocol's answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.ledger import queries
from gateway.ledger.columns import Dialect
from gateway.ledger.records import Charge, ReportRow
from gateway.ledger.search import Cursor, Found, Page, RequestFilter


class SqlReads:
    """`ReportReader` and `RequestReader` over `_read`; a subclass names its `dialect`."""

    dialect: Dialect

    async def _read(self, query: queries.Query) -> Sequence[Any]:
        raise NotImplementedError

    async def charged_since(self, since: float) -> dict[str, Charge]:
        """Per team: charged tokens, cost and requests of records with ts >= since."""
        return queries.charges(await self._read(queries.charged_since(self.dialect, since)))

    async def owner(self, response_id: str) -> tuple[str, str] | None:
        """(team, upstream) of the first request that recorded `response_id`."""
        if not response_id:
            return None
        rows = await self._read(queries.owner(self.dialect, response_id))
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    async def report(
        self, since: float | None, until: float | None, by: Sequence[str]
    ) -> list[ReportRow]:
        """Usage rows grouped by `by` (team, model, day in UTC, user, tag:KEY), over ts in
        [since, until)."""
        query = queries.report(self.dialect, since, until, by)  # validates `by` before any I/O
        return queries.report_rows(await self._read(query), by)

    async def requests(self, where: RequestFilter, limit: int, before: Cursor | None) -> Page:
        """Records matching `where`, newest first, before `before` (see RequestReader)."""
        rows = await self._read(queries.requests(self.dialect, where, limit, before))
        return queries.page(rows, limit)

    async def request(self, request_id: str) -> Found | None:
        """The newest record of `request_id`."""
        rows = await self._read(queries.request(self.dialect, request_id))
        return queries.found(rows)[0] if rows else None
