"""Who a request is for and how it is labelled: the user id and tags it is attributed to.

Pure: headers and a decoded body in, an `Attribution` (or `InvalidTags`) out.

User: `x-gateway-user`, else the body's `user` string, else its `safety_identifier` string.
A user id is 1 to `MAX_USER` printable characters, surrounding spaces removed. A header that
does not fit is refused (`InvalidUser`): the client asked for an attribution the gateway
cannot record. A body field that does not fit is not used for attribution (the next source
is tried): the body belongs to the upstream, which may accept what the gateway would not.

Tags: `x-gateway-tags: key=value,key=value` (several such headers are one list, as HTTP
joins them). Keys match `[a-z0-9_.-]{1,32}`, values are 1 to 64 printable characters
(spaces around an item, its key and its value are dropped; a value may hold `=`, never `,`),
at most `MAX_TAGS` items, each key once. Anything else is refused with `InvalidTags`.

The string values of the body's top-level `metadata` object count as tags too, under the
same grammar; an entry that does not fit it (an upper-case key, a 300-character value, a
number) is skipped, never refused, for the same reason as the body's user. On a clash the
header wins (it is the gateway's own channel; metadata is the upstream's field, read along),
and metadata fills only the places the header left free: at most `MAX_TAGS` tags in all,
metadata entries taken in key order.

Both are redacted before they leave this module: a key pasted into a tag is never stored,
logged or put on a span.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

MAX_TAGS = 10
MAX_USER = 128
MAX_KEY = 32
MAX_VALUE = 64
TAG_KEY = re.compile(r"[a-z0-9_.\-]{1,32}")
USER_HEADER = "x-gateway-user"
TAGS_HEADER = "x-gateway-tags"
# longest header worth splitting: MAX_TAGS items of the longest key and value, with spaces
_MAX_HEADER = 4 * MAX_TAGS * (MAX_KEY + MAX_VALUE + 2)


class InvalidTags(ValueError):
    """The tag header does not follow the grammar; the message says how, never echoing it."""


class InvalidUser(ValueError):
    """The user header is not a user id the gateway records."""


@dataclass(frozen=True, slots=True)
class Attribution:
    user: str = ""
    tags: tuple[tuple[str, str], ...] = ()  # sorted by key, each key once

    @property
    def tags_text(self) -> str:
        """The tags as the ledger stores them: canonical JSON (sorted keys, no spaces), or ""
        for none, so that equal tag sets are equal text."""
        if not self.tags:
            return ""
        return orjson.dumps(dict(self.tags), option=orjson.OPT_SORT_KEYS).decode()


NONE = Attribution()


def valid_value(value: str) -> bool:
    return 0 < len(value) <= MAX_VALUE and value.isprintable()


def valid_key(key: str) -> bool:
    return TAG_KEY.fullmatch(key) is not None


def parse_tags(text: str) -> dict[str, str]:
    """`key=value,key=value` as a dict; raises InvalidTags naming the first problem."""
    if len(text) > _MAX_HEADER:
        raise InvalidTags(f"the tag header is longer than {_MAX_HEADER} characters")
    items = text.split(",", MAX_TAGS)  # an 11th piece is enough to know there are too many
    if len(items) > MAX_TAGS:
        raise InvalidTags(f"at most {MAX_TAGS} tags may be sent")
    out: dict[str, str] = {}
    for n, item in enumerate(items, 1):
        key, eq, value = item.partition("=")
        key, value = key.strip(" \t"), value.strip(" \t")
        if not eq:
            raise InvalidTags(f"tag {n} is not key=value")
        if not valid_key(key):
            raise InvalidTags(f"tag {n}: a key is 1 to {MAX_KEY} characters of a-z 0-9 _ . -")
        if not valid_value(value):
            raise InvalidTags(f"tag {n}: a value is 1 to {MAX_VALUE} printable characters")
        if key in out:
            raise InvalidTags(f"tag {n} repeats the key of an earlier one")
        out[key] = value
    return out


def _user(value: object) -> str:
    """A user id as recorded, or "" when `value` is not one."""
    if not isinstance(value, str):
        return ""
    value = value.strip(" \t")
    return value if 0 < len(value) <= MAX_USER and value.isprintable() else ""


def metadata_tags(metadata: object) -> list[tuple[str, str]]:
    """The body's `metadata` entries that are tags, in key order."""
    if not isinstance(metadata, dict):
        return []
    return sorted(
        (k, v.strip(" \t"))
        for k, v in metadata.items()
        if isinstance(k, str) and isinstance(v, str) and valid_key(k) and valid_value(v.strip())
    )


def attribute(
    user_headers: Iterable[str],
    tag_headers: Iterable[str],
    top: Mapping[str, Any],
    redact: Callable[[str], str],
) -> Attribution:
    """A request's attribution from its `x-gateway-user` and `x-gateway-tags` header values
    and its body's top-level fields (by lower-cased name). Raises InvalidUser or InvalidTags
    for a header that breaks the rules above."""
    user = ""
    sent = [v for v in user_headers if v.strip(" \t")]
    if sent:
        user = _user(sent[0]) if len(sent) == 1 else ""
        if not user:
            raise InvalidUser(f"send one user id of 1 to {MAX_USER} printable characters")
    else:
        user = _user(top.get("user")) or _user(top.get("safety_identifier"))
    joined = ",".join(v for v in tag_headers if v.strip(" \t"))
    tags = parse_tags(joined) if joined else {}
    for key, value in metadata_tags(top.get("metadata")):
        if len(tags) >= MAX_TAGS:
            break
        tags.setdefault(key, value)
    if not user and not tags:
        return NONE
    shown: dict[str, str] = {}
    for key, value in tags.items():  # a key redacted to the mark keeps its first value
        shown.setdefault(redact(key), redact(value))
    return Attribution(redact(user) if user else "", tuple(sorted(shown.items())))
