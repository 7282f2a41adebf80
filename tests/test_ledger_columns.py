"""The ledger's column mapping: one column per record field, rows PostgreSQL's binary COPY
takes, and records read back from column values."""

from __future__ import annotations

import dataclasses
import math

import pytest
from contract.ledger_samples import record

from gateway.ledger import columns, queries
from gateway.ledger.records import LedgerRecord


def test_one_column_per_field_with_its_type_nullability_and_default() -> None:
    assert tuple(f.name for f in dataclasses.fields(LedgerRecord)) == columns.NAMES
    by_name = {c.name: c for c in columns.COLUMNS}
    assert by_name["ttft_ms"].declaration("postgres") == "DOUBLE PRECISION"
    assert by_name["stream"].declaration("postgres") == "BOOLEAN NOT NULL"
    assert by_name["stream"].declaration("sqlite") == "INTEGER NOT NULL"
    assert by_name["attempts"].declaration("postgres") == "BIGINT NOT NULL DEFAULT 0"
    assert by_name["response_id"].declaration("sqlite") == "TEXT NOT NULL DEFAULT ''"


def test_only_columns_a_table_lacks_are_added() -> None:
    have = [n for n in columns.NAMES if n != "attempts"]
    assert queries.add_columns("postgres", have) == [
        'ALTER TABLE ledger ADD COLUMN "attempts" BIGINT NOT NULL DEFAULT 0'
    ]
    assert queries.add_columns("sqlite", columns.NAMES) == []


def test_a_well_formed_record_is_its_field_values() -> None:
    r = record(3, model="模型-ü", ttft_ms=None)
    assert columns.postgres_row(r) == tuple(getattr(r, n) for n in columns.NAMES)


@pytest.mark.parametrize(
    ("field", "value", "stored"),
    [
        ("cost_usd", 0, 0.0),  # an int where a float belongs: binary COPY wants a float
        ("input_tokens", 10**30, 2**63 - 1),  # past BIGINT: clamped, not a failed batch
        ("output_tokens", -(10**30), -(2**63 - 1)),
        ("model", "a\x00b", "a\ufffdb"),  # PostgreSQL text cannot hold NUL
        ("team", "t\ud800", "t\ufffd"),  # nor a lone surrogate
        ("team", "模型\x00", "模型\ufffd"),
        ("stream", 1, True),
    ],
)
def test_values_postgres_cannot_take_are_made_storable(
    field: str, value: object, stored: object
) -> None:
    row = columns.postgres_row(dataclasses.replace(record(0), **{field: value}))  # type: ignore[arg-type]
    got = row[columns.NAMES.index(field)]
    assert got == stored and type(got) is type(stored)


def test_a_record_reads_back_from_values_of_another_version() -> None:
    r = record(1, ttft_ms=None, attempts=2)
    values: dict[str, object] = dict(zip(columns.NAMES, columns.postgres_row(r), strict=True))
    assert columns.from_mapping(values) == r
    newer = {**values, "field_of_a_later_version": "x"}
    assert columns.from_mapping(newer) == r
    older = {k: v for k, v in values.items() if k not in ("attempts", "transport")}
    assert columns.from_mapping(older) == dataclasses.replace(r, attempts=0)
    assert math.isnan(columns.from_mapping({**values, "cost_usd": None}).cost_usd)
    with pytest.raises(TypeError):
        columns.from_mapping({k: v for k, v in values.items() if k != "ts"})
