"""Several workers' metrics as one: the sum of their counters and histograms, and each gauge
combined as what it measures asks. Pure: parsed metric families in, metric families out.

Why a merge of scrapes rather than prometheus_client's multiprocess mode: that mode drops
exemplars (the trace ids on `/metrics`), cannot serve gauges read by callbacks at scrape time
(`gateway_upstream_healthy`, budget and cache gauges), and is switched on by an environment
variable for the whole process, where the gateway keeps one registry per `Gateway`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

__all__ = ["counters_only", "merge", "parse"]

Combine = Callable[[Sequence[float]], float]

# Gauges that read state the workers share (Redis budgets and cache): every worker reports
# the same value, so one of them stands for all. Upstream health is each worker's own view:
# an upstream counts as healthy only while every worker sends it requests, so an ejection
# anywhere shows. Every other gauge is a count of the worker's own (requests in flight,
# streams, records pending) and is summed.
GAUGES: dict[str, Combine] = {
    "gateway_budget_limit_tokens": max,
    "gateway_budget_used_tokens": max,
    "gateway_cache_entries": max,
    "gateway_cache_bytes": max,
    "gateway_upstream_healthy": min,
}
_SUMMED = ("counter", "histogram", "gaugehistogram", "summary")


def parse(text: str) -> list[Metric]:
    """Metric families from an OpenMetrics exposition (what a worker's `/metrics` sends)."""
    families: Iterable[Metric] = text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
    return list(families)


def counters_only(families: Iterable[Metric]) -> list[Metric]:
    """The families that keep their meaning after their worker is gone: those that count.
    A gauge of a worker that no longer answers says nothing about now."""
    return [f for f in families if f.type in _SUMMED]


def merge(scrapes: Iterable[Iterable[Metric]]) -> list[Metric]:
    """One family per name, in the order first seen, each sample combined over the scrapes:
    counter, histogram and summary samples summed (`_created` the earliest), gauges by
    `GAUGES` (summed if not listed), anything else the first scrape's value. A sample keeps
    the newest exemplar any scrape has for it."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[Sample]]] = {}
    for scrape in scrapes:
        for family in scrape:
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                families[family.name].unit = family.unit
                values[family.name] = {}
            by_series = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                by_series.setdefault(key, []).append(sample)
    out = []
    for name, family in families.items():
        for samples in values[name].values():
            family.samples.append(_combine(family.type, name, samples))
        out.append(family)
    return out


def _combine(kind: str, family: str, samples: list[Sample]) -> Sample:
    first = samples[0]
    numbers = [s.value for s in samples]
    if first.name.endswith("_created"):
        value = min(numbers)
    elif kind in _SUMMED:
        value = sum(numbers)
    elif kind == "gauge":
        value = GAUGES.get(family, sum)(numbers)
    else:
        value = first.value
    exemplars = [s.exemplar for s in samples if s.exemplar is not None]
    exemplar = max(exemplars, key=lambda e: e.timestamp or 0.0) if exemplars else None
    return Sample(first.name, first.labels, value, None, exemplar)
