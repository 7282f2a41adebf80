"""The attribution rules: the tag grammar, where the user id comes from, what metadata adds
and what wins on a clash. Pure: no server."""

from __future__ import annotations

import string

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.attribution import (
    MAX_TAGS,
    Attribution,
    InvalidTags,
    InvalidUser,
    attribute,
    parse_tags,
)
from gateway.redact import MARK, Redactor

KEYS = st.text(alphabet=string.ascii_lowercase + string.digits + "_.-", min_size=1, max_size=32)
# printable, no comma (the separator), not only spaces (stripped to nothing)
VALUES = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters=","),
    min_size=1,
    max_size=64,
).filter(lambda v: v.strip(" \t") != "" and v.isprintable())


def plain(text: str) -> str:
    return text


def attr(
    users: list[str] | None = None, tags: list[str] | None = None, **top: object
) -> Attribution:
    return attribute(users or [], tags or [], top, plain)


@given(st.dictionaries(KEYS, VALUES, min_size=1, max_size=MAX_TAGS))
def test_any_well_formed_header_parses_back_to_its_tags(tags: dict[str, str]) -> None:
    header = ",".join(f"{k}={v}" for k, v in tags.items())
    assert parse_tags(header) == {k: v.strip(" \t") for k, v in tags.items()}


@given(st.dictionaries(KEYS, VALUES, min_size=MAX_TAGS + 1, max_size=MAX_TAGS + 5))
def test_more_than_ten_tags_are_refused(tags: dict[str, str]) -> None:
    with pytest.raises(InvalidTags, match="at most 10"):
        parse_tags(",".join(f"{k}={v}" for k, v in tags.items()))


@given(KEYS, st.text(min_size=1, max_size=40))
def test_a_key_outside_the_grammar_is_refused(good: str, bad: str) -> None:
    key = good + bad
    if len(key) <= 32 and all(c in string.ascii_lowercase + string.digits + "_.-" for c in key):
        return
    if "," in key or "=" in key or key.strip(" \t") != key:
        return  # splits or strips differently: another test's case
    with pytest.raises(InvalidTags):
        parse_tags(f"{key}=v")


@pytest.mark.parametrize(
    "header",
    [
        "env",  # no value
        "env=",  # empty value
        "=prod",  # empty key
        "Env=prod",  # upper case
        "env=prod,",  # an empty item
        ",env=prod",
        "env=prod,env=dev",  # a key twice
        "e nv=prod",
        "env=pr\x00od",  # not printable
        "env=pr\x1bod",
        "env=\u2028",
        "env=" + "x" * 65,
        "k" * 33 + "=v",
    ],
)
def test_malformed_headers_are_refused(header: str) -> None:
    with pytest.raises(InvalidTags):
        parse_tags(header)


def test_refusal_messages_never_echo_the_header() -> None:
    with pytest.raises(InvalidTags) as e:
        parse_tags("env=1,sk-secretsecretsecret=1,sk-secretsecretsecret=2")
    assert "secret" not in str(e.value)
    with pytest.raises(InvalidTags) as e:
        parse_tags("sk-secretsecretsecretsecretsecretsecret=1")
    assert "secret" not in str(e.value)


def test_a_huge_header_is_refused_without_being_split() -> None:
    with pytest.raises(InvalidTags, match="longer than"):
        parse_tags("a=b," * 100_000)


def test_values_may_hold_equals_and_unicode_and_spaces_are_trimmed() -> None:
    assert parse_tags(" env = a=b , who=Zoë 🙂 ") == {"env": "a=b", "who": "Zoë 🙂"}


def test_several_tag_headers_are_one_list() -> None:
    assert attr(tags=["a=1", "b=2"]).tags == (("a", "1"), ("b", "2"))
    with pytest.raises(InvalidTags):
        attr(tags=["a=1", "a=2"])


def test_user_comes_from_the_header_then_user_then_safety_identifier() -> None:
    assert attr(["alice"], user="bob", safety_identifier="carol").user == "alice"
    assert attr(user="bob", safety_identifier="carol").user == "bob"
    assert attr(safety_identifier="carol").user == "carol"
    assert attr(user=7, safety_identifier="carol").user == "carol"
    assert attr().user == ""


@pytest.mark.parametrize("bad", ["x" * 129, "a\x00b", "a\nb", "\ud800"])
def test_a_bad_user_header_is_refused_and_a_bad_body_user_skipped(bad: str) -> None:
    with pytest.raises(InvalidUser):
        attr([bad])
    assert attr(user=bad).user == ""
    assert attr(user=bad, safety_identifier="ok").user == "ok"


def test_two_user_headers_are_refused() -> None:
    with pytest.raises(InvalidUser):
        attr(["a", "b"])


def test_metadata_string_values_count_as_tags_and_the_header_wins() -> None:
    got = attr(tags=["env=prod"], metadata={"env": "dev", "app": "web", "n": 3, "Up": "x"})
    assert got.tags == (("app", "web"), ("env", "prod"))


def test_metadata_fills_only_the_places_the_header_left() -> None:
    header = ",".join(f"h{i}=v" for i in range(8))
    meta = {f"m{i}": "v" for i in range(16)}  # the Responses API allows 16 entries
    got = attr(tags=[header], metadata=meta)
    assert len(got.tags) == MAX_TAGS
    assert [k for k, _ in got.tags if k.startswith("m")] == ["m0", "m1"]  # in key order


def test_metadata_never_makes_a_request_fail() -> None:
    meta = {"K": "v", "k": "x" * 500, "ok": "\x00", "fine": "yes", "x" * 40: "v"}
    assert attr(metadata=meta).tags == (("fine", "yes"),)
    assert attr(metadata=["not", "an", "object"]).tags == ()


def test_tags_are_stored_as_canonical_json() -> None:
    got = attr(tags=["z=1,a=é"])
    assert got.tags_text == '{"a":"é","z":"1"}'
    assert orjson.loads(got.tags_text) == {"a": "é", "z": "1"}
    assert Attribution().tags_text == ""


def test_keys_in_a_user_or_tag_are_redacted() -> None:
    key = "sk-" + "a1B2" * 10
    redact = Redactor([key])
    got = attribute([key], [f"k={key[:60]}"], {"metadata": {"m": f"x {key}"}}, redact)
    assert got.user == MARK
    assert dict(got.tags) == {"k": MARK, "m": f"x {MARK}"}
