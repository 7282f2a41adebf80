"""Request JSON within one nesting limit, and the output-token estimate read from it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import jsonbody
from gateway.budget import estimate

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(alphabet='ab[]{}"\\', max_size=5),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(alphabet="k[{", max_size=3), children, max_size=3)
    ),
    max_leaves=40,
)


def reference_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((reference_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((reference_depth(v) for v in value), default=0)
    return 0


@given(JSON, st.integers(min_value=0, max_value=12))
@settings(max_examples=400, deadline=None)
def test_refused_exactly_when_deeper_than_the_limit(value: Any, limit: int) -> None:
    body = orjson.dumps(value)
    assert jsonbody.depth(value) == reference_depth(value)
    if reference_depth(value) > limit:
        with pytest.raises(jsonbody.TooDeep):
            jsonbody.loads(body, limit)
    else:
        assert jsonbody.loads(body, limit) == value


@pytest.mark.parametrize("depth", [254, 1000, 1023])
def test_depths_that_broke_reencoding_are_refused(depth: int) -> None:
    body = b'{"input": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    with pytest.raises(jsonbody.TooDeep):
        jsonbody.loads(body, 64)


def test_brackets_inside_strings_do_not_count() -> None:
    body = orjson.dumps({"input": "[" * 500 + "{" * 500})
    assert jsonbody.loads(body, 2) == {"input": "[" * 500 + "{" * 500}


def test_beyond_the_decoder_limit_is_a_decode_error() -> None:
    with pytest.raises(orjson.JSONDecodeError):
        jsonbody.loads(b"[" * 2000 + b"]" * 2000, 64)


CAPS = st.one_of(st.none(), st.integers(min_value=1, max_value=10**6))


@given(CAPS, CAPS, CAPS, st.one_of(st.none(), st.integers(min_value=1, max_value=8)))
def test_the_estimate_is_the_largest_cap_times_n(
    a: int | None, b: int | None, c: int | None, n: int | None
) -> None:
    body = {"max_output_tokens": a, "max_tokens": b, "max_completion_tokens": c, "n": n}
    caps = [x for x in (a, b, c) if x is not None]
    expected = (max(caps) if caps else 77) * (n or 1)
    assert estimate.output_tokens(body, 77) == expected
    absent = {k: v for k, v in body.items() if v is not None}
    assert estimate.output_tokens(absent, 77) == expected


@pytest.mark.parametrize("bad", [0, -1, 2.0, "5", True, False, [], {}])
@pytest.mark.parametrize("name", [*estimate.OUTPUT_CAPS, "n"])
def test_a_field_that_is_not_a_positive_integer_is_named(name: str, bad: object) -> None:
    with pytest.raises(estimate.InvalidValue) as e:
        estimate.output_tokens({"max_tokens": 5, name: bad}, 10)
    assert e.value.param == name


@pytest.mark.parametrize(("size", "tokens"), [(0, 0), (1, 1), (4, 1), (5, 2), (4001, 1001)])
def test_input_estimate_rounds_up(size: int, tokens: int) -> None:
    assert estimate.input_tokens(size) == tokens
