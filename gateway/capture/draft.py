"""A finished request's capture: made by `finish` from references (cheap), and rendered by
the writer, off the request path, into the redacted JSON document that is stored.

What is stored (CONTRACT section 11): the request (method, path, headers without
credentials, body), the answer (status, headers, body; for a stream the SSE bytes as
relayed and the assembled output text), each attempt's upstream, status and timing, and the
request id linking it to its ledger record. Every text goes through the policy's one
redactor before it is rendered: client keys, upstream keys, key shapes and `capture.redact`
matches become `[REDACTED]`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.capture.tap import CaptureTap
from gateway.context import Attempt
from gateway.redact import Redactor
from gateway.sse import SSEDecoder

# never stored, whatever their value: they carry credentials
CREDENTIAL_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "cookie",
        "set-cookie",
    }
)

Row = tuple[str, float, str, str, str]  # request_id, ts, team, reason, document (JSON)


@dataclass(frozen=True, slots=True)
class Draft:
    request_id: str
    ts: float  # the ledger record's ts
    team: str
    trace_id: str
    reason: str  # sampled | error
    tap: CaptureTap
    body: bytes | None  # the request body, cut at cap + SLACK; None: never read
    body_size: int  # the request body's whole length
    status: int  # what the client was answered
    error: str | None
    streamed: bool
    started: float  # perf_counter at the request's start
    ended: float  # perf_counter at its finish: the end of the attempt that was relayed
    attempts: Sequence[Attempt]
    redactor: Redactor


def render(d: Draft) -> Row:
    """The stored row: every text redacted, every body cut at the tap's cap and marked."""
    tap, redact, cap = d.tap, d.redactor, d.tap.cap
    request_body, request_cut = _body(d.body, d.body_size > cap, cap, redact)
    answer_raw = b"".join(tap.parts)
    answer: dict[str, Any] = {
        "status": d.status,
        "upstream_status": tap.status,
        "headers": _headers(tap.headers.items(), redact),
        "complete": tap.complete,
        "error": d.error,
    }
    if d.streamed:
        assembled = _output_text(answer_raw)
        text = redact(assembled)
        sse, cut = _body(answer_raw, tap.cut, cap, redact, canonical=False)
        if text != assembled:
            # a key spread over several delta events is whole only in the joined text, and
            # no redaction of the events could find it: the events are not stored
            sse, answer["sse_withheld"] = None, "the output text held a key"
        answer.update(sse=sse, body_cut=cut, output_text=text[:cap])
    else:
        answer["body"], answer["body_cut"] = _body(answer_raw, tap.cut, cap, redact)
    doc = {
        "request_id": d.request_id,
        "ts": d.ts,
        "team": d.team,
        "trace_id": d.trace_id,
        "reason": d.reason,
        "request": {
            "method": tap.method,
            "path": redact(_text(tap.target)),
            "headers": _headers(tap.request_headers.items(), redact),
            "body": request_body,
            "body_cut": request_cut,
            "body_bytes": d.body_size,
        },
        "answer": answer,
        "attempts": [_attempt(a, d.started, d.ended) for a in d.attempts],
    }
    return d.request_id, d.ts, d.team, d.reason, orjson.dumps(doc).decode()


def _headers(items: Iterable[tuple[str, str]], redact: Redactor) -> list[list[str]]:
    """Headers without credentials, their values redacted in one pass (one line each: a
    header value holds no line break). Should an operator's pattern span lines, each value
    is redacted on its own instead."""
    kept = [(_text(k), _text(v)) for k, v in items if k.lower() not in CREDENTIAL_HEADERS]
    values = redact("\n".join(v for _, v in kept)).split("\n")
    if len(values) != len(kept):
        values = [redact(v) for _, v in kept]
    return [[k, v] for (k, _), v in zip(kept, values, strict=True)]


def _text(value: str) -> str:
    """A header's text as UTF-8 can hold it: aiohttp hands non-UTF-8 header bytes over as lone
    surrogates (surrogateescape), which no JSON document may carry."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def _body(
    raw: bytes | None, cut: bool, cap: int, redact: Redactor, canonical: bool = True
) -> tuple[str | None, bool]:
    """A body as stored text: redacted first (a key across the cut is still whole in the
    slack), then cut at `cap` bytes. A whole JSON body is re-encoded first, so no `\\u`
    escape hides a key from the redactor."""
    if raw is None:
        return None, False
    text = raw.decode("utf-8", "replace")
    if canonical and not cut:
        with contextlib.suppress(orjson.JSONDecodeError, orjson.JSONEncodeError):
            text = orjson.dumps(orjson.loads(raw)).decode()
    text = redact(text)
    data = text.encode()
    if len(data) > cap:
        text, cut = data[:cap].decode("utf-8", "ignore"), True
    return text, cut


def _output_text(raw: bytes) -> str:
    """The text a client assembles from a stream's deltas (Responses and Chat)."""
    parts: list[str] = []
    for ev in SSEDecoder().feed(raw):
        if b"delta" not in ev.data:
            continue
        try:
            obj = orjson.loads(ev.data)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(obj, dict):
            continue
        if obj.get("type") == "response.output_text.delta" and isinstance(obj.get("delta"), str):
            parts.append(obj["delta"])
            continue
        for choice in obj.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, Mapping) else None
            if isinstance(delta, Mapping) and isinstance(delta.get("content"), str):
                parts.append(delta["content"])
    return "".join(parts)


def _attempt(a: Attempt, started: float, ended: float) -> dict[str, Any]:
    # as the duration metric measures it: the attempt whose answer was relayed ends with it
    return {
        "upstream": a.upstream,
        "key_id": a.key_id,
        "status": a.status,
        "outcome": a.outcome,
        "error": a.error,
        "started_ms": round((a.started - started) * 1000, 3),
        "duration_ms": round(((a.ended or ended) - a.started) * 1000, 3),
    }
