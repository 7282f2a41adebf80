"""Budget admission for one request: reserve its estimate, and the headers that report it."""

from __future__ import annotations

from gateway import errors
from gateway.budget import estimate
from gateway.budget.store import BudgetStore, Rejection, Reservation
from gateway.budget.windows import seconds_until, window_bounds
from gateway.policy import Policy
from gateway.redis_state import StateUnavailable
from gateway.settings import Team
from gateway.telemetry.metrics import Metrics


async def budget_headers(store: BudgetStore, team: Team, now: float) -> dict[str, str]:
    """The tightest token window's remaining tokens and reset; none when the team has no
    token budget, or when the store does not answer (the answer goes out without them)."""
    if not any(b.tokens is not None for b in team.budgets):
        return {}
    try:
        windows = [w for w in await store.windows(team, now) if w.unit == "tokens"]
    except StateUnavailable:
        return {}
    tightest = min(windows, key=lambda w: w.remaining)
    return {
        "x-gateway-budget-remaining-tokens": str(int(tightest.remaining)),
        "x-gateway-budget-reset": str(seconds_until(tightest.end, now)),
    }


async def reserve(
    store: BudgetStore,
    policy: Policy,
    metrics: Metrics,
    team: Team,
    model: str,
    body_len: int,
    output_estimate: int,
    now: float,
    counted: bool = True,
) -> Reservation:
    """Hold the request's estimate in every window of the team, or refuse it (429; counted as
    a budget rejection unless `counted` is false: a retry's extra hold is no request, and
    counts no request in `requests` windows).

    When the store does not answer: 503 `state_unavailable` under `state.on_unavailable:
    reject`; under `admit`, a Reservation of no windows, so the request is served unchecked
    and charged in the ledger as if it had been held (the store rebuilds its counters from
    the ledger once it answers again)."""
    if policy.prices.price(model) is None and any(b.usd is not None for b in team.budgets):
        # fail closed: never count it as free
        raise errors.model_not_priced(policy.redactor(model), team.name)
    input_est = estimate.input_tokens(body_len)
    tokens = input_est + output_estimate
    usd = policy.prices.estimate(model, input_est, output_estimate)
    requests = 1 if counted else 0
    try:
        got = await store.reserve(team, tokens, usd, now, requests)
    except StateUnavailable:
        if policy.settings.state.on_unavailable == "admit":
            return Reservation(team.name, tokens, usd, (), requests)
        raise errors.state_unavailable() from None
    if isinstance(got, Rejection):
        if counted:
            metrics.budget_rejections.labels(team.name).inc()
        unit = got.window.rpartition(":")[2] if ":" in got.window else "tokens"
        held = {"usd": usd, "requests": float(requests)}.get(unit, tokens)
        raise errors.budget_exceeded(team.name, got.window, got.retry_after, held, got.limit)
    return got


def zero_hold(team: Team, now: float) -> Reservation:
    """A reservation of nothing in every window of the team, for a request that ran without
    asking (a response an upstream started on its own): settling it charges its real usage."""
    return Reservation(
        team.name,
        0,
        0.0,
        tuple((b.per, b.unit, window_bounds(b.per, now)[0]) for b in team.budgets),
        requests=0,  # holds nothing: its settle adds the request without releasing one
    )


async def has_room(store: BudgetStore, team: Team, now: float) -> bool:
    """Whether every window of the team has something left (a team without budgets has)."""
    if not team.budgets:
        return True
    return all(w.remaining > 0 for w in await store.windows(team, now))
