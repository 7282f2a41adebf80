"""The control routes under ``/mock/``: faults and refused keys, set at run time.

Owns: ``GET``/``POST``/``DELETE /mock/faults`` (show, queue, clear the stateful faults) and
``POST``/``DELETE /mock/keys/refuse`` (refuse a key with 401, or stop refusing it). The
middleware neither records nor faults these routes; the gateway never forwards to them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from gateway.mock_upstream.faults import Faults, make_fault
from gateway.mock_upstream.replies import error, json_body, json_reply
from gateway.mock_upstream.state import MOCK_STATE

__all__ = ["CONTROL_ROUTES"]

_FAULT_FIELDS: Final = frozenset({"status", "count", "retry_after", "cut_after", "path", "key"})


def _faults(request: web.Request) -> Faults:
    return request.app[MOCK_STATE].faults


def _whole(body: dict[str, Any], name: str, default: int | None, least: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"`{name}` must be a whole number, at least {least}")
    return value


def _text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"`{name}` must be a non-empty string")
    return value


async def _show(request: web.Request) -> web.StreamResponse:
    return json_reply(_faults(request).view())


async def _queue(request: web.Request) -> web.StreamResponse:
    """Body: {"status": 400-599 | "reset" | "close" | "cut", "count": N (1),
    "retry_after": S, "cut_after": K (1), "path": prefix ("/v1/"), "key": upstream key}."""
    body = await json_body(request)
    if isinstance(body, web.Response):
        return body
    try:
        if unknown := sorted(body.keys() - _FAULT_FIELDS):
            raise ValueError(f"unknown fields {unknown}; known: {sorted(_FAULT_FIELDS)}")
        status = body.get("status")
        if isinstance(status, bool) or not isinstance(status, int | str):
            raise ValueError("`status` must be 400-599, reset, close or cut")
        retry_after = _whole(body, "retry_after", None, 0)
        cut_after = _whole(body, "cut_after", None, 0)
        if cut_after is not None and status != "cut":
            raise ValueError("`cut_after` goes with status cut")
        if retry_after is not None and not isinstance(status, int):
            raise ValueError("`retry_after` goes with an HTTP status")
        fault = make_fault(status, cut_after if cut_after is not None else retry_after)
        count = _whole(body, "count", 1, 1) or 1
        path = _text(body, "path") or "/v1/"
        if not path.startswith("/"):
            raise ValueError("`path` must start with /")
        _faults(request).queue(fault, count, path, _text(body, "key"))
    except ValueError as e:
        return error(400, f"/mock/faults: {e}", code="mock_bad_fault")
    return json_reply(_faults(request).view())


async def _clear(request: web.Request) -> web.StreamResponse:
    _faults(request).clear()
    return json_reply(_faults(request).view())


async def _refuse_body(request: web.Request) -> str | web.Response:
    body = await json_body(request)
    if isinstance(body, web.Response):
        return body
    key = body.get("key")
    if not isinstance(key, str) or not key or body.keys() != {"key"}:
        return error(400, 'The body must be {"key": "<upstream key>"}.', code="mock_bad_key")
    return key


async def _refuse(request: web.Request) -> web.StreamResponse:
    key = await _refuse_body(request)
    if isinstance(key, web.Response):
        return key
    _faults(request).refuse(key)
    return json_reply({"refused_keys": len(_faults(request).refused)})


async def _unrefuse(request: web.Request) -> web.StreamResponse:
    key = await _refuse_body(request)
    if isinstance(key, web.Response):
        return key
    _faults(request).unrefuse(key)
    return json_reply({"refused_keys": len(_faults(request).refused)})


CONTROL_ROUTES: Final[
    tuple[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]], ...]
] = (
    ("GET", "/mock/faults", _show),
    ("POST", "/mock/faults", _queue),
    ("DELETE", "/mock/faults", _clear),
    ("POST", "/mock/keys/refuse", _refuse),
    ("DELETE", "/mock/keys/refuse", _unrefuse),
)
