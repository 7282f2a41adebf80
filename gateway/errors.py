"""OpenAI-shaped errors: the gateway's own failures as JSON responses and SSE events."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web

from gateway import amounts


class GatewayError(Exception):
    """A failure the gateway answers itself, with the contract's status, type and code."""

    def __init__(
        self,
        status: int,
        type_: str,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.param = param
        self.reached = False  # an upstream failure after the request may have reached it
        self.timed_out = False  # an upstream failure by timeout (connect or first byte)

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def response(self, extra_headers: Mapping[str, str] | None = None) -> web.Response:
        headers = {**self.headers, **(extra_headers or {})}
        return web.Response(
            status=self.status,
            body=self.body(),
            content_type="application/json",
            headers=headers,
        )


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def invalid_api_key() -> GatewayError:
    return GatewayError(
        401,
        "invalid_request_error",
        "invalid_api_key",
        "Missing or unknown API key. Send your team key as "
        "'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
    )


def quoted(text: str) -> str:
    """Client input (a model name, an id) as an error message shows it: short, printable,
    quoted."""
    cut = text if len(text) <= 100 else text[:100] + "..."
    return repr(cut) if not cut.isprintable() or "'" in cut else f"'{cut}'"


def model_not_allowed(model: str, team: str) -> GatewayError:
    return GatewayError(
        403,
        "permission_error",
        "model_not_allowed",
        f"Team '{team}' may not use model {quoted(model)}.",
    )


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        "invalid_request_error",
        "model_not_found",
        f"No upstream serves model {quoted(model)}.",
    )


def invalid_json(detail: str) -> GatewayError:
    return GatewayError(
        400,
        "invalid_request_error",
        "invalid_json",
        f"The request body is not valid JSON: {detail}",
    )


def invalid_value(param: str, message: str) -> GatewayError:
    return GatewayError(400, "invalid_request_error", "invalid_value", message, param=param)


def invalid_tags(detail: str) -> GatewayError:
    """A malformed `x-gateway-tags` header; `detail` says what is wrong without echoing it."""
    return GatewayError(
        400,
        "invalid_request_error",
        "invalid_tags",
        f"The x-gateway-tags header is not valid: {detail}. Send at most 10 key=value pairs, "
        "comma-separated; keys are 1 to 32 of a-z 0-9 _ . -, values 1 to 64 printable "
        "characters.",
    )


def invalid_user(detail: str) -> GatewayError:
    """A `x-gateway-user` header that is no user id the gateway records."""
    return GatewayError(
        400,
        "invalid_request_error",
        "invalid_user",
        f"The x-gateway-user header is not valid: {detail}.",
    )


def json_too_deep(limit: int) -> GatewayError:
    return GatewayError(
        400,
        "invalid_request_error",
        "invalid_json",
        f"The request body nests JSON deeper than {limit} levels.",
    )


def client_disconnected() -> GatewayError:
    """Not an answer anyone reads: the client left while sending its request."""
    return GatewayError(
        499, "invalid_request_error", "client_disconnected", "The client closed the connection."
    )


def missing_model() -> GatewayError:
    return GatewayError(
        400, "invalid_request_error", "missing_model", "The request body has no 'model' string."
    )


def request_too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        "invalid_request_error",
        "request_too_large",
        f"The request body is larger than {limit} bytes.",
    )


def budget_exceeded(
    team: str, window: str, retry_after: int, reserve: float = 0.0, limit: float = 0.0
) -> GatewayError:
    if limit:
        unit = window.rpartition(":")[2] if ":" in window else "tokens"
        held, whole = amounts.text(unit, reserve), amounts.text(unit, limit)
        message = (
            f"This request reserves {held} (its input estimate plus max_output_tokens), "
            f"more than team '{team}''s whole '{window}' budget of {whole}: lower "
            "max_output_tokens or split the request."
        )
    else:
        message = (
            f"Team '{team}' has no budget left for this request in its '{window}' window; "
            f"it resets in {retry_after} s."
        )
    return GatewayError(
        429,
        "insufficient_quota",
        "budget_exceeded",
        message,
        headers={"retry-after": str(retry_after), "x-should-retry": "false"},
    )


def model_not_priced(model: str, team: str) -> GatewayError:
    return GatewayError(
        403,
        "permission_error",
        "model_not_priced",
        f"Team '{team}' has a USD budget and model {quoted(model)} has no price in the gateway's "
        "prices table, so its cost could not be counted; ask the gateway's operators to add one.",
    )


def upstream_unavailable(upstream: str, reached: bool = False) -> GatewayError:
    err = GatewayError(
        502,
        "upstream_error",
        "upstream_unavailable",
        f"Upstream '{upstream}' could not be reached."
        if not reached
        else f"Upstream '{upstream}' closed the connection before answering.",
    )
    err.reached = reached
    return err


def upstream_timeout(upstream: str, seconds: float) -> GatewayError:
    err = GatewayError(
        504,
        "upstream_error",
        "upstream_timeout",
        f"Upstream '{upstream}' sent no response within {seconds:g} s.",
    )
    err.reached = True  # it may be working on the request: charge the estimate
    err.timed_out = True
    return err


def state_unavailable() -> GatewayError:
    """The shared state store (Redis) does not answer and `state.on_unavailable` is reject."""
    return GatewayError(
        503,
        "server_error",
        "state_unavailable",
        "The gateway cannot reach its shared state store to check this team's budgets; "
        "retry shortly.",
        headers={"retry-after": "2"},
    )


def shutting_down() -> GatewayError:
    return GatewayError(
        503,
        "server_error",
        "shutting_down",
        "The gateway is shutting down; retry on another instance.",
        headers={"retry-after": "1"},
    )


def not_found() -> GatewayError:
    # the path is not echoed: an answer never repeats request bytes
    return GatewayError(404, "invalid_request_error", "not_found", "No route for this path.")


def stream_interrupted_event(
    sequence_number: int, message: str, code: str = "upstream_stream_interrupted"
) -> bytes:
    """The SSE `error` event that ends a client's stream when it cannot go on (the upstream
    broke it, or the gateway stopped)."""
    payload = orjson.dumps(
        {
            "type": "error",
            "code": code,
            "message": message,
            "param": None,
            "sequence_number": sequence_number,
        }
    )
    return b"event: error\ndata: " + payload + b"\n\n"
