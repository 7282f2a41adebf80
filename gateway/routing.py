"""Model -> upstream routing and team allowlists, by glob pattern."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable


class GlobSet:
    """A compiled set of glob patterns (`*`, `?`, `[...]`), case-sensitive."""

    __slots__ = ("_match_all", "_regex")

    def __init__(self, patterns: Iterable[str]) -> None:
        pats = tuple(patterns)
        self._match_all = "*" in pats
        self._regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in pats) or "(?!)")

    def __call__(self, name: str) -> bool:
        return self._match_all or self._regex.match(name) is not None


class Router:
    """Picks the first upstream, in file order, whose model patterns match."""

    __slots__ = ("_routes",)

    def __init__(self, routes: Iterable[tuple[str, Iterable[str]]]) -> None:
        self._routes = tuple((name, GlobSet(pats)) for name, pats in routes)

    def route(self, model: str) -> str | None:
        for name, matches in self._routes:
            if matches(model):
                return name
        return None

    def serves(self, upstream: str, model: str) -> bool:
        return any(name == upstream and matches(model) for name, matches in self._routes)
