"""How a setting's value is checked and how a problem with it is worded: the value types the
settings models are built from (`gateway.settings`), `Secret`, and the base of every model.

Each leaf value says what it must be (`_must_be`), so an error reads ``must be a port number
from 0 to 65535`` rather than a library's wording; a problem with a secret value never carries
the value for display.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Self, get_args
from urllib.parse import urlsplit

from annotated_types import Ge, Gt, Interval, MinLen
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    GetCoreSchemaHandler,
    ModelWrapValidatorHandler,
    PlainValidator,
    Strict,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError, core_schema

Window = Literal["minute", "hour", "day", "week", "month", "total"]
AuthHeader = Literal["x-api-key", "authorization"]
WebSocketMode = Literal["bridge", "native"]
WINDOWS: tuple[str, ...] = get_args(Window)
AUTH_HEADERS: tuple[str, ...] = get_args(AuthHeader)
ALL_MODELS: tuple[str, ...] = ("*",)

# Error kinds `gateway.config` knows how to word: "invalid" shows the offending value after
# the message, "secret" never does, "rule" is a whole sentence about the place it is reported.
INVALID, SECRET, RULE = "invalid", "secret", "rule"
_SHA256 = re.compile(r"sha256:([0-9a-f]{64})")
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


class Secret:
    """A string that never shows itself in a repr, str or log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('****')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(_to_secret)


class FromEnv(str):
    """A value that was one whole `${VAR}` reference: the variable's text as set.

    `typed` is what YAML makes of that text (`${PORT}` set to "9000" is the number 9000), which
    is what a number, flag or plain string takes. Secrets and team keys take the text itself,
    and a team key given this way is hashed: only a reference may carry a plain key.
    """

    typed: object

    def __new__(cls, text: str, typed: object) -> FromEnv:
        self = super().__new__(cls, text)
        self.typed = typed
        return self


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _problem(
    loc: tuple[str | int, ...], kind: str, message: str, value: object
) -> InitErrorDetails:
    """One problem at `loc`, relative to the model or field being validated."""
    return InitErrorDetails(type=PydanticCustomError(kind, message), loc=loc, input=value)


def _again(e: ErrorDetails) -> InitErrorDetails:
    """An error pydantic found, to be raised again together with others."""
    return _problem(e["loc"], e["type"], e["msg"], e["input"])


def _fail(title: str, problems: Iterable[InitErrorDetails]) -> ValidationError:
    return ValidationError.from_exception_data(title, list(problems))


def _must_be(what: str, *, secret: bool = False) -> WrapValidator:
    """Whatever is wrong with the value, one problem: ``must be <what>``."""
    kind = SECRET if secret else INVALID

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if isinstance(value, FromEnv) and not secret:
            value = value.typed
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(kind, f"must be {what}") from None

    return WrapValidator(check)


def _to_secret(value: Any) -> Secret:
    if isinstance(value, Secret):
        return value
    if isinstance(value, str):
        return Secret(str(value))  # str(): a FromEnv's plain text
    raise PydanticCustomError(SECRET, "must be a string")


def _filled(value: Secret) -> Secret:
    if not value.get():
        raise PydanticCustomError(SECRET, "must not be empty")
    return value


def _not_empty(items: tuple[Any, ...]) -> tuple[Any, ...]:
    # after the items: an empty list is one problem, a list of wrong items is the items' problems
    if not items:
        raise PydanticCustomError(RULE, "must not be empty")
    return items


def _secret_or_none(value: Any) -> Secret | None:
    return None if value is None or value == "" else _to_secret(value)


def _none_as_empty(value: Any) -> Any:
    return "" if value is None else value


def _none_as_empty_table(value: Any) -> Any:
    return {} if value is None else value


def _none_as_empty_list(value: Any) -> Any:
    return () if value is None else value


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise PydanticCustomError(INVALID, "must start with http:// or https://")
    return value.rstrip("/")


def _store(value: str) -> str:
    if value != "local" and not value.startswith(("redis://", "rediss://")):
        # a redis URL may carry a password: never shown
        raise PydanticCustomError(SECRET, "must be local or a redis:// URL")
    return value


def _digest(value: Any) -> bytes:
    if isinstance(value, FromEnv):
        if not value:
            raise PydanticCustomError(SECRET, "the referenced variable is empty")
        return hash_key(value)
    if isinstance(value, str) and (m := _SHA256.fullmatch(value)):
        return bytes.fromhex(m.group(1))
    raise PydanticCustomError(
        SECRET,
        "must be 'sha256:<64 lowercase hex>' or an env reference like ${TEAM_KEY} "
        "(plain keys are not allowed in the file)",
    )


LEDGER_SCHEMES = ("postgresql", "postgres")


def _ledger_url(value: str) -> str:
    """Empty (SQLite under state.path) or a PostgreSQL URL with a host; a URL may carry a
    password, so a problem never shows it."""
    if not value:
        return value
    wanted = "empty (SQLite under state.path) or postgresql://user@host:port/database"
    try:
        parts = urlsplit(value)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        raise PydanticCustomError(SECRET, f"must be {wanted}: the port is not a number") from None
    if parts.scheme not in LEDGER_SCHEMES:
        raise PydanticCustomError(
            SECRET, f"must be {wanted} (only a PostgreSQL ledger can be named by URL)"
        )
    if not (parts.hostname or "host=" in parts.query):
        raise PydanticCustomError(SECRET, f"must be {wanted}: the host is missing")
    if not port_ok:
        raise PydanticCustomError(SECRET, f"must be {wanted}: the port is not valid")
    return value


Port = Annotated[int, Strict(), Interval(ge=0, le=65535), _must_be("a port number from 0 to 65535")]
Host = Annotated[str, Strict(), _must_be("a host string")]
Text = Annotated[str, Strict(), _must_be("a string")]
OptionalText = Annotated[str, Strict(), BeforeValidator(_none_as_empty), _must_be("a string")]
Flag = Annotated[bool, Strict(), _must_be("true or false")]
Count = Annotated[int, Strict(), Ge(1), _must_be("a positive integer")]
Seconds = Annotated[
    float, Strict(), AllowInfNan(False), Gt(0), _must_be("a positive number of seconds")
]
Globs = Annotated[
    tuple[Annotated[str, Strict(), MinLen(1)], ...],
    MinLen(1),
    _must_be("a non-empty list of glob patterns"),
]
_USD = Annotated[float, Strict(), AllowInfNan(False), Ge(0)]
Money = Annotated[_USD, _must_be("a non-negative number (USD per million tokens)")]
ApiKey = Annotated[Secret, AfterValidator(_filled), _must_be("a non-empty string", secret=True)]
KeyDigest = Annotated[bytes, PlainValidator(_digest)]


class _Schema(BaseModel):
    """Frozen, no unknown keys; an empty section takes every default; rules report alongside."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="wrap")
    @classmethod
    def _validate(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        if data is None:
            data = {}  # `listen:` with nothing under it
        data, found = cls._prepare(data)
        try:
            model = handler(data)
        except ValidationError as e:
            raise _fail(cls.__name__, [*map(cls._reword, e.errors()), *found]) from None
        if found:
            raise _fail(cls.__name__, found)
        return model

    @classmethod
    def _prepare(cls, data: Any) -> tuple[Any, list[InitErrorDetails]]:
        """The input as the fields take it, and the problems of rules on the input as a whole."""
        return data, []

    @classmethod
    def _file_keys(cls) -> list[str]:
        return [f.alias or n for n, f in cls.model_fields.items() if n != "name"]

    @classmethod
    def _reword(cls, e: ErrorDetails) -> InitErrorDetails:
        """This model's own unknown and missing keys, said with what the model takes."""
        if len(e["loc"]) != 1:
            return _again(e)
        if e["type"] in ("extra_forbidden", "invalid_key"):
            keys = ", ".join(cls._file_keys())
            return _problem(e["loc"], RULE, f"unknown key (expected one of: {keys})", None)
        if e["type"] == "missing":
            field = next(
                (f for n, f in cls.model_fields.items() if e["loc"][0] in (n, f.alias)), None
            )
            what = f": {field.description}" if field is not None and field.description else ""
            return _problem(e["loc"], RULE, f"is required{what}", None)
        return _again(e)
