"""Tool calls: when the mock answers with a function call instead of text, and with what.

The rule, the same for the Responses API and Chat Completions:

1. Only function tools count, in either shape, in both APIs: ``{"type": "function",
   "name": N, "parameters": S}`` (Responses) or ``{"type": "function", "function": {"name": N,
   "parameters": S}}`` (Chat). A request without one gets text.
2. A request whose input ends with a tool's result gets text, whatever ``tool_choice`` says:
   Responses, the last input item is a ``function_call_output`` (or another ``*_call_output``);
   Chat, the last message has role ``tool`` (or ``function``). That text is the usual
   deterministic text of the whole input, tool results included.
3. ``tool_choice``: ``"none"`` gets text; ``"required"`` calls the first tool;
   ``{"type": "function", "name": N}`` (Chat: ``{"type": "function", "function": {"name": N}}``)
   calls N when it is offered. Anything else (``"auto"``, absent) follows rule 4.
4. The mock calls the first tool, in ``tools`` order, whose name appears in a user message
   after the last tool result (Responses: for a string input, the string), as a whole word:
   case-sensitive, with no letter, digit or underscore right before or after it, so
   ``get_weather`` is named by "use get_weather." but not by "get_weather_now".
   Instructions, system and developer messages and assistant messages do not count. Else, text.

Arguments: a compact JSON object built from the tool's JSON-schema ``parameters``. Each
``required`` property in that order (with none listed, each property in order) gets a value by
its schema: ``const`` or the first ``enum`` value when given; else by ``type``: a string is a
word of the mock's vocabulary picked by a hash of the input texts and the property's path,
integer 1, number 1.5, boolean true, array [], null null, and an object gets its own properties
by the same rule ({} when it lists none). A list of types, ``anyOf``, ``oneOf`` and ``allOf``
take their first non-null choice; local ``$ref`` pointers are followed; past 8 levels of nesting
a value is null. The same request always gets the same arguments; only the ids differ.

Usage: input tokens as for text; ``output_tokens = max(1, ceil(len(name + arguments) / 4))``
plus ``x-mock-reasoning-tokens``. ``x-mock-output-tokens`` and ``max_output_tokens`` do not
shorten a call. Streams send the arguments in deltas of up to 4 characters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from gateway.mock_upstream.text import (
    chat_texts,
    content_texts,
    input_usage,
    pick_word,
    responses_texts,
)

__all__ = ["Call", "chat_call", "pieces", "responses_call"]

_PIECE: Final = 4  # characters of arguments per streamed delta, about one token
_MAX_DEPTH: Final = 8  # nesting of objects and $refs followed; deeper values are null
_WORD_CHAR: Final = "[0-9A-Za-z_]"  # what may not touch a tool's name in a text

Tool = tuple[str, Any]  # name, parameters schema


@dataclass(frozen=True, slots=True)
class Call:
    """One function call the mock answers with, and its usage."""

    name: str
    arguments: str  # compact JSON object
    input_tokens: int
    cached_tokens: int
    reasoning_tokens: int

    @property
    def output_tokens(self) -> int:
        return max(1, math.ceil(len(self.name + self.arguments) / 4)) + self.reasoning_tokens


def pieces(arguments: str) -> list[str]:
    """The arguments split into streamed deltas, in order (never none)."""
    return [arguments[i : i + _PIECE] for i in range(0, len(arguments), _PIECE)] or [""]


def responses_call(request: web.Request, body: Mapping[str, Any]) -> Call | None:
    """The function call a Responses request gets, or None for text."""
    if not (tools := _tools(body)) or (user := _responses_user_texts(body.get("input"))) is None:
        return None
    tool = _choose(tools, body.get("tool_choice"), user)
    return None if tool is None else _call(request, tool, responses_texts(body))


def chat_call(request: web.Request, body: Mapping[str, Any]) -> Call | None:
    """The tool call a Chat Completions request gets, or None for text."""
    if not (tools := _tools(body)) or (user := _chat_user_texts(body.get("messages"))) is None:
        return None
    tool = _choose(tools, body.get("tool_choice"), user)
    return None if tool is None else _call(request, tool, chat_texts(body))


# ---------------------------------------------------------------- the rule


def _tools(body: Mapping[str, Any]) -> list[Tool]:
    """The function tools offered, in order, in either shape."""
    found: list[Tool] = []
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict) and tool.get("type") == "function":
            spec = tool["function"] if isinstance(tool.get("function"), dict) else tool
            if isinstance(name := spec.get("name"), str) and name:
                found.append((name, spec.get("parameters")))
    return found


def _is_tool_result(item: Any) -> bool:
    kind = item.get("type") if isinstance(item, dict) else None
    return isinstance(kind, str) and kind.endswith("_call_output")


def _is_user_message(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and item.get("role") == "user"
        and item.get("type", "message") == "message"
    )


def _responses_user_texts(items: Any) -> list[str] | None:
    """The user's texts after the last tool result; None when the input ends with one."""
    if isinstance(items, str):
        return [items]
    if not isinstance(items, list):
        return []
    if items and _is_tool_result(items[-1]):
        return None
    texts: list[str] = []
    for item in items:
        if _is_tool_result(item):
            texts = []
        elif isinstance(item, str):
            texts.append(item)
        elif _is_user_message(item):
            content_texts(item.get("content"), texts)
    return texts


def _chat_user_texts(messages: Any) -> list[str] | None:
    """The user's texts after the last tool message; None when the messages end with one."""
    if not isinstance(messages, list):
        return []
    texts: list[str] = []
    role = None
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("tool", "function"):
            texts = []
        elif role == "user":
            content_texts(message.get("content"), texts)
    return None if role in ("tool", "function") else texts


def _choose(tools: list[Tool], choice: Any, user_texts: list[str]) -> Tool | None:
    if choice == "none":
        return None
    if choice == "required":
        return tools[0]
    if isinstance(choice, dict) and choice.get("type") == "function":
        spec = choice["function"] if isinstance(choice.get("function"), dict) else choice
        for tool in tools:
            if tool[0] == spec.get("name"):
                return tool
    for tool in tools:
        pattern = re.compile(f"(?<!{_WORD_CHAR}){re.escape(tool[0])}(?!{_WORD_CHAR})")
        if any(pattern.search(text) for text in user_texts):
            return tool
    return None


# ---------------------------------------------------------------- arguments


def _call(request: web.Request, tool: Tool, texts: list[str]) -> Call:
    name, parameters = tool
    schema = parameters if isinstance(parameters, dict) else {}
    value = _object(schema, schema, "\x1f".join(texts), "", 0)
    return Call(name, orjson.dumps(value).decode(), *input_usage(request, texts))


def _resolve(root: Mapping[str, Any], ref: str) -> Any:
    """A local JSON pointer (``#/$defs/City``) into the parameters schema; None elsewhere."""
    if not ref.startswith("#"):
        return None
    node: Any = root
    for part in filter(None, ref[1:].split("/")):
        key = part.replace("~1", "/").replace("~0", "~")
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _value(schema: Any, root: Mapping[str, Any], seed: str, path: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return None
    if not isinstance(schema, dict):  # no schema, or `true`: anything goes, a word will do
        return pick_word(seed + "\x1e" + path)
    if isinstance(ref := schema.get("$ref"), str):
        return _value(_resolve(root, ref), root, seed, path, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(enum := schema.get("enum"), list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(choices := schema.get(key), list) and choices:
            real = [c for c in choices if not (isinstance(c, dict) and c.get("type") == "null")]
            return _value((real or choices)[0], root, seed, path, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if not isinstance(kind, str):  # none given (or nonsense): guess from the keywords
        kind = "object" if "properties" in schema else "string"
    simple = {"integer": 1, "number": 1.5, "boolean": True, "null": None}
    if kind in simple:
        return simple[kind]
    if kind == "array":
        return []
    if kind == "object":
        return _object(schema, root, seed, path, depth + 1)
    return pick_word(seed + "\x1e" + path)


def _object(
    schema: Mapping[str, Any], root: Mapping[str, Any], seed: str, path: str, depth: int
) -> dict[str, Any]:
    props = schema.get("properties")
    props = props if isinstance(props, dict) else {}
    required = schema.get("required")
    names = (
        [n for n in required if isinstance(n, str)]
        if isinstance(required, list) and required
        else [n for n in props if isinstance(n, str)]
    )
    return {n: _value(props.get(n), root, seed, f"{path}/{n}", depth) for n in names}
