"""The pure parts of resilience: retry-after, backoff, the retry budget, key and upstream
health, the charge across attempts, the model rename. Fast: mutation testing runs these."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import loads
from gateway.context import Attempt, Outcome
from gateway.upstream.attempts import backoff, retry_after
from gateway.upstream.health import MAX_EJECTION, RECENT, TRIAL_TIME, Health, Standing, key_id
from gateway.upstream.retry_budget import MIN_RETRIES, WINDOW, RetryBudget


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
    assert health.key("u", "k").until == MAX_EJECTION == 300.0


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


# -- the retry budget


def allowed_retries(budget: RetryBudget, now: float) -> int:
    n = 0
    while budget.allows_retry(now) and n < 10_000:
        budget.retried(now)
        n += 1
    return n


@settings(max_examples=100, deadline=None)
@given(
    eighths=st.integers(min_value=0, max_value=24),
    firsts=st.lists(st.integers(min_value=0, max_value=9), max_size=40),
    start=st.integers(min_value=-100, max_value=100),
)
def test_retries_allowed_are_the_ratio_of_first_attempts_plus_the_minimum(
    eighths: int, firsts: list[int], start: int
) -> None:
    """Over one window (any second of the clock, its start too): ceil(ratio x firsts) + 3."""
    ratio = eighths / 8  # exact in binary: the bound has no rounding to argue about
    budget = RetryBudget(ratio)
    for offset in firsts:
        budget.first(start + offset + 0.5)
    last = start + WINDOW - 1 + 0.99
    assert allowed_retries(budget, last) == math.ceil(ratio * len(firsts)) + MIN_RETRIES


def test_a_new_budget_allows_exactly_the_minimum_at_any_time() -> None:
    for now in (0.0, 5.0, -3.0, 1e6):
        assert allowed_retries(RetryBudget(1.0), now) == MIN_RETRIES


def test_buckets_older_than_the_window_are_forgotten() -> None:
    budget = RetryBudget(1.0)
    for _ in range(4):
        budget.first(100.0)
    budget.retried(100.0)
    # 109.x: second 100 is still one of the last ten
    assert allowed_retries(budget, 109.99) == 4 + MIN_RETRIES - 1
    # 110.0: it is not, its first attempts and retries with it
    budget = RetryBudget(1.0)
    for _ in range(4):
        budget.first(100.0)
    budget.retried(100.0)
    assert allowed_retries(budget, 110.0) == MIN_RETRIES


def test_a_bucket_used_again_ten_seconds_on_starts_from_zero() -> None:
    budget = RetryBudget(1.0)
    for _ in range(5):
        budget.first(100.2)
        budget.retried(100.2)
    budget.first(110.7)  # the same bucket, a new second
    assert allowed_retries(budget, 110.7) == 1 + MIN_RETRIES


# -- health


def test_key_id_is_the_first_12_hex_of_the_sha256() -> None:
    assert key_id("sk-test-123") == "e0dbaa0c6455"


def fields(s: Standing) -> tuple[object, ...]:
    return (s.state, s.reason, s.until, s.failures, s.ejections, s.trial)


def test_shown_healthy_with_no_requests() -> None:
    assert Standing().shown(5.0, 1000.0) == {
        "state": "healthy",
        "recent_requests": 0,
        "error_ratio": 0.0,
    }


def test_shown_counts_the_last_60_seconds_and_rounds_the_error_ratio() -> None:
    now = [100.0]
    health = Health(eject_after=100, eject_for=10.0, clock=lambda: now[0])
    health.failed("u", "k")  # at 100: out of the window at 160.001
    now[0] = 101.0
    health.succeeded("u", "k")
    health.failed("u", "k")
    health.succeeded("u", "k")
    now[0] = 100.0 + RECENT  # 60 s after the first: still counted
    assert health.upstream("u").shown(160.0, 5000.0) == {
        "state": "healthy",
        "recent_requests": 4,
        "error_ratio": 0.5,
    }
    assert health.upstream("u").shown(160.5, 5000.0) == {
        "state": "healthy",
        "recent_requests": 3,
        "error_ratio": 0.3333,
    }
    assert health.key("u", "k").shown(161.5, 5000.0) == {
        "state": "healthy",
        "recent_requests": 0,
        "error_ratio": 0.0,
    }


def test_shown_ejected_gives_until_in_wall_clock_seconds_and_the_reason() -> None:
    now = [50.0]
    health = Health(eject_after=5, eject_for=30.0, clock=lambda: now[0])
    health.refused("u", "k")
    assert health.key("u", "k").shown(60.0, 1_700_000_000.0) == {
        "state": "ejected",
        "until": 1_700_000_020.0,
        "reason": "auth",
        "recent_requests": 1,
        "error_ratio": 1.0,
    }
    assert health.key("u", "k").shown(60.0, 0.12345)["until"] == 20.123


def test_shown_resting_gives_until_and_no_reason() -> None:
    health = Health(eject_after=5, eject_for=30.0, clock=lambda: 10.0)
    health.rest("u", "k", 7.0)
    assert health.key("u", "k").shown(12.0, 1000.0) == {
        "state": "resting",
        "until": 1005.0,
        "recent_requests": 1,
        "error_ratio": 1.0,
    }
    assert health.upstream("u").shown(12.0, 1000.0)["recent_requests"] == 0


def test_a_trial_lasts_trial_time() -> None:
    now = [0.0]
    health = Health(eject_after=1, eject_for=10.0, clock=lambda: now[0])
    health.refused("u", "k")
    health.begin("u", "k", 10.0)
    assert not health.usable("u", "k", 10.0 + TRIAL_TIME - 0.001)
    assert health.usable("u", "k", 10.0 + TRIAL_TIME)


def test_a_begin_before_the_time_is_up_starts_no_trial() -> None:
    health = Health(eject_after=1, eject_for=10.0, clock=lambda: 0.0)
    health.refused("u", "k")
    health.begin("u", "k", 9.0)
    assert health.key("u", "k").trial == 0.0 and health.usable("u", "k", 10.0)


@settings(max_examples=50, deadline=None)
@given(origin=st.integers(min_value=0, max_value=10**6))
def test_the_clock_origin_changes_nothing(origin: int) -> None:
    """A monotonic clock's zero is anywhere before now: the same story at any origin. (Not
    below zero: a fresh standing's `until` of 0.0 would bound a rest from below there, and
    `time.monotonic` is never negative.)"""

    def story(o: float) -> list[object]:
        now = [o]
        health = Health(eject_after=2, eject_for=10.0, clock=lambda: now[0])
        seen: list[object] = []

        def look(t: float) -> None:
            seen.append(
                (
                    health.usable("u", "k", o + t),
                    health.healthy("u", o + t),
                    health.key("u", "k").shown(o + t, 1000.0 + t),
                    health.upstream("u").shown(o + t, 1000.0 + t),
                )
            )

        look(0)
        health.rest("u", "k", 5.0)
        look(1)
        look(5)
        health.begin("u", "k", o + 5)
        look(5)
        now[0] = o + 6
        health.failed("u", "k")
        health.failed("u", "k")
        look(6)
        look(16)
        health.begin("u", "k", o + 16)
        look(17)
        now[0] = o + 17
        health.succeeded("u", "k")
        look(17)
        return seen

    assert story(float(origin)) == story(0.0)


def test_a_key_usable_needs_both_it_and_its_upstream() -> None:
    health = Health(eject_after=1, eject_for=10.0, clock=lambda: 0.0)
    health.refused("u", "k")  # the key only
    assert not health.usable("u", "k", 1.0)
    assert health.usable("u", "k2", 1.0) and health.healthy("u", 1.0)
    health.failed("v", "k")  # the upstream and the key
    health.begin("v", "k", 10.0)
    health.succeeded("v", "k")
    assert health.usable("v", "k", 10.0)
    health.upstreams["v"] = Standing(state="ejected", reason="failures", until=20.0)
    assert not health.usable("v", "k", 10.0) and not health.usable("v", "other", 10.0)
    assert not health.healthy("v", 19.0) and health.healthy("v", 20.0)


def test_configure_keeps_what_is_still_configured_and_forgets_the_rest() -> None:
    health = Health(eject_after=1, eject_for=10.0, clock=lambda: 0.0)
    health.refused("a", "k1")
    health.refused("a", "k2")
    health.failed("b", "k")
    health.configure(3, 20.0, [("a", ["k1"]), ("b", ["k"])])
    assert (health.eject_after, health.eject_for) == (3, 20.0)
    assert set(health.keys) == {("a", "k1"), ("b", "k")}
    assert health.key("a", "k1").state == "ejected" and health.upstream("b").state == "ejected"
    assert health.key("a", "k2").state == "healthy"  # forgotten: it was no longer configured
    health.configure(3, 20.0, [("b", ["k"])], changed=["b"])
    assert health.keys == {} and health.upstreams == {}


def test_succeeded_makes_the_key_and_the_upstream_healthy_and_counts() -> None:
    now = [0.0]
    health = Health(eject_after=1, eject_for=10.0, clock=lambda: now[0])
    health.failed("u", "k")
    now[0] = 10.0
    health.begin("u", "k", 10.0)
    health.succeeded("u", "k")
    for s in (health.upstream("u"), health.key("u", "k")):
        assert fields(s) == ("healthy", "", 0.0, 0, 0, 0.0)
        assert list(s.recent) == [(0.0, False), (10.0, True)]
    assert not health.key("u", "other").recent


def test_failed_ejects_after_eject_after_failures_in_a_row() -> None:
    now = [0.0]
    calls: list[tuple[str, str]] = []
    health = Health(eject_after=3, eject_for=10.0, clock=lambda: now[0])
    health.on_ejection = lambda upstream, reason: calls.append((upstream, reason))
    health.failed("u", "k")
    health.failed("u", "k")
    assert fields(health.upstream("u")) == ("healthy", "", 0.0, 2, 0, 0.0)
    assert fields(health.key("u", "k")) == ("healthy", "", 0.0, 2, 0, 0.0)
    assert calls == []
    health.failed("u", "k")
    assert fields(health.upstream("u")) == ("ejected", "failures", 10.0, 0, 1, 0.0)
    assert fields(health.key("u", "k")) == ("ejected", "failures", 10.0, 0, 1, 0.0)
    assert calls == [("u", "failures")]  # the key's ejection only: the upstream is no key
    assert list(health.key("u", "k").recent) == [(0.0, False)] * 3


def test_failed_while_ejected_re_ejects_only_during_a_trial() -> None:
    now = [0.0]
    calls: list[tuple[str, str]] = []
    health = Health(eject_after=1, eject_for=10.0, clock=lambda: now[0])
    health.on_ejection = lambda upstream, reason: calls.append((upstream, reason))
    health.failed("u", "k")
    now[0] = 5.0
    health.failed("u", "k")  # a request sent before the ejection: no trial, nothing changes
    assert fields(health.key("u", "k")) == ("ejected", "failures", 10.0, 1, 1, 0.0)
    assert calls == [("u", "failures")]
    now[0] = 10.0
    health.begin("u", "k", 10.0)
    health.failed("u", "k")
    assert fields(health.key("u", "k")) == ("ejected", "failures", 30.0, 0, 2, 0.0)
    assert fields(health.upstream("u")) == ("ejected", "failures", 30.0, 0, 2, 0.0)
    assert calls == [("u", "failures")] * 2


def test_failures_while_resting_do_not_eject() -> None:
    health = Health(eject_after=1, eject_for=10.0, clock=lambda: 0.0)
    health.rest("u", "k", 5.0)
    health.failed("u", "k")
    assert fields(health.key("u", "k")) == ("resting", "", 5.0, 1, 0, 0.0)


def test_refused_ejects_the_key_for_auth_and_tells() -> None:
    calls: list[tuple[str, str]] = []
    health = Health(eject_after=5, eject_for=10.0, clock=lambda: 3.0)
    health.on_ejection = lambda upstream, reason: calls.append((upstream, reason))
    health.refused("u", "k")
    assert fields(health.key("u", "k")) == ("ejected", "auth", 13.0, 0, 1, 0.0)
    assert fields(health.upstream("u")) == ("healthy", "", 0.0, 0, 0, 0.0)
    assert calls == [("u", "auth")]
    assert list(health.key("u", "k").recent) == [(3.0, False)]


def test_the_ejection_exponent_is_capped_at_30() -> None:
    now = [0.0]
    health = Health(eject_after=1, eject_for=2.0**-30, clock=lambda: now[0])
    key = health.key("u", "k")
    for _ in range(40):
        now[0] = key.until
        health.begin("u", "k", now[0])
        health.refused("u", "k")
    assert key.ejections == 40 and key.until - now[0] == 1.0


def test_rest_leaves_an_ejected_key_out_and_ignores_no_wait() -> None:
    health = Health(eject_after=5, eject_for=10.0, clock=lambda: 0.0)
    health.refused("u", "k")
    health.rest("u", "k", 5.0)
    assert fields(health.key("u", "k")) == ("ejected", "auth", 10.0, 0, 1, 0.0)
    health.rest("u", "k2", 0.0)
    assert fields(health.key("u", "k2")) == ("healthy", "", 0.0, 0, 0, 0.0)
    health.rest("u", "k2", 0.5)
    assert fields(health.key("u", "k2")) == ("resting", "", 0.5, 0, 0, 0.0)
    health.rest("u", "k2", 0.25)  # a shorter rest does not cut the one running
    assert health.key("u", "k2").until == 0.5
    assert list(health.key("u", "k2").recent) == [(0.0, False)] * 3


def test_a_rest_ends_at_its_time_on_the_next_begin() -> None:
    health = Health(eject_after=5, eject_for=10.0, clock=lambda: 0.0)
    health.rest("u", "k", 5.0)
    health.begin("u", "k", 4.999)
    assert fields(health.key("u", "k")) == ("resting", "", 5.0, 0, 0, 0.0)
    assert not health.usable("u", "k", 4.999) and health.usable("u", "k", 5.0)
    health.begin("u", "k", 5.0)
    assert fields(health.key("u", "k")) == ("healthy", "", 0.0, 0, 0, 0.0)
    assert health.key("u", "k").shown(5.0, 100.0)["state"] == "healthy"


def test_answered_ends_a_trial_but_not_an_ejection() -> None:
    now = [0.0]
    health = Health(eject_after=2, eject_for=10.0, clock=lambda: now[0])
    health.failed("u", "k")
    health.failed("u", "k")
    health.answered("u")  # answered while out (a request sent before): still out
    assert fields(health.upstream("u")) == ("ejected", "failures", 10.0, 0, 1, 0.0)
    now[0] = 10.0
    health.begin("u", "k", 10.0)
    health.failed("u", "k")  # one failure during the trial
    now[0] = 30.0
    health.begin("u", "k", 30.0)
    health.answered("u")
    assert fields(health.upstream("u")) == ("healthy", "", 0.0, 0, 0, 0.0)
    health.failed("u", "k")  # one failure: not yet eject_after
    assert health.upstream("u").state == "healthy"
    health.failed("u", "k")
    assert health.upstream("u").until - now[0] == 10.0  # the streak started over


def test_answered_resets_the_failures_in_a_row() -> None:
    health = Health(eject_after=2, eject_for=10.0, clock=lambda: 0.0)
    health.failed("u", "k")
    health.answered("u")
    assert health.upstream("u").failures == 0
    health.failed("u", "k")
    assert health.upstream("u").state == "healthy"


def test_a_healthy_standing_is_usable_at_any_time() -> None:
    assert Standing().usable(-5.0) and Standing().usable(0.0)
    assert Standing(state="resting", until=-10.0).usable(-5.0)
    assert not Standing(state="resting", until=-1.0).usable(-5.0)
