"""`GET /admin/requests`, `GET /admin/requests/{request_id}` and
`POST /admin/requests/{request_id}/replay`: finding requests in the ledger and sending a
captured one again (CONTRACT section 11). The admin guard (`admin._guard`) checks the key
and turns a ValueError from parsing into 400 `invalid_parameter`."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway import errors, replay
from gateway.context import request_id as sane_request_id
from gateway.ledger.records import LedgerRecord
from gateway.ledger.report import parse_when
from gateway.ledger.search import Cursor, Found, make_filter, parse_limit, record_dict
from gateway.runtime import GATEWAY, Gateway

PARAMS = frozenset({"team", "status", "model", "user", "tag", "since", "until", "limit", "cursor"})


def _one(request: web.Request, name: str) -> str | None:
    """A parameter given at most once (a repeated one is ambiguous: 400)."""
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise ValueError(f"{name}: give it once")
    return values[0] if values else None


async def list_requests(request: web.Request) -> web.Response:
    """Ledger records matching the query, newest first, and the next page's cursor."""
    unknown = sorted(set(request.query) - PARAMS)
    if unknown:
        raise ValueError(f"unknown parameter: expected any of {', '.join(sorted(PARAMS))}")
    since, until, cursor = _one(request, "since"), _one(request, "until"), _one(request, "cursor")
    where = make_filter(
        team=_one(request, "team"),
        model=_one(request, "model"),
        user=_one(request, "user"),
        status=_one(request, "status"),
        tags=request.query.getall("tag", []),
        since=parse_when(since) if since else None,
        until=parse_when(until) if until else None,
    )
    limit = parse_limit(_one(request, "limit"))
    gw = request.app[GATEWAY]
    page = await gw.reports.requests(where, limit, Cursor.decode(cursor) if cursor else None)
    captured = await gw.captures.captured([f.record.request_id for f in page.found])
    rows = [
        {**record_dict(f.record), "captured": f.record.request_id in captured} for f in page.found
    ]
    return web.json_response({"requests": rows, "next_cursor": page.next_cursor})


def _trace_url(template: str, record: LedgerRecord, capture: dict[str, Any] | None) -> str | None:
    """The link to a request's trace (`telemetry.trace_url`), by the trace id in its record
    (or its capture, for a record written before records had one)."""
    trace_id = record.trace_id or (capture.get("trace_id") if capture else None)
    if not template or not isinstance(trace_id, str) or not trace_id:
        return None
    return template.replace("{trace_id}", trace_id)


async def _found(request: web.Request) -> Found:
    wanted = request.match_info["request_id"]
    # an id the gateway would not have kept is no record's: not looked up
    found = None
    if sane_request_id(wanted) == wanted:
        found = await request.app[GATEWAY].reports.request(wanted)
    if found is None:
        raise errors.GatewayError(
            404, "invalid_request_error", "not_found", "No request with this id in the ledger."
        )
    return found


async def _capture(gw: Gateway, record: LedgerRecord) -> dict[str, Any] | None:
    """The record's own capture (not another request's of the same id), or None."""
    doc = await gw.captures.capture(record.request_id)
    return doc if replay.of_record(record, doc) is not None else None


async def one_request(request: web.Request) -> web.Response:
    """One request's record and its capture (null when its bodies were not kept)."""
    found = await _found(request)
    gw = request.app[GATEWAY]
    capture = await _capture(gw, found.record)
    trace_url = _trace_url(gw.policy.settings.telemetry.trace_url, found.record, capture)
    return web.json_response(
        {**record_dict(found.record), "capture": capture, "trace_url": trace_url}
    )


async def replay_request(request: web.Request) -> web.Response:
    """Send a captured request again as its team; the new answer beside the captured one."""
    found = await _found(request)
    gw = request.app[GATEWAY]
    # `captured` refuses a capture that is not the record's own
    original = replay.captured(found.record, await gw.captures.capture(found.record.request_id))
    return web.json_response(await replay.replay(gw, original))
