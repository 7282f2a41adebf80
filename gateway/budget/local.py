"""In-process budget store: exact under concurrency because the event loop serialises it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.budget.store import Rejection, Reservation, WindowState, amount, window_name
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

    def amount(self, tokens: float, usd: float, requests: int) -> float:
        return amount(self.rule, tokens, usd, requests)


class LocalBudgetStore:
    """One counter per (team, window, unit). No method awaits before it is done, so each is
    atomic."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str, str], _Counter] = {}

    def _counter(self, team: str, rule: BudgetRule, now: float) -> _Counter:
        key = (team, rule.per, rule.unit)
        c = self._counters.get(key)
        if c is None or not c.start <= now < c.end:
            start, end = window_bounds(rule.per, now)
            c = _Counter(rule, start, end)
            self._counters[key] = c
        elif c.rule != rule:
            c.rule = rule  # a reload changed the limit: the spend so far still counts
        return c

    async def reserve(
        self, team: Team, tokens: int, usd: float, now: float, requests: int = 1
    ) -> Reservation | Rejection:
        counters = [self._counter(team.name, rule, now) for rule in team.budgets]
        worst: Rejection | None = None
        for c in counters:
            need = c.amount(tokens, usd, requests)
            if c.used + c.reserved + need > c.rule.limit:
                name = window_name(c.rule)
                if need > c.rule.limit:  # no reset will ever make room for this request
                    return Rejection(team.name, name, seconds_until(c.end, now), c.rule.limit)
                wait = seconds_until(c.end, now)
                if worst is None or wait > worst.retry_after:
                    worst = Rejection(team.name, name, wait)
        if worst is not None:
            return worst
        for c in counters:
            c.reserved += c.amount(tokens, usd, requests)
        return Reservation(
            team.name,
            tokens,
            usd,
            tuple((c.rule.per, c.rule.unit, c.start) for c in counters),
            requests,
        )

    async def settle(
        self,
        reservation: Reservation,
        tokens: int,
        usd: float,
        now: float,
        requests: int | None = None,
    ) -> None:
        r = reservation
        count = r.requests if requests is None else requests
        for per, unit, start in reservation.windows:
            old = self._counters.get((reservation.team, per, unit))
            if old is None:
                continue
            if old.start == start:
                old.reserved = max(0.0, old.reserved - old.amount(r.tokens, r.usd, r.requests))
            # charged to the window the request finished in, as the ledger rebuild counts it
            c = self._counter(reservation.team, old.rule, now)
            c.used += c.amount(tokens, usd, count)

    async def windows(self, team: Team, now: float) -> list[WindowState]:
        out = []
        for rule in team.budgets:
            c = self._counter(team.name, rule, now)
            out.append(
                WindowState(rule.per, rule.unit, rule.limit, c.used, c.reserved, c.start, c.end)
            )
        return out

    async def restore(
        self, teams: Sequence[Team], charged: Mapping[float, Mapping[str, Charge]], now: float
    ) -> None:
        for team in teams:
            for rule in team.budgets:
                c = self._counter(team.name, rule, now)
                got = charged.get(c.start, {}).get(team.name)
                c.used = 0.0 if got is None else amount(rule, got.tokens, got.usd, got.requests)

    @property
    def shared(self) -> bool:
        return False

    async def reachable(self) -> bool:
        return True

    async def close(self) -> None:
        pass
