"""Usage report parsing (--since/--until/--by) and rendering (table, csv, json)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from datetime import UTC, datetime

import pytest

from gateway.ledger.records import ReportRow
from gateway.ledger.report import NUMERIC_FIELDS, parse_by, parse_when, render, row_to_dict

MARCH_1 = datetime(2025, 3, 1, tzinfo=UTC).timestamp()


def row(team: str = "", model: str = "", day: str = "", scale: int = 1) -> ReportRow:
    return ReportRow(
        team=team,
        model=model,
        day=day,
        requests=3 * scale,
        input_tokens=1234567 * scale,
        cached_tokens=1000 * scale,
        output_tokens=5000 * scale,
        reasoning_tokens=7 * scale,
        cost_usd=0.1234567 * scale,
        saved_tokens=11 * scale,
        estimated_requests=1 * scale,
    )


ROWS = [row("ads", "nusantara-base"), row("search-engine-team", "nusantara-pro", scale=2)]
BY = ("team", "model")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-03-01", MARCH_1),
        ("  2025-03-01\n", MARCH_1),
        ("2025-03-01T12:00:00", MARCH_1 + 43200),
        ("2025-03-01 12:00", MARCH_1 + 43200),
        ("2025-03-01T12:00:00Z", MARCH_1 + 43200),
        ("2025-03-01T19:00:00+07:00", MARCH_1 + 43200),
        ("2025-03-01T12:00:00.250-01:00", MARCH_1 + 43200 + 3600.25),
        ("1740787200", MARCH_1),
        ("1740787200.5", MARCH_1 + 0.5),
        ("0", 0.0),
    ],
)
def test_parse_when_accepts_dates_datetimes_and_unix_seconds(text: str, expected: float) -> None:
    assert parse_when(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "yesterday",
        "2025-13-01",
        "2025-02-30",
        "03/01/2025",
        "nan",
        "inf",
        "1e5",
        "1.2.3",
    ],
)
def test_parse_when_rejects_anything_else_with_a_clear_message(text: str) -> None:
    with pytest.raises(ValueError, match="YYYY-MM-DD") as error:
        parse_when(text)
    if text.strip():
        assert repr(text) in str(error.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ("  ", ()),
        ("team", ("team",)),
        ("team,model,day", ("team", "model", "day")),
        ("day, team", ("day", "team")),
        ("model,team,model,day,team", ("model", "team", "day")),
        ("team,,model,", ("team", "model")),
    ],
)
def test_parse_by_keeps_order_and_drops_repeats(text: str, expected: tuple[str, ...]) -> None:
    assert parse_by(text) == expected


@pytest.mark.parametrize(
    "text",
    ["users", "team,key_id", "Team", "team;model", "ts", "tag:", "tag:Env", "tag:a'b", "tag"],
)
def test_parse_by_rejects_unknown_keys(text: str) -> None:
    with pytest.raises(ValueError, match="unknown group key"):
        parse_by(text)


def test_user_and_tag_groups_parse_and_render() -> None:
    assert parse_by("user, tag:env,team,tag:env") == ("user", "tag:env", "team")
    grouped = dataclasses.replace(
        row("ads"), user="alice", tags=(("env", "prod"), ("feature", "x"))
    )
    by = ("tag:feature", "user", "tag:env")
    out = row_to_dict(grouped, by)
    assert list(out)[:3] == list(by)
    assert (out["tag:feature"], out["user"], out["tag:env"]) == ("x", "alice", "prod")
    assert render([grouped], by, "table").splitlines()[1].split()[:3] == ["x", "alice", "prod"]
    assert json.loads(render([grouped], by, "json"))["rows"][0]["tag:env"] == "prod"


def test_row_to_dict_has_grouped_keys_then_numbers() -> None:
    out = row_to_dict(row("ads", "m", "2025-03-01"), ("day", "team"))
    assert list(out) == ["day", "team", *NUMERIC_FIELDS]
    assert out["day"] == "2025-03-01"
    assert out["team"] == "ads"
    assert out["input_tokens"] == 1234567
    assert out["cost_usd"] == 0.123457  # to the micro-dollar


def test_table_aligns_columns_and_ends_with_a_total() -> None:
    lines = render(ROWS, BY, "table").splitlines()

    assert lines[0].split() == [*BY, *NUMERIC_FIELDS]
    assert [line.split()[:2] for line in lines[1:3]] == [
        ["ads", "nusantara-base"],
        ["search-engine-team", "nusantara-pro"],
    ]
    assert lines[3].split() == [
        "TOTAL",
        "9",
        "3703701",
        "3000",
        "15000",
        "21",
        "0.370370",
        "33",
        "3",
    ]
    # Numbers are right-aligned, so every line ends at the same column.
    assert len({len(line) for line in lines}) == 1
    # Text columns are left-aligned: the model column starts at the same offset everywhere.
    model_at = lines[0].index("model")
    assert lines[1].index("nusantara-base") == model_at
    assert lines[2].index("nusantara-pro") == model_at
    assert "0.123457" in lines[1]
    assert "1,234,567" not in "\n".join(lines)


def test_table_without_grouping_is_one_total_row() -> None:
    lines = render(ROWS, (), "table").splitlines()
    assert len(lines) == 2
    assert lines[0].split() == list(NUMERIC_FIELDS)
    assert lines[1].split()[:2] == ["9", "3703701"]


def test_table_of_no_rows_shows_zero_totals() -> None:
    lines = render([], ("team",), "table").splitlines()
    assert lines[0].split() == ["team", *NUMERIC_FIELDS]
    assert lines[1].split() == ["TOTAL", "0", "0", "0", "0", "0", "0.000000", "0", "0"]


def test_csv_round_trips_the_numbers_without_a_total_row() -> None:
    text = render(ROWS, ("model", "team"), "csv")
    reader = csv.reader(io.StringIO(text))
    header, *body = list(reader)

    assert header == ["model", "team", *NUMERIC_FIELDS]
    assert len(body) == len(ROWS)
    for cells, expected in zip(body, ROWS, strict=True):
        parsed = dict(zip(header, cells, strict=True))
        assert parsed["model"] == expected.model
        assert parsed["team"] == expected.team
        for name in NUMERIC_FIELDS:
            if name == "cost_usd":
                assert parsed[name] == f"{expected.cost_usd:.6f}"
            else:
                assert int(parsed[name]) == getattr(expected, name)


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_costs_are_shown_to_the_micro_dollar_never_as_float_noise(fmt: str) -> None:
    """Sums of float costs carry noise (0.1 + 0.2 != 0.3); what is shown is rounded, in fixed
    notation, and a sum that is exactly zero shows as zero, not as -0.0 or 8e-20."""
    noisy = [
        dataclasses.replace(row("ads", "m"), cost_usd=0.0004946999999999998),
        dataclasses.replace(row("web", "m"), cost_usd=-8.13e-20),
        dataclasses.replace(row("x", "m"), cost_usd=1e-7),
    ]
    text = render(noisy, ("team",), fmt)
    assert "0.000495" in text and "e-" not in text and "-0.0" not in text
    assert "4946999" not in text
    if fmt == "json":
        document = json.loads(text)
        assert [r["cost_usd"] for r in document["rows"]] == [0.000495, 0.0, 0.0]
        assert document["totals"]["cost_usd"] == 0.000495


def test_csv_quotes_awkward_names() -> None:
    odd = row('team "a", b', "m")
    header, first = list(csv.reader(io.StringIO(render([odd], ("team",), "csv"))))
    assert header[0] == "team"
    assert first[0] == 'team "a", b'


def test_json_has_by_rows_with_only_grouped_keys_and_totals() -> None:
    document = json.loads(render(ROWS, ("team",), "json"))

    assert document["by"] == ["team"]
    assert [list(r) for r in document["rows"]] == [["team", *NUMERIC_FIELDS]] * 2
    assert [r["team"] for r in document["rows"]] == ["ads", "search-engine-team"]
    assert document["rows"][1]["input_tokens"] == 2469134
    assert document["rows"][0]["cost_usd"] == 0.123457
    totals = document["totals"]
    assert list(totals) == list(NUMERIC_FIELDS)
    assert totals["requests"] == 9
    assert totals["estimated_requests"] == 3
    assert totals["cost_usd"] == 0.37037  # the exact sum, rounded once


def test_json_of_no_rows() -> None:
    document = json.loads(render([], ("day",), "json"))
    assert document["rows"] == []
    assert document["totals"]["requests"] == 0


def test_render_rejects_unknown_formats_and_keys() -> None:
    with pytest.raises(ValueError, match="unknown format 'yaml'"):
        render(ROWS, BY, "yaml")
    with pytest.raises(ValueError, match="unknown group key 'key_id'"):
        render(ROWS, ("key_id",), "table")
