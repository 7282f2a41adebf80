"""Configuration: substitution, validation messages, secrets, and the CLI commands on it."""

from __future__ import annotations

import hashlib
import string
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.config import ConfigError, Secret, loads, parse

GOOD = """
listen: {host: 127.0.0.1, port: ${PORT:-8080}}
admin:  {host: 127.0.0.1, port: 9464, key: ${GATEWAY_ADMIN_KEY:-}}
upstreams:
  neosantara:
    base_url: https://api.neosantara.xyz
    api_key: ${NEOSANTARA_API_KEY}
    auth_header: x-api-key
    models: ["nusantara-*", "garda-*"]
teams:
  search:
    keys: ["sha256:%s", "${SEARCH_KEY}"]
    budgets:
      - {tokens: 1000000, per: month}
      - {usd: 25.0, per: month}
prices:
  nusantara-base: {input: 0.10, cached_input: 0.025, output: 0.40}
""" % ("a" * 64)


def test_valid_config_with_substitution_and_defaults() -> None:
    s = loads(GOOD, {"NEOSANTARA_API_KEY": "sk-real", "SEARCH_KEY": "team-key"})
    assert s.listen.port == 8080 and isinstance(s.listen.port, int)
    assert s.admin.key is None
    up = s.upstreams[0]
    assert up.api_keys == (Secret("sk-real"),) and up.auth_header == "x-api-key"
    assert up.timeouts.first_byte == 120
    team = s.teams[0]
    assert team.key_digests == (bytes.fromhex("a" * 64), hashlib.sha256(b"team-key").digest())
    assert team.budgets[1].usd == 25.0 and team.budgets[1].per == "month"
    assert s.cache.scope == "team" and s.state.store == "local"


def test_port_from_env_takes_int_type() -> None:
    s = loads(GOOD, {"NEOSANTARA_API_KEY": "k", "SEARCH_KEY": "t", "PORT": "9000"})
    assert s.listen.port == 9000


def test_secrets_never_in_repr_or_errors() -> None:
    s = loads(GOOD, {"NEOSANTARA_API_KEY": "sk-topsecret", "SEARCH_KEY": "team-secret"})
    assert "sk-topsecret" not in repr(s) and "team-secret" not in repr(s)
    bad = GOOD.replace("auth_header: x-api-key", "auth_header: 42")
    with pytest.raises(ConfigError) as e:
        loads(bad, {"NEOSANTARA_API_KEY": "sk-topsecret", "SEARCH_KEY": "team-secret"})
    assert "sk-topsecret" not in str(e.value)


def test_every_problem_reported_with_its_path() -> None:
    text = """
listen: {host: 127.0.0.1, port: "eighty"}
bogus: 1
upstreams:
  a: {base_url: ftp://x, api_key: ${MISSING_VAR}, timeouts: {connect: -1}, extra: 1}
teams:
  t1: {keys: ["plain-key-in-file"], budgets: [{tokens: 5, per: fortnight}]}
  t2: {keys: ["sha256:abc"], budgets: [{usd: 1, per: day}]}
"""
    with pytest.raises(ConfigError) as e:
        loads(text, {}, "gw.yaml")
    lines = str(e.value).splitlines()
    expected = [
        "gw.yaml: bogus: unknown key",
        "gw.yaml: listen.port: must be a port number",
        "gw.yaml: upstreams.a.extra: unknown key",
        "gw.yaml: upstreams.a.base_url: must start with http:// or https://",
        "gw.yaml: upstreams.a.api_key: environment variable MISSING_VAR is not set",
        "gw.yaml: upstreams.a.timeouts.connect: must be a positive number",
        "gw.yaml: teams.t1.keys[0]: must be 'sha256:<64 lowercase hex>'",
        "gw.yaml: teams.t1.budgets[0].per: must be minute | hour",
        "gw.yaml: teams.t2.keys[0]: must be 'sha256:",
        "gw.yaml: teams.t2.budgets: a usd budget needs a prices table",
    ]
    for want in expected:
        assert any(line.startswith(want) for line in lines), (want, lines)


def test_no_upstreams_or_teams() -> None:
    with pytest.raises(ConfigError) as e:
        loads("listen: {port: 1}", {}, "x.yaml")
    assert "x.yaml: upstreams: at least one upstream is required" in str(e.value)
    assert "x.yaml: teams: at least one team is required" in str(e.value)


def test_invalid_yaml() -> None:
    with pytest.raises(ConfigError) as e:
        loads("a: [1,\n", {}, "y.yaml")
    assert str(e.value).startswith("y.yaml: line ")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        GOOD.replace("${NEOSANTARA_API_KEY}", "${NEOSANTARA_API_KEY:-sk-x}").replace(
            "${SEARCH_KEY}", "${SEARCH_KEY:-t}"
        )
    )
    ok = run_cli("check-config", str(good))
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: {}\nteams: {t: {keys: [nope]}}\n")
    res = run_cli("check-config", str(bad))
    assert res.returncode == 1
    assert f"{bad}: upstreams: at least one upstream is required" in res.stderr
    assert f"{bad}: teams.t.keys[0]: must be" in res.stderr


def test_keys_new_prints_key_and_matching_digest() -> None:
    res = run_cli("keys", "new", "--team", "search")
    assert res.returncode == 0
    lines = [line for line in res.stdout.splitlines() if not line.startswith("#")]
    key, digest_line = lines[0], lines[1]
    assert key.startswith("gw-") and len(key) > 30
    assert digest_line == f'- "sha256:{hashlib.sha256(key.encode()).hexdigest()}"'


def test_trace_endpoint_falls_back_to_otel_env() -> None:
    env = {"NEOSANTARA_API_KEY": "k", "SEARCH_KEY": "t"}
    assert loads(GOOD, env).telemetry.traces.endpoint == ""
    s = loads(GOOD, {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"})
    assert s.telemetry.traces.endpoint == "http://collector:4318/v1/traces"
    s = loads(
        GOOD,
        {
            **env,
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:4318/custom",
        },
    )
    assert s.telemetry.traces.endpoint == "http://b:4318/custom"


def test_one_budget_per_window_and_unit() -> None:
    text = GOOD.replace(
        "- {tokens: 1000000, per: month}",
        "- {tokens: 1000000, per: month}\n      - {tokens: 5, per: month}",
    )
    with pytest.raises(ConfigError) as e:
        loads(text, {"NEOSANTARA_API_KEY": "k", "SEARCH_KEY": "t"}, "g.yaml")
    assert "g.yaml: teams.search.budgets: two tokens budgets per month" in str(e.value)


def test_a_requests_budget_and_the_state_settings() -> None:
    env = {"NEOSANTARA_API_KEY": "k", "SEARCH_KEY": "t"}
    text = GOOD.replace(
        "- {tokens: 1000000, per: month}",
        "- {tokens: 1000000, per: month}\n      - {requests: 600, per: minute}",
    )
    s = loads(
        text + 'state: {store: "redis://h:6379/0", prefix: "a:", on_unavailable: admit}\n', env
    )
    rule = s.teams[0].budgets[1]
    assert (rule.unit, rule.limit, rule.per) == ("requests", 600, "minute")
    assert (s.state.prefix, s.state.on_unavailable) == ("a:", "admit")
    assert (loads(GOOD, env).state.prefix, loads(GOOD, env).state.on_unavailable) == (
        "gw:",
        "reject",
    )
    bad = GOOD.replace(
        "- {tokens: 1000000, per: month}",
        "- {requests: 0, per: minute}\n      - {requests: 5, usd: 1.0, per: day}",
    )
    with pytest.raises(ConfigError) as e:
        loads(bad + "state: {on_unavailable: maybe, prefix: 5}\n", env, "g.yaml")
    assert e.value.problems == [
        "teams.search.budgets[0].requests: must be a positive integer (got 0)",
        "teams.search.budgets[1]: set exactly one of tokens, usd or requests",
        "state.on_unavailable: must be reject or admit (got 'maybe')",
        "state.prefix: must be a string (got 5)",
    ]


def test_server_limits_defaults_and_values() -> None:
    """The HTTP server limits have production defaults and take values from `limits`."""
    env = {"NEOSANTARA_API_KEY": "k", "SEARCH_KEY": "t"}
    limits = loads(GOOD, env).limits
    assert (limits.header_timeout, limits.body_timeout) == (10.0, 30.0)
    assert (limits.max_connections, limits.max_json_depth) == (10000, 64)
    text = GOOD + (
        "limits: {header_timeout: 2.5, body_timeout: 7, max_connections: 50, max_json_depth: 8}\n"
    )
    limits = loads(text, env).limits
    assert (limits.header_timeout, limits.body_timeout) == (2.5, 7.0)
    assert (limits.max_connections, limits.max_json_depth) == (50, 8)


@pytest.mark.parametrize(
    ("key", "value", "what"),
    [
        ("header_timeout", "0", "a positive number of seconds"),
        ("header_timeout", "ten", "a positive number of seconds"),
        ("body_timeout", "-1", "a positive number of seconds"),
        ("body_timeout", "true", "a positive number of seconds"),
        ("max_connections", "0", "a positive integer"),
        ("max_connections", "1.5", "a positive integer"),
        ("max_json_depth", "0", "an integer from 1 to 200"),
        ("max_json_depth", "[64]", "an integer from 1 to 200"),
        ("max_json_depth", "255", "an integer from 1 to 200"),
    ],
)
def test_server_limits_are_validated(key: str, value: str, what: str) -> None:
    """A wrong server limit is reported with its path, like every other limit."""
    with pytest.raises(ConfigError) as e:
        loads(
            GOOD + f"limits: {{{key}: {value}}}\n",
            {"NEOSANTARA_API_KEY": "k", "SEARCH_KEY": "t"},
            "g.yaml",
        )
    assert f"g.yaml: limits.{key}: must be {what}" in str(e.value)


DIGEST = "sha256:" + "b" * 64
MINIMAL = f"""
upstreams: {{u: {{base_url: "http://127.0.0.1:9"}}}}
teams: {{t: {{keys: ["{DIGEST}"]}}}}
"""
# the defaults as the contract documents them (section 2), each written out
DOCUMENTED = f"""
listen: {{host: 127.0.0.1, port: 8080}}
admin:  {{host: 127.0.0.1, port: 9464, key: ""}}
limits:
  max_body_bytes: 10485760
  default_max_output_tokens: 4096
  drain_timeout: 30
  header_timeout: 10
  body_timeout: 30
  max_connections: 10000
  max_json_depth: 64
upstreams:
  u:
    base_url: "http://127.0.0.1:9"
    auth_header: authorization
    models: ["*"]
    timeouts: {{connect: 5, first_byte: 120, idle: 60}}
teams:
  t: {{keys: ["{DIGEST}"], models: ["*"], budgets: []}}
prices: {{}}
cache:   {{enabled: true, ttl: 3600, max_bytes: 268435456, scope: team}}
state:   {{store: local, path: ./gateway-state}}
ledger:  {{url: ""}}
telemetry:
  service_name: llm-gateway
  traces: {{endpoint: "", sample_ratio: 1.0, capture_content: false}}
  logs: {{level: info, format: json}}
  max_model_labels: 100
"""


def test_defaults_are_the_documented_ones() -> None:
    """What a minimal file leaves out is what the contract says it defaults to."""
    minimal, documented = loads(MINIMAL, {}), loads(DOCUMENTED, {})
    assert minimal == documented
    assert minimal.admin.key is None and minimal.upstreams[0].api_keys == ()
    assert isinstance(minimal.limits.drain_timeout, float)
    # empty sections take every default too
    empty = MINIMAL + "listen:\nadmin:\nlimits:\nprices:\ncache:\nstate:\nledger:\ntelemetry:\n"
    assert loads(empty, {}) == documented


def test_settings_are_frozen_comparable_and_hashable() -> None:
    env = {"NEOSANTARA_API_KEY": "k", "SEARCH_KEY": "t"}
    a, b = loads(GOOD, env), loads(GOOD, env)
    assert a == b and a.upstreams[0] == b.upstreams[0]
    assert hash(a.upstreams[0]) == hash(b.upstreams[0]) and hash(a.teams[0]) == hash(b.teams[0])
    assert a.upstreams[0] != loads(GOOD, {**env, "NEOSANTARA_API_KEY": "other"}).upstreams[0]
    with pytest.raises(ValidationError):
        a.listen.port = 1  # type: ignore[misc]


@pytest.mark.parametrize("port", [-1, 65536, 70000])
@pytest.mark.parametrize("section", ["listen", "admin"])
def test_ports_are_0_to_65535(section: str, port: int) -> None:
    with pytest.raises(ConfigError) as e:
        loads(MINIMAL + f"{section}: {{port: {port}}}\n", {}, "p.yaml")
    assert e.value.problems == [
        f"{section}.port: must be a port number from 0 to 65535 (got {port})"
    ]
    for ok in (0, 65535):
        assert getattr(loads(MINIMAL + f"{section}: {{port: {ok}}}\n", {}), section).port == ok


@pytest.mark.parametrize(
    ("listen", "admin"),
    [
        ("{host: 127.0.0.1, port: 8080}", "{host: 127.0.0.1, port: 8080}"),
        ("{port: 9464}", "{}"),
        ("{host: 0.0.0.0, port: 8080}", "{host: 127.0.0.1, port: 8080}"),
        ("{host: 127.0.0.1, port: 8080}", "{host: '::', port: 8080}"),
    ],
)
def test_admin_cannot_share_the_client_address(listen: str, admin: str) -> None:
    with pytest.raises(ConfigError) as e:
        loads(MINIMAL + f"listen: {listen}\nadmin: {admin}\n", {}, "a.yaml")
    [problem] = e.value.problems
    assert problem.startswith("admin.port: the admin server cannot share the client address")


@pytest.mark.parametrize(
    ("listen", "admin"),
    [
        ("{host: 127.0.0.1, port: 0}", "{host: 127.0.0.1, port: 0}"),  # 0: any free port
        ("{host: 127.0.0.1, port: 8080}", "{host: 127.0.0.2, port: 8080}"),
        ("{host: 127.0.0.1, port: 8080}", "{host: 127.0.0.1, port: 8081}"),
    ],
)
def test_admin_on_another_address_is_fine(listen: str, admin: str) -> None:
    loads(MINIMAL + f"listen: {listen}\nadmin: {admin}\n", {})


def test_problems_show_the_value_not_its_type() -> None:
    text = f"""
upstreams:
  a: {{base_url: "http://a", models: [], timeouts: {{connect: -1}}}}
prices: {{"*": {{input: 1, output: 1}}}}
teams:
  t:
    keys: ["{DIGEST}"]
    budgets: [{{usd: -3, per: day}}, {{tokens: 1000.5, per: hour}}]
    models: {{}}
"""
    with pytest.raises(ConfigError) as e:
        loads(text, {}, "m.yaml")
    assert e.value.problems == [
        "upstreams.a.models: must be a non-empty list of glob patterns (got [])",
        "upstreams.a.timeouts.connect: must be a positive number of seconds (got -1)",
        "teams.t.budgets[0].usd: must be a non-negative number (got -3)",
        "teams.t.budgets[1].tokens: must be a positive integer (got 1000.5)",
        "teams.t.models: must be a non-empty list of glob patterns (got {})",
    ]


def test_a_list_that_may_hold_a_secret_shows_only_its_kind() -> None:
    text = f"""
upstreams: {{a: {{base_url: "http://a", api_keys: "sk-live-secret"}}}}
teams: {{t: {{keys: ["{DIGEST}"], models: ["sk-live-other", 3]}}}}
"""
    with pytest.raises(ConfigError) as e:
        loads(text, {}, "m.yaml")
    assert "sk-live" not in str(e.value)


@pytest.mark.parametrize("name", ["unknown", "Unknown", "UNKNOWN", "'unknown '"])
def test_the_team_name_unknown_is_reserved(name: str) -> None:
    with pytest.raises(ConfigError) as e:
        loads(MINIMAL.replace("teams: {t:", f"teams: {{{name}:"), {}, "m.yaml")
    shown = name.strip("'")
    assert e.value.problems == [
        f"teams.{shown}: the team name 'unknown' is reserved for requests without a valid key;"
        " choose another"
    ]


def test_every_problem_at_once_in_file_order() -> None:
    text = f"""
listen: {{port: 70000}}
upstreams:
  a: {{base_url: x, api_key: k1, api_keys: [k2]}}
  b: {{base_url: "http://b"}}
teams:
  t:
    keys: ["{DIGEST}"]
    budgets: [{{per: day}}, {{tokens: 1, per: day}}, {{tokens: 2, per: day}}]
  u: {{keys: ["{DIGEST}"], models: []}}
  v: {{keys: ["{DIGEST}"]}}
cache: {{ttl: 0, scope: global}}
"""
    with pytest.raises(ConfigError) as e:
        loads(text, {}, "m.yaml")
    assert e.value.problems == [
        "listen.port: must be a port number from 0 to 65535 (got 70000)",
        "upstreams.a: set api_key or api_keys, not both",
        "upstreams.a.base_url: must start with http:// or https:// (got 'x')",
        "teams.t.budgets[0]: set exactly one of tokens, usd or requests",
        "teams.u.models: must be a non-empty list of glob patterns (got [])",
        "cache.ttl: must be a positive number of seconds (got 0)",
        "cache.scope: must be team or shared (got 'global')",
    ]
    # rules across the items of a list come up once each item is right
    text = f"""
upstreams: {{a: {{base_url: "http://a"}}}}
teams:
  t:
    keys: ["{DIGEST}"]
    budgets: [{{tokens: 1, per: day}}, {{tokens: 2, per: day}}]
  u: {{keys: ["{DIGEST}"]}}
  v: {{keys: ["{DIGEST}"]}}
"""
    with pytest.raises(ConfigError) as e:
        loads(text, {}, "m.yaml")
    assert e.value.problems == ["teams.t.budgets: two tokens budgets per day: keep one"]
    with pytest.raises(ConfigError) as e:
        loads(text.replace("{tokens: 2, per: day}", "{tokens: 2, per: hour}"), {}, "m.yaml")
    assert e.value.problems == [
        "teams.u.keys: a key is also listed for team t",
        "teams.v.keys: a key is also listed for team t",
    ]


def test_unknown_keys_name_the_allowed_ones() -> None:
    text = MINIMAL.replace('base_url: "http://127.0.0.1:9"', 'base_url: "http://x", name: y')
    with pytest.raises(ConfigError) as e:
        loads(text + "cache: {size: 1}\n", {}, "u.yaml")
    assert e.value.problems == [
        "upstreams.u.name: unknown key (expected one of: base_url, api_key, api_keys,"
        " auth_header, models, model_map, timeouts, websocket)",
        "cache.size: unknown key (expected one of: enabled, ttl, max_bytes, scope,"
        " max_entry_bytes)",
    ]


def test_long_values_are_shown_cut() -> None:
    with pytest.raises(ConfigError) as e:
        loads(MINIMAL + f"telemetry: {{logs: {{level: {'x' * 500}}}}}\n", {}, "l.yaml")
    [problem] = e.value.problems
    assert problem.startswith("telemetry.logs.level: must be debug | info | warning | error (got")
    assert "x" * 41 not in problem and "(500 chars)" in problem


def test_a_whole_reference_takes_the_type_of_its_value_but_keys_take_the_text() -> None:
    text = MINIMAL.replace(f'"{DIGEST}"', '"${TEAM_KEY}"') + (
        "listen: {port: ${PORT}}\ncache: {enabled: ${CACHE}}\n"
        'upstreams: {u: {base_url: "http://${HOST}:9", api_key: ${UP_KEY}}}\n'
    )
    env = {"TEAM_KEY": "0123", "PORT": "9000", "CACHE": "false", "HOST": "h", "UP_KEY": "1e3"}
    s = loads(text.replace('upstreams: {u: {base_url: "http://127.0.0.1:9"}}\n', ""), env)
    assert s.listen.port == 9000 and s.cache.enabled is False
    assert s.upstreams[0].base_url == "http://h:9" and s.upstreams[0].api_keys == (Secret("1e3"),)
    assert s.teams[0].key_digests == (hashlib.sha256(b"0123").digest(),)


SECRET_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=80)


@settings(max_examples=40, deadline=None)
@given(secret=SECRET_TEXT.map(lambda s: "sk-" + s))
def test_a_secret_that_fails_validation_is_never_shown(secret: str) -> None:
    """Keys put where they do not belong are reported by place, never by value."""
    text = f"""
admin: {{key: ["{secret}"]}}
state: {{store: "redis//:{secret}@host"}}
upstreams:
  a: {{base_url: "http://a", api_keys: "{secret}"}}
  b: {{base_url: "http://b", api_keys: [["{secret}"]], api_kye: "{secret}"}}
  c: {{base_url: "http://c", api_keys: ${{UP_KEY}}}}
  d: "{secret}"
teams:
  t: {{keys: ["{secret}"]}}
  u: {{keys: "{secret}"}}
  v: {{keys: ${{TEAM_KEY}}}}
"""
    with pytest.raises(ConfigError) as e:
        loads(text, {"UP_KEY": secret, "TEAM_KEY": secret}, "s.yaml")
    assert len(e.value.problems) == 10, e.value.problems
    assert secret not in str(e.value) and not any(secret in p for p in e.value.problems)


FILE_KEYS = [
    *("listen", "admin", "limits", "upstreams", "teams", "prices", "cache", "state", "ledger"),
    *("telemetry", "host", "port", "key", "base_url", "api_key", "api_keys", "models"),
    *("timeouts", "keys", "budgets", "per", "tokens", "usd", "input", "output", "ttl", "name"),
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.floats(),
    st.text(max_size=4),
    st.sampled_from(["${X}", "${UNSET}", "${Y:-1}", "http://x", DIGEST, "day", "*", ""]),
)
TREES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FILE_KEYS), st.text(max_size=3)), inner),
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(tree=TREES)
def test_any_tree_gives_settings_or_one_line_problems(tree: object) -> None:
    """Whatever the file holds, the answer is Settings or ConfigError, one problem a line."""
    try:
        parse(tree, {"X": "5"})
    except ConfigError as e:
        assert e.problems and all(p and "\n" not in p for p in e.problems), e.problems


def test_infinite_and_nan_numbers_are_refused() -> None:
    """An infinite price makes every cost NaN, which the ledger cannot store; an infinite
    timeout or budget is a typo for "none" that would never end or never refuse."""
    text = f"""
upstreams: {{a: {{base_url: "http://a", timeouts: {{idle: .inf}}}}}}
prices: {{"*": {{input: .inf, output: .nan}}}}
teams: {{t: {{keys: ["{DIGEST}"], budgets: [{{usd: .inf, per: day}}]}}}}
limits: {{drain_timeout: .inf}}
telemetry: {{traces: {{sample_ratio: .nan}}}}
"""
    with pytest.raises(ConfigError) as e:
        loads(text, {}, "m.yaml")
    assert e.value.problems == [
        "upstreams.a.timeouts.idle: must be a positive number of seconds (got inf)",
        "prices.*.input: must be a non-negative number (USD per million tokens) (got inf)",
        "prices.*.output: must be a non-negative number (USD per million tokens) (got nan)",
        "teams.t.budgets[0].usd: must be a non-negative number (got inf)",
        "limits.drain_timeout: must be a number of seconds (got inf)",
        "telemetry.traces.sample_ratio: must be a number between 0 and 1 (got nan)",
    ]


def test_text_that_looks_like_a_placeholder_is_taken_literally() -> None:
    text = f"""
upstreams: {{u: {{base_url: "http://127.0.0.1:9", api_key: "${{KEY}}"}}}}
teams: {{t: {{keys: ["{DIGEST}"]}}}}
state: {{path: "/tmp/__GATEWAY_ENV_0__/__GATEWAY_ENV_9__"}}
"""
    settings = loads(text, {"KEY": "sk-secret-value"})
    assert settings.state.path == "/tmp/__GATEWAY_ENV_0__/__GATEWAY_ENV_9__"


def test_websocket_mode_and_age_limit() -> None:
    env = {"NEOSANTARA_API_KEY": "sk-real", "SEARCH_KEY": "team-secret"}
    native = GOOD.replace("auth_header: x-api-key", "auth_header: x-api-key\n    websocket: native")
    assert loads(native, env).upstreams[0].websocket == "native"
    assert loads(GOOD, env).upstreams[0].websocket == "bridge"
    assert loads(GOOD, env).limits.max_websocket_seconds == 3600
    bad = native.replace("websocket: native", "websocket: relay")
    with pytest.raises(ConfigError) as e:
        loads(bad + "limits: {max_websocket_seconds: -1}\n", env, "g.yaml")
    text = "\n".join(e.value.problems)
    assert "upstreams.neosantara.websocket: must be bridge or native" in text, text
    assert "limits.max_websocket_seconds" in text, text


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("mysql://u:hunter2@db/gw", "only a PostgreSQL ledger can be named by URL"),
        ("sqlite:///tmp/hunter2.db", "only a PostgreSQL ledger can be named by URL"),
        ("postgresql://u:hunter2@db:port/gw", "the port is not a number"),
        ("postgresql://u:hunter2@/gw", "the host is missing"),
    ],
)
def test_a_ledger_url_must_be_postgres_with_a_host_and_is_never_shown(url: str, why: str) -> None:
    with pytest.raises(ConfigError) as e:
        loads(MINIMAL + f"ledger: {{url: '{url}'}}\n", {}, "g.yaml")
    (problem,) = e.value.problems
    assert problem.startswith("ledger.url: must be empty (SQLite under state.path) or ")
    assert why in problem
    assert "hunter2" not in str(e.value)


@pytest.mark.parametrize(
    "url",
    ["postgresql://gw:pw@127.0.0.1:5432/gw", "postgres://db/gw", "postgresql:///gw?host=/run/pg"],
)
def test_a_postgres_ledger_url_is_accepted(url: str) -> None:
    assert loads(MINIMAL + f"ledger: {{url: '{url}'}}\n", {}).ledger.url == url


def test_check_config_names_a_bad_capture_pattern_and_trace_url(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        GOOD.replace("${NEOSANTARA_API_KEY}", "${NEOSANTARA_API_KEY:-sk-x}").replace(
            "${SEARCH_KEY}", "${SEARCH_KEY:-t}"
        )
        + "capture: {enabled: true, sample_ratio: 1.5,"
        + " redact: ['acct-[0-9]+', '(unclosed', 'x*']}\n"
        + "telemetry: {trace_url: 'http://jaeger:16686/trace/'}\n"
    )
    res = run_cli("check-config", str(bad))
    assert res.returncode == 1
    assert f"{bad}: capture.sample_ratio: must be a number between 0 and 1" in res.stderr
    assert f"{bad}: capture.redact: entry 1 is not a valid regular expression" in res.stderr
    assert "telemetry.trace_url: must be empty or a URL template with {trace_id}" in res.stderr
