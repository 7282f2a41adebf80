"""Budget admission for one request: reserve its estimate, and the headers that report it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway import errors
from gateway.budget import estimate
from gateway.budget.store import Rejection
from gateway.budget.windows import seconds_until
from gateway.exchange import Exchange

if TYPE_CHECKING:
    from gateway.runtime import Gateway


async def budget_headers(gw: Gateway, ex: Exchange) -> dict[str, str]:
    team = gw.policy.teams.get(ex.team)
    if team is None or not any(b.tokens is not None for b in team.budgets):
        return {}
    now = gw.clock()
    windows = [w for w in await gw.budget.windows(team, now) if w.unit == "tokens"]
    tightest = min(windows, key=lambda w: w.remaining)
    return {
        "x-gateway-budget-remaining-tokens": str(int(tightest.remaining)),
        "x-gateway-budget-reset": str(seconds_until(tightest.end, now)),
    }


async def reserve(gw: Gateway, ex: Exchange, body_len: int) -> None:
    team = gw.policy.teams[ex.team]  # the caller checked it is there
    if gw.policy.prices.price(ex.model) is None and any(b.usd is not None for b in team.budgets):
        # fail closed: never count it as free
        raise errors.model_not_priced(gw.redactor(ex.model), team.name)
    out = ex.output_estimate  # the pipeline checked the body's output caps
    input_est = estimate.input_tokens(body_len)
    tokens = input_est + out
    usd = gw.policy.prices.estimate(ex.model, input_est, out)
    got = await gw.budget.reserve(team, tokens, usd, gw.clock())
    if isinstance(got, Rejection):
        gw.metrics.budget_rejections.labels(team.name).inc()
        reserve = usd if got.window.endswith(":usd") else tokens
        raise errors.budget_exceeded(team.name, got.window, got.retry_after, reserve, got.limit)
    ex.reservation = got
