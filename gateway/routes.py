"""The client listener's routes: one table for the router, for labels and span names, and for
what the pipeline does on each route.

Routes are registered with aiohttp one by one, and the same table answers for any other path
under `/v1/` by a match without regard to case: an upstream that routes case-insensitively must
not be reached past an ownership check or a budget by `/v1/Responses/...`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # the template: a bounded label value and span name, never the raw path
    path: str  # the aiohttp resource registered for it ("" for matches only by pattern)
    model: bool = False  # a POST names a model in its body, which picks the upstream
    metered: bool = True  # a POST naming a model is charged to the team
    cacheable: bool = False  # a POST's answer may be cached and shared in flight
    creates_response: bool = False  # a POST makes a stored response, owned by its team
    owned: bool = False  # about a stored response: only its team reaches it
    refused: bool = False  # nothing the gateway forwards: 404
    model_list: bool = False  # the upstreams' models, filtered to the team's
    pattern: re.Pattern[str] | None = None


def _route(name: str, regex: str, path: str = "", **flags: bool) -> Route:
    return Route(name, path, pattern=re.compile(regex, re.IGNORECASE), **flags)


ROUTES: tuple[Route, ...] = (
    _route(
        "/v1/responses",
        r"^/v1/responses$",
        "/v1/responses",
        model=True,
        cacheable=True,
        creates_response=True,
    ),
    _route(
        "/v1/responses/input_tokens",
        r"^/v1/responses/input_tokens$",
        "/v1/responses/input_tokens",
        model=True,
        metered=False,
    ),
    _route(
        "/v1/responses/compact",
        r"^/v1/responses/compact$",
        "/v1/responses/compact",
        model=True,
    ),
    _route("/v1/responses/{id}", r"^/v1/responses/[^/]+$", "/v1/responses/{id}", owned=True),
    _route(
        "/v1/responses/{id}/cancel",
        r"^/v1/responses/[^/]+/cancel$",
        "/v1/responses/{id}/cancel",
        owned=True,
    ),
    _route(
        "/v1/responses/{id}/input_items",
        r"^/v1/responses/[^/]+/input_items$",
        "/v1/responses/{id}/input_items",
        owned=True,
    ),
    # anything else about a stored response: refused, never passed through unchecked
    _route("/v1/responses/*", r"^/v1/responses/", refused=True),
    _route(
        "/v1/chat/completions",
        r"^/v1/chat/completions$",
        "/v1/chat/completions",
        model=True,
    ),
    _route("/v1/completions", r"^/v1/completions$", "/v1/completions", model=True),
    _route("/v1/embeddings", r"^/v1/embeddings$", "/v1/embeddings", model=True),
    _route("/v1/models", r"^/v1/models$", "/v1/models", model_list=True),
    _route("/v1/models/{model}", r"^/v1/models/.+$", "/v1/models/{model}"),
)
PASSTHROUGH = Route("/v1/*", "/v1/{tail:.*}")


def route_of(path: str) -> Route:
    """The route of a path, matched without regard to case; `/v1/*` when none matches."""
    for route in ROUTES:
        assert route.pattern is not None
        if route.pattern.match(path):
            return route
    return PASSTHROUGH


_BY_NAME = {r.name: r for r in ROUTES}
# POST-only names under /v1/responses/: with any other method the segment is a response id
_POSTS_UNDER_RESPONSES = frozenset({"/v1/responses/input_tokens", "/v1/responses/compact"})


def for_method(route: Route, method: str) -> Route:
    """`GET /v1/responses/compact` is about a stored response named `compact` (for the
    upstream, too): it gets the ownership check, not the model route's allowlist."""
    if method != "POST" and route.name in _POSTS_UNDER_RESPONSES:
        return _BY_NAME["/v1/responses/{id}"]
    return route
