"""The ledger's read queries, written once for both SQL backends.

The report's grouping rules (which expression each group key is, the half-open time range,
the order of rows, no rows for no records) and what a team was charged are defined here; a
backend runs the SQL with its driver and converts the rows with `report_rows` and `charges`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.attribution import valid_key
from gateway.ledger.columns import COLUMNS, NAMES, Dialect, from_mapping
from gateway.ledger.records import GROUP_KEYS, TAG_PREFIX, Charge, ReportRow
from gateway.ledger.report import normalize_by
from gateway.ledger.search import Cursor, Found, Page, RequestFilter

TABLE = "ledger"

_DAY: dict[Dialect, str] = {
    "sqlite": "strftime('%Y-%m-%d', ts, 'unixepoch')",
    "postgres": "to_char(to_timestamp(ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
}
# Rows sort by code point in both, as Python sorts strings (PostgreSQL's default collation
# may follow a locale). Every group expression is text.
_ORDER: dict[Dialect, str] = {"sqlite": "{}", "postgres": '{} COLLATE "C"'}
_TRUE: dict[Dialect, str] = {"sqlite": "1", "postgres": "TRUE"}
# what counts as a request in `Charge.requests`: an upstream call for a named model
_REQUEST = "attempts > 0 AND model <> ''"


@dataclass(frozen=True, slots=True)
class Query:
    """SQL with its parameters, in the driver's placeholder style."""

    sql: str
    params: tuple[object, ...]


def quote(name: str) -> str:
    """A column name as SQL names it: quoted, since `user` is a reserved word in PostgreSQL
    (bare, it means the session's role). Names come from `LedgerRecord`, never from input."""
    return f'"{name}"'


def _placeholder(dialect: Dialect, n: int) -> str:
    return "?" if dialect == "sqlite" else f"${n}"


def create_table(dialect: Dialect) -> str:
    """CREATE TABLE IF NOT EXISTS with an id in write order and one column per field."""
    ident = {
        "sqlite": "id INTEGER PRIMARY KEY AUTOINCREMENT",
        "postgres": "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    }[dialect]
    cols = ",\n    ".join(f"{quote(c.name)} {c.declaration(dialect)}" for c in COLUMNS)
    return f"CREATE TABLE IF NOT EXISTS {TABLE} (\n    {ident},\n    {cols}\n)"


def add_columns(dialect: Dialect, have: Iterable[str]) -> list[str]:
    """ALTER TABLE statements adding the columns a table made by an older version lacks."""
    present = set(have)
    return [
        f"ALTER TABLE {TABLE} ADD COLUMN {quote(c.name)} {c.declaration(dialect)}"
        for c in COLUMNS
        if c.name not in present
    ]


# Which query each index serves (each listing index ends in (ts, id): read backwards it gives
# `requests` its order, newest first, so a page reads `limit` records and no sort is needed):
# - ledger_ts_id: the report and charged_since (a ts range); `requests` without a team, user
#   or model filter;
# - ledger_team_ts_id, ledger_user_ts_id, ledger_model_ts_id: `requests` filtered by team,
#   user or model;
# - ledger_response: `owner` (response id -> team, upstream);
# - ledger_request: `request` (one request by its id).
# `requests`' status and tag filters are checked on the records those indexes lead to. The
# (ts) and (team, ts) indexes of earlier versions are superseded and dropped.
INDEXES = (
    f"CREATE INDEX IF NOT EXISTS ledger_ts_id ON {TABLE} (ts, id)",
    f"CREATE INDEX IF NOT EXISTS ledger_team_ts_id ON {TABLE} (team, ts, id)",
    f'CREATE INDEX IF NOT EXISTS ledger_user_ts_id ON {TABLE} ("user", ts, id)',
    f"CREATE INDEX IF NOT EXISTS ledger_model_ts_id ON {TABLE} (model, ts, id)",
    f"CREATE INDEX IF NOT EXISTS ledger_request ON {TABLE} (request_id)",
    f"CREATE INDEX IF NOT EXISTS ledger_response ON {TABLE} (response_id) WHERE response_id <> ''",
    "DROP INDEX IF EXISTS ledger_ts",
    "DROP INDEX IF EXISTS ledger_team_ts",
)


def charged_since(dialect: Dialect, since: float) -> Query:
    """Per team: charged tokens, cost and requests (see `Charge`) of records with ts >= since."""
    return Query(
        "SELECT team, COALESCE(SUM(charged_tokens), 0), COALESCE(SUM(cost_usd), 0),"
        f" COALESCE(SUM(CASE WHEN {_REQUEST} THEN 1 ELSE 0 END), 0)"
        f" FROM {TABLE} WHERE ts >= {_placeholder(dialect, 1)} GROUP BY team",
        (since,),
    )


def charges(rows: Iterable[Sequence[Any]]) -> dict[str, Charge]:
    """`charged_since` rows as Charges by team."""
    return {
        str(team): Charge(tokens=int(tokens), usd=float(usd), requests=int(requests))
        for team, tokens, usd, requests in rows
    }


def owner(dialect: Dialect, response_id: str) -> Query:
    """(team, upstream) of the earliest record naming `response_id`: by ts, then write order
    (a record that waited in a spill file is written late but keeps its ts)."""
    return Query(
        f"SELECT team, upstream FROM {TABLE} WHERE response_id = {_placeholder(dialect, 1)}"
        " ORDER BY ts, id LIMIT 1",
        (response_id,),
    )


def tag_value(dialect: Dialect, key: str) -> str:
    """The SQL expression for the value of tag `key` of a record, NULL when it has none.
    `key` must be valid (`attribution.valid_key`: a-z 0-9 _ . -, so it cannot close the
    quotes around it); it is checked again here, since it is written into the SQL."""
    if not valid_key(key):
        raise ValueError("invalid tag key")
    if dialect == "sqlite":
        return f"""json_extract(NULLIF(tags, ''), '$."{key}"')"""
    return f"(NULLIF(tags, '')::jsonb ->> '{key}')"


def _group_expr(dialect: Dialect, key: str) -> str:
    if key.startswith(TAG_PREFIX):
        return f"COALESCE({tag_value(dialect, key[len(TAG_PREFIX) :])}, '')"
    return {"team": "team", "model": "model", "day": _DAY[dialect], "user": quote("user")}[key]


def report(dialect: Dialect, since: float | None, until: float | None, by: Sequence[str]) -> Query:
    """Usage over ts in [since, until), grouped by `by` (validated: ValueError for an unknown
    key), in `by` order. Rows hold team, model, day and user (or '' where not grouped by),
    then one value per `tag:KEY` of `by`, then the sums (see `report_rows`). Without
    grouping an empty range yields one row of zeros, which `report_rows` drops."""
    keys = normalize_by(by)
    tags = [key for key in keys if key.startswith(TAG_PREFIX)]
    select = [_group_expr(dialect, key) if key in keys else "''" for key in GROUP_KEYS]
    select += [_group_expr(dialect, key) for key in tags]
    where: list[str] = []
    params: list[float] = []
    for bound, op in ((since, ">="), (until, "<")):
        if bound is not None:
            params.append(bound)
            where.append(f"ts {op} {_placeholder(dialect, len(params))}")
    sql = (
        f"SELECT {', '.join(select)}, COUNT(*),"
        " COALESCE(SUM(input_tokens), 0), COALESCE(SUM(cached_tokens), 0),"
        " COALESCE(SUM(output_tokens), 0), COALESCE(SUM(reasoning_tokens), 0),"
        " COALESCE(SUM(cost_usd), 0), COALESCE(SUM(saved_tokens), 0),"
        f" COALESCE(SUM(CASE WHEN estimated = {_TRUE[dialect]} THEN 1 ELSE 0 END), 0)"
        f" FROM {TABLE}"
    )
    if where:
        sql += " WHERE " + " AND ".join(where)
    if keys:
        exprs = [_group_expr(dialect, key) for key in keys]
        sql += f" GROUP BY {', '.join(exprs)}"
        sql += f" ORDER BY {', '.join(_ORDER[dialect].format(e) for e in exprs)}"
    return Query(sql, tuple(params))


def report_rows(rows: Iterable[Sequence[Any]], by: Sequence[str]) -> list[ReportRow]:
    """`report` rows (of the same `by`) as ReportRows, without the all-zero row of an empty
    ungrouped range."""
    tags = [key[len(TAG_PREFIX) :] for key in normalize_by(by) if key.startswith(TAG_PREFIX)]
    n = len(GROUP_KEYS) + len(tags)  # where the sums start
    return [
        ReportRow(
            team=str(r[0]),
            model=str(r[1]),
            day=str(r[2]),
            user=str(r[3]),
            tags=tuple(zip(tags, map(str, r[4:n]), strict=True)),
            requests=int(r[n]),
            input_tokens=int(r[n + 1]),
            cached_tokens=int(r[n + 2]),
            output_tokens=int(r[n + 3]),
            reasoning_tokens=int(r[n + 4]),
            cost_usd=float(r[n + 5]),
            saved_tokens=int(r[n + 6]),
            estimated_requests=int(r[n + 7]),
        )
        for r in rows
        if r[n]
    ]


_SELECT_RECORD = f"SELECT id, {', '.join(quote(n) for n in NAMES)} FROM {TABLE}"


def requests(dialect: Dialect, where: RequestFilter, limit: int, before: Cursor | None) -> Query:
    """Records matching `where`, newest first (ts, then id), strictly before `before`: at
    most `limit` + 1, the last only telling that there is a next page. Every value is a
    parameter; a tag key is validated and written into the SQL (see `tag_value`)."""
    conds: list[str] = []
    params: list[object] = []

    def param(value: object) -> str:
        params.append(value)
        return _placeholder(dialect, len(params))

    for column, value in (("team", where.team), ("model", where.model), ("user", where.user)):
        if value is not None:
            conds.append(f"{quote(column)} = {param(value)}")
    if where.status is not None:
        low, high = where.status
        conds.append(f"status >= {param(low)} AND status < {param(high)}")
    for key, value in where.tags:
        conds.append(f"{tag_value(dialect, key)} = {param(value)}")
    if where.since is not None:
        conds.append(f"ts >= {param(where.since)}")
    if where.until is not None:
        conds.append(f"ts < {param(where.until)}")
    if before is not None:
        conds.append(f"(ts, id) < ({param(before.ts)}, {param(before.id)})")
    sql = _SELECT_RECORD
    if conds:
        sql += " WHERE " + " AND ".join(conds)
    sql += f" ORDER BY ts DESC, id DESC LIMIT {param(limit + 1)}"
    return Query(sql, tuple(params))


def request(dialect: Dialect, request_id: str) -> Query:
    """The newest record of `request_id` (a client may send the same id twice)."""
    return Query(
        f"{_SELECT_RECORD} WHERE request_id = {_placeholder(dialect, 1)}"
        " ORDER BY ts DESC, id DESC LIMIT 1",
        (request_id,),
    )


def found(rows: Iterable[Sequence[Any]]) -> list[Found]:
    """`requests` or `request` rows as records with their ids."""
    return [Found(int(r[0]), from_mapping(dict(zip(NAMES, r[1:], strict=True)))) for r in rows]


def page(rows: Sequence[Sequence[Any]], limit: int) -> Page:
    """`requests` rows as a page of at most `limit` records and the next page's cursor."""
    records = found(rows[:limit])
    more = len(rows) > limit and records
    return Page(records, records[-1].cursor.encode() if more else None)
