"""The USD cost of usage: what finance sees must be what the provider's price list says."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.prices import PriceBook
from gateway.settings import Price
from gateway.usage import Usage

# USD per million tokens, chosen so that every term of a cost has its own digits
DEAR = Price(input=2.5, cached_input=1.25, output=10.0)
PLAIN = Price(input=3.0, output=15.0)  # no cached price: cached input costs as input
BOOK = PriceBook({"gpt-4o": DEAR, "claude": PLAIN})

exact = pytest.approx  # relative 1e-12: a change of the divisor by one is seen
TOKENS = st.integers(0, 10**7)


def test_cost_prices_cached_input_at_its_own_rate() -> None:
    # 600 uncached x 2.5 + 400 cached x 1.25 + 200 output x 10, per million
    usage = Usage(input_tokens=1000, output_tokens=200, cached_tokens=400)
    assert BOOK.cost("gpt-4o", usage) == exact(0.004, rel=1e-12)


def test_cost_without_a_cached_price_charges_cached_input_as_input() -> None:
    usage = Usage(input_tokens=1000, output_tokens=200, cached_tokens=400)
    assert BOOK.cost("claude", usage) == exact(0.006, rel=1e-12)  # 1000 x 3 + 200 x 15


def test_cost_of_one_token_of_each_kind() -> None:
    assert BOOK.cost("gpt-4o", Usage(input_tokens=1)) == exact(2.5e-6, rel=1e-12)
    assert BOOK.cost("gpt-4o", Usage(output_tokens=1)) == exact(1e-5, rel=1e-12)
    assert BOOK.cost("gpt-4o", Usage(input_tokens=1, cached_tokens=1)) == exact(1.25e-6, rel=1e-12)


def test_cached_tokens_beyond_the_input_are_not_discounted_twice() -> None:
    # a provider reporting more cached than input tokens: all of the input is cached, no more
    usage = Usage(input_tokens=100, output_tokens=0, cached_tokens=500)
    assert BOOK.cost("gpt-4o", usage) == exact(125e-6, rel=1e-12)


def test_a_model_without_a_price_costs_nothing() -> None:
    assert BOOK.price("mystery") is None
    assert BOOK.cost("mystery", Usage(10**6, 10**6, 2 * 10**6)) == 0.0
    assert BOOK.estimate("mystery", 10**6, 10**6) == 0.0


def test_estimate_adds_input_and_output_at_their_rates() -> None:
    # what admission reserves: 1000 x 2.5 + 300 x 10, per million
    assert BOOK.estimate("gpt-4o", 1000, 300) == exact(0.0055, rel=1e-12)
    assert BOOK.estimate("claude", 1, 0) == exact(3e-6, rel=1e-12)
    assert BOOK.estimate("claude", 0, 1) == exact(15e-6, rel=1e-12)


def test_glob_patterns_match_models_by_prefix_and_wildcards() -> None:
    book = PriceBook({"gpt-4o*": DEAR, "o?-mini": PLAIN, "claude-[0-9]*": PLAIN})
    assert book.price("gpt-4o") is DEAR
    assert book.price("gpt-4o-mini-2024-07-18") is DEAR
    assert book.price("o3-mini") is PLAIN and book.price("o33-mini") is None
    assert book.price("claude-3-haiku") is PLAIN and book.price("claude-x") is None
    assert book.price("GPT-4o") is None  # case matters: model names are case-sensitive
    assert book.cost("gpt-4o-mini", Usage(input_tokens=1000)) == exact(0.0025, rel=1e-12)


def test_first_matching_glob_in_file_order_wins() -> None:
    book = PriceBook({"gpt-4o-mini*": PLAIN, "gpt-4o*": DEAR, "*": Price(input=0, output=0)})
    assert book.price("gpt-4o-mini") is PLAIN
    assert book.price("gpt-4o-2024") is DEAR
    assert book.price("anything") == Price(input=0, output=0)
    assert book.price("gpt-4o-mini") is PLAIN  # asked again: the same answer


def test_an_exact_name_wins_over_any_glob_listed_before_it() -> None:
    # "Model-X" holds no glob character (its capital X included): it is an exact name
    book = PriceBook({"*": PLAIN, "Model-X": DEAR, "gpt-4o": DEAR})
    assert book.price("Model-X") is DEAR and book.price("gpt-4o") is DEAR
    assert book.price("gpt-4o-mini") is PLAIN  # an exact name is not a prefix


@settings(max_examples=50, deadline=None)
@given(TOKENS, TOKENS, TOKENS, TOKENS)
def test_cost_is_additive_in_each_token_count(a: int, b: int, out_a: int, out_b: int) -> None:
    def cost(inp: int, cached: int, out: int) -> float:
        return BOOK.cost("gpt-4o", Usage(input_tokens=inp, output_tokens=out, cached_tokens=cached))

    assert cost(a + b, 0, 0) == exact(cost(a, 0, 0) + cost(b, 0, 0), rel=1e-9)
    assert cost(0, 0, out_a + out_b) == exact(cost(0, 0, out_a) + cost(0, 0, out_b), rel=1e-9)
    # cached tokens are part of the input: each one replaces an input price by a cached one
    assert cost(a + b, b, out_a) == exact(cost(a, 0, out_a) + cost(b, b, 0), rel=1e-9)


@settings(max_examples=50, deadline=None)
@given(TOKENS, TOKENS)
def test_estimate_is_the_cost_of_the_same_uncached_usage(inp: int, out: int) -> None:
    for model in ("gpt-4o", "claude", "mystery"):
        cost = BOOK.cost(model, Usage(input_tokens=inp, output_tokens=out))
        assert BOOK.estimate(model, inp, out) == exact(cost, rel=1e-12)
