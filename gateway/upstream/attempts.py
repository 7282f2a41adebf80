"""Running a request's attempt plan: each attempt is one call to one key of one upstream.

Without `retries` a request makes one attempt. With it, a connect error, a timeout or an
answer whose status is in `retries.on` is tried again, up to `retries.attempts` in all: the
next healthy key of the same upstream first, then the next upstream of the route, then round
again. An upstream 401 or 403 takes that key out of the pool and the request goes on with
another key. Nothing of an answer has reached the client when it is retried: the answer chosen
here is the one relayed. Each retry waits a full-jitter exponential backoff, never less than a
resting key's `retry-after`, and needs room in the retry budget; when it has none, the last
answer goes to the client as it came (or the last gateway error is raised).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import aiohttp
from opentelemetry.trace import Status, StatusCode

from gateway.context import Attempt, Candidate, Envelope, Outcome, RequestContext
from gateway.errors import GatewayError
from gateway.jsonbody import with_model
from gateway.settings import Retries
from gateway.telemetry.genai import client_span
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tracing import Tracing
from gateway.upstream.client import UpstreamClient
from gateway.upstream.headers import request_headers
from gateway.upstream.health import Health
from gateway.upstream.retry_budget import RetryBudget

AUTH_REFUSED = (401, 403)


class Picker:
    """The order one request tries keys in: every key of the first upstream (starting at the
    pool's next key), then those of the next upstream. A key that is not usable now (resting,
    ejected, or its upstream ejected) is passed over; when every one is, the request still goes
    to the one that is back soonest, so an outage never turns into a refusal of its own."""

    __slots__ = ("health", "orders", "plan", "tried")

    def __init__(self, plan: Sequence[UpstreamClient], health: Health) -> None:
        self.health, self.plan = health, plan
        self.orders = [c.key_order() for c in plan]  # each pool's keys, from its next one
        self.tried: set[tuple[str, int]] = set()

    @property
    def order(self) -> list[Candidate]:
        return [
            Candidate(c, i) for c, keys in zip(self.plan, self.orders, strict=True) for i in keys
        ]

    def next(self, now: float) -> Candidate:
        usable, tried = self.health.usable, self.tried
        for c, keys in zip(self.plan, self.orders, strict=True):  # the usual case: no list made
            for i in keys:
                if (c.name, i) not in tried and usable(c.name, c.key_ids[i], now):
                    tried.add((c.name, i))
                    return Candidate(c, i)
        order = self.order
        ready = [o for o in order if usable(o.client.name, o.kid, now)]
        # each usable one has had its turn: round again; none is usable: the one back soonest
        chosen = ready[0] if ready else min(order, key=self.back_at)
        tried.clear()
        tried.add((chosen.client.name, chosen.index))
        return chosen

    def back_at(self, c: Candidate) -> float:
        """When `c` can take requests again (in the past when it can now)."""
        up = self.health.upstream(c.client.name)
        key = self.health.key(c.client.name, c.kid)
        return max(up.until, key.until)

    def spent(self, client: UpstreamClient) -> None:
        """The upstream itself failed (unreachable, or no first byte in time): its other keys
        would fare no better, so the next upstream comes first."""
        self.tried.update((client.name, i) for i in range(len(client.keys)))

    def others(self, c: Candidate, now: float) -> bool:
        """Whether another key or upstream than `c` could take the request now."""
        return any(o is not c and self.health.usable(o.client.name, o.kid, now) for o in self.order)


def retry_after(headers: Mapping[str, str], now: float) -> float:
    """Seconds an answer asks to wait (`retry-after-ms`, `retry-after` as seconds or an HTTP
    date); 0 when it asks nothing."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000
            return value if math.isfinite(value) and value > 0 else 0.0
        except ValueError:
            pass
    text = headers.get("retry-after")
    if text is None:
        return 0.0
    try:
        value = float(text)
        return value if math.isfinite(value) and value > 0 else 0.0
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when.timestamp() - now)


def backoff(retries: Retries, retry: int) -> float:
    """Full jitter: uniform in [0, min(max, base x 2^(retry-1))]."""
    cap = min(retries.backoff.max, retries.backoff.base * 2 ** (retry - 1))
    return random.uniform(0, cap)


class Failure(Exception):
    """An attempt that did not give an answer to relay: `error` says why."""

    def __init__(self, error: str, gateway: GatewayError | None, up: aiohttp.ClientResponse | None):
        self.error, self.gateway, self.up = error, gateway, up


# one more estimate held in the team's budgets before a billable attempt is tried again;
# False when the budgets have no room for it
ReserveMore = Callable[[], Awaitable[bool]]


async def run(
    tracing: Tracing,
    metrics: Metrics,
    health: Health,
    budget: RetryBudget,
    env: Envelope,
    ctx: RequestContext,
    incoming: Mapping[str, str],
    reserve_more: ReserveMore,
) -> tuple[aiohttp.ClientResponse, Candidate]:
    """The answer to relay and who gave it; raises the last gateway error when no attempt got
    an answer."""
    out, retries = env.outcome, ctx.policy.settings.retries
    limit = retries.attempts if retries is not None else 1
    # an HTTP error is retried only where sending the request twice is expected: generations
    # (the contract's retries) and reads; any request is tried again when nothing was sent
    repeatable = ctx.metered or ctx.method in ("GET", "HEAD")
    picker = Picker(ctx.plan, health)
    clock = health.clock
    now = clock()
    budget.first(now)
    candidate = picker.next(now)
    n = 1
    while True:
        health.begin(candidate.client.name, candidate.kid, now)
        try:
            up = await attempt(tracing, metrics, env, ctx, out, candidate, incoming)
            try:
                failure = judge(health, candidate, up, retries)
            except BaseException:
                up.close()
                raise
            if failure is None:
                return up, candidate
        except GatewayError as e:
            failure = Failure("timeout" if e.timed_out else "connect_error", e, None)
            health.failed(candidate.client.name, candidate.kid)
            picker.spent(candidate.client)  # the upstream itself failed, not the key
        record = out.attempts[-1]
        record.error = failure.error
        record.ended = time.perf_counter()
        now = clock()
        nxt, wait = _next(retries, picker, failure, candidate, n, limit, budget, now)
        if nxt is not None and not repeatable and failure.error != "connect_error":
            nxt = None
        if nxt is not None and record.reached and not await reserve_more():
            nxt = None  # the budgets cannot hold another attempt that may be billed
        if nxt is None:  # this one is the answer: the client gets it as it came
            record.outcome = "failed"
            _mark(out, failure.error)
            if failure.up is not None:
                return failure.up, candidate
            assert failure.gateway is not None
            raise failure.gateway
        record.outcome = "retried"
        _mark(out, failure.error)
        if out.client_span is not None:  # its time ends here, not after the wait
            out.client_span.end()
            out.client_span = None
        if failure.up is not None:
            failure.up.close()  # an error answer nobody will read: not worth its connection
        budget.retried(now)
        if wait > 0:  # the upstream's time, not the gateway's: not overhead
            await asyncio.sleep(wait)
            out.upstream_wait += wait
        candidate, n, now = nxt, n + 1, clock()


def judge(
    health: Health, c: Candidate, up: aiohttp.ClientResponse, retries: Retries | None
) -> Failure | None:
    """What an answer says of its key and upstream; a Failure when it may be worth another
    attempt (the caller decides), None when it is the answer."""
    status = up.status
    if note_answer(health, c, status, up.headers) or (
        retries is not None and status in retries.on  # a 4xx the config says to retry
    ):
        return Failure(str(status), None, up)
    return None


def note_answer(health: Health, c: Candidate, status: int, headers: Mapping[str, str]) -> bool:
    """Tell `health` what an answer's status says of its key and upstream: a 401/403 refuses
    the key, a 429 rests it, a 5xx is a failure, anything else a success; True for the first
    three (an answer that is no success)."""
    name = c.client.name
    if status in AUTH_REFUSED:
        health.answered(name)  # the upstream is up: only the key is refused
        health.refused(name, c.kid)
    elif status == 429:
        health.answered(name)
        health.rest(name, c.kid, retry_after(headers, time.time()))
    elif status >= 500:
        health.failed(name, c.kid)
    else:
        health.succeeded(name, c.kid)
        return False
    return True


def _next(
    retries: Retries | None,
    picker: Picker,
    failure: Failure,
    c: Candidate,
    n: int,
    limit: int,
    budget: RetryBudget,
    now: float,
) -> tuple[Candidate | None, float]:
    """The next attempt and the wait before it, or (None, 0) when there is none."""
    if retries is None or n >= limit:
        return None, 0.0
    auth = failure.error in ("401", "403")
    if auth:  # another key may take it, whatever `on` says; the same key never
        if not picker.others(c, now):
            return None, 0.0
    elif failure.error not in retries.on and _status(failure.error) not in retries.on:
        return None, 0.0
    if not budget.allows_retry(now):
        return None, 0.0
    nxt = picker.next(now)
    wait = backoff(retries, n)
    usable = picker.health.usable(nxt.client.name, nxt.kid, now)
    back = 0.0 if usable else picker.back_at(nxt) - now
    if back > 0:  # every key is resting or out: wait for the one back soonest, if it is soon
        if back > retries.backoff.max:
            return None, 0.0
        wait = max(wait, back)
    return nxt, wait


def _status(error: str) -> int:
    return int(error) if error.isdigit() else 0


def _mark(out: Outcome, error: str) -> None:
    span = out.client_span
    if span is not None and span.is_recording():
        span.set_attribute("error.type", error)
        span.set_status(Status(StatusCode.ERROR))


def body_for(ctx: RequestContext, client: UpstreamClient) -> bytes:
    """The body as this upstream gets it: its `model_map` renames the model."""
    mapped = client.cfg.upstream_model(ctx.model) if ctx.model else None
    return ctx.send if mapped is None else with_model(ctx.send, mapped)


async def attempt(
    tracing: Tracing,
    metrics: Metrics,
    env: Envelope,
    ctx: RequestContext,
    out: Outcome,
    candidate: Candidate,
    incoming: Mapping[str, str],
) -> aiohttp.ClientResponse:
    client = candidate.client
    if out.client_span is not None:  # the attempt before this one
        out.client_span.end()
    span = out.client_span = client_span(tracing, env, ctx, client)
    headers = request_headers(
        incoming.items(), {"x-request-id": env.request_id, **client.auth_header(candidate.key)}
    )
    tracing.inject(span, headers)
    record = Attempt(client.name, time.perf_counter(), key_id=candidate.kid)
    out.attempts.append(record)
    try:
        up = await client.send(ctx.method, ctx.target, headers, body_for(ctx, client))
    except GatewayError as e:
        # sent, then timed out or dropped: the upstream may have billed it
        record.reached = e.reached
        record.ended = time.perf_counter()
        metrics.upstream_errors.labels(client.name, e.code).inc()
        raise
    finally:
        out.upstream_wait += time.perf_counter() - record.started
    record.status = up.status
    if up.status >= 500:
        metrics.upstream_errors.labels(client.name, f"http_{up.status}").inc()
    return up
