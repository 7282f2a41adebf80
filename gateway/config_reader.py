"""Reading a raw YAML tree: `${VAR}` substitution, typed values, problems by key path. Pure."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import yaml

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# references are swapped for plain-scalar placeholders before YAML parsing, so that
# `{key: ${VAR:-}}` in a flow mapping parses; values are resolved per key afterwards
_REF = re.compile(r"__GATEWAY_ENV_(\d+)__")
WHOLE_VAR = re.compile(r"^__GATEWAY_ENV_\d+__$")
SHA256 = re.compile(r"^sha256:([0-9a-f]{64})$")

T = TypeVar("T")


class Reader:
    """Walks the raw YAML tree, substituting variables and collecting problems by key path."""

    def __init__(self, env: Mapping[str, str], refs: list[tuple[str, str | None]]) -> None:
        self.env = env
        self.refs = refs
        self.problems: list[str] = []

    def problem(self, path: str, what: str) -> None:
        self.problems.append(f"{path}: {what}")

    def substitute(self, value: Any, path: str) -> Any:
        if not isinstance(value, str) or "__GATEWAY_ENV_" not in value:
            return value
        whole = bool(WHOLE_VAR.match(value))

        def repl(m: re.Match[str]) -> str:
            name, default = self.refs[int(m.group(1))]
            found = self.env.get(name)
            if found is None or (found == "" and default is not None):
                if default is None:
                    self.problem(path, f"environment variable {name} is not set")
                    return ""
                return default
            return found

        out = _REF.sub(repl, value)
        if whole and out != "":
            # a value that is only a reference takes the YAML type of what it expands to
            try:
                return yaml.safe_load(out) if not out.startswith(("{", "[")) else out
            except yaml.YAMLError:
                return out
        return out

    def section(self, raw: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problem(path, "must be a mapping")
            return {}
        out: dict[str, Any] = {}
        for key, value in raw.items():
            sub = f"{path}.{key}" if path else str(key)
            if key not in allowed:
                self.problem(sub, f"unknown key (expected one of: {', '.join(allowed)})")
                continue
            out[str(key)] = value
        return out

    def get(
        self,
        data: dict[str, Any],
        path: str,
        key: str,
        kind: Callable[[Any], T | None],
        default: T,
        what: str,
    ) -> T:
        if key not in data:
            return default
        sub = f"{path}.{key}" if path else key
        value = self.substitute(data[key], sub)
        result = kind(value)
        if result is None:
            self.problem(sub, f"must be {what} (got {describe(value)})")
            return default
        return result


def describe(value: Any) -> str:
    if isinstance(value, str):
        return "a string" if len(value) > 40 else repr(value)
    return type(value).__name__


def as_int(lo: int = 0, hi: int | None = None) -> Callable[[Any], int | None]:
    def conv(v: Any) -> int | None:
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            return None
        return v if hi is None or v <= hi else None

    return conv


def as_num(lo: float = 0.0, hi: float | None = None) -> Callable[[Any], float | None]:
    def conv(v: Any) -> float | None:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return None
        f = float(v)
        return f if f >= lo and (hi is None or f <= hi) else None

    return conv


def as_str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def as_bool(v: Any) -> bool | None:
    return v if isinstance(v, bool) else None


def as_choice(*options: str) -> Callable[[Any], str | None]:
    def conv(v: Any) -> str | None:
        return v if isinstance(v, str) and v in options else None

    return conv


def as_globs(v: Any) -> tuple[str, ...] | None:
    if isinstance(v, list) and v and all(isinstance(x, str) and x for x in v):
        return tuple(v)
    return None


def placeholders(text: str, refs: list[tuple[str, str | None]]) -> str:
    def sub(m: re.Match[str]) -> str:
        refs.append((m.group(1), m.group(2)))
        return f"__GATEWAY_ENV_{len(refs) - 1}__"

    return _VAR.sub(sub, text)


def tree_placeholders(raw: Any, refs: list[tuple[str, str | None]]) -> Any:
    if isinstance(raw, str):
        return placeholders(raw, refs)
    if isinstance(raw, dict):
        return {k: tree_placeholders(v, refs) for k, v in raw.items()}
    if isinstance(raw, list):
        return [tree_placeholders(v, refs) for v in raw]
    return raw
