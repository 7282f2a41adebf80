"""In-process budget store: exact under concurrency because the event loop serialises it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.budget.store import Rejection, Reservation, WindowState
from gateway.budget.windows import seconds_until, window_bounds
from gateway.ledger.records import Charge
from gateway.settings import BudgetRule, Team


@dataclass(slots=True)
class _Counter:
    rule: BudgetRule
    start: float
    end: float
    used: float = 0.0
    reserved: float = 0.0

    def amount(self, tokens: float, usd: float) -> float:
        return tokens if self.rule.tokens is not None else usd


class LocalBudgetStore:
    """One counter per (team, rule). No method awaits before it is done, so each is atomic."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, int], _Counter] = {}

    def _counter(self, team: str, index: int, rule: BudgetRule, now: float) -> _Counter:
        c = self._counters.get((team, index))
        if c is None or c.rule != rule or not c.start <= now < c.end:
            start, end = window_bounds(rule.per, now)
            used = (
                c.used
                if c is not None
                and c.start == start
                and c.rule.per == rule.per
                and c.rule.unit == rule.unit
                else 0.0
            )
            c = _Counter(rule, start, end, used)
            self._counters[(team, index)] = c
        return c

    async def reserve(
        self, team: Team, tokens: int, usd: float, now: float
    ) -> Reservation | Rejection:
        counters = [
            (i, self._counter(team.name, i, rule, now)) for i, rule in enumerate(team.budgets)
        ]
        worst: Rejection | None = None
        for _, c in counters:
            need = c.amount(tokens, usd)
            if c.used + c.reserved + need > c.rule.limit:
                unit = "" if c.rule.tokens is not None else ":usd"
                name = c.rule.per + unit
                if need > c.rule.limit:  # no reset will ever make room for this request
                    return Rejection(team.name, name, seconds_until(c.end, now), c.rule.limit)
                wait = seconds_until(c.end, now)
                if worst is None or wait > worst.retry_after:
                    worst = Rejection(team.name, name, wait)
        if worst is not None:
            return worst
        for _, c in counters:
            c.reserved += c.amount(tokens, usd)
        return Reservation(team.name, tokens, usd, tuple((i, c.start) for i, c in counters))

    async def settle(self, reservation: Reservation, tokens: int, usd: float, now: float) -> None:
        for index, start in reservation.windows:
            old = self._counters.get((reservation.team, index))
            if old is None:
                continue
            if old.start == start:
                old.reserved = max(
                    0.0, old.reserved - old.amount(reservation.tokens, reservation.usd)
                )
            # charged to the window the request finished in, as the ledger rebuild counts it
            c = self._counter(reservation.team, index, old.rule, now)
            c.used += c.amount(tokens, usd)

    async def windows(self, team: Team, now: float) -> list[WindowState]:
        out = []
        for i, rule in enumerate(team.budgets):
            c = self._counter(team.name, i, rule, now)
            out.append(
                WindowState(rule.per, rule.unit, rule.limit, c.used, c.reserved, c.start, c.end)
            )
        return out

    async def restore(
        self, teams: Sequence[Team], charged: Mapping[float, Mapping[str, Charge]], now: float
    ) -> None:
        for team in teams:
            for i, rule in enumerate(team.budgets):
                c = self._counter(team.name, i, rule, now)
                got = charged.get(c.start, {}).get(team.name)
                c.used = (
                    0.0
                    if got is None
                    else (float(got.tokens) if rule.tokens is not None else got.usd)
                )
