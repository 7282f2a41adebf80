"""The one reading of a request's path: canonical or refused. Pure, no I/O.

Ownership checks, routing and the URL sent upstream all use the string returned here, so a
path cannot mean one thing to the gateway and another to an upstream that normalises it
(collapses empty segments, drops a trailing slash or `;` parameters, resolves dot segments,
treats `\\` as `/`, or decodes percent-escapes once more). Anything that some server could
read as a different path is refused instead of normalised: a client that sends such a path
is either broken or probing.
"""

from __future__ import annotations

import re

# RFC 3986 pchar without `;` (path parameters, which Java servers strip); `%` only as a
# well-formed escape, and only of a character that cannot change the path (below)
_SEGMENT = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,=:@]|%[0-9A-Fa-f]{2})+")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# escaped characters whose meaning does not depend on who decodes them: never a letter,
# digit, dot, slash, backslash, percent, `;`, `?`, `#`, control or non-ASCII byte
_SAFE_ESCAPED = frozenset(" !\"$&'()*+,:<=>@[]^`{|}")


def canonical_path(target: str) -> tuple[str, str] | None:
    """Split a raw request target into (path, query) if its path is canonical, else None.

    Canonical: origin-form (starts with `/`), no fragment, every segment non-empty (no `//`,
    no trailing slash), no `.` or `..` segment, only RFC 3986 segment characters without
    `;`, and percent-escapes only of characters listed in `_SAFE_ESCAPED`. The path is
    returned as sent (still escaped), the query raw.
    """
    path, _, query = target.partition("?")
    if not path.startswith("/") or "#" in target:
        return None
    if path == "/":
        return path, query
    for segment in path[1:].split("/"):
        if not _segment_ok(segment):
            return None
    return path, query


def _segment_ok(segment: str) -> bool:
    # the pattern refuses an empty segment, a stray or malformed `%` and any other character
    return (
        segment not in (".", "..")
        and _SEGMENT.fullmatch(segment) is not None
        and all(chr(int(h, 16)) in _SAFE_ESCAPED for h in _ESCAPE.findall(segment))
    )
