"""The usage report's inputs and outputs: parsing `--since/--until/--by` and rendering rows.

Pure functions shared by `gateway usage` and `GET /admin/usage`; the ledger backends compute
the rows (see `ReportReader.report`), this module only validates what they are asked and formats
what they return.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from gateway import amounts
from gateway.attribution import MAX_TAGS, valid_key
from gateway.ledger.records import GROUP_KEYS, TAG_PREFIX, ReportRow

FORMATS = ("table", "csv", "json")
NUMERIC_FIELDS = (
    "requests",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_usd",
    "saved_tokens",
    "estimated_requests",
)

_UNIX_SECONDS = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_TIME_FORMS = "YYYY-MM-DD, an ISO-8601 datetime (naive means UTC) or unix seconds"


def parse_when(text: str) -> float:
    """Parse a report bound into unix seconds.

    Accepts unix seconds (`1735689600`, `1735689600.5`), a date (`2025-01-01`, UTC midnight)
    or an ISO-8601 datetime (`2025-01-01T12:00:00`, `...Z`, `...+07:00`; naive means UTC).
    A bare number is always unix seconds, so write dates with dashes.
    """
    value = text.strip()
    if not value:
        raise ValueError(f"empty time: expected {_TIME_FORMS}")
    if _UNIX_SECONDS.fullmatch(value):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError(f"invalid time {text!r}: not a finite number")
        return seconds
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"invalid time {text!r}: expected {_TIME_FORMS}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def normalize_by(by: Sequence[str]) -> tuple[str, ...]:
    """Validate group keys (GROUP_KEYS, or `tag:KEY` with KEY in the tag key grammar, at
    most MAX_TAGS of those); keep their order and drop repeats."""
    if isinstance(by, str):
        # A bare string is a Sequence[str] too; iterating it would validate its letters.
        raise TypeError("by must be a sequence of group keys, not a string; use parse_by()")
    keys: list[str] = []
    for key in by:
        tag = key.startswith(TAG_PREFIX) and valid_key(key[len(TAG_PREFIX) :])
        if key not in GROUP_KEYS and not tag:
            shown = key if len(key) <= 60 else key[:60] + "..."
            raise ValueError(
                f"unknown group key {shown!r}: expected any of {', '.join(GROUP_KEYS)} or"
                " tag:KEY (KEY: 1 to 32 of a-z 0-9 _ . -)"
            )
        if key not in keys:
            keys.append(key)
    if sum(key.startswith(TAG_PREFIX) for key in keys) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tag:KEY groups")
    return tuple(keys)


def parse_by(text: str) -> tuple[str, ...]:
    """Parse `--by team,model,day,user,tag:KEY` (any subset, any order, any number of tags);
    empty text means no grouping."""
    return normalize_by([part.strip() for part in text.split(",") if part.strip()])


def totals(rows: Sequence[ReportRow]) -> ReportRow:
    """The sum of `rows`, with every group field empty."""
    return ReportRow(
        team="",
        model="",
        day="",
        requests=sum(row.requests for row in rows),
        input_tokens=sum(row.input_tokens for row in rows),
        cached_tokens=sum(row.cached_tokens for row in rows),
        output_tokens=sum(row.output_tokens for row in rows),
        reasoning_tokens=sum(row.reasoning_tokens for row in rows),
        cost_usd=math.fsum(row.cost_usd for row in rows),
        saved_tokens=sum(row.saved_tokens for row in rows),
        estimated_requests=sum(row.estimated_requests for row in rows),
    )


def row_to_dict(row: ReportRow, by: Sequence[str]) -> dict[str, object]:
    """The grouped keys of `row` (in `by` order), then its numeric fields (USD rounded)."""
    out: dict[str, object] = {key: row.group(key) for key in normalize_by(by)}
    for name in NUMERIC_FIELDS:
        value = getattr(row, name)
        out[name] = amounts.usd(value) if isinstance(value, float) else value
    return out


def render(rows: Sequence[ReportRow], by: Sequence[str], fmt: str) -> str:
    """Render report rows as `table` (with a TOTAL row), `csv` or `json` (with totals)."""
    keys = normalize_by(by)
    if fmt == "table":
        return _render_table(rows, keys)
    if fmt == "csv":
        return _render_csv(rows, keys)
    if fmt == "json":
        return _render_json(rows, keys)
    raise ValueError(f"unknown format {fmt!r}: expected any of {', '.join(FORMATS)}")


def _render_table(rows: Sequence[ReportRow], by: tuple[str, ...]) -> str:
    header = [*by, *NUMERIC_FIELDS]
    body = [_cells(row, by, _number) for row in rows]
    total = _cells(totals(rows), by, _number)
    if by:
        total[0] = "TOTAL"
        body.append(total)
    else:
        # Without grouping the only row is already the total; show it once even when empty.
        body = [total]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # Group columns are text (left-aligned), the rest are numbers (right-aligned).
        parts = [
            cell.ljust(width) if i < len(by) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join(line(cells) for cells in [header, *body]) + "\n"


def _render_csv(rows: Sequence[ReportRow], by: tuple[str, ...]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*by, *NUMERIC_FIELDS])
    for row in rows:
        writer.writerow(_cells(row, by, _number))
    return out.getvalue()


def _render_json(rows: Sequence[ReportRow], by: tuple[str, ...]) -> str:
    document = {
        "by": list(by),
        "rows": [row_to_dict(row, by) for row in rows],
        "totals": row_to_dict(totals(rows), ()),
    }
    return json.dumps(document, indent=2) + "\n"


def _cells(row: ReportRow, by: tuple[str, ...], number: Callable[[object], str]) -> list[str]:
    return [row.group(key) for key in by] + [number(getattr(row, name)) for name in NUMERIC_FIELDS]


def _number(value: object) -> str:
    """A report cell: a count as it is, USD (the only float) in fixed notation."""
    return amounts.usd_text(value) if isinstance(value, float) else str(value)
