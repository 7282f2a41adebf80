"""The budget store protocol and its value types.

A store keeps, per team, one counter for each budget window (`minute` ... `total`, in tokens
or in USD): what was `used` (settled) and what is `reserved` (admitted, not yet settled) in
the window's current calendar period. Any implementation, in-process or shared between
replicas, keeps the semantics documented on `BudgetStore`; `tests/contract` holds it to them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.ledger.records import Charge
from gateway.settings import BudgetRule, Team


@dataclass(frozen=True, slots=True)
class Reservation:
    """Held against every window of a team until settled. Settle exactly once.

    A config reload may reorder, retune, add or remove a team's budgets while a request is in
    flight: its reservation still settles against the windows it was counted in, found by
    window and unit, never by position in the team's list.
    """

    team: str
    tokens: int
    usd: float
    # (window, unit, window start) of each counter it was counted in; keyed by window and
    # unit rather than list position, so a config reload that edits budgets settles right
    windows: tuple[tuple[str, str, float], ...]
    requests: int = 1  # what it counts in `requests` windows: 0 for a retry's extra hold
    # for a store that can lose its counters (Redis): the generation of the team's counters
    # it was held in, so a hold lost with the counters never releases one made after they
    # were rebuilt. Empty for the in-process store.
    epoch: str = ""


@dataclass(frozen=True, slots=True)
class Rejection:
    team: str
    window: str  # e.g. "day" (tokens), "month:usd" or "minute:requests"
    retry_after: int
    limit: float = 0.0  # the refusing window's whole limit, when the request alone exceeds it


@dataclass(frozen=True, slots=True)
class WindowState:
    per: str
    unit: str  # tokens | usd | requests
    limit: float
    used: float
    reserved: float
    start: float
    end: float

    @property
    def remaining(self) -> float:
        return max(0.0, self.limit - self.used - self.reserved)


class BudgetStore(Protocol):
    """Atomic reserve/settle over all of a team's windows.

    `shared` says whether other processes share the counters (Redis): such a store rebuilds
    the counters it lacks from the ledger by itself, and the gateway never `restore`s it at a
    start, which would set every replica's spend from one replica's view of the ledger.

    Every method takes `now` (unix seconds) from the caller rather than reading a clock, and
    works on the calendar period of each window that contains `now` (`window_bounds`); a
    period that has ended is forgotten, so each window starts its new period at zero.
    A token window counts `tokens`, a USD window counts `usd`, a request window counts
    `requests` (1 for a request admitted to an upstream call, 0 for a retry's extra hold).
    """

    @property
    def shared(self) -> bool: ...

    async def reserve(
        self, team: Team, tokens: int, usd: float, now: float, requests: int = 1
    ) -> Reservation | Rejection:
        """Admit a request costing at most `tokens` / `usd` / `requests`, or refuse it; one
        atomic step.

        Admitted when every window can hold it (`used + reserved + amount <= limit`): the
        amount is then added to `reserved` of every window, and the Reservation names each
        of them. Otherwise nothing is reserved anywhere and a Rejection names a refusing
        window (`window_name`: `per`, `per:usd` or `per:requests`) with `retry_after`, the
        whole seconds (at least 1) until every refusing window has reset. When the request
        alone exceeds a window's whole limit, so that no reset can make room, the Rejection
        names that window and carries its `limit`; otherwise `limit` is 0.0.

        A team without budgets is always admitted, with a Reservation of no windows.
        Concurrent reserves, in this process or any other sharing the store, never admit
        more than a window's limit between them.
        """
        ...

    async def settle(
        self,
        reservation: Reservation,
        tokens: int,
        usd: float,
        now: float,
        requests: int | None = None,
    ) -> None:
        """Replace a reservation by what the request really cost; one atomic step.

        Releases the reservation's amount from each window it was counted in (if that
        window's period is still current: an ended period is forgotten with what it held),
        and adds the real `tokens` / `usd` / `requests` (None: the reservation's own count)
        to `used` of the same windows in the period that
        contains `now`, which is where a ledger rebuild counts the request too. The real cost
        may be more than the reservation: `used` may then pass the limit. Windows that a
        reload added after the reservation are not charged; windows it removed are settled
        all the same.

        The caller settles each reservation exactly once (the pipeline's single `finish`);
        the store does not detect a second settle, which would charge the request again.
        Other reservations are untouched: until its own settle a reservation keeps holding.
        """
        ...

    async def windows(self, team: Team, now: float) -> list[WindowState]:
        """The current period of each of the team's windows, in the order of `team.budgets`:
        its limit (from `team`, so a reload's new limit shows at once), used, reserved and
        [start, end) as `window_bounds` gives them. Reserves nothing."""
        ...

    async def restore(
        self, teams: Sequence[Team], charged: Mapping[float, Mapping[str, Charge]], now: float
    ) -> None:
        """Seed window counters from the ledger: `charged[window_start][team]`.

        For each team's window, `used` of the period containing `now` is set (not added) to
        the tokens, USD or requests charged since that period's start, or to 0 where the ledger has
        none. What is `reserved` by requests in flight is kept.
        """
        ...

    async def reachable(self) -> bool:
        """Whether the store answers now: a shared store's server is up (an in-process store
        always answers). Other methods of a store that does not answer raise
        `gateway.redis_state.StateUnavailable`."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used after."""
        ...


def window_name(rule: BudgetRule) -> str:
    """How a refusal names a window: `day` for tokens, `month:usd`, `minute:requests`."""
    return rule.per if rule.unit == "tokens" else f"{rule.per}:{rule.unit}"


def amount(rule: BudgetRule, tokens: float, usd: float, requests: int) -> float:
    """What a request costing `tokens` / `usd` / `requests` counts in `rule`'s window."""
    if rule.tokens is not None:
        return tokens
    return usd if rule.usd is not None else float(requests)
