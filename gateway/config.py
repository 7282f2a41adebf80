"""YAML configuration -> one frozen, validated `Settings`; `${VAR}` substitution.

This is the only module that reads `os.environ` for configuration. The schema itself, every
default and rule, is `gateway.settings`; here the file is read, `${VAR}` and `${VAR:-default}`
are substituted, and validation errors become lines ``key.path: what is wrong`` (ConfigError's
str prefixes each with the file). Every problem is reported at once, in the order of the file;
secrets never appear in a repr or an error.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.schema import (
    INVALID,
    RULE,
    SECRET,
    FromEnv,
    Secret,
    hash_key,
)
from gateway.settings import (
    Admin,
    BudgetRule,
    Cache,
    LedgerSettings,
    Limits,
    Listen,
    Logs,
    Price,
    Settings,
    State,
    Team,
    Telemetry,
    Timeouts,
    Traces,
    Upstream,
)

__all__ = [
    "Admin",
    "BudgetRule",
    "Cache",
    "ConfigError",
    "LedgerSettings",
    "Limits",
    "Listen",
    "Logs",
    "Price",
    "Secret",
    "Settings",
    "State",
    "Team",
    "Telemetry",
    "Timeouts",
    "Traces",
    "Upstream",
    "default_config_path",
    "hash_key",
    "load",
    "loads",
    "parse",
]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# references are swapped for plain-scalar placeholders before YAML parsing, so that
# `{key: ${VAR:-}}` in a flow mapping parses; they are put back before substitution
_PLACEHOLDER = "__GATEWAY_ENV_{nonce}_{n}__"
_NULLS = frozenset({"~", "null", "Null", "NULL"})
_SHOWN = 40  # longest string shown whole in a problem

# where in the file a problem is: its key path and its position, to list problems in file order
Place = tuple[str, tuple[int, ...]]


class ConfigError(Exception):
    """Raised with every problem found; `problems` holds ``key.path: what is wrong`` lines."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def parse(raw: Any, env: Mapping[str, str], source: str = "<config>") -> Settings:
    """Validate a raw YAML tree into Settings, or raise ConfigError listing every problem."""
    unset: list[tuple[Place, str]] = []
    tree = _substitute(raw, ("", ()), env, unset)
    found = list(unset)
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(tree)
    except ValidationError as e:
        # a variable that is not set is the problem there, not the empty value it left
        skip = tuple(path for (path, _), _ in unset)
        for err in e.errors(include_url=False):
            loc, what = err["loc"], _what(err)
            if loc and loc[-1] == "[key]":  # a mapping's key, not its value, is wrong
                loc, what = loc[:-1], f"the key must be a string (got {_show(err['input'])})"
            place = _place(tree, loc)
            if not _under(place[0], skip):
                found.append((place, what))
    if found or settings is None:
        found.sort(key=lambda p: p[0][1])
        lines = [f"{path or '(file)'}: {what}" for (path, _), what in found]
        raise ConfigError(source, [_one_line(line) for line in lines])
    return _traces_endpoint_from_env(settings, env)


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a config file; ConfigError lists every problem found."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(source, [f"(file): cannot read: {e.strerror}"]) from None
    return loads(text, env, source)


def loads(text: str, env: Mapping[str, str] | None = None, source: str = "<config>") -> Settings:
    refs: list[str] = []
    # a nonce no file can guess: text that looks like a placeholder stays what it is
    nonce = secrets.token_hex(8)

    def hide(m: re.Match[str]) -> str:
        refs.append(m.group(0))
        return _PLACEHOLDER.format(nonce=nonce, n=len(refs) - 1)

    try:
        raw = yaml.safe_load(_VAR.sub(hide, text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        raise ConfigError(
            source, [f"{where}: not valid YAML: {getattr(e, 'problem', e)}"]
        ) from None
    placeholder = re.compile(_PLACEHOLDER.format(nonce=nonce, n=r"(\d+)"))
    return parse(_unhide(raw, refs, placeholder), os.environ if env is None else env, source)


def default_config_path(env: Mapping[str, str] | None = None) -> str:
    e = os.environ if env is None else env
    return e.get("GATEWAY_CONFIG") or "./gateway.yaml"


def _unhide(node: Any, refs: list[str], placeholder: re.Pattern[str]) -> Any:
    if isinstance(node, str):
        return placeholder.sub(lambda m: refs[int(m.group(1))], node)
    if isinstance(node, dict):
        return {
            _unhide(k, refs, placeholder): _unhide(v, refs, placeholder) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_unhide(v, refs, placeholder) for v in node]
    return node


def _substitute(
    node: Any, place: Place, env: Mapping[str, str], unset: list[tuple[Place, str]]
) -> Any:
    """The tree with every `${VAR}` replaced; a value that is one whole reference becomes a
    `FromEnv`, which takes the YAML type of what it expands to where the schema wants one."""
    path, order = place
    if isinstance(node, dict):
        return {
            k: _substitute(v, (f"{path}.{k}" if path else str(k), (*order, i)), env, unset)
            for i, (k, v) in enumerate(node.items())
        }
    if isinstance(node, list):
        return [
            _substitute(v, (f"{path}[{i}]", (*order, i)), env, unset) for i, v in enumerate(node)
        ]
    if not isinstance(node, str) or "${" not in node:
        return node

    def value(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        found = env.get(name)
        if found is None or (found == "" and default is not None):
            if default is None:
                unset.append((place, f"environment variable {name} is not set"))
                return ""
            return default
        return found

    text = _VAR.sub(value, node)
    return FromEnv(text, _yaml_scalar(text)) if _VAR.fullmatch(node) else text


def _yaml_scalar(text: str) -> object:
    """What YAML makes of `text` as a plain scalar (`9000` a number, `true` a flag), else it."""
    if not text or text.startswith(("{", "[")):
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is None and text.strip() not in _NULLS:
        return text  # a comment, say
    return value if value is None or isinstance(value, str | int | float | bool) else text


def _place(tree: Any, loc: tuple[str | int, ...]) -> Place:
    """A validation error's location as a key path in the file: upstreams and teams are
    validated as lists but named in the file by key, so `("teams", 0)` is `teams.<first key>`."""
    path, order, node = "", [], tree
    for part in loc:
        if isinstance(node, dict):
            keys = list(node)
            key: object = part
            if isinstance(part, int) and part not in node and 0 <= part < len(keys):
                key = keys[part]
            order.append(keys.index(key) if key in node else len(keys))
            path = f"{path}.{key}" if path else str(key)
            node = node.get(key)
        elif isinstance(part, int):
            order.append(part)
            path = f"{path}[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
        else:  # under something that is not in the file
            order.append(0)
            path = f"{path}.{part}" if path else part
    return path, tuple(order)


def _under(path: str, tops: tuple[str, ...]) -> bool:
    return any(path == t or path.startswith((f"{t}.", f"{t}[")) for t in tops)


def _what(err: Any) -> str:
    """One validation error as ``what is wrong``, with the value when it may be shown."""
    kind, msg, value = err["type"], err["msg"], err["input"]
    if kind == INVALID:
        return f"{msg} (got {_show(value)})"
    if kind in (SECRET, RULE):
        return str(msg)
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping (got {_kind(value)})"
    if kind in ("tuple_type", "list_type"):
        return f"must be a list (got {_kind(value)})"
    if kind == "too_short":
        return "must not be empty"
    if kind == "missing":
        return "is required"
    if kind in ("extra_forbidden", "invalid_key"):
        return "unknown key"
    return f"is not valid: {msg[:1].lower()}{msg[1:]}"  # never the value: it may be a secret


def _one_line(text: str) -> str:
    """A problem line as printed: a key or name with a newline in it does not split it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        text = str(value)
        return repr(text) if len(text) <= _SHOWN else f"{text[:_SHOWN]!r}... ({len(text)} chars)"
    if isinstance(value, list | tuple | dict) and not value:
        return "[]" if isinstance(value, list | tuple) else "{}"
    return _kind(value)  # what a list or mapping holds may be a secret: only its kind


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _traces_endpoint_from_env(settings: Settings, env: Mapping[str, str]) -> Settings:
    """An empty `telemetry.traces.endpoint` takes the standard OpenTelemetry variables."""
    traces = settings.telemetry.traces
    if traces.endpoint:
        return settings
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (
        base.rstrip("/") + "/v1/traces" if base else ""
    )
    if not endpoint:
        return settings
    telemetry = settings.telemetry.model_copy(
        update={"traces": traces.model_copy(update={"endpoint": endpoint})}
    )
    return settings.model_copy(update={"telemetry": telemetry})
