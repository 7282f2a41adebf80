"""`gateway requests` output: found ledger records as a table or JSON. Pure."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

from gateway import amounts
from gateway.ledger.search import Page, record_dict, tags_text

FORMATS = ("table", "json")
COLUMNS = (
    "time",
    "request_id",
    "team",
    "user",
    "model",
    "status",
    "tokens",
    "cost_usd",
    "ms",
    "captured",
    "tags",
)
_MAX_CELL = 40  # a longer user, model or tag list is cut in the table (JSON has it whole)


def _cut(text: str) -> str:
    # a cell is one line of printable text: a value could hold anything the ledger stores
    shown = text if text.isprintable() else text.encode("unicode_escape").decode()
    return shown if len(shown) <= _MAX_CELL else shown[: _MAX_CELL - 1] + "…"


def render(page: Page, captured: frozenset[str], fmt: str) -> str:
    """The page as `table` (newest first, "captured" yes/no) or `json` (every field)."""
    if fmt == "json":
        rows = [
            {**record_dict(f.record), "captured": f.record.request_id in captured}
            for f in page.found
        ]
        return json.dumps({"requests": rows, "next_cursor": page.next_cursor}, indent=2) + "\n"
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}: expected any of {', '.join(FORMATS)}")
    lines = [list(COLUMNS)]
    for f in page.found:
        r = f.record
        tags = json.loads(r.tags) if r.tags else {}
        lines.append(
            [
                datetime.fromtimestamp(r.ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                _cut(r.request_id),
                _cut(r.team),
                _cut(r.user) or "-",
                _cut(r.model) or "-",
                str(r.status),
                f"{r.input_tokens}/{r.output_tokens}",
                amounts.usd_text(r.cost_usd),
                str(round(r.duration_ms)),
                "yes" if r.request_id in captured else "no",
                _cut(tags_text(tags)) or "-",
            ]
        )
    return _table(lines)


def _table(lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() + "\n"
        for line in lines
    )
