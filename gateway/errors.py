"""OpenAI-shaped errors: the gateway's own failures as JSON responses and SSE events."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web


class GatewayError(Exception):
    """A failure the gateway answers itself, with the contract's status, type and code."""

    def __init__(
        self,
        status: int,
        type_: str,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code)

    def response(self, extra_headers: Mapping[str, str] | None = None) -> web.Response:
        headers = {**self.headers, **(extra_headers or {})}
        return web.Response(
            status=self.status,
            body=self.body(),
            content_type="application/json",
            headers=headers,
        )


def error_body(message: str, type_: str, code: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


def invalid_api_key() -> GatewayError:
    return GatewayError(
        401,
        "invalid_request_error",
        "invalid_api_key",
        "Missing or unknown API key. Send your team key as "
        "'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
    )


def model_not_allowed(model: str, team: str) -> GatewayError:
    return GatewayError(
        403, "permission_error", "model_not_allowed", f"Team '{team}' may not use model '{model}'."
    )


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404, "invalid_request_error", "model_not_found", f"No upstream serves model '{model}'."
    )


def invalid_json(detail: str) -> GatewayError:
    return GatewayError(
        400,
        "invalid_request_error",
        "invalid_json",
        f"The request body is not valid JSON: {detail}",
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


def budget_exceeded(team: str, window: str, retry_after: int) -> GatewayError:
    return GatewayError(
        429,
        "insufficient_quota",
        "budget_exceeded",
        f"Team '{team}' has no budget left for this request in its '{window}' window; "
        f"it resets in {retry_after} s.",
        headers={"retry-after": str(retry_after), "x-should-retry": "false"},
    )


def upstream_unavailable(upstream: str) -> GatewayError:
    return GatewayError(
        502,
        "upstream_error",
        "upstream_unavailable",
        f"Upstream '{upstream}' could not be reached.",
    )


def upstream_timeout(upstream: str, seconds: float) -> GatewayError:
    return GatewayError(
        504,
        "upstream_error",
        "upstream_timeout",
        f"Upstream '{upstream}' sent no response within {seconds:g} s.",
    )


def shutting_down() -> GatewayError:
    return GatewayError(
        503,
        "server_error",
        "shutting_down",
        "The gateway is shutting down; retry on another instance.",
        headers={"retry-after": "1"},
    )


def not_found(path: str) -> GatewayError:
    return GatewayError(404, "invalid_request_error", "not_found", f"No route for {path}.")


def stream_interrupted_event(sequence_number: int, message: str) -> bytes:
    """The SSE `error` event that ends a client's stream when the upstream broke it."""
    payload = orjson.dumps(
        {
            "type": "error",
            "code": "upstream_stream_interrupted",
            "message": message,
            "param": None,
            "sequence_number": sequence_number,
        }
    )
    return b"event: error\ndata: " + payload + b"\n\n"


def mask_secrets(body: bytes, secrets: tuple[bytes, ...]) -> bytes:
    """Replace any echoed upstream key in a body with a masked form."""
    for secret in secrets:
        if secret and secret in body:
            body = body.replace(secret, mask(secret))
    return body


def mask(secret: bytes) -> bytes:
    return secret[:3] + b"****" if len(secret) > 12 else b"****"
