"""How many tokens a request may cost at most, from its body. Pure functions.

An upstream honours whichever output cap it knows, so the reservation takes the largest cap
the body carries under any name an OpenAI-compatible API accepts; reading only one name let a
request reserve 1 output token and spend 2,000.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# every name under which a Responses or Chat Completions upstream reads an output cap
OUTPUT_CAPS = ("max_output_tokens", "max_completion_tokens", "max_tokens")


class InvalidValue(ValueError):
    """A field the estimate depends on holds something other than a positive integer."""

    def __init__(self, param: str) -> None:
        super().__init__(f"'{param}' must be a positive integer.")
        self.param = param


def _positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None  # absent, or an explicit null: the field is not set
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidValue(name)
    return value


def output_tokens(body: Mapping[str, Any], default: int) -> int:
    """The most output tokens the request can produce: its largest cap (or `default`), times
    the completions it asks for (`n`, or `best_of` of the legacy Completions API, which are
    generated and billed though only `n` come back). Raises InvalidValue for any of those
    fields that is not a positive integer. `body` maps lower-cased field names."""
    caps = [c for c in (_positive_int(body, name) for name in OUTPUT_CAPS) if c is not None]
    choices = max(_positive_int(body, "n") or 1, _positive_int(body, "best_of") or 1)
    return (max(caps) if caps else default) * choices


def input_tokens(body_bytes: int) -> int:
    """A cheap upper estimate of the input tokens: one per four bytes of body, rounded up."""
    return -(-body_bytes // 4)
