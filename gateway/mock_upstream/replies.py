"""Plain JSON replies shared by the mock's handlers.

Owns: random ids, JSON and OpenAI-shaped error responses, reading a JSON object body and
checking its ``model`` against the models the mock serves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Final

import orjson
from aiohttp import web

from gateway.mock_upstream.state import Runtime

__all__ = ["JSON_TYPE", "check_model", "error", "hex_id", "json_body", "json_reply"]

JSON_TYPE: Final = "application/json"


def hex_id(prefix: str, nbytes: int = 24) -> str:
    return prefix + os.urandom(nbytes).hex()


def json_reply(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type=JSON_TYPE)


def error(
    status: int,
    message: str,
    etype: str = "invalid_request_error",
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return web.Response(
        status=status, body=orjson.dumps(body), content_type=JSON_TYPE, headers=headers
    )


async def json_body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return error(400, "We could not parse the JSON body of your request.", code="invalid_json")
    if not isinstance(body, dict):
        return error(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def check_model(body: dict[str, Any], runtime: Runtime) -> web.Response | None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return error(400, "You must provide a model parameter.", code="missing_model")
    if model not in runtime.models:
        message = f"The model `{model}` does not exist or you do not have access to it."
        return error(404, message, code="model_not_found")
    return None
