"""USD cost of usage from the prices table (USD per million tokens)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from gateway.settings import Price
from gateway.usage import Usage


class PriceBook:
    """Looks a model's price up by exact name, then by glob pattern in file order."""

    __slots__ = ("_exact", "_globs", "_memo")

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._exact = {k: v for k, v in prices.items() if not any(c in k for c in "*?[")}
        self._globs = [(k, v) for k, v in prices.items() if k not in self._exact]
        self._memo: dict[str, Price | None] = {}

    def price(self, model: str) -> Price | None:
        if model in self._exact:
            return self._exact[model]
        if model not in self._memo:
            if len(self._memo) > 10_000:
                self._memo.clear()
            self._memo[model] = next(
                (p for pat, p in self._globs if fnmatch.fnmatchcase(model, pat)), None
            )
        return self._memo[model]

    def cost(self, model: str, usage: Usage) -> float:
        p = self.price(model)
        if p is None:
            return 0.0
        cached = min(usage.cached_tokens, usage.input_tokens)
        cached_price = p.input if p.cached_input is None else p.cached_input
        return (
            (usage.input_tokens - cached) * p.input
            + cached * cached_price
            + usage.output_tokens * p.output
        ) / 1_000_000

    def estimate(self, model: str, input_tokens: int, output_tokens: int) -> float:
        p = self.price(model)
        if p is None:
            return 0.0
        return (input_tokens * p.input + output_tokens * p.output) / 1_000_000
