"""What a finished request is charged: real usage when it came, else the reserved estimate
when an attempt may have been billed, else nothing."""

from __future__ import annotations

import pytest

from gateway.budget.charge import charge
from gateway.budget.store import Reservation
from gateway.context import Attempt, Outcome
from gateway.prices import PriceBook
from gateway.settings import Price
from gateway.usage import Usage

PRICES = PriceBook({"m": Price(input=2.0, output=8.0)})
HELD = Reservation("t", 500, 0.25, (("day", "tokens", 0.0),))
USAGE = Usage(input_tokens=100, output_tokens=50, total_tokens=160)  # total as billed


def outcome(
    usage: Usage | None = None, reservation: Reservation | None = HELD, *attempts: Attempt
) -> Outcome:
    return Outcome(usage=usage, reservation=reservation, attempts=list(attempts))


def test_real_usage_is_charged_its_billed_total_and_its_cost() -> None:
    tokens, usd, estimated = charge("m", True, outcome(USAGE), PRICES)
    assert (tokens, estimated) == (160, False)
    assert usd == pytest.approx(0.0006, rel=1e-12)  # 100 x 2 + 50 x 8, per million


def test_without_a_reservation_usage_costs_money_but_counts_no_tokens() -> None:
    tokens, usd, estimated = charge("m", True, outcome(USAGE, None), PRICES)
    assert (tokens, estimated) == (0, False)
    assert usd == pytest.approx(0.0006, rel=1e-12)


def test_an_unmetered_request_is_charged_nothing_whatever_it_used() -> None:
    answered = outcome(USAGE, HELD, Attempt("up", 0.0, status=200))
    assert charge("m", False, answered, PRICES) == (0, 0.0, False)


@pytest.mark.parametrize(
    "attempt",
    [Attempt("up", 0.0, status=200), Attempt("up", 0.0, status=0, reached=True)],
    ids=["answered 200 without usage", "reached then broke"],
)
def test_a_possibly_billed_attempt_without_usage_is_charged_the_estimate(
    attempt: Attempt,
) -> None:
    failed_first = Attempt("other", 0.0, status=503)
    assert charge("m", True, outcome(None, HELD, failed_first, attempt), PRICES) == (
        500,
        0.25,
        True,
    )


def test_attempts_that_all_failed_with_an_answer_cost_nothing() -> None:
    refused = outcome(None, HELD, Attempt("a", 0.0, status=429), Attempt("b", 0.0, status=500))
    assert charge("m", True, refused, PRICES) == (0, 0.0, False)
    assert charge("m", True, outcome(None, HELD), PRICES) == (0, 0.0, False)


def test_an_estimate_needs_a_reservation_to_charge() -> None:
    answered = outcome(None, None, Attempt("up", 0.0, status=200))
    assert charge("m", True, answered, PRICES) == (0, 0.0, False)


def attempts(*kinds: str) -> list[Attempt]:
    """`timeout` (sent, then no answer), `refused` (never sent), or an HTTP status."""
    return [
        Attempt("u", 0.0, reached=k == "timeout", status=int(k) if k.isdigit() else 0)
        for k in kinds
    ]


COST = 0.0006  # USAGE's: 100 x 2 + 50 x 8, per million


def test_each_earlier_attempt_that_may_have_been_billed_adds_an_estimate() -> None:
    out = outcome(USAGE, HELD, *attempts("503", "timeout", "timeout", "200"))
    tokens, usd, estimated = charge("m", True, out, PRICES)
    assert (tokens, estimated) == (2 * 500 + 160, True)
    assert usd == pytest.approx(2 * 0.25 + COST, rel=1e-12)


@pytest.mark.parametrize("earlier", [("refused",), ("503",), ("refused", "429")])
def test_earlier_attempts_that_were_answered_or_never_sent_add_nothing(
    earlier: tuple[str, ...],
) -> None:
    out = outcome(USAGE, HELD, *attempts(*earlier, "200"))
    tokens, usd, estimated = charge("m", True, out, PRICES)
    assert (tokens, estimated) == (160, False) and usd == pytest.approx(COST, rel=1e-12)


def test_only_the_attempts_before_the_last_are_estimated_on_their_own() -> None:
    """The last attempt is the answer: its usage, or one estimate when it has none."""
    assert charge("m", True, outcome(None, HELD, *attempts("timeout", "timeout")), PRICES) == (
        1000,
        0.5,
        True,
    )
    assert charge("m", True, outcome(None, HELD, *attempts("timeout", "503")), PRICES) == (
        500,
        0.25,
        True,
    )


def test_without_a_reservation_an_unanswered_attempt_adds_nothing() -> None:
    out = outcome(USAGE, None, *attempts("timeout", "200"))
    tokens, usd, estimated = charge("m", True, out, PRICES)
    assert (tokens, estimated) == (0, False) and usd == pytest.approx(COST, rel=1e-12)
