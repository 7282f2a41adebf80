"""The request search's inputs: filters, limits and cursors as an admin (or an attacker
holding the admin key) sends them. Pure."""

from __future__ import annotations

import base64
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.ledger.search import (
    MAX_LIMIT,
    Cursor,
    RequestFilter,
    make_filter,
    parse_limit,
    parse_status,
)


@given(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=0, max_value=2**63 - 1),
)
def test_a_cursor_reads_back_exactly(ts: float, ident: int) -> None:
    text = Cursor(ts, ident).encode()
    assert Cursor.decode(text) == Cursor(ts, ident)
    assert text.isascii() and len(text) == 23


def forged(version: int, ts: float, ident: int) -> str:
    return base64.urlsafe_b64encode(struct.pack(">Bdq", version, ts, ident)).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "x",
        "not a cursor at all!!!!",
        Cursor(1.0, 1).encode() + "A",
        Cursor(1.0, 1).encode()[:-1],
        Cursor(1.0, 1).encode() + "=",
        forged(2, 1.0, 1),  # another version
        forged(1, float("nan"), 1),
        forged(1, float("inf"), 1),
        forged(1, 1.0, -1),
        "' OR 1=1 --aaaaaaaaaaaaa",
        "é" * 23,
        "A" * 10_000,
    ],
)
def test_a_forged_or_broken_cursor_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid cursor"):
        Cursor.decode(text)


@given(st.text(max_size=40))
def test_no_text_but_a_real_cursor_decodes_to_anything_unsafe(text: str) -> None:
    try:
        cursor = Cursor.decode(text)
    except ValueError:
        return
    assert cursor.id >= 0 and abs(cursor.ts) < float("inf")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("200", (200, 201)), ("5xx", (500, 600)), ("4XX", (400, 500)), (" 429 ", (429, 430))],
)
def test_status_is_a_code_or_a_class(text: str, expected: tuple[int, int]) -> None:
    assert parse_status(text) == expected


@pytest.mark.parametrize(
    "text", ["", "2", "20", "2000", "6xx", "0", "5x", "xx", "5xx;--", "\u0665xx"]
)
def test_other_statuses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="status"):
        parse_status(text)


def test_limits() -> None:
    assert parse_limit(None) == 50 and parse_limit("") == 50
    assert parse_limit("1") == 1 and parse_limit(str(MAX_LIMIT)) == MAX_LIMIT
    for bad in ("0", "501", "-1", "1e3", "ten", "\u0663", "10.0"):
        with pytest.raises(ValueError, match="limit"):
            parse_limit(bad)


def test_filters() -> None:
    assert make_filter() == RequestFilter()
    got = make_filter(team="ads", tags=["env:prod", "k:a:b"], status="5xx", user="")
    assert got == RequestFilter(team="ads", tags=(("env", "prod"), ("k", "a:b")), status=(500, 600))
    assert make_filter(tags=["env=prod"], tag_separator="=").tags == (("env", "prod"),)
    for bad in (
        {"tags": ["env"]},
        {"tags": ["Env:x"]},
        {"tags": ["env:"]},
        {"tags": [f"k{i}:v" for i in range(11)]},
        {"team": "x" * 257},
        {"model": "a\x00b"},
        {"user": "u" * 1000},
    ):
        with pytest.raises(ValueError):
            make_filter(**bad)  # type: ignore[arg-type]
