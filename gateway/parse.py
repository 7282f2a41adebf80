"""Reading a request's body once: bounded, JSON when it should be, the fields every upstream
reads (whatever the case of their names), and what a metered request may cost."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import MultiMapping

from gateway import attribution, errors, jsonbody
from gateway.budget import estimate
from gateway.routes import Route
from gateway.server import read_body
from gateway.settings import Limits

_OBJECT = re.compile(rb"\s*\{")


@dataclass(frozen=True, slots=True)
class Parsed:
    body: bytes
    json: Any  # the decoded body when it is JSON, else None
    top: dict[str, Any]  # top-level fields by lower-cased name
    model: str  # "" when the body names none

    @property
    def stream(self) -> bool:
        return self.top.get("stream") is True

    @property
    def previous(self) -> object:
        """`previous_response_id` as sent (None when absent or null)."""
        return self.top.get("previous_response_id")


async def read(
    request: web.Request, route: Route, limits: Limits, redact: Callable[[str], str]
) -> Parsed:
    try:
        body = await read_body(request, limits.max_body_bytes, limits.body_timeout)
    except ConnectionError:  # the client left mid-upload: nobody to answer, nothing to charge
        raise errors.client_disconnected() from None
    return parse(body, request.method, request.content_type, route, limits, redact)


def parse(
    body: bytes,
    method: str,
    content_type: str,
    route: Route,
    limits: Limits,
    redact: Callable[[str], str],
) -> Parsed:
    """A body already read (from a request, or a WebSocket message): its JSON and fields."""
    needs_model = method == "POST" and route.model
    parsed: Any = None
    # a JSON object sent under another content type (or none) is still read for its model:
    # an upstream that parses it anyway must not be reached past the allowlist and budgets
    if (
        method == "POST"
        and body
        and (needs_model or "json" in content_type or _OBJECT.match(body) is not None)
    ):
        try:
            parsed = jsonbody.loads(body, limits.max_json_depth)
        except jsonbody.TooDeep:
            raise errors.json_too_deep(limits.max_json_depth) from None
        except orjson.JSONDecodeError as e:
            if needs_model:
                raise errors.invalid_json(str(e)) from None
    # fields as every upstream reads them, whatever the case of their names
    try:
        top = jsonbody.fields(parsed) if isinstance(parsed, dict) else {}
    except jsonbody.AmbiguousKeys as e:  # the message names a field: never a key in it
        raise errors.invalid_json(redact(str(e))) from None
    model = top.get("model")
    if needs_model and (not isinstance(model, str) or not model):
        raise errors.missing_model()
    return Parsed(body, parsed, top, model if isinstance(model, str) else "")


def attribute(
    headers: Mapping[str, str], parsed: Parsed, redact: Callable[[str], str]
) -> attribution.Attribution:
    """The user and tags the request is attributed to (see `gateway.attribution`): 400
    `invalid_tags` or `invalid_user` for a header that breaks the rules."""
    users = _values(headers, attribution.USER_HEADER)
    tags = _values(headers, attribution.TAGS_HEADER)
    try:
        return attribution.attribute(users, tags, parsed.top, redact)
    except attribution.InvalidTags as e:
        raise errors.invalid_tags(str(e)) from None
    except attribution.InvalidUser as e:
        raise errors.invalid_user(str(e)) from None


def _values(headers: Mapping[str, str], name: str) -> list[str]:
    """Every value of a header: a request's headers may repeat one, a plain mapping cannot."""
    if isinstance(headers, MultiMapping):
        return list(headers.getall(name, []))
    value = headers.get(name)
    return [value] if value is not None else []


def output_estimate(parsed: Parsed, limits: Limits) -> int:
    """Most output tokens the request can produce; 400 for a cap that is not a count."""
    try:
        return estimate.output_tokens(parsed.top, limits.default_max_output_tokens)
    except estimate.InvalidValue as e:
        raise errors.invalid_value(e.param, str(e)) from None


def adds_usage(route: Route, parsed: Parsed) -> bool:
    """Whether the gateway asks for the usage of a Chat Completions stream whose client did not
    (it reports none unless asked): that client must then not get the usage chunk."""
    body = parsed.json
    if route.name != "/v1/chat/completions" or not parsed.stream or not isinstance(body, dict):
        return False
    options = body.get("stream_options")
    return not (isinstance(options, dict) and options.get("include_usage") is True)


def upstream_body(route: Route, parsed: Parsed) -> bytes:
    """The bytes sent upstream: the client's, except that a Chat Completions stream is asked
    for its usage, so that it is charged exactly (see `adds_usage`)."""
    if not adds_usage(route, parsed):
        return parsed.body
    body = parsed.json
    options = body.get("stream_options")
    options = (
        {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
    )
    return orjson.dumps({**body, "stream_options": options})
