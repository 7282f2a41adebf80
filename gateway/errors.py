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
        self.reached = False  # an upstream failure after the request may have reached it

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


def budget_exceeded(
    team: str, window: str, retry_after: int, reserve: float = 0.0, limit: float = 0.0
) -> GatewayError:
    if limit:
        message = (
            f"This request reserves {reserve:g} (its input estimate plus max_output_tokens), "
            f"more than team '{team}''s whole '{window}' budget of {limit:g}: lower "
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
        f"Team '{team}' has a USD budget and model '{model}' has no price in the gateway's "
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
    return err


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


class StreamMasker:
    """Masks secrets in a byte stream whose chunks may split a secret anywhere.

    A chunk's tail is held back only while it could be the start of a secret, so in practice
    (chunks ending in a line break) nothing is delayed.
    """

    __slots__ = ("_held", "_secrets")

    def __init__(self, secrets: tuple[bytes, ...]) -> None:
        self._secrets = tuple(s for s in secrets if s)
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self._secrets:
            return chunk
        data = self._held + chunk if self._held else chunk
        data = mask_secrets(data, self._secrets)
        hold = 0
        for s in self._secrets:
            for k in range(min(len(s) - 1, len(data)), hold, -1):
                if data.endswith(s[:k]):
                    hold = k
                    break
        if hold:
            self._held = data[-hold:]
            return data[:-hold]
        self._held = b""
        return data

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held


def mask(secret: bytes) -> bytes:
    return secret[:3] + b"****" if len(secret) > 12 else b"****"
