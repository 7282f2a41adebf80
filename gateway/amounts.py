"""Amounts as a person reads them: whole tokens and requests, and USD to the micro-dollar.

Sums are kept exact wherever they are computed (budgets, the ledger, metrics); only what is
shown (the admin API, the usage report, error messages) is rounded here, so a window that
has settled everything shows `reserved: 0`, never `8.13e-20`.
"""

from __future__ import annotations

USD_DECIMALS = 6  # a millionth of a dollar: below any price per token times a token


def usd(value: float) -> float:
    """USD rounded to `USD_DECIMALS` places (never `-0.0`)."""
    return round(value, USD_DECIMALS) + 0.0


def tokens(value: float) -> int:
    return round(value)


def amount(unit: str, value: float) -> int | float:
    """A budget amount in its unit: whole tokens or requests, or rounded USD."""
    return usd(value) if unit == "usd" else tokens(value)


def usd_text(value: float) -> str:
    """USD in fixed notation with `USD_DECIMALS` places: `0.000495`, never `4.95e-04`."""
    return f"{usd(value):.{USD_DECIMALS}f}"


def text(unit: str, value: float) -> str:
    """A budget amount with its unit, for messages: `120 tokens`, `0.250000 USD`, `1 request`."""
    if unit == "usd":
        return f"{usd_text(value)} USD"
    n = tokens(value)
    if unit == "requests":
        return f"{n} request" if n == 1 else f"{n} requests"
    return f"{n} tokens"
