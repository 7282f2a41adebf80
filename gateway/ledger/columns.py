"""The ledger table's columns, derived from `LedgerRecord`'s fields in this one place.

Both SQL backends and the spill file take their column list, column types and row values from
`COLUMNS`, so a new record field needs one change: the field itself (with a default, so rows
and spill lines written before it still load). Field types map as: `int` -> a 64-bit integer,
`float` -> a double, `str` -> text, `bool` -> a boolean (an integer in SQLite), and `X | None`
-> the same type, nullable. Any other field type fails at import, before a row is written.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import attrgetter, itemgetter
from typing import Any, Literal

from gateway.ledger.records import LedgerRecord

Dialect = Literal["sqlite", "postgres"]
Kind = Literal["int", "float", "str", "bool"]

_SQL_TYPES: dict[Kind, dict[Dialect, str]] = {
    "int": {"sqlite": "INTEGER", "postgres": "BIGINT"},
    "float": {"sqlite": "REAL", "postgres": "DOUBLE PRECISION"},
    "str": {"sqlite": "TEXT", "postgres": "TEXT"},
    "bool": {"sqlite": "INTEGER", "postgres": "BOOLEAN"},
}
_KINDS: dict[object, Kind] = {int: "int", float: "float", str: "str", bool: "bool"}
_INT64 = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Column:
    """One column: a `LedgerRecord` field's name, value kind, nullability and default."""

    name: str
    kind: Kind
    nullable: bool
    default: object = dataclasses.MISSING  # the field's default, MISSING if it has none

    def declaration(self, dialect: Dialect) -> str:
        """The column's type and constraints, e.g. ``BIGINT NOT NULL DEFAULT 0``."""
        decl = _SQL_TYPES[self.kind][dialect]
        if not self.nullable:
            decl += " NOT NULL"
        if self.default is not dataclasses.MISSING and self.default is not None:
            decl += f" DEFAULT {_literal(self.default, dialect)}"
        return decl


def _literal(value: object, dialect: Dialect) -> str:
    if isinstance(value, bool):
        if dialect == "postgres":
            return "TRUE" if value else "FALSE"
        return "1" if value else "0"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise TypeError(f"no SQL literal for default {value!r}")


def _column(field: dataclasses.Field[Any], hint: object) -> Column:
    nullable = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(hint)) != 2:
            raise TypeError(f"LedgerRecord.{field.name}: unsupported type {hint!r}")
        nullable, hint = True, args[0]
    kind = _KINDS.get(hint)
    if kind is None:
        raise TypeError(f"LedgerRecord.{field.name}: unsupported type {hint!r}")
    return Column(field.name, kind, nullable, field.default)


def _columns() -> tuple[Column, ...]:
    hints = typing.get_type_hints(LedgerRecord)
    return tuple(_column(f, hints[f.name]) for f in dataclasses.fields(LedgerRecord))


COLUMNS: tuple[Column, ...] = _columns()
NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)


def sqlite_row(record: LedgerRecord) -> tuple[object, ...]:
    """The record's values in column order, as SQLite stores them."""
    return tuple(getattr(record, name) for name in NAMES)


def _text(value: str) -> str:
    """Text PostgreSQL accepts: it refuses NUL characters and lone surrogates, and one such
    record would otherwise fail its whole batch forever; both become U+FFFD."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            value = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value)
    return value


def _int(value: object) -> int:
    number: int = int(value)  # type: ignore[call-overload]
    return max(-_INT64, min(_INT64, number))  # out of BIGINT's range would fail the batch


def _float(value: object) -> float:
    return math.nan if value is None else float(value)  # type: ignore[arg-type]


_CONVERT: dict[Kind, Callable[[Any], object]] = {
    "int": _int,
    "float": _float,
    "str": lambda v: _text(str(v)),
    "bool": bool,
}
_CONVERTERS = tuple((c.name, c.nullable, _CONVERT[c.kind]) for c in COLUMNS)


_PY_TYPES: dict[Kind, type] = {"int": int, "float": float, "str": str, "bool": bool}
_GET_ALL = attrgetter(*NAMES)
# itemgetter of one index returns the item, not a tuple: a trailing index keeps it a tuple
# whatever the field count, and `[:-1]` drops it again
_GET_TEXT = itemgetter(*(i for i, c in enumerate(COLUMNS) if c.kind == "str"), 0)
_GET_INTS = itemgetter(*(i for i, c in enumerate(COLUMNS) if c.kind == "int"), 0)
# Every exact type signature a well-formed record has (each nullable column either way).
_WELL_FORMED = frozenset(
    itertools.product(
        *((_PY_TYPES[c.kind], type(None)) if c.nullable else (_PY_TYPES[c.kind],) for c in COLUMNS)
    )
)


def postgres_row(record: LedgerRecord) -> tuple[object, ...]:
    """The record's values in column order, each of the exact Python type its PostgreSQL
    column takes (binary COPY accepts nothing else) and storable there (see `_text`)."""
    values: tuple[object, ...] = _GET_ALL(record)
    # Fast path, checked at C speed: exact types, ASCII text without NUL, ints in range.
    if tuple(map(type, values)) in _WELL_FORMED:
        text = "".join(_GET_TEXT(values)[:-1])
        if text.isascii() and "\x00" not in text:
            ints = _GET_INTS(values)[:-1]
            if min(ints) >= -_INT64 and max(ints) <= _INT64:
                return values
    out = []
    for value, (_, nullable, convert) in zip(values, _CONVERTERS, strict=True):
        out.append(None if value is None and nullable else convert(value))
    return tuple(out)


def from_mapping(values: Mapping[str, object]) -> LedgerRecord:
    """A record from column values by name (a spill line): unknown names are ignored and
    missing ones take the field's default, so lines written by another version still load.
    Raises ValueError or TypeError when a value does not fit its column."""
    out: dict[str, object] = {}
    for name, nullable, convert in _CONVERTERS:
        if name not in values:
            continue
        value = values[name]
        out[name] = None if nullable and value is None else convert(value)
    return LedgerRecord(**out)  # type: ignore[arg-type]
