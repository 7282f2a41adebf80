"""Finding requests in the ledger: the filter, the page cursor and the limit, parsed from what
an admin sends (`GET /admin/requests`, `gateway requests`), and a record as it is shown.

Pure. The backends run the query (`RequestReader.requests`, SQL in `queries.requests`).

A cursor is opaque to clients: the (ts, id) of the last record of a page, packed and base64url
encoded. It is validated like any input (a forged one is a ValueError, answered 400), and
trusting it would give nothing away: it only says where to resume, over records the admin may
read anyway.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.attribution import MAX_TAGS, MAX_USER, MAX_VALUE, valid_key, valid_value
from gateway.ledger.records import LedgerRecord

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
_CURSOR = struct.Struct(">Bdq")  # version, ts, id
_CURSOR_VERSION = 1
_CURSOR_CHARS = re.compile(r"[A-Za-z0-9_-]{23}")  # 17 bytes, base64url without padding
_STATUS = re.compile(r"([1-5])(?:([0-9]{2})|xx)", re.IGNORECASE)
_DIGITS = re.compile(r"[0-9]{1,4}")
_MAX_TEXT = 256  # longest team or model name a filter may hold


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page ends: the next page holds records strictly before (ts, id)."""

    ts: float
    id: int

    def encode(self) -> str:
        packed = _CURSOR.pack(_CURSOR_VERSION, self.ts, self.id)
        return base64.urlsafe_b64encode(packed).rstrip(b"=").decode()

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """A cursor `encode` made; ValueError for anything else."""
        if not _CURSOR_CHARS.fullmatch(text):
            raise ValueError("invalid cursor: pass next_cursor from the previous page as it is")
        try:
            version, ts, ident = _CURSOR.unpack(base64.urlsafe_b64decode(text + "="))
        except (binascii.Error, struct.error):
            raise ValueError("invalid cursor") from None
        if version != _CURSOR_VERSION or not math.isfinite(ts) or ident < 0:
            raise ValueError("invalid cursor")
        return cls(ts, ident)


@dataclass(frozen=True, slots=True)
class RequestFilter:
    """Which records to list; every field set must hold (None: any)."""

    team: str | None = None
    model: str | None = None
    user: str | None = None
    status: tuple[int, int] | None = None  # [low, high): one code, or a class such as 5xx
    tags: tuple[tuple[str, str], ...] = ()  # each (key, value) must be one of the tags
    since: float | None = None  # ts >= since
    until: float | None = None  # ts < until


@dataclass(frozen=True, slots=True)
class Found:
    """A record as the ledger holds it, with its row id (its place in write order)."""

    id: int
    record: LedgerRecord

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.record.ts, self.id)


@dataclass(frozen=True, slots=True)
class Page:
    """Records newest first (by ts, then by id), and the cursor of the next page (None for
    the last page)."""

    found: list[Found]
    next_cursor: str | None


def parse_status(text: str) -> tuple[int, int]:
    """`404` -> [404, 405); `5xx` -> [500, 600)."""
    m = _STATUS.fullmatch(text.strip())
    if m is None:
        raise ValueError("status: expected a code such as 429 or a class such as 5xx")
    if m.group(2) is None:
        low = int(m.group(1)) * 100
        return low, low + 100
    code = int(m.group(1) + m.group(2))
    return code, code + 1


def parse_tag(text: str, separator: str) -> tuple[str, str]:
    """`KEY<separator>VALUE` (`:` in the admin API, `=` on the command line)."""
    key, sep, value = text.partition(separator)
    if not sep or not valid_key(key) or not valid_value(value):
        raise ValueError(
            f"tag: expected KEY{separator}VALUE, KEY 1 to 32 of a-z 0-9 _ . -,"
            f" VALUE 1 to {MAX_VALUE} printable characters"
        )
    return key, value


def parse_limit(text: str | None) -> int:
    if text is None or text == "":
        return DEFAULT_LIMIT
    # ASCII digits only: str.isdigit() and int() take other scripts' digits too
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= MAX_LIMIT:
        raise ValueError(f"limit: expected a whole number from 1 to {MAX_LIMIT}")
    return int(text)


def _text(name: str, value: str | None, most: int = _MAX_TEXT) -> str | None:
    if value is None or value == "":
        return None
    if len(value) > most or not value.isprintable():
        raise ValueError(f"{name}: expected at most {most} printable characters")
    return value


def make_filter(
    *,
    team: str | None = None,
    model: str | None = None,
    user: str | None = None,
    status: str | None = None,
    tags: Sequence[str] = (),
    tag_separator: str = ":",
    since: float | None = None,
    until: float | None = None,
) -> RequestFilter:
    """A filter from text as an admin sends it; ValueError naming what is wrong."""
    if len(tags) > MAX_TAGS:
        raise ValueError(f"tag: at most {MAX_TAGS}")
    return RequestFilter(
        team=_text("team", team),
        model=_text("model", model),
        user=_text("user", user, MAX_USER + 32),  # room for a redaction mark
        status=parse_status(status) if status else None,
        tags=tuple(parse_tag(t, tag_separator) for t in tags),
        since=since,
        until=until,
    )


class NoCaptures:
    """The capture reader while no bodies are captured: nothing is."""

    async def capture(self, request_id: str) -> Mapping[str, Any] | None:
        return None

    async def captured(self, request_ids: Sequence[str]) -> frozenset[str]:
        return frozenset()


def record_dict(record: LedgerRecord) -> dict[str, Any]:
    """A record as the admin API and `gateway requests --format json` show it: every field,
    tags as an object."""
    out = dataclasses.asdict(record)
    out["tags"] = orjson.loads(record.tags) if record.tags else {}
    return out


def tags_text(tags: Mapping[str, str]) -> str:
    """Tags as a table cell: `k=v,k=v`."""
    return ",".join(f"{k}={v}" for k, v in tags.items())
