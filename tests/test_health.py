"""The pure parts of resilience: retry-after, backoff, the retry budget, key and upstream
health, the charge across attempts, the model rename. Fast: mutation testing runs these."""

from __future__ import annotations

import json

import pytest

from gateway.config import loads
from gateway.context import Attempt, Outcome
from gateway.upstream.attempts import backoff, retry_after
from gateway.upstream.health import Health
from gateway.upstream.retry_budget import MIN_RETRIES, RetryBudget


def test_retry_after_forms() -> None:
    assert retry_after({"retry-after": "2"}, 0) == 2.0
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}, 0) == 1.5
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 1445412470.0) == 10.0
    for bad in ("soon", "-3", "nan", "inf", ""):
        assert retry_after({"retry-after": bad}, 0) == 0.0
    assert retry_after({}, 0) == 0.0


def test_backoff_is_full_jitter_under_the_cap() -> None:
    retries = loads(
        'upstreams: {a: {base_url: "http://a"}}\nretries: {backoff: {base: 0.1, max: 0.3}}\n'
        f'teams: {{t: {{keys: ["sha256:{"0" * 64}"]}}}}\n',
        {},
    ).retries
    assert retries is not None and retries.on == (
        "connect_error",
        "timeout",
        429,
        500,
        502,
        503,
        504,
    )
    waits = [backoff(retries, n) for n in (1, 2, 3, 4) for _ in range(200)]
    assert all(0 <= w <= 0.3 for w in waits) and max(waits) > 0.25
    assert all(backoff(retries, 1) <= 0.1 for _ in range(200))


def test_retry_budget_window() -> None:
    budget = RetryBudget(0.5)
    for _ in range(10):
        budget.first(100.0)
    allowed = 0
    while budget.allows_retry(100.5) and allowed < 100:
        budget.retried(100.5)
        allowed += 1
    assert allowed == 5 + MIN_RETRIES
    assert budget.allows_retry(111.0)  # ten seconds on, the window is empty again


def test_health_ejection_doubles_and_caps() -> None:
    now = [0.0]
    health = Health(eject_after=2, eject_for=100.0, clock=lambda: now[0])
    for expected in (100.0, 200.0, 300.0, 300.0):
        health.failed("u", "k")
        health.failed("u", "k") if health.upstream("u").state == "healthy" else None
        assert health.upstream("u").state == "ejected"
        assert health.upstream("u").until - now[0] == expected
        assert not health.usable("u", "k", now[0] + expected - 1)
        now[0] += expected
        assert health.usable("u", "k", now[0])  # time is up: one trial
        health.begin("u", "k", now[0])
        assert not health.usable("u", "k", now[0])  # only one at a time
    health.succeeded("u", "k")
    assert health.upstream("u").state == "healthy" and health.upstream("u").ejections == 0


def test_charge_counts_an_unanswered_attempt_and_the_real_usage() -> None:
    from gateway.budget.charge import charge
    from gateway.budget.store import Reservation
    from gateway.prices import PriceBook
    from gateway.settings import Price
    from gateway.usage import Usage

    prices = PriceBook({"m": Price(input=1.0, output=2.0)})
    out = Outcome()
    out.reservation = Reservation("t", 100, 0.001, ())
    out.attempts = [
        Attempt("a", 0.0, reached=True),
        Attempt("a", 0.0, status=503),
        Attempt("b", 0.0, status=200),
    ]
    out.usage = Usage(input_tokens=10, output_tokens=5, total_tokens=15)
    tokens, usd, estimated = charge("m", True, out, prices)
    assert (tokens, estimated) == (100 + 15, True)
    assert usd == pytest.approx(0.001 + (10 * 1.0 + 5 * 2.0) / 1e6)
    out.attempts = [Attempt("a", 0.0, status=503), Attempt("b", 0.0, status=500)]
    out.usage = None
    assert charge("m", True, out, prices) == (0, 0.0, False)


def test_a_key_refused_again_and_again_never_overflows_its_ejection() -> None:
    now = [0.0]
    health = Health(eject_after=5, eject_for=30.0, clock=lambda: now[0])
    for _ in range(2000):  # every key out: the request still goes to it, and is refused
        health.refused("u", "k")
    key = health.key("u", "k")
    assert key.state == "ejected" and key.ejections == 1 and key.until == 30.0
    for _ in range(1100):  # a trial that fails each time: doubling, capped, never overflowing
        now[0] = key.until
        health.begin("u", "k", now[0])
        health.refused("u", "k")
    assert key.until - now[0] == 300.0


def test_a_rest_is_at_most_300_seconds() -> None:
    health = Health(eject_after=5, eject_for=30.0, clock=lambda: 0.0)
    health.rest("u", "k", 1e9)
    assert health.key("u", "k").until == 300.0


def test_a_trial_answered_429_brings_the_upstream_back() -> None:
    now = [0.0]
    health = Health(eject_after=1, eject_for=10.0, clock=lambda: now[0])
    health.failed("u", "k")
    assert health.upstream("u").state == "ejected"
    now[0] = 10.0
    health.begin("u", "k", now[0])
    health.answered("u")  # the key was rate limited, but the upstream answered
    assert health.upstream("u").state == "healthy" and health.usable("u", "k2", now[0])


def test_a_reload_that_changes_an_upstream_forgets_its_standing() -> None:
    health = Health(eject_after=1, eject_for=10.0, clock=lambda: 0.0)
    health.failed("a", "k")
    health.failed("b", "k")
    health.configure(1, 10.0, [("a", ["k"]), ("b", ["k"])], changed=["a"])
    assert health.upstream("a").state == "healthy" and health.upstream("b").state == "ejected"


def test_model_map_keeps_every_other_value_as_it_was() -> None:
    from gateway.jsonbody import with_model

    body = b'{"model":"a","seed":12345678901234567890123,"t":0.1,"s":"\\ud800 \\u00e9"}'
    out = json.loads(with_model(body, "b"))
    assert out == {**json.loads(body), "model": "b"}
    assert out["seed"] == 12345678901234567890123 and out["t"] == 0.1
