"""The budget store protocol and its value types."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.ledger.records import Charge
from gateway.settings import Team


@dataclass(frozen=True, slots=True)
class Reservation:
    """Held against every window of a team until settled. Settle exactly once."""

    team: str
    tokens: int
    usd: float
    # (window, unit, window start) of each counter it was counted in; keyed by window and
    # unit rather than list position, so a config reload that edits budgets settles right
    windows: tuple[tuple[str, str, float], ...]


@dataclass(frozen=True, slots=True)
class Rejection:
    team: str
    window: str  # e.g. "day" or "month:usd"
    retry_after: int
    limit: float = 0.0  # the refusing window's whole limit, when the request alone exceeds it


@dataclass(frozen=True, slots=True)
class WindowState:
    per: str
    unit: str  # tokens | usd
    limit: float
    used: float
    reserved: float
    start: float
    end: float

    @property
    def remaining(self) -> float:
        return max(0.0, self.limit - self.used - self.reserved)


class BudgetStore(Protocol):
    """Atomic reserve/settle over all of a team's windows."""

    async def reserve(
        self, team: Team, tokens: int, usd: float, now: float
    ) -> Reservation | Rejection: ...

    async def settle(
        self, reservation: Reservation, tokens: int, usd: float, now: float
    ) -> None: ...

    async def windows(self, team: Team, now: float) -> list[WindowState]: ...

    async def restore(
        self, teams: Sequence[Team], charged: Mapping[float, Mapping[str, Charge]], now: float
    ) -> None:
        """Seed window counters from the ledger: `charged[window_start][team]`."""
        ...
