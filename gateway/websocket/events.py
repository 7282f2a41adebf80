"""The Responses WebSocket mode's messages: client events in, server events out. Pure, no I/O.

A client sends `response.create` (the fields of `POST /v1/responses`, plus `type` and the
WebSocket-only `stream_id`) and, on upstreams that support it, `response.steer`. The server
sends the events a stream carries, one JSON object per text message. Errors the gateway makes
itself carry both shapes clients read: the WebSocket one (`error: {type, code, message,
param}` and `status`) and the stream one (`code`, `message`, `param` at the top).
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway import errors, jsonbody
from gateway.errors import GatewayError

CREATE = "response.create"
TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
# the usage-bearing end of each response, and the events that end one without usage
ENDS = TERMINAL | {"error"}


def client_event(data: str | bytes, max_depth: int) -> dict[str, Any]:
    """A client message as a JSON object; 400 `invalid_json` for anything else."""
    try:
        event = jsonbody.loads(data.encode() if isinstance(data, str) else data, max_depth)
    except jsonbody.TooDeep:
        raise errors.json_too_deep(max_depth) from None
    except orjson.JSONDecodeError as e:
        raise errors.invalid_json(str(e)) from None
    except UnicodeEncodeError:  # a lone surrogate in a text frame aiohttp decoded
        raise errors.invalid_json("the message is not valid UTF-8") from None
    if not isinstance(event, dict):
        raise errors.invalid_json("a client event must be a JSON object")
    kind = event.get("type")
    if not isinstance(kind, str):
        raise GatewayError(
            400,
            "invalid_request_error",
            "invalid_event",
            "A client event needs a string 'type', such as 'response.create'.",
            param="type",
        )
    return event


def unsupported(kind: str, redact: Any) -> GatewayError:
    shown = errors.quoted(redact(kind[:64]))
    return GatewayError(
        400,
        "invalid_request_error",
        "unsupported_event",
        f"The event type {shown} is not supported on this connection; send 'response.create'.",
        param="type",
    )


def no_room(team: str) -> GatewayError:
    """An event that would make a team's responses go on (a steer) when a budget is spent."""
    return GatewayError(
        429,
        "insufficient_quota",
        "budget_exceeded",
        f"Team {errors.quoted(team)} has no budget left for this event.",
    )


def create_body(event: dict[str, Any]) -> tuple[bytes, str | None]:
    """The `POST /v1/responses` body of a `response.create` (always a stream), and the
    `stream_id` it names, if any (WebSocket-only: not sent to an upstream over HTTP)."""
    body = {k: v for k, v in event.items() if k not in ("type", "stream_id")}
    body["stream"] = True
    lane = event.get("stream_id")
    return orjson.dumps(body), lane if isinstance(lane, str) else None


def error_event(error: GatewayError, lane: str | None = None) -> str:
    """The gateway's own refusal or failure as an `error` event."""
    detail: dict[str, str | None] = {
        "type": error.type,
        "code": error.code,
        "message": error.message,
        "param": error.param,
    }
    return _error(error.status, detail, lane)


def upstream_error_event(status: int, body: bytes, lane: str | None = None) -> str:
    """An upstream's HTTP error answer (an OpenAI error body, or anything) as an `error` event."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    sent = parsed.get("error") if isinstance(parsed, dict) else None
    sent = sent if isinstance(sent, dict) else {}

    def text(name: str) -> str | None:
        value = sent.get(name)
        return value if isinstance(value, str) else None

    detail = {
        "type": text("type") or "upstream_error",
        "code": text("code"),
        "message": text("message") or f"The upstream answered with HTTP status {status}.",
        "param": text("param"),
    }
    return _error(status, detail, lane)


def _error(status: int, detail: dict[str, str | None], lane: str | None) -> str:
    event: dict[str, Any] = {
        "type": "error",
        "status": status,
        "error": detail,
        "code": detail["code"],
        "message": detail["message"],
        "param": detail["param"],
    }
    if lane is not None:
        event["stream_id"] = lane
    return orjson.dumps(event).decode()


def server_message(data: bytes, lane: str | None) -> str | bytes | None:
    """One SSE event's data as the WebSocket message a client gets; None for the `[DONE]`
    sentinel (not an event). An `error` event without the WebSocket `error` object gets one,
    and every event names the client's `stream_id` when its `response.create` gave one."""
    if data == b"[DONE]":
        return None
    if lane is None and b'"error"' not in data[:40]:
        return data  # the usual case: as it came
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode("utf-8", "replace")
    if not isinstance(event, dict):
        return data.decode("utf-8", "replace")
    if event.get("type") == "error" and not isinstance(event.get("error"), dict):
        event["error"] = {
            "type": "server_error",
            "code": event.get("code"),
            "message": event.get("message") if isinstance(event.get("message"), str) else "",
            "param": event.get("param"),
        }
    if lane is not None:
        event["stream_id"] = lane
    return orjson.dumps(event).decode()
