"""Merging workers' metrics (gateway.workers.merge) and the restart budget, without processes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.openmetrics.exposition import generate_latest

from gateway.workers.merge import counters_only, merge, parse
from gateway.workers.restarts import RestartBudget


def scrape(
    requests: float,
    inflight: float,
    used: float,
    healthy: float,
    observe: float,
    trace: str,
) -> str:
    """One worker's /metrics in OpenMetrics, with the kinds of metric the gateway has."""
    r = CollectorRegistry()
    Counter("gateway_requests", "r", ["team"], registry=r).labels("alpha").inc(requests)
    Gauge("gateway_inflight_requests", "i", registry=r).set(inflight)
    Gauge("gateway_budget_used_tokens", "u", ["team", "window"], registry=r).labels(
        "alpha", "day"
    ).set(used)
    Gauge("gateway_upstream_healthy", "h", ["upstream"], registry=r).labels("mock").set(healthy)
    h = Histogram("gateway_overhead_seconds", "o", ["route"], buckets=(0.1, 1.0), registry=r)
    h.labels("/v1/responses").observe(observe, {"trace_id": trace})
    return generate_latest(r).decode()


def values(families: list[object]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in families:
        for s in family.samples:  # type: ignore[attr-defined]
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counters_and_histograms_sum_gauges_combine_as_they_measure() -> None:
    a = parse(scrape(3, inflight=2, used=500, healthy=1, observe=0.05, trace="a" * 32))
    b = parse(scrape(4, inflight=1, used=500, healthy=0, observe=0.5, trace="b" * 32))
    v = values(merge([a, b]))  # type: ignore[arg-type]
    assert v[("gateway_requests_total", (("team", "alpha"),))] == 7
    assert v[("gateway_inflight_requests", ())] == 3  # each worker's own: summed
    # read from the shared store: every worker says the same, one stands for all
    assert v[("gateway_budget_used_tokens", (("team", "alpha"), ("window", "day")))] == 500
    # one worker's ejection shows
    assert v[("gateway_upstream_healthy", (("upstream", "mock"),))] == 0
    route = ("route", "/v1/responses")
    assert v[("gateway_overhead_seconds_bucket", (("le", "0.1"), route))] == 1
    assert v[("gateway_overhead_seconds_bucket", (("le", "1.0"), route))] == 2
    assert v[("gateway_overhead_seconds_count", (route,))] == 2
    assert abs(v[("gateway_overhead_seconds_sum", (route,))] - 0.55) < 1e-9
    created_a = values(a)[("gateway_requests_created", (("team", "alpha"),))]  # type: ignore[arg-type]
    assert v[("gateway_requests_created", (("team", "alpha"),))] == created_a  # the earliest


def test_series_only_one_worker_has_are_kept_and_exemplars_survive() -> None:
    a = parse(scrape(1, 0, 0, 1, 0.05, "a" * 32))
    b = parse(scrape(1, 0, 0, 1, 0.5, "b" * 32))
    extra = parse(
        '# TYPE gateway_budget_rejections counter\ngateway_budget_rejections_total{team="beta"} 2\n'
        "# EOF\n"
    )
    merged = merge([a, b, extra])
    assert values(merged)[("gateway_budget_rejections_total", (("team", "beta"),))] == 2  # type: ignore[arg-type]
    buckets = {
        s.labels["le"]: s.exemplar
        for f in merged
        if f.name == "gateway_overhead_seconds"
        for s in f.samples
        if s.name.endswith("_bucket")
    }
    assert buckets["0.1"] is not None and buckets["0.1"].labels == {"trace_id": "a" * 32}
    assert buckets["1.0"] is not None and buckets["1.0"].labels == {"trace_id": "b" * 32}
    # the order of the first scrape is kept: dashboards and diffs read the same each time
    assert [f.name for f in merged][:2] == ["gateway_requests", "gateway_inflight_requests"]


def test_counters_only_drops_gauges() -> None:
    kept = counters_only(parse(scrape(1, 5, 5, 1, 0.05, "a" * 32)))
    assert sorted(f.name for f in kept) == ["gateway_overhead_seconds", "gateway_requests"]


def test_restart_budget_paces_restarts_and_gives_up_on_a_crash_loop() -> None:
    now = [0.0]
    budget = RestartBudget(limit=3, window=60.0, max_delay=1.0, clock=lambda: now[0])
    delays = []
    for t in (0.0, 10.0, 20.0):
        now[0] = t
        delays.append(budget.next_delay())
    assert delays == [0.0, 0.5, 1.0]
    assert budget.next_delay() is None  # a fourth within the minute: crash-looping
    now[0] = 59.0
    assert budget.next_delay() is None
    now[0] = 60.0  # the first restart left the window: room for one more, paced (two remain)
    assert budget.next_delay() == 1.0
    now[0] = 200.0  # a quiet spell: back to an immediate restart
    assert budget.next_delay() == 0.0
