"""The path normaliser: canonical paths pass as they are, everything ambiguous is refused."""

from __future__ import annotations

import posixpath
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway.paths import canonical_path
from gateway.routes import route_of


@pytest.mark.parametrize(
    "target",
    [
        "/v1/responses",
        "/v1/responses/resp_abc123",
        "/v1/responses/resp_abc123/input_items?limit=10&order=asc",
        "/v1/models/ft:gpt-4o-mini:org::abc",
        "/v1/models/llama3.1:8b",
        "/v1/models/my%20model",
        "/healthz",
        "/",
    ],
)
def test_canonical_paths_pass_unchanged(target: str) -> None:
    path, _, query = target.partition("?")
    assert canonical_path(target) == (path, query)


@pytest.mark.parametrize(
    "target",
    [
        "/v1/responses/resp_1/",  # trailing slash
        "//v1/responses/resp_1",  # empty segments
        "/v1/responses//resp_1",
        "/v1/responses/resp_1/input_items/",
        "/v1/responses/resp_1/cancel/",
        "/v1/../admin",  # dot segments, plain and escaped
        "/v1/./models",
        "/v1/%2e%2e/admin",
        "/v1/%2E/models",
        "/v1/responses/..;/admin",  # `;` parameters
        "/v1/responses/resp_1;x=1",
        "/v1/responses/%5C..%5C",  # backslashes, escaped or not
        "/v1/responses\\resp_1",
        "/v1/%252e%252e/admin",  # double escaping
        "/v1/responses%2Fresp_1",  # escaped slash
        "/v1/respons%65s/resp_1",  # escaped letter: reads as another route once decoded
        "/v1/responses/resp%5f1",
        "/v1/responses/%",  # malformed escapes
        "/v1/responses/%4",
        "/v1/responses/%zz",
        "/v1/responses/%00",  # control and non-ASCII bytes
        "/v1/responses/%C0%AE",
        "/v1/responses/é",
        "/v1/responses/a b",
        "/v1/responses/resp_1#frag",
        "/v1/responses?limit=1#frag",  # a fragment after the query is a fragment still
        "http://evil/v1/responses",  # absolute and asterisk forms
        "*",
        "",
        "v1/responses",
    ],
)
def test_ambiguous_paths_are_refused(target: str) -> None:
    assert canonical_path(target) is None


PIECES = [
    "v1", "responses", "resp_1", "cancel", "input_items", "models", "chat", "completions",
    ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "\\", ";", ";x=1", "%3b", "%25",
    "%252e", "%20", "%41", "%7e", "%3A", ":", "@", "~", "a.b", "%", "%g1", "é", "?", "?a=1",
    "#", "&", "=", "'", "(", "*",
]  # fmt: skip


@given(st.lists(st.sampled_from([*PIECES, "/", "/", "/"]), max_size=12))
@settings(max_examples=600, deadline=None)
def test_every_reader_sees_the_same_path(pieces: list[str]) -> None:
    """For any target, an accepted path is the one string that ownership, routing and the
    upstream all read: sending it does not change it, and neither a further decoding nor a
    dot-segment resolution by the upstream can turn it into another route or another id."""
    target = "/" + "".join(pieces)
    found = canonical_path(target)
    if found is None:
        return
    path, query = found
    assert target == f"{path}?{query}" if "?" in target else target == path
    # what the upstream client sends is exactly this path
    assert URL("http://up.example:8080" + path, encoded=True).raw_path == path
    # the upstream cannot read it as something else
    decoded = unquote(path)
    assert posixpath.normpath(path) == path or path == "/"
    assert decoded.count("/") == path.count("/")
    assert not {".", ".."} & set(decoded.split("/"))
    assert "\\" not in decoded and ";" not in decoded and "%" not in decoded
    assert route_of(decoded) == route_of(path)
    if route_of(path).name.startswith("/v1/responses/{id}"):
        # the owner check reads the id the upstream will, or an escaped one that no response
        # id matches, so the check fails closed
        raw_id = path.split("/")[3]
        assert raw_id == decoded.split("/")[3] or "%" in raw_id
