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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.capture.tap import CaptureTap
from gateway.context import Attempt
from gateway.output_text import from_sse
from gateway.redact import Redactor

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
    """The stored row: every text redacted, every body cut at the tap's cap and marked. The
    texts go through the redactor together, in one call."""
    tap, cap = d.tap, d.tap.cap
    asked = _kept(tap.request_headers.items())
    got = _kept(tap.headers.items())
    answer_raw = b"".join(tap.parts)
    # the request and trace ids are stored as they are at the top of the document: their
    # copies in the headers need no search
    ids = (d.request_id, d.trace_id)
    texts = [_text(tap.target), *(_unless(v, ids) for _, v in asked + got)]
    texts.append(_body_text(d.body, d.body_size > cap))
    if d.streamed:
        assembled = from_sse(answer_raw)
        texts += [_body_text(answer_raw, tap.cut, canonical=False), assembled]
    else:
        texts.append(_body_text(answer_raw, tap.cut))
    redacted = d.redactor.many(texts)
    path, n = redacted[0], 1 + len(asked)
    asked_values = [v or a for (_, a), v in zip(asked, redacted[1:n], strict=True)]
    got_values = [v or a for (_, a), v in zip(got, redacted[n : n + len(got)], strict=True)]
    answer: dict[str, Any] = {
        "status": d.status,
        "upstream_status": tap.status,
        "headers": _pairs(got, got_values),
        "complete": tap.complete,
        "error": d.error,
    }
    if d.streamed:
        sse, cut = _cut(redacted[-2], tap.cut, cap)
        text = redacted[-1]
        if text != assembled:
            # a key spread over several delta events is whole only in the joined text, and
            # no redaction of the events could find it: the events are not stored
            sse, answer["sse_withheld"] = None, "the output text held a key"
        answer.update(sse=sse, body_cut=cut, output_text=text[:cap])
        request_text = redacted[-3]
    else:
        answer["body"], answer["body_cut"] = _cut(redacted[-1], tap.cut, cap)
        request_text = redacted[-2]
    request_body, request_cut = _cut(
        request_text if d.body is not None else None, d.body_size > cap, cap
    )
    doc = {
        "request_id": d.request_id,
        "ts": d.ts,
        "team": d.team,
        "trace_id": d.trace_id,
        "reason": d.reason,
        "request": {
            "method": tap.method,
            "path": path,
            "headers": _pairs(asked, asked_values),
            "body": request_body,
            "body_cut": request_cut,
            "body_bytes": d.body_size,
        },
        "answer": answer,
        "attempts": [_attempt(a, d.started, d.ended) for a in d.attempts],
    }
    return d.request_id, d.ts, d.team, d.reason, orjson.dumps(doc).decode()


def _kept(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers without credentials, as UTF-8 can hold them."""
    return [
        (k, v) if k.isascii() and v.isascii() else (_text(k), _text(v))
        for k, v in items
        if k.lower() not in CREDENTIAL_HEADERS
    ]


def _unless(value: str, ids: tuple[str, ...]) -> str:
    """A header's value to redact, or "" for one of the ids (then the value is kept)."""
    return "" if value in ids else value


def _pairs(kept: list[tuple[str, str]], values: Sequence[str]) -> list[list[str]]:
    return [[k, v] for (k, _), v in zip(kept, values, strict=True)]


def _text(value: str) -> str:
    """A header's text as UTF-8 can hold it: aiohttp hands non-UTF-8 header bytes over as lone
    surrogates (surrogateescape), which no JSON document may carry."""
    if value.isascii():  # O(1): most paths and header values
        return value
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def _body_text(raw: bytes | None, cut: bool, canonical: bool = True) -> str:
    """A body as text to redact. A whole JSON body with an escape in it is re-encoded first,
    so no `\\u` escape hides a key from the redactor; one without a backslash has none and is
    kept as it was sent (the re-encoding would only have dropped its whitespace)."""
    if raw is None:
        return ""
    if canonical and not cut and b"\\" in raw:
        with contextlib.suppress(orjson.JSONDecodeError, orjson.JSONEncodeError):
            return orjson.dumps(orjson.loads(raw)).decode()
    return raw.decode("utf-8", "replace")


def _cut(text: str | None, cut: bool, cap: int) -> tuple[str | None, bool]:
    """A redacted body cut at `cap` bytes: redacted before the cut, so a key across the cut is
    still whole in the slack the tap kept past it."""
    if text is None:
        return None, False
    if text.isascii():  # then a character is a byte
        return (text[:cap], True) if len(text) > cap else (text, cut)
    data = text.encode()
    if len(data) > cap:
        text, cut = data[:cap].decode("utf-8", "ignore"), True
    return text, cut


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
