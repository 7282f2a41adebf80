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
    """Picks the upstreams that serve a model, in the order they are tried: those of the first
    route whose patterns match it, else the first upstream, in file order, whose models do."""

    __slots__ = ("_routes", "_upstreams")

    def __init__(
        self,
        upstreams: Iterable[tuple[str, Iterable[str]]],
        routes: Iterable[tuple[Iterable[str], Iterable[str]]] = (),
    ) -> None:
        self._routes = tuple((GlobSet(pats), tuple(names)) for pats, names in routes)
        self._upstreams = tuple((name, GlobSet(pats)) for name, pats in upstreams)

    def route(self, model: str) -> tuple[str, ...]:
        """The upstreams to try for `model`, in order; empty when none serves it."""
        for matches, names in self._routes:
            if matches(model):
                return names
        for name, matches in self._upstreams:
            if matches(model):
                return (name,)
        return ()
