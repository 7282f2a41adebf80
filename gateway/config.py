"""YAML configuration -> one frozen, validated `Settings`; `${VAR}` substitution.

This is the only module that reads `os.environ` for configuration. Every problem found is
reported as ``PATH: key.path: what is wrong``; secrets never appear in a repr or an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from gateway.config_reader import (
    SHA256,
    WHOLE_VAR,
    Reader,
    as_bool,
    as_choice,
    as_globs,
    as_int,
    as_num,
    as_str,
    placeholders,
    tree_placeholders,
)
from gateway.settings import (
    ALL_MODELS,
    AUTH_HEADERS,
    WINDOWS,
    Admin,
    BudgetRule,
    Cache,
    LedgerSettings,
    Limits,
    Listen,
    Logs,
    Price,
    Secret,
    Settings,
    State,
    Team,
    Telemetry,
    Timeouts,
    Traces,
    Upstream,
    hash_key,
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


class ConfigError(Exception):
    """Raised with every problem found; `problems` holds ``key.path: what is wrong`` lines."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def _read_upstream(r: Reader, name: str, raw: Any) -> Upstream | None:
    path = f"upstreams.{name}"
    d = r.section(
        raw, path, ("base_url", "api_key", "api_keys", "auth_header", "models", "timeouts")
    )
    if not d and raw is not None and not isinstance(raw, dict):
        return None
    base_url = r.get(d, path, "base_url", as_str, "", "a URL string")
    if not base_url:
        r.problem(f"{path}.base_url", "is required")
    elif not base_url.startswith(("http://", "https://")):
        r.problem(f"{path}.base_url", "must start with http:// or https://")
    keys: list[Secret] = []
    if "api_key" in d and "api_keys" in d:
        r.problem(path, "set api_key or api_keys, not both")
    if "api_key" in d:
        value = r.substitute(d["api_key"], f"{path}.api_key")
        if not isinstance(value, str):
            r.problem(f"{path}.api_key", "must be a string")
        elif value:
            keys.append(Secret(value))
    if "api_keys" in d:
        raw_keys = d["api_keys"]
        if not isinstance(raw_keys, list) or not raw_keys:
            r.problem(f"{path}.api_keys", "must be a non-empty list of strings")
        else:
            for i, item in enumerate(raw_keys):
                value = r.substitute(item, f"{path}.api_keys[{i}]")
                if not isinstance(value, str) or not value:
                    r.problem(f"{path}.api_keys[{i}]", "must be a non-empty string")
                else:
                    keys.append(Secret(value))
    auth_header = r.get(
        d,
        path,
        "auth_header",
        as_choice(*AUTH_HEADERS),
        "authorization",
        "x-api-key or authorization",
    )
    models = r.get(d, path, "models", as_globs, ALL_MODELS, "a non-empty list of glob patterns")
    tpath = f"{path}.timeouts"
    t = r.section(d.get("timeouts"), tpath, ("connect", "first_byte", "idle"))
    timeouts = Timeouts(
        connect=r.get(t, tpath, "connect", as_num(0.001), 5.0, "a positive number of seconds"),
        first_byte=r.get(
            t, tpath, "first_byte", as_num(0.001), 120.0, "a positive number of seconds"
        ),
        idle=r.get(t, tpath, "idle", as_num(0.001), 60.0, "a positive number of seconds"),
    )
    return Upstream(
        name=name,
        base_url=base_url.rstrip("/"),
        api_keys=tuple(keys),
        auth_header=auth_header,
        models=models,
        timeouts=timeouts,
    )


def _read_team(r: Reader, name: str, raw: Any) -> Team:
    path = f"teams.{name}"
    d = r.section(raw, path, ("keys", "models", "budgets"))
    digests: list[bytes] = []
    raw_keys = d.get("keys")
    if not isinstance(raw_keys, list) or not raw_keys:
        r.problem(f"{path}.keys", "is required: a non-empty list of client keys")
    else:
        for i, item in enumerate(raw_keys):
            kp = f"{path}.keys[{i}]"
            if isinstance(item, str) and WHOLE_VAR.match(item):
                value = r.substitute(item, kp)
                if isinstance(value, str | int) and str(value):
                    digests.append(hash_key(str(value)))
                elif not r.problems or not r.problems[-1].startswith(kp):
                    r.problem(kp, "the referenced variable is empty")
            elif isinstance(item, str) and (m := SHA256.match(item)):
                digests.append(bytes.fromhex(m.group(1)))
            else:
                r.problem(
                    kp,
                    "must be 'sha256:<64 lowercase hex>' or an env reference "
                    "like ${TEAM_KEY} (plain keys are not allowed in the file)",
                )
    models = r.get(d, path, "models", as_globs, ALL_MODELS, "a non-empty list of glob patterns")
    budgets: list[BudgetRule] = []
    raw_budgets = d.get("budgets", [])
    if not isinstance(raw_budgets, list):
        r.problem(f"{path}.budgets", "must be a list")
        raw_budgets = []
    for i, item in enumerate(raw_budgets):
        bp = f"{path}.budgets[{i}]"
        b = r.section(item, bp, ("tokens", "usd", "per"))
        per = r.get(b, bp, "per", as_choice(*WINDOWS), "", " | ".join(WINDOWS))
        if "per" not in b:
            r.problem(f"{bp}.per", f"is required ({' | '.join(WINDOWS)})")
        tokens = r.get(b, bp, "tokens", as_int(1), 0, "a positive integer")
        usd = r.get(b, bp, "usd", as_num(0.0), -1.0, "a non-negative number")
        if ("tokens" in b) == ("usd" in b):
            r.problem(bp, "set exactly one of tokens or usd")
        elif per:
            budgets.append(
                BudgetRule(
                    per=per,
                    tokens=tokens if "tokens" in b else None,
                    usd=usd if "usd" in b else None,
                )
            )
    seen: set[tuple[str, str]] = set()
    for rule in budgets:
        if (rule.per, rule.unit) in seen:
            r.problem(f"{path}.budgets", f"two {rule.unit} budgets per {rule.per}: keep one")
        seen.add((rule.per, rule.unit))
    return Team(name=name, key_digests=tuple(digests), models=models, budgets=tuple(budgets))


def _read_price(r: Reader, model: str, raw: Any) -> Price | None:
    path = f"prices.{model}"
    d = r.section(raw, path, ("input", "cached_input", "output"))
    for req in ("input", "output"):
        if req not in d:
            r.problem(f"{path}.{req}", "is required (USD per million tokens)")
    money = "a non-negative number (USD per million tokens)"
    inp = r.get(d, path, "input", as_num(0.0), 0.0, money)
    out = r.get(d, path, "output", as_num(0.0), 0.0, money)
    cached = r.get(d, path, "cached_input", as_num(0.0), -1.0, money)
    return Price(input=inp, output=out, cached_input=None if cached < 0 else cached)


def parse(
    raw: Any,
    env: Mapping[str, str],
    source: str = "<config>",
    refs: list[tuple[str, str | None]] | None = None,
) -> Settings:
    """Validate a raw YAML tree into Settings, or raise ConfigError listing every problem."""
    if refs is None:
        refs = []
        raw = tree_placeholders(raw, refs)
    r = Reader(env, refs)
    top = r.section(
        raw,
        "",
        (
            "listen",
            "admin",
            "limits",
            "upstreams",
            "teams",
            "prices",
            "cache",
            "state",
            "ledger",
            "telemetry",
        ),
    )
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(source, r.problems)

    ld = r.section(top.get("listen"), "listen", ("host", "port"))
    listen = Listen(
        host=r.get(ld, "listen", "host", as_str, "127.0.0.1", "a host string"),
        port=r.get(ld, "listen", "port", as_int(0), 8080, "a port number"),
    )
    ad = r.section(top.get("admin"), "admin", ("host", "port", "key"))
    admin_key = r.get(ad, "admin", "key", lambda v: "" if v is None else as_str(v), "", "a string")
    admin = Admin(
        host=r.get(ad, "admin", "host", as_str, "127.0.0.1", "a host string"),
        port=r.get(ad, "admin", "port", as_int(0), 9464, "a port number"),
        key=Secret(admin_key) if admin_key else None,
    )
    lm = r.section(
        top.get("limits"),
        "limits",
        (
            "max_body_bytes",
            "default_max_output_tokens",
            "drain_timeout",
            "header_timeout",
            "body_timeout",
            "max_connections",
            "max_json_depth",
        ),
    )
    limits = Limits(
        max_body_bytes=r.get(
            lm, "limits", "max_body_bytes", as_int(1), 10 * 1024 * 1024, "a positive integer"
        ),
        default_max_output_tokens=r.get(
            lm, "limits", "default_max_output_tokens", as_int(1), 4096, "a positive integer"
        ),
        drain_timeout=r.get(
            lm, "limits", "drain_timeout", as_num(0.0), 30.0, "a number of seconds"
        ),
        header_timeout=r.get(
            lm, "limits", "header_timeout", as_num(0.001), 10.0, "a positive number of seconds"
        ),
        body_timeout=r.get(
            lm, "limits", "body_timeout", as_num(0.001), 30.0, "a positive number of seconds"
        ),
        max_connections=r.get(
            lm, "limits", "max_connections", as_int(1), 10000, "a positive integer"
        ),
        # orjson encodes at most 254 levels, and the gateway re-encodes request bodies
        max_json_depth=r.get(
            lm, "limits", "max_json_depth", as_int(1, 200), 64, "an integer from 1 to 200"
        ),
    )

    upstreams: list[Upstream] = []
    raw_up = top.get("upstreams")
    if not isinstance(raw_up, dict) or not raw_up:
        r.problem("upstreams", "at least one upstream is required")
    else:
        for name, item in raw_up.items():
            up = _read_upstream(r, str(name), item)
            if up is not None:
                upstreams.append(up)

    teams: list[Team] = []
    raw_teams = top.get("teams")
    if not isinstance(raw_teams, dict) or not raw_teams:
        r.problem("teams", "at least one team is required")
    else:
        teams = [_read_team(r, str(name), item) for name, item in raw_teams.items()]
        seen: dict[bytes, str] = {}
        for team in teams:
            for digest in team.key_digests:
                if digest in seen and seen[digest] != team.name:
                    r.problem(
                        f"teams.{team.name}.keys", f"a key is also listed for team {seen[digest]}"
                    )
                seen[digest] = team.name

    prices: dict[str, Price] = {}
    raw_prices = top.get("prices")
    if raw_prices is not None and not isinstance(raw_prices, dict):
        r.problem("prices", "must be a mapping of model -> {input, cached_input, output}")
    elif raw_prices:
        for model, item in raw_prices.items():
            price = _read_price(r, str(model), item)
            if price is not None:
                prices[str(model)] = price
    for team in teams:
        if any(b.usd is not None for b in team.budgets) and not prices:
            r.problem(f"teams.{team.name}.budgets", "a usd budget needs a prices table")

    cd = r.section(
        top.get("cache"), "cache", ("enabled", "ttl", "max_bytes", "scope", "max_entry_bytes")
    )
    cache = Cache(
        enabled=r.get(cd, "cache", "enabled", as_bool, True, "true or false"),
        ttl=r.get(cd, "cache", "ttl", as_num(0.001), 3600.0, "a positive number of seconds"),
        max_bytes=r.get(
            cd, "cache", "max_bytes", as_int(1), 256 * 1024 * 1024, "a positive integer"
        ),
        scope=r.get(cd, "cache", "scope", as_choice("team", "shared"), "team", "team or shared"),
        max_entry_bytes=r.get(
            cd, "cache", "max_entry_bytes", as_int(1), 8 * 1024 * 1024, "a positive integer"
        ),
    )
    sd = r.section(top.get("state"), "state", ("store", "path"))
    store = r.get(sd, "state", "store", as_str, "local", "local or redis://host:port/db")
    if store != "local" and not store.startswith(("redis://", "rediss://")):
        r.problem("state.store", "must be local or a redis:// URL")
    state = State(
        store=store, path=r.get(sd, "state", "path", as_str, "./gateway-state", "a directory path")
    )
    ledd = r.section(top.get("ledger"), "ledger", ("url", "flush_interval"))
    ledger = LedgerSettings(
        url=r.get(ledd, "ledger", "url", lambda v: "" if v is None else as_str(v), "", "a string"),
        flush_interval=r.get(
            ledd, "ledger", "flush_interval", as_num(0.01), 0.5, "a positive number of seconds"
        ),
    )
    td = r.section(
        top.get("telemetry"), "telemetry", ("service_name", "traces", "logs", "max_model_labels")
    )
    trd = r.section(
        td.get("traces"), "telemetry.traces", ("endpoint", "sample_ratio", "capture_content")
    )
    lgd = r.section(td.get("logs"), "telemetry.logs", ("level", "format"))
    telemetry = Telemetry(
        service_name=r.get(td, "telemetry", "service_name", as_str, "llm-gateway", "a string"),
        traces=Traces(
            endpoint=r.get(
                trd,
                "telemetry.traces",
                "endpoint",
                lambda v: "" if v is None else as_str(v),
                "",
                "a URL string",
            ),
            sample_ratio=r.get(
                trd,
                "telemetry.traces",
                "sample_ratio",
                as_num(0.0, 1.0),
                1.0,
                "a number between 0 and 1",
            ),
            capture_content=r.get(
                trd, "telemetry.traces", "capture_content", as_bool, False, "true or false"
            ),
        ),
        logs=Logs(
            level=r.get(
                lgd,
                "telemetry.logs",
                "level",
                as_choice("debug", "info", "warning", "error"),
                "info",
                "debug | info | warning | error",
            ),
            format=r.get(
                lgd,
                "telemetry.logs",
                "format",
                as_choice("json", "console"),
                "json",
                "json or console",
            ),
        ),
        max_model_labels=r.get(
            td, "telemetry", "max_model_labels", as_int(1), 100, "a positive integer"
        ),
    )
    if not telemetry.traces.endpoint:
        endpoint = r.env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (
            r.env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").rstrip("/") + "/v1/traces"
            if r.env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            else ""
        )
        if endpoint:
            telemetry = replace(telemetry, traces=replace(telemetry.traces, endpoint=endpoint))
    if r.problems:
        raise ConfigError(source, r.problems)
    return Settings(
        upstreams=tuple(upstreams),
        teams=tuple(teams),
        listen=listen,
        admin=admin,
        limits=limits,
        prices=prices,
        cache=cache,
        state=state,
        ledger=ledger,
        telemetry=telemetry,
    )


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a config file; ConfigError lists every problem found."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(source, [f"(file): cannot read: {e.strerror}"]) from None
    return loads(text, env, source)


def loads(text: str, env: Mapping[str, str] | None = None, source: str = "<config>") -> Settings:
    refs: list[tuple[str, str | None]] = []
    try:
        raw = yaml.safe_load(placeholders(text, refs))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        raise ConfigError(
            source, [f"{where}: not valid YAML: {getattr(e, 'problem', e)}"]
        ) from None
    return parse(raw, os.environ if env is None else env, source, refs)


def default_config_path(env: Mapping[str, str] | None = None) -> str:
    e = os.environ if env is None else env
    return e.get("GATEWAY_CONFIG") or "./gateway.yaml"
