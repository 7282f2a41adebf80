"""What a finished request is charged. Pure: the outcome in, (tokens, usd, estimated) out."""

from __future__ import annotations

from gateway.context import Outcome
from gateway.prices import PriceBook


def charge(model: str, metered: bool, out: Outcome, prices: PriceBook) -> tuple[int, float, bool]:
    """Real usage when it arrived. Without it, the reservation's estimate when an attempt may
    have been billed: the upstream answered 200, or the request reached it and then timed out
    or broke. A request every attempt of which failed with an error answer costs nothing.

    Token budgets count tokens only for a request that reserved them (a team with budgets);
    the cost is recorded either way.
    """
    if not metered:
        return 0, 0.0, False
    reservation = out.reservation
    if out.usage is not None:
        tokens = out.usage.total_tokens if reservation is not None else 0
        return tokens, prices.cost(model, out.usage), False
    if reservation is not None and any(a.status == 200 or a.reached for a in out.attempts):
        return reservation.tokens, reservation.usd, True
    return 0, 0.0, False
