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
    # attempts before the last that the upstream may have billed without saying so (sent,
    # then timed out or cut): each is charged the estimate
    unanswered = sum(1 for a in out.attempts[:-1] if a.reached and not a.status)
    est_tokens, est_usd = (reservation.tokens, reservation.usd) if reservation else (0, 0.0)
    tokens, usd = unanswered * est_tokens, unanswered * est_usd
    estimated = unanswered > 0 and reservation is not None
    if out.usage is not None:
        real = out.usage.total_tokens if reservation is not None else 0
        return tokens + real, usd + prices.cost(model, out.usage), estimated
    last = out.attempts[-1] if out.attempts else None
    if reservation is not None and last is not None and (last.status == 200 or last.reached):
        return tokens + est_tokens, usd + est_usd, True
    return tokens, usd, estimated
