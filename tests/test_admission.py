"""Budget admission: what a retry's hold counts, and a store that does not answer."""

from __future__ import annotations

from typing import Literal

import pytest

from gateway import errors
from gateway.budget.admission import budget_headers, reserve
from gateway.budget.local import LocalBudgetStore
from gateway.budget.store import Reservation
from gateway.policy import Policy
from gateway.redact import Redactor
from gateway.redis_state import StateUnavailable
from gateway.settings import BudgetRule, Price, Settings, State, Team, Upstream
from gateway.telemetry.metrics import Metrics

NOW = 1_790_000_000.0
TEAM = Team(
    name="t",
    keys=("sha256:" + "0" * 64,),
    budgets=(BudgetRule(per="minute", requests=1), BudgetRule(per="day", tokens=1000)),
)


def policy(on_unavailable: Literal["reject", "admit"] = "reject") -> Policy:
    settings = Settings(
        upstreams=(Upstream(name="u", base_url="http://127.0.0.1:9"),),
        teams=(TEAM,),
        prices={"m": Price(input=1.0, output=2.0)},
        state=State(on_unavailable=on_unavailable),
    )
    return Policy(settings, {}, Redactor.from_settings(settings))


class Unanswered(LocalBudgetStore):
    """A store whose server does not answer."""

    async def reserve(
        self, team: Team, tokens: int, usd: float, now: float, requests: int = 1
    ) -> Reservation:
        raise StateUnavailable("budget_reserve")

    async def windows(self, team: Team, now: float) -> list[object]:  # type: ignore[override]
        raise StateUnavailable("budget_windows")


async def test_a_retry_hold_counts_no_request() -> None:
    store, metrics = LocalBudgetStore(), Metrics(10)
    first = await reserve(store, policy(), metrics, TEAM, "m", 40, 10, NOW)
    assert first.requests == 1
    # the minute's one request is held: another request is refused, a retry's hold is not
    with pytest.raises(errors.GatewayError) as refused:
        await reserve(store, policy(), metrics, TEAM, "m", 40, 10, NOW)
    assert refused.value.status == 429 and "'minute:requests'" in refused.value.message
    more = await reserve(store, policy(), metrics, TEAM, "m", 40, 10, NOW, counted=False)
    assert more.requests == 0
    minute, day = await store.windows(TEAM, NOW)
    assert (minute.reserved, day.reserved) == (1, 40)


async def test_reject_answers_503_when_the_store_does_not_answer() -> None:
    with pytest.raises(errors.GatewayError) as e:
        await reserve(Unanswered(), policy("reject"), Metrics(10), TEAM, "m", 40, 10, NOW)
    err = e.value
    assert (err.status, err.type, err.code) == (503, "server_error", "state_unavailable")
    assert int(err.headers["retry-after"]) >= 1


async def test_admit_holds_nothing_yet_keeps_the_estimate_to_charge() -> None:
    got = await reserve(Unanswered(), policy("admit"), Metrics(10), TEAM, "m", 40, 10, NOW)
    assert (got.windows, got.tokens, got.requests) == ((), 20, 1)
    assert got.usd == pytest.approx((10 * 1.0 + 10 * 2.0) / 1e6)


async def test_budget_headers_are_left_out_when_the_store_does_not_answer() -> None:
    assert await budget_headers(Unanswered(), TEAM, NOW) == {}
    assert await budget_headers(LocalBudgetStore(), TEAM, NOW) == {
        "x-gateway-budget-remaining-tokens": "1000",
        "x-gateway-budget-reset": str(86400 - int(NOW) % 86400),
    }
