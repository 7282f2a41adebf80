"""The gateway's settings, declared once as a schema: frozen, validated pydantic models.

Every default, constraint and accepted form of the configuration is written here, once; the
models are what the rest of the gateway reads. `gateway.config` reads the YAML, substitutes
`${VAR}` from the environment and turns validation errors into ``key.path: what is wrong`` lines.

Why pydantic (v2): it collects *every* validation error, with its location and its input, in
one pass (msgspec stops at the first), which `gateway check-config` needs to list every problem
of a file at once; and it gives frozen models whose defaults and constraints are declared once.

Each leaf value says what it must be (`_must_be`), so an error reads ``must be a port number
from 0 to 65535`` rather than a library's wording. Rules across fields are checked alongside
field validation, so they are reported together with the other problems, not after them.
Secrets are held in `Secret`, whose repr never shows the value, and a problem with a secret
value never carries the value for display.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from annotated_types import Ge, Interval, MinLen
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BeforeValidator,
    Field,
    PlainValidator,
    Strict,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from gateway.schema import (
    _USD,
    _WILDCARD_HOSTS,
    ALL_MODELS,
    AUTH_HEADERS,
    INVALID,
    RULE,
    SECRET,
    WINDOWS,
    ApiKey,
    AuthHeader,
    Count,
    Flag,
    Globs,
    Host,
    KeyDigest,
    Money,
    OptionalText,
    Port,
    Seconds,
    Secret,
    Text,
    WebSocketMode,
    Window,
    _again,
    _fail,
    _http_url,
    _ledger_url,
    _must_be,
    _none_as_empty,
    _none_as_empty_list,
    _none_as_empty_table,
    _not_empty,
    _problem,
    _Schema,
    _secret_or_none,
    _store,
)


def _model_map(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise PydanticCustomError(
            RULE, "must be a mapping of model name -> the name this upstream knows it by"
        )
    for k, v in value.items():
        if not isinstance(k, str) or not k or not isinstance(v, str) or not v:
            raise PydanticCustomError(
                RULE, f"{str(k)[:40]!r} must map to a non-empty model name (a string)"
            )
    return tuple(value.items())  # hashable, as every setting is


class Listen(_Schema):
    host: Host = "127.0.0.1"
    port: Port = 8080


class Admin(_Schema):
    host: Host = "127.0.0.1"
    port: Port = 9464
    key: Annotated[
        Secret | None, PlainValidator(_secret_or_none), _must_be("a string", secret=True)
    ] = None


class Limits(_Schema):
    max_body_bytes: Count = 10 * 1024 * 1024
    default_max_output_tokens: Count = 4096
    # a graceful stop waits this long for requests in flight
    drain_timeout: Annotated[
        float, Strict(), AllowInfNan(False), Ge(0), _must_be("a number of seconds")
    ] = 30.0
    header_timeout: Seconds = 10.0  # from a request head's first byte to its end
    body_timeout: Seconds = 30.0  # longest pause between chunks of a request body
    max_connections: Count = 10000  # open client connections; more wait in the listen backlog
    # orjson encodes at most 254 levels, and the gateway re-encodes request bodies
    max_json_depth: Annotated[
        int, Strict(), Interval(ge=1, le=200), _must_be("an integer from 1 to 200")
    ] = 64
    # a WebSocket connection older than this is closed once its current response has ended
    max_websocket_seconds: Seconds = 3600.0


class Timeouts(_Schema):
    connect: Seconds = 5.0
    first_byte: Seconds = 120.0
    idle: Seconds = 60.0


class Upstream(_Schema):
    name: str
    base_url: Annotated[str, Strict(), _must_be("a URL string"), AfterValidator(_http_url)] = Field(
        description="the upstream's URL, http:// or https://"
    )
    api_keys: Annotated[tuple[ApiKey, ...], AfterValidator(_not_empty)] = ()
    auth_header: Annotated[AuthHeader, _must_be(" or ".join(AUTH_HEADERS))] = "authorization"
    models: Globs = ALL_MODELS
    # the name this upstream knows a model by, where it differs: the body sent is rewritten
    model_map: Annotated[tuple[tuple[str, str], ...], PlainValidator(_model_map)] = ()
    timeouts: Timeouts = Timeouts()
    # WebSocket mode: bridge (one streamed POST per response) | native (its own WebSocket)
    websocket: Annotated[WebSocketMode, _must_be("bridge or native")] = "bridge"

    def upstream_model(self, model: str) -> str | None:
        """The name this upstream knows `model` by, when its `model_map` renames it."""
        for name, there in self.model_map:
            if name == model:
                return there
        return None

    @classmethod
    def _file_keys(cls) -> list[str]:
        keys = super()._file_keys()
        keys.insert(keys.index("api_keys"), "api_key")
        return keys

    @classmethod
    def _prepare(cls, data: Any) -> tuple[Any, list[InitErrorDetails]]:
        """`api_key: K` is `api_keys: [K]`; an empty one (`${KEY:-}`) is no key."""
        if not isinstance(data, Mapping) or "api_key" not in data:
            return data, []
        data = dict(data)
        key = data.pop("api_key")
        if "api_keys" in data:
            return data, [_problem((), RULE, "set api_key or api_keys, not both", None)]
        if not isinstance(key, str):
            return data, [_problem(("api_key",), SECRET, "must be a string", None)]
        if key:
            data["api_keys"] = (key,)
        return data, []


class Route(_Schema):
    """Requests for `models` go to `upstreams`, tried in this order."""

    models: Globs = Field(description="a non-empty list of glob patterns")
    upstreams: Annotated[
        tuple[Annotated[str, Strict(), MinLen(1)], ...],
        MinLen(1),
        _must_be("a non-empty list of upstream names"),
    ] = Field(description="a non-empty list of upstream names")


UNITS = ("tokens", "usd", "requests")  # what a budget counts


class BudgetRule(_Schema):
    """A limit over one calendar window, in exactly one unit: `tokens`, `usd`, or `requests`
    (each request admitted to an upstream call counts 1)."""

    per: Annotated[Window, _must_be(" | ".join(WINDOWS))] = Field(description=" | ".join(WINDOWS))
    tokens: Annotated[Annotated[int, Strict(), Ge(1)] | None, _must_be("a positive integer")] = None
    usd: Annotated[_USD | None, _must_be("a non-negative number")] = None
    requests: Annotated[Annotated[int, Strict(), Ge(1)] | None, _must_be("a positive integer")] = (
        None
    )

    @classmethod
    def _prepare(cls, data: Any) -> tuple[Any, list[InitErrorDetails]]:
        if isinstance(data, Mapping) and sum(data.get(u) is not None for u in UNITS) != 1:
            return data, [_problem((), RULE, "set exactly one of tokens, usd or requests", None)]
        return data, []

    @property
    def unit(self) -> str:
        """tokens | usd | requests"""
        if self.tokens is not None:
            return "tokens"
        return "usd" if self.usd is not None else "requests"

    @property
    def limit(self) -> float:
        value = self.tokens if self.tokens is not None else self.usd
        return float(value if value is not None else self.requests or 0)


class Team(_Schema):
    name: str
    # SHA-256 digests of the team's client keys; in the file: `keys`
    key_digests: Annotated[tuple[KeyDigest, ...], AfterValidator(_not_empty)] = Field(
        alias="keys", description="a non-empty list of client keys"
    )
    models: Globs = ALL_MODELS
    budgets: tuple[BudgetRule, ...] = ()

    @field_validator("budgets")
    @classmethod
    def _one_per_window_and_unit(cls, budgets: tuple[BudgetRule, ...]) -> tuple[BudgetRule, ...]:
        seen: set[tuple[str, str]] = set()
        for rule in budgets:
            if (rule.per, rule.unit) in seen:
                raise PydanticCustomError(RULE, f"two {rule.unit} budgets per {rule.per}: keep one")
            seen.add((rule.per, rule.unit))
        return budgets


class Price(_Schema):
    input: Money = Field(description="USD per million tokens")
    output: Money = Field(description="USD per million tokens")
    cached_input: Annotated[
        _USD | None, _must_be("a non-negative number (USD per million tokens)")
    ] = None  # None: cached input is priced as input


class Cache(_Schema):
    enabled: Flag = True
    ttl: Seconds = 3600.0
    max_bytes: Count = 256 * 1024 * 1024
    scope: Annotated[Literal["team", "shared"], _must_be("team or shared")] = "team"
    max_entry_bytes: Count = 8 * 1024 * 1024


class State(_Schema):
    store: Annotated[
        str, Strict(), _must_be("local or redis://host:port/db"), AfterValidator(_store)
    ] = "local"
    # every Redis key the gateway writes starts with it: replicas sharing it share state
    prefix: Text = "gw:"
    # Redis unreachable: a generation request of a team with budgets is refused (503
    # state_unavailable) or served without budget checks
    on_unavailable: Annotated[Literal["reject", "admit"], _must_be("reject or admit")] = "reject"
    path: Text = "./gateway-state"


class LedgerSettings(_Schema):
    # empty: SQLite under state.path; postgresql://... (or postgres://): one table for replicas
    url: Annotated[
        str,
        Strict(),
        BeforeValidator(_none_as_empty),
        _must_be("a string", secret=True),
        AfterValidator(_ledger_url),
    ] = ""
    flush_interval: Annotated[
        float,
        Strict(),
        AllowInfNan(False),
        Ge(0.01),
        _must_be("a number of seconds, at least 0.01"),
    ] = 0.5


class Traces(_Schema):
    endpoint: OptionalText = ""  # empty: $OTEL_EXPORTER_OTLP_ENDPOINT (see gateway.config) or off
    sample_ratio: Annotated[
        float,
        Strict(),
        AllowInfNan(False),
        Interval(ge=0, le=1),
        _must_be("a number between 0 and 1"),
    ] = 1.0
    capture_content: Flag = False


def _patterns(value: tuple[str, ...]) -> tuple[str, ...]:
    """Each `capture.redact` entry must compile: a bad one is named by its place and the
    regex engine's reason (a pattern is the operator's, never a secret)."""
    for i, pattern in enumerate(value):
        try:
            re.compile(pattern)
        except re.error as e:
            raise PydanticCustomError(
                RULE, f"entry {i} is not a valid regular expression: {e}"
            ) from None
        if re.fullmatch(pattern, ""):  # would mark every gap between characters
            raise PydanticCustomError(RULE, f"entry {i} matches the empty string")
    return value


def _trace_url(value: str) -> str:
    if value and "{trace_id}" not in value:
        raise PydanticCustomError(INVALID, "must be empty or a URL template with {trace_id}")
    return value


class Capture(_Schema):
    """Which requests keep their bodies for debugging, and for how long (section 11)."""

    enabled: Flag = False
    sample_ratio: Annotated[
        float,
        Strict(),
        AllowInfNan(False),
        Interval(ge=0, le=1),
        _must_be("a number between 0 and 1"),
    ] = 0.0
    errors: Flag = True  # also every request that ended in an error
    teams: Globs = ("*",)
    max_body_bytes: Count = 1024 * 1024  # per direction
    retention: Seconds = 7 * 24 * 3600.0
    redact: Annotated[
        tuple[Annotated[str, Strict(), MinLen(1)], ...],
        BeforeValidator(_none_as_empty_list),
        _must_be("a list of regular expressions"),
        AfterValidator(_patterns),
    ] = ()


class Logs(_Schema):
    level: Annotated[
        Literal["debug", "info", "warning", "error"], _must_be("debug | info | warning | error")
    ] = "info"
    format: Annotated[Literal["json", "console"], _must_be("json or console")] = "json"


RETRY_CONDITIONS = ("connect_error", "timeout")  # and HTTP statuses 400..599


def _retry_condition(item: object) -> bool:
    if isinstance(item, str):
        return item in RETRY_CONDITIONS
    return isinstance(item, int) and not isinstance(item, bool) and 400 <= item <= 599


def _retry_on(value: Any) -> tuple[str | int, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise PydanticCustomError(
            RULE, "must be a non-empty list of connect_error, timeout or HTTP statuses (400-599)"
        )
    out: list[str | int] = []
    for item in value:
        if _retry_condition(item):
            out.append(item)
        else:
            shown = repr(item)[:40]
            raise PydanticCustomError(
                RULE, f"{shown} is not connect_error, timeout or an HTTP status from 400 to 599"
            )
    return tuple(out)


class Backoff(_Schema):
    base: Seconds = 0.1
    max: Seconds = 2.0


class Retries(_Schema):
    """Without this section a request makes one attempt."""

    attempts: Annotated[
        int, Strict(), Interval(ge=1, le=10), _must_be("an integer from 1 to 10")
    ] = 3  # per request over keys and upstreams, the first included
    backoff: Backoff = Backoff()
    on: Annotated[tuple[str | int, ...], PlainValidator(_retry_on)] = (
        "connect_error",
        "timeout",
        429,
        500,
        502,
        503,
        504,
    )
    # over the last 10 s, retries <= budget x first attempts + 3
    budget: Annotated[float, Strict(), Interval(ge=0, le=10), _must_be("a number from 0 to 10")] = (
        0.2
    )

    @classmethod
    def _prepare(cls, data: Any) -> tuple[Any, list[InitErrorDetails]]:
        """YAML 1.1 reads a bare `on:` key as true."""
        if isinstance(data, Mapping) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data, []


class Health(_Schema):
    eject_after: Count = 5  # failures in a row that eject a key or an upstream
    eject_for: Seconds = 30.0  # doubling for each ejection in a row, at most 300


class Telemetry(_Schema):
    service_name: Text = "llm-gateway"
    traces: Traces = Traces()
    logs: Logs = Logs()
    max_model_labels: Count = 100
    # the inspector links each request to its trace: e.g. http://jaeger:16686/trace/{trace_id}
    trace_url: Annotated[
        str,
        Strict(),
        BeforeValidator(_none_as_empty),
        _must_be("a string"),
        AfterValidator(_trace_url),
    ] = ""


# the team of requests without a valid key, in the ledger, the metrics and the log line
UNKNOWN_TEAM = "unknown"


def _by_name(value: Any, model: type[_Schema], what: str) -> tuple[Any, list[InitErrorDetails]]:
    """The file names upstreams and teams by key (`teams: {search: {...}}`), in order; code
    passes `Upstream` and `Team` objects. At least one of each is required."""
    if value is None or (isinstance(value, Mapping | list | tuple) and not value):
        return (), [_problem((), RULE, f"at least one {what} is required", None)]
    if isinstance(value, list | tuple) and all(isinstance(v, model) for v in value):
        return value, []
    if not isinstance(value, Mapping):
        return (), [_problem((), INVALID, f"must be a mapping of {what} name -> settings", value)]
    items: list[Any] = []
    found: list[InitErrorDetails] = []
    for i, (name, body) in enumerate(value.items()):
        if isinstance(body, Mapping) and "name" in body:
            keys = ", ".join(model._file_keys())
            found.append(
                _problem((i, "name"), RULE, f"unknown key (expected one of: {keys})", None)
            )
        if model is Team and str(name).strip().casefold() == UNKNOWN_TEAM:
            found.append(
                _problem(
                    (i,),
                    RULE,
                    f"the team name {UNKNOWN_TEAM!r} is reserved for requests without a valid "
                    "key; choose another",
                    None,
                )
            )
        if body is None or isinstance(body, Mapping):  # `name:` alone takes every default
            items.append({**(body or {}), "name": str(name)})
        else:
            items.append(body)  # reported: not a mapping
    return items, found


class Settings(_Schema):
    # `listen` before `admin` and `prices` before `teams`: rules on the later read the earlier
    listen: Listen = Listen()
    admin: Admin = Admin()
    limits: Limits = Limits()
    prices: Annotated[Mapping[str, Price], BeforeValidator(_none_as_empty_table)] = {}
    upstreams: tuple[Upstream, ...]  # tried in file order
    # optional: without routes, the first upstream whose models match serves a model
    routes: Annotated[tuple[Route, ...], BeforeValidator(_none_as_empty_list)] = ()
    retries: Retries | None = None  # None: one attempt per request
    health: Health = Health()
    teams: tuple[Team, ...]
    cache: Cache = Cache()
    state: State = State()
    ledger: LedgerSettings = LedgerSettings()
    telemetry: Telemetry = Telemetry()
    capture: Capture = Capture()

    def secrets(self) -> tuple[str, ...]:
        """Every upstream key (and the admin key): what must be masked wherever it could echo."""
        out = [k.get() for u in self.upstreams for k in u.api_keys if k.get()]
        if self.admin.key is not None and self.admin.key.get():
            out.append(self.admin.key.get())
        return tuple(out)

    @classmethod
    def _prepare(cls, data: Any) -> tuple[Any, list[InitErrorDetails]]:
        if not isinstance(data, Mapping):
            return data, []
        data = dict(data)
        found: list[InitErrorDetails] = []
        for field, model, what in (("upstreams", Upstream, "upstream"), ("teams", Team, "team")):
            data[field], problems = _by_name(data.get(field), model, what)
            found += [{**p, "loc": (field, *p["loc"])} for p in problems]
        return data, found

    @field_validator("admin")
    @classmethod
    def _not_on_listen_address(cls, admin: Admin, info: ValidationInfo) -> Admin:
        listen = info.data.get("listen")
        if (
            isinstance(listen, Listen)
            and admin.port != 0  # 0: any free port
            and admin.port == listen.port
            and (admin.host == listen.host or {admin.host, listen.host} & _WILDCARD_HOSTS)
        ):
            where = f"{listen.host}:{listen.port}"
            raise _fail(
                "Admin",
                [
                    _problem(
                        ("port",),
                        RULE,
                        f"the admin server cannot share the client address {where}"
                        " (listen); choose another port",
                        admin.port,
                    )
                ],
            )
        return admin

    @field_validator("routes")
    @classmethod
    def _routes_name_upstreams(
        cls, routes: tuple[Route, ...], info: ValidationInfo
    ) -> tuple[Route, ...]:
        upstreams = info.data.get("upstreams")
        if upstreams is None:  # wrong themselves: reported there
            return routes
        known = {u.name for u in upstreams}
        found: list[InitErrorDetails] = []
        for i, route in enumerate(routes):
            for j, name in enumerate(route.upstreams):
                if name not in known:
                    listed = ", ".join(sorted(known))
                    found.append(
                        _problem(
                            (i, "upstreams", j),
                            RULE,
                            f"no upstream named {name!r} (upstreams: {listed})",
                            None,
                        )
                    )
                elif name in route.upstreams[:j]:
                    found.append(
                        _problem((i, "upstreams", j), RULE, f"{name!r} is listed twice", None)
                    )
        if found:
            raise _fail("Route", found)
        return routes

    @field_validator("teams", mode="wrap")
    @classmethod
    def _across_teams(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> tuple[Team, ...]:
        found: list[InitErrorDetails] = []
        if info.data.get("prices") == {}:  # an empty table; a wrong one is reported as such
            # from the input: reported even when another field of the team is wrong
            for i, team in enumerate(value):
                if _has_usd_budget(team):
                    found.append(
                        _problem((i, "budgets"), RULE, "a usd budget needs a prices table", None)
                    )
        try:
            teams: tuple[Team, ...] = handler(value)
        except ValidationError as e:
            raise _fail("Team", [*map(_again, e.errors()), *found]) from None
        owner: dict[bytes, str] = {}
        for i, team in enumerate(teams):
            for digest in team.key_digests:
                other = owner.setdefault(digest, team.name)
                if other != team.name:
                    found.append(
                        _problem((i, "keys"), RULE, f"a key is also listed for team {other}", None)
                    )
        if found:
            raise _fail("Team", found)
        return teams


def _has_usd_budget(team: Any) -> bool:
    if isinstance(team, Team):
        return any(b.usd is not None for b in team.budgets)
    budgets = team.get("budgets") if isinstance(team, Mapping) else None
    return isinstance(budgets, list | tuple) and any(
        b.usd is not None
        if isinstance(b, BudgetRule)
        else isinstance(b, Mapping) and b.get("usd") is not None
        for b in budgets
    )
