"""Every Prometheus metric the gateway exports (CONTRACT section 6), on one registry."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import partial
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.routing import GlobSet
from gateway.settings import Settings

# GenAI semantic-convention advisory buckets for operation durations, in seconds
DURATION_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


# fnmatch's wildcards: `*`, `?` and a `[...]` class. A pattern made of nothing else names no model.
_WILDCARDS = re.compile(r"\*|\?|\[!?\]?[^\]]*\]")
# a label value is stored per series and echoed in every scrape: printable ASCII and short
_SANE = re.compile(r"[\x20-\x7e]{1,128}")


def named_models(settings: Settings) -> tuple[str, ...]:
    """The model names and patterns the config knows: upstreams' `models` and the prices table."""
    return (*(p for u in settings.upstreams for p in u.models), *settings.prices)


def _naming(patterns: Iterable[str]) -> GlobSet:
    return GlobSet(p for p in patterns if _WILDCARDS.sub("", p))


class ModelLabels:
    """Bounds the `model` label, which comes from the client: only models the config names.

    A model matched by an exact name or a glob with some literal part (`gpt-4o*`) keeps its
    name, up to `limit` distinct values; a catch-all (`*`) names nothing, so a model only it
    matches is `other`, as is anything not printable ASCII or longer than 128 characters, and
    every new model past `limit`. An empty model is `unknown`. `know()` follows a reload;
    labels already given stay.
    """

    __slots__ = ("_known", "_limit", "_seen")

    def __init__(self, limit: int, known: Iterable[str] = ()) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._known = _naming(known)

    def know(self, patterns: Iterable[str]) -> None:
        self._known = _naming(patterns)

    def __call__(self, model: str) -> str:
        if model in self._seen:
            return model
        if not model:
            return "unknown"
        if (
            len(self._seen) >= self._limit
            or not _SANE.fullmatch(model)  # before the glob match: bounds its cost too
            or not self._known(model)
        ):
            return "other"
        self._seen.add(model)
        return model


M = TypeVar("M", Counter, Gauge, Histogram)


class Family(Generic[M]):
    """A labelled metric whose children are kept: prometheus_client's `labels()` checks its
    arguments and takes a lock on every call, on the hot path several times per request.
    Every label value here comes from a bounded set, as the series themselves do."""

    __slots__ = ("_children", "metric")

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def labels(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class Metrics:
    """The gateway's metric objects. One instance per app, on its own registry."""

    def __init__(
        self,
        max_model_labels: int,
        registry: CollectorRegistry | None = None,
        known_models: Iterable[str] = (),
    ) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        self.model = ModelLabels(max_model_labels, known_models)
        self.requests = Family(
            Counter(
                "gateway_requests",
                "Requests answered, by outcome.",
                ["team", "model", "route", "status", "cache"],
                registry=r,
            )
        )
        self.request_duration = Family(
            Histogram(
                "gateway_request_duration_seconds",
                "Time from request received to last byte sent.",
                ["team", "model", "route"],
                buckets=DURATION_BUCKETS,
                registry=r,
            )
        )
        self.ttft = Family(
            Histogram(
                "gateway_time_to_first_token_seconds",
                "Time from request received to the first output event of a stream.",
                ["team", "model"],
                buckets=TTFT_BUCKETS,
                registry=r,
            )
        )
        self.overhead = Family(
            Histogram(
                "gateway_overhead_seconds",
                "Time spent inside the gateway per request, upstream time excluded.",
                ["route"],
                buckets=OVERHEAD_BUCKETS,
                registry=r,
            )
        )
        self.upstream_duration = Family(
            Histogram(
                "gateway_upstream_duration_seconds",
                "Time from sending upstream to the upstream's last byte.",
                ["upstream", "model", "status"],
                buckets=DURATION_BUCKETS,
                registry=r,
            )
        )
        self.tokens = Family(
            Counter(
                "gateway_tokens",
                "Tokens reported by upstreams.",
                ["team", "model", "type"],
                registry=r,
            )
        )
        self.cost = Family(
            Counter(
                "gateway_cost_usd",
                "Cost in USD from the prices table.",
                ["team", "model"],
                registry=r,
            )
        )
        self.budget_limit = Family(
            Gauge(
                "gateway_budget_limit_tokens",
                "A token budget's limit.",
                ["team", "window"],
                registry=r,
            )
        )
        self.budget_used = Family(
            Gauge(
                "gateway_budget_used_tokens",
                "Tokens spent in a budget's current window.",
                ["team", "window"],
                registry=r,
            )
        )
        self.budget_rejections = Family(
            Counter(
                "gateway_budget_rejections",
                "Requests refused with 429 budget_exceeded.",
                ["team"],
                registry=r,
            )
        )
        self.cache_lookups = Family(
            Counter("gateway_cache_lookups", "Cache lookups by result.", ["result"], registry=r)
        )
        self.cache_entries = Gauge(
            "gateway_cache_entries", "Entries in the response cache.", registry=r
        )
        self.cache_bytes = Gauge(
            "gateway_cache_bytes", "Bytes held by the response cache.", registry=r
        )
        self.cache_saved_tokens = Family(
            Counter(
                "gateway_cache_saved_tokens",
                "Tokens not spent thanks to cache hits and coalescing.",
                ["team", "model"],
                registry=r,
            )
        )
        self.ledger_pending = Gauge(
            "gateway_ledger_pending_records",
            "Ledger records not yet in the ledger's storage (in memory or in a spill file).",
            registry=r,
        )
        self.inflight = Gauge("gateway_inflight_requests", "Requests being handled.", registry=r)
        self.websockets = Gauge(
            "gateway_websocket_connections", "Open Responses WebSocket connections.", registry=r
        )
        self.active_streams = Gauge(
            "gateway_active_streams", "SSE streams being relayed.", registry=r
        )
        self.upstream_errors = Family(
            Counter(
                "gateway_upstream_errors",
                "Upstream failures by reason.",
                ["upstream", "reason"],
                registry=r,
            )
        )
        self.upstream_attempts = Family(
            Counter(
                "gateway_upstream_attempts",
                "Attempts by outcome: ok (its answer was relayed), retried (it failed and another"
                " attempt followed), failed (it failed and was the last).",
                ["upstream", "outcome"],
                registry=r,
            )
        )
        self.key_ejections = Family(
            Counter(
                "gateway_upstream_key_ejections",
                "Keys taken out of an upstream's pool, by reason (auth, failures).",
                ["upstream", "reason"],
                registry=r,
            )
        )
        self.state_errors = Family(
            Counter(
                "gateway_state_errors",
                "Operations on the shared state store (Redis) that got no answer, by operation.",
                ["operation"],
                registry=r,
            )
        )
        self.captures = Family(
            Counter(
                "gateway_captures",
                "Requests captured, by why: sampled (the sample draw) or error (it failed).",
                ["reason"],
                registry=r,
            )
        )
        self.captures_dropped = Counter(
            "gateway_captures_dropped",
            "Captures dropped: the writer's queue was full or the store refused them.",
            registry=r,
        )
        # each upstream's child reads the health view when scraped (`watch_upstreams`)
        self.upstream_healthy = Gauge(
            "gateway_upstream_healthy",
            "1 while an upstream takes requests, 0 while it is ejected.",
            ["upstream"],
            registry=r,
        )
        self._upstreams: set[str] = set()
        for result in ("hit", "miss", "bypass", "coalesced"):
            self.cache_lookups.labels(result)
        for reason in ("sampled", "error"):
            self.captures.labels(reason)

    def watch_upstreams(self, healthy: Callable[[str], bool], names: Iterable[str]) -> None:
        """`gateway_upstream_healthy` for these upstreams, read at each scrape."""
        wanted = set(names)
        for gone in self._upstreams - wanted:
            self.upstream_healthy.remove(gone)
        for name in wanted - self._upstreams:
            self.upstream_healthy.labels(name).set_function(partial(_as_float, healthy, name))
        self._upstreams = wanted


def _as_float(healthy: Callable[[str], bool], name: str) -> float:
    return 1.0 if healthy(name) else 0.0
