"""Replaying a captured request (CONTRACT section 11): sent again as its team, through the
whole pipeline (the team's live config, the model allowlist, routing, the budget, the
attempt plan, the ledger) but never answered from the cache nor stored in it.

The replay is a request of its own: a new id, its own span, ledger record (`replay_of` names
the original) and log line, charged like any request. What is sent is the capture: its body
and headers as stored, that is redacted (a `[REDACTED]` in the body goes as it is) and
without credentials. Only generations are replayed: a POST to a route that names a model;
a request about a stored response (read, cancel, delete) is not sent twice.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict

from gateway import errors, finish, parse, plan
from gateway.auth import Principal, key_ids
from gateway.context import Envelope, Outcome, request_id
from gateway.errors import GatewayError
from gateway.ledger.records import LedgerRecord
from gateway.output_text import from_json, from_sse
from gateway.paths import canonical_path
from gateway.pipeline import admitted, call, hold
from gateway.redact import Redactor
from gateway.relay import answer
from gateway.routes import for_method, route_of
from gateway.runtime import Gateway
from gateway.telemetry.tracing import trace_id_hex

# the most of a replay's answer kept to show (it is relayed to its end whatever its length)
KEEP_BYTES = 8 * 1024 * 1024
SHOWN_BODY = 1024 * 1024  # of a whole answer's body, shown as it came
REDACTED = "[REDACTED]"


def _refused(code: str, message: str, status: int = 409) -> GatewayError:
    return GatewayError(status, "invalid_request_error", code, message)


@dataclass(frozen=True, slots=True)
class Captured:
    """What a capture holds of the request to send again."""

    record: LedgerRecord
    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    body: bytes
    streamed: bool
    output: str
    status: int


def of_record(record: LedgerRecord, doc: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The capture if it is the record's own, else None. A client-sent request id can be
    another request's too (another team's, even): the newest capture of the id is this
    record's only when it has the record's team and time."""
    if doc is None or doc.get("team") != record.team:
        return None
    ts = doc.get("ts")
    if not isinstance(ts, int | float) or abs(ts - record.ts) > 1e-6:
        return None
    return doc


def captured(record: LedgerRecord, doc: Mapping[str, Any] | None) -> Captured:
    """The request of the record's capture, or the 409 that says why it cannot be sent again."""
    doc = of_record(record, doc)
    if doc is None:
        raise _refused(
            "not_captured",
            "No capture of this request is stored: it was not sampled, capture was off, or"
            " its capture was deleted.",
        )
    req, ans = doc.get("request") or {}, doc.get("answer") or {}
    if req.get("body_cut"):
        raise _refused("capture_cut", "The captured request body was cut: it cannot be sent.")
    target = canonical_path(str(req.get("path") or ""))
    method = str(req.get("method") or "")
    route = for_method(route_of(target[0]), method) if target is not None else None
    if target is None or route is None or method != "POST" or not route.model:
        raise _refused("not_replayable", "Only generations (a POST naming a model) are sent again.")
    if req.get("body") is None:
        raise _refused(
            "body_not_captured",
            "The request was refused before its body was read: there is no body to send.",
        )
    headers: CIMultiDict[str] = CIMultiDict()
    for pair in req.get("headers") or ():
        if isinstance(pair, list) and len(pair) == 2:
            headers.add(str(pair[0]), str(pair[1]))
    headers.popall("x-request-id", None)
    headers.popall("traceparent", None)
    headers.popall("tracestate", None)
    headers.popall("cache-control", None)
    streamed = "sse" in ans or "output_text" in ans
    if streamed:
        output = str(ans.get("output_text") or "")
    else:
        output = from_json(str(ans.get("body") or "").encode())
    return Captured(
        record=record,
        method=method,
        path=target[0],
        query=target[1],
        headers=headers,
        body=str(req.get("body") or "").encode(),
        streamed=streamed,
        output=output,
        status=int(ans.get("status") or record.status),
    )


class KeptSink:
    """Where a replay's answer goes: kept in memory (up to `KEEP_BYTES`) to be shown."""

    __slots__ = ("cut", "headers", "out", "parts", "size")

    present = True  # the admin call waits for the whole answer

    def __init__(self, out: Outcome) -> None:
        self.out = out
        self.headers: Mapping[str, str] = {}
        self.parts: list[bytes] = []
        self.size = 0
        self.cut = False

    async def whole(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        await self.open(status, headers)
        await self.write(body)

    async def open(self, status: int, headers: Mapping[str, str]) -> None:
        self.out.head(status)
        self.headers = headers

    async def write(self, chunk: bytes) -> None:
        room = KEEP_BYTES - self.size
        if len(chunk) > room:
            chunk, self.cut = chunk[: max(room, 0)], True
        if chunk:
            self.parts.append(chunk)
            self.size += len(chunk)

    async def close(self) -> None:
        return None

    def abort(self) -> None:
        return None

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)


async def replay(gw: Gateway, original: Captured) -> dict[str, Any]:
    """Send the captured request again; the new answer beside the captured one."""
    if gw.draining:
        raise errors.shutting_down()
    policy = gw.policy
    team = policy.teams.get(original.record.team)
    if team is None:
        raise _refused("team_unknown", "The request's team is no longer configured.")
    if original.record.key_id not in key_ids(team):
        raise _refused(
            "key_revoked",
            "The key that made this request is no longer one of its team's: it is not used again.",
        )
    route = for_method(route_of(original.path), original.method)
    target = f"{original.path}?{original.query}" if original.query else original.path
    span = gw.tracing.server_span(f"{original.method} {route.name}", {})
    env = Envelope(
        request_id(None),
        trace_id_hex(span),
        span,
        span.is_recording(),
        route,
        original.method,
        replay_of=original.record.request_id,
    )
    if env.sampled:
        span.set_attributes({"http.route": route.name, "gateway.replay_of": env.replay_of})
    gw.metrics.inflight.inc()
    gw.inflight += 1
    gw.active += 1
    sink = KeptSink(env.outcome)
    try:
        await _send(gw, env, original, Principal(team, original.record.key_id), target, sink)
    except GatewayError as e:
        env.outcome.error = env.outcome.error or e.code
        if not env.outcome.status:
            env.outcome.head(e.status)
            sink.parts, sink.size = [e.body()], len(e.body())
    except Exception:
        gw.log.exception("unhandled error", request_id=env.request_id)
        env.outcome.error = "internal_error"
        env.outcome.head(500)
    finally:
        record = await finish.end(gw, env, 1)
    return _result(env, record, sink, original, policy.redactor)


async def _send(
    gw: Gateway,
    env: Envelope,
    original: Captured,
    principal: Principal,
    target: str,
    sink: KeptSink,
) -> None:
    """The pipeline of `gateway.pipeline.handle`, from a capture, without the cache step."""
    policy = env.policy = gw.policy.hold()
    env.principal = principal
    headers = original.headers
    env.outcome.capture = policy.capture.admit(
        principal.team.name, original.method, target, headers
    )
    limits = policy.settings.limits
    if len(original.body) > limits.max_body_bytes:  # as `parse.read` refuses a client's
        raise errors.request_too_large(limits.max_body_bytes)
    route = env.route
    parsed = parse.parse(
        original.body,
        original.method,
        headers.get("content-type", "application/json"),
        route,
        limits,
        policy.redactor,
    )
    env.attribution = parse.attribute(headers, parsed, policy.redactor)
    model = env.model = parsed.model
    candidates = await plan.plan(
        policy, route, principal, model, gw.owners, gw.reports, original.path, parsed.previous
    )
    ctx = env.ctx = admitted(
        original.method, route, target, principal, policy, model, parsed, candidates
    )
    if ctx.metered and principal.team.budgets:
        env.outcome.reservation = await hold(gw, ctx)
    if ctx.cacheable:  # the cache is neither read nor written: counted as a bypass
        env.outcome.cache = "bypass"
        gw.cache_counts.count("bypass", gw.metrics)
    up, candidate = await call(gw, env, ctx, headers)
    try:
        await answer.from_upstream(
            gw, sink, ctx, env.outcome, up, candidate, {}, env.started, None, None
        )
    finally:
        up.release()


def _result(
    env: Envelope,
    record: LedgerRecord | None,
    sink: KeptSink,
    original: Captured,
    redactor: Redactor,
) -> dict[str, Any]:
    # the bytes a client would have got (upstream keys masked by the relay), shown redacted
    # as the captured answer is, so that the two compare alike
    out, body, redact = env.outcome, sink.body, redactor
    output = redact(from_sse(body) if out.streamed else from_json(body))
    text = None if out.streamed else redact(body[:SHOWN_BODY].decode("utf-8", "replace"))
    latency = (
        record.duration_ms if record is not None else (time.perf_counter() - env.started) * 1000
    )
    return {
        "request_id": env.request_id,
        "replay_of": original.record.request_id,
        "status": out.status,
        "error": out.error,
        "latency_ms": round(latency, 3),
        "usage": _usage(record),
        "cost_usd": record.cost_usd if record is not None else 0.0,
        "streamed": out.streamed,
        "output": output,
        "body": text,  # a whole answer's body (None for a stream)
        "body_cut": sink.cut or len(body) > SHOWN_BODY,
        "redacted_input": REDACTED in original.body.decode("utf-8", "replace"),
        "original": {
            "request_id": original.record.request_id,
            "status": original.status,
            "latency_ms": round(original.record.duration_ms, 3),
            "usage": _usage(original.record),
            "cost_usd": original.record.cost_usd,
            "streamed": original.streamed,
            "output": original.output,
        },
    }


def _usage(record: LedgerRecord | None) -> dict[str, int] | None:
    if record is None or (record.input_tokens == 0 and record.output_tokens == 0):
        return None
    return {
        "input_tokens": record.input_tokens,
        "cached_tokens": record.cached_tokens,
        "output_tokens": record.output_tokens,
        "reasoning_tokens": record.reasoning_tokens,
        "total_tokens": record.input_tokens + record.output_tokens,
    }
