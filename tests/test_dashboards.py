"""Dashboards, alert rules and deploy configs.

Static checks: every PromQL expression (Grafana panels, template variables, alert rules) names
only metrics and labels the gateway exports; the deploy configs load and agree with each other.
End to end (needs the `prometheus` binary): a real Prometheus scrapes a real gateway under a
workload, every dashboard query returns data, and the alerts that should be pending are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.metrics import MetricWrapperBase

from gateway.app import create_admin_app, create_app
from gateway.config import ConfigError, load, loads
from gateway.mock_upstream import MockOptions, start_mock
from gateway.runtime import Gateway
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tracing import Tracing

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
DASHBOARD = DASHBOARDS / "grafana" / "llm-gateway.json"
ALERTS = DASHBOARDS / "prometheus" / "alerts.yml"
DEPLOY = ROOT / "deploy"

# labels Prometheus adds at scrape time
TARGET_LABELS = frozenset({"job", "instance"})
# Grafana's variables and what the end-to-end test puts in their place
GRAFANA_VARS = {
    "__rate_interval": "1m",
    "__range": "5m",
    "__interval": "15s",
    "team": ".*",
    "model": ".*",
}
_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)\b(?!\s*\()")
# PromQL words that look like names
_OPERATORS = ("and", "or", "unless", "bool", "offset", "inf", "nan", "start", "end")
_KEYWORDS = frozenset((*_OPERATORS, "group_left", "group_right"))


# --- what the gateway exports ------------------------------------------------------------


def exported_series() -> dict[str, frozenset[str]]:
    """Series name -> label names, as prometheus_client exposes them (counters get `_total`,
    histograms `_bucket` with `le`, `_sum` and `_count`)."""
    metrics = Metrics(100)
    wrappers = [getattr(m, "metric", m) for m in vars(metrics).values()]
    labels = {
        m._name: frozenset(m._labelnames)  # no public accessor for a metric's label names
        for m in wrappers
        if isinstance(m, MetricWrapperBase)
    }
    out: dict[str, frozenset[str]] = {}
    for family in metrics.registry.collect():
        names = labels[family.name]
        if family.type == "counter":
            out[f"{family.name}_total"] = names
        elif family.type == "histogram":
            out[f"{family.name}_bucket"] = names | {"le"}
            out[f"{family.name}_sum"] = names
            out[f"{family.name}_count"] = names
        else:
            out[family.name] = names
    return out


EXPORTED = exported_series()


def test_exported_series_follow_the_exposition_rules() -> None:
    # the helper the checks below rely on: a wrong suffix rule would make them vacuous
    assert EXPORTED["gateway_requests_total"] == {"team", "model", "route", "status", "cache"}
    assert EXPORTED["gateway_request_duration_seconds_bucket"] == {"team", "model", "route", "le"}
    assert EXPORTED["gateway_overhead_seconds_count"] == {"route"}
    assert EXPORTED["gateway_cache_entries"] == frozenset()
    assert "gateway_requests" not in EXPORTED
    assert "gateway_cache_entries_total" not in EXPORTED


# --- PromQL, read just enough to know what it names --------------------------------------


def substitute(expr: str) -> str:
    """Grafana variables -> the values the end-to-end test queries with."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in GRAFANA_VARS:
            raise AssertionError(f"unknown Grafana variable ${name} in {expr!r}")
        return GRAFANA_VARS[name]

    return _VAR.sub(repl, expr)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords, labels left out)."""
    text = _STRING.sub('""', substitute(expr))
    text = _GROUPING.sub(" ", _RANGE.sub(" ", re.sub(r"\{[^}]*\}", " ", text)))
    return {n for n in _IDENT.findall(text) if n not in _KEYWORDS}


def label_problems(expr: str) -> list[str]:
    """Matchers and grouping labels that the selected metrics do not carry."""
    text = _STRING.sub('""', substitute(expr))
    names = metric_names(expr)
    known = set(TARGET_LABELS)
    for name in names:
        known |= EXPORTED.get(name, frozenset())
    problems = []
    for metric, body in _SELECTOR.findall(text):
        allowed = (EXPORTED.get(metric, frozenset()) | TARGET_LABELS) if metric else known
        problems += [
            f"{metric}{{{label}}}" for label in _MATCHER_LABEL.findall(body) if label not in allowed
        ]
    for clause, body in _GROUPING.findall(text):
        problems += [
            f"{clause} ({label})" for label in re.findall(r"\w+", body) if label not in known
        ]
    return problems


def test_promql_reader_finds_names_and_labels() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(gateway_x_bucket{team=~"$team",'
        ' model!="a{b}"}[$__rate_interval]))) / on (job) group_left vector(1) > bool 0.5'
    )
    assert metric_names(expr) == {"gateway_x_bucket"}
    assert metric_names("sum(gateway_a) / ignoring (le) rate(gateway_b_total[5m] offset 1h)") == {
        "gateway_a",
        "gateway_b_total",
    }
    assert label_problems('sum by (team) (rate(gateway_tokens_total{typ="input"}[1m]))') == [
        "gateway_tokens_total{typ}"
    ]
    assert label_problems("sum by (upstream) (gateway_requests_total)") == ["by (upstream)"]
    assert label_problems("sum by (le, team) (gateway_time_to_first_token_seconds_bucket)") == []
    with pytest.raises(AssertionError, match="unknown Grafana variable"):
        substitute("rate(x[$__nope])")


# --- the files ---------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def data_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dash["panels"]:
        if panel.get("type") == "row":
            out += panel.get("panels", [])  # a collapsed row holds its panels
        else:
            out.append(panel)
    return out


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title + refId, expr) for every panel target."""
    return [
        (f"{p['title']} [{t['refId']}]", t["expr"])
        for p in data_panels(dashboard())
        for t in p["targets"]
    ]


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for g in groups for rule in g["rules"]]


def test_dashboard_panels_query_prometheus_through_the_variable() -> None:
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] == "llm-gateway"
    panels = data_panels(dash)
    assert len(panels) >= 14
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        for t in panel["targets"]:
            assert t["expr"].strip(), f"panel {panel['title']!r} has an empty query"
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, f"panel {panel['title']!r} overflows the grid"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("team", "model"):
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"]
        assert v["query"]["query"].startswith("label_values(")


def test_template_variables_read_exported_labels() -> None:
    for v in dashboard()["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", v["query"]["query"])
        assert m, v["query"]
        selector, label = m.groups()
        (name,) = metric_names(selector)
        assert name in EXPORTED, f"variable {v['name']}: {name} is not exported"
        assert label in EXPORTED[name], f"variable {v['name']}: {name} has no label {label}"
        assert not label_problems(selector)


@pytest.mark.parametrize(
    ("where", "expr"), [pytest.param(w, e, id=w) for w, e in dashboard_queries()]
)
def test_dashboard_query_names_only_exported_metrics(where: str, expr: str) -> None:
    names = metric_names(expr)
    assert names, f"{where}: no metric found in {expr!r}"
    assert names <= EXPORTED.keys(), f"{where}: not exported: {sorted(names - EXPORTED.keys())}"
    assert not label_problems(expr), f"{where}: unknown labels {label_problems(expr)}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_rule_names_only_exported_metrics(rule: dict[str, Any]) -> None:
    names = metric_names(rule["expr"])
    assert names, f"no metric found in {rule['expr']!r}"
    assert names <= EXPORTED.keys(), f"not exported: {sorted(names - EXPORTED.keys())}"
    assert not label_problems(rule["expr"]), f"unknown labels {label_problems(rule['expr'])}"
    assert rule["labels"]["severity"] in ("warning", "critical")
    for key in ("summary", "description"):
        assert "$labels." in rule["annotations"][key], f"{key} names no label"


def test_alert_rules_cover_budgets_errors_latency_and_upstreams() -> None:
    (group,) = yaml.safe_load(ALERTS.read_text())["groups"]
    assert group["name"] == "llm-gateway"
    used = {name for rule in group["rules"] for name in metric_names(rule["expr"])}
    for needed in (
        "gateway_budget_used_tokens",
        "gateway_budget_limit_tokens",
        "gateway_budget_rejections_total",
        "gateway_requests_total",
        "gateway_request_duration_seconds_bucket",
        "gateway_upstream_errors_total",
        "gateway_upstream_healthy",
    ):
        assert needed in used, f"no alert on {needed}"
    severities = {r["alert"]: r["labels"]["severity"] for r in group["rules"]}
    assert "warning" in severities.values() and "critical" in severities.values()


def test_dashboard_shows_every_exported_metric() -> None:
    shown = {n for _, expr in dashboard_queries() for n in metric_names(expr)}
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in shown}
    missing = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in EXPORTED} - families
    assert not missing, f"metrics without a panel: {sorted(missing)}"


def test_check_script_passes() -> None:
    # validates the JSON/YAML, and runs promtool when it is installed
    done = subprocess.run(
        ["sh", str(DASHBOARDS / "check.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"SUCCESS: \d+ panels", done.stdout), done.stdout


@pytest.mark.prometheus
@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool is not on PATH (apt-get install prometheus)"
)
def test_promtool_accepts_the_rules_and_their_unit_tests() -> None:
    for args in (
        ["check", "rules", str(ALERTS)],
        ["test", "rules", str(DASHBOARDS / "prometheus" / "alerts_test.yml")],
        ["check", "config", str(DASHBOARDS / "prometheus" / "prometheus.yml")],
    ):
        done = subprocess.run(
            ["promtool", *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout + done.stderr


# --- deploy/ -----------------------------------------------------------------------------

DEPLOY_ENV = {
    "UPSTREAM_API_KEY": "sk-test",
    "SEARCH_TEAM_KEY": "k-search",
    "SUPPORT_TEAM_KEY": "k-support",
}


def test_deploy_gateway_config_loads_with_its_environment() -> None:
    settings = load(DEPLOY / "gateway.yaml", env=DEPLOY_ENV)
    assert (settings.admin.host, settings.admin.port) == ("0.0.0.0", 9464)
    assert settings.listen.port == 8080
    assert settings.upstreams[0].base_url == "http://mock-upstream:8090"
    assert settings.telemetry.traces.endpoint == "http://otel-collector:4318"
    assert {t.name for t in settings.teams} == {"search", "support"}
    # the replicas share state: Redis and PostgreSQL by their compose service names
    assert settings.state.store == "redis://redis:6379/0"
    assert settings.ledger.url == "postgresql://gateway:gateway@postgres:5432/gateway"
    with pytest.raises(ConfigError) as err:
        load(DEPLOY / "gateway.yaml", env={})
    assert {p.split(":")[0] for p in err.value.problems} == {
        "upstreams.default.api_key",
        "teams.search.keys[0]",
        "teams.support.keys[0]",
    }


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", value)
    assert m, value
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def test_compose_stack_is_wired_to_the_gateway_config() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert {"mock-upstream", "prometheus", "grafana", "otel-collector"} <= compose.keys()
    replicas = ["gateway-1", "gateway-2"]
    for name in replicas:
        gw = compose[name]
        # the gateway's environment, with compose's ${VAR:-default} taken at its default
        env = {
            k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in gw["environment"].items()
        }
        settings = load(DEPLOY / "gateway.yaml", env=env)
        assert "./gateway.yaml:/etc/gateway/gateway.yaml:ro" in gw["volumes"]
        assert _seconds(gw["stop_grace_period"]) >= settings.limits.drain_timeout
        mock = compose["mock-upstream"]["command"]
        assert settings.upstreams[0].base_url.endswith(f":{mock[mock.index('--port') + 1]}")

    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    # every replica on its own: a scrape through the balancer would see a random one
    targets = [f"{name}:{settings.admin.port}" for name in replicas]
    assert job["static_configs"][0]["targets"] == targets
    assert prom["rule_files"] == ["alerts.yml"]
    assert (
        "../dashboards/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro"
        in compose["prometheus"]["volumes"]
    )

    otel = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    assert otel["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert otel["service"]["pipelines"]["traces"]["exporters"] == ["debug"]
    assert settings.telemetry.traces.endpoint == "http://otel-collector:4318"

    grafana = compose["grafana"]["volumes"]
    assert "../dashboards/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    provider = yaml.safe_load(
        (DASHBOARDS / "grafana/provisioning/dashboards/llm-gateway.yaml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    assert f"../dashboards/grafana:{path}:ro" in grafana


def test_k8s_manifests_agree_with_the_config() -> None:
    k8s = DEPLOY / "k8s"
    docs = [d for f in sorted(k8s.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    (cm,) = by_kind["ConfigMap"]
    secret_env = {
        "UPSTREAM_API_KEY": "sk-test",
        "REDIS_URL": "redis://redis:6379/0",
        "LEDGER_URL": "postgresql://gateway@postgres:5432/gateway",
    }
    settings = loads(cm["data"]["gateway.yaml"], secret_env)
    assert settings.state.store == secret_env["REDIS_URL"]
    assert settings.ledger.url == secret_env["LEDGER_URL"]
    (deployment,) = by_kind["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": settings.listen.port, "admin": settings.admin.port}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + settings.limits.drain_timeout
    env = {e["name"]: e for e in c["env"]}
    for name in secret_env:  # every variable the config needs comes from the Secret
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "llm-gateway-secrets"
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert c["args"][-1] == f"{mounts['config']}/gateway.yaml"
    assert settings.state.path.startswith(mounts["state"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    # shared state: several replicas, replaced one at a time, never more than one away
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (pdb,) = by_kind["PodDisruptionBudget"]
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert pdb["spec"]["maxUnavailable"] == 1
    # read-only root: state.path and /tmp are emptyDirs
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert "emptyDir" in volumes["state"] and "emptyDir" in volumes["tmp"]
    assert mounts["tmp"] == "/tmp"
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    assert services["llm-gateway-admin"]["spec"]["ports"][0]["targetPort"] == "admin"
    assert services["llm-gateway"]["spec"]["ports"][0]["targetPort"] == "http"


# --- end to end: a real Prometheus scraping a real gateway -------------------------------

MODEL = "nusantara-base"
FLAKY_MODEL = "flaky-base"  # served by the upstream `flaky` only
KEYS = {"search": "k1", "near": "k-near", "over": "k-over"}
UPSTREAM_KEY, REFUSED_KEY = "sk-upstream", "sk-refused"  # the mock answers the second with 401
E2E_CONFIG = """
listen: {host: 127.0.0.1, port: 0}
admin: {host: 127.0.0.1, port: 0}
limits: {default_max_output_tokens: 32, drain_timeout: 5}
upstreams:
  mock:
    base_url: ${MOCK_URL}
    # the refused key is ejected (auth) at its first 401; its request goes on with the other
    api_keys: ["${UPSTREAM_KEY}", "${REFUSED_KEY}"]
    models: ["*"]
    timeouts: {connect: 2, first_byte: 10, idle: 10}
  flaky:   # fails eject_after times in a row at the start, then stays ejected
    base_url: ${MOCK_URL}
    api_key: ${UPSTREAM_KEY}
    models: ["flaky-*"]
    timeouts: {connect: 2, first_byte: 10, idle: 10}
routes:
  - {models: ["flaky-*"], upstreams: [flaky]}
# only a 503 (x-mock-fail-first) is retried: each 500 of the bursts stays one failed attempt
retries: {attempts: 3, backoff: {base: 0.01, max: 0.05}, on: [503]}
# eject_after: more than FAILS, so the 500 bursts never eject `mock`; eject_for: longer than
# this test, so `flaky` is out until it ends
health: {eject_after: 8, eject_for: 300}
teams:
  search:
    keys: ["${TEAM_KEY}"]
    budgets: [{tokens: 100000, per: day}]
  near:   # one big request takes it past 80%
    keys: ["${NEAR_KEY}"]
    budgets: [{tokens: 1000, per: day}]
  over:   # an upstream overshoots its reservation: past 100%, then every request is refused
    keys: ["${OVER_KEY}"]
    budgets: [{tokens: 50, per: day}]
prices:
  nusantara-base: {input: 0.10, cached_input: 0.025, output: 0.40}
cache: {enabled: true, ttl: 600, scope: team}
state: {store: local, path: ${STATE_DIR}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Stack:
    url: str
    admin_url: str
    admin_port: int
    gw: Gateway
    spans: InMemorySpanExporter  # traces are exported, so exemplars may point at them
    trace_ids: set[str] = field(default_factory=set)  # from x-gateway-trace-id


@pytest.fixture
async def gateway_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with contextlib.AsyncExitStack() as stack:
        mock_runner, mock_port = await start_mock(options=MockOptions(refused_keys=(REFUSED_KEY,)))
        stack.push_async_callback(mock_runner.cleanup)
        settings = loads(
            E2E_CONFIG,
            {
                "MOCK_URL": f"http://127.0.0.1:{mock_port}",
                "UPSTREAM_KEY": UPSTREAM_KEY,
                "REFUSED_KEY": REFUSED_KEY,
                "TEAM_KEY": KEYS["search"],
                "NEAR_KEY": KEYS["near"],
                "OVER_KEY": KEYS["over"],
                "STATE_DIR": str(tmp_path / "state"),
            },
        )
        spans = InMemorySpanExporter()
        gw = Gateway(settings, tracing=Tracing.from_settings(settings.telemetry, spans))
        runners = []
        for app in (create_app(gw), create_admin_app(gw)):
            runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2)
            await runner.setup()  # the main app's cleanup_ctx starts (and closes) the Gateway
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            runners.append(runner)
        port, admin_port = (int(r.addresses[0][1]) for r in runners)
        yield Stack(
            f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", admin_port, gw, spans
        )


@pytest.fixture
def prometheus_files(tmp_path: Path, gateway_stack: Stack) -> Iterator[tuple[Path, IO[bytes]]]:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "llm-gateway",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "static_configs": [{"targets": [f"127.0.0.1:{gateway_stack.admin_port}"]}],
            }
        ],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    with (tmp_path / "prometheus.log").open("wb") as log:
        yield path, log


@pytest.fixture
async def prometheus(
    tmp_path: Path, prometheus_files: tuple[Path, IO[bytes]]
) -> AsyncIterator[str]:
    binary = shutil.which("prometheus")
    assert binary is not None
    config, log = prometheus_files
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--enable-feature=exemplar-storage",
        "--log.level=warn",
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 15
            while True:
                assert proc.returncode is None, (
                    f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()[-2000:]}"
                )
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(f"{url}/-/ready") as r:
                        if r.status == 200:
                            break
                assert time.monotonic() < deadline, "prometheus did not get ready in 15 s"
                await asyncio.sleep(0.2)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _post(
    s: aiohttp.ClientSession, stack: Stack, team: str, body: dict[str, Any], **headers: str
) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {KEYS.get(team, team)}", **headers}
    async with s.post(f"{stack.url}/v1/responses", json=body, headers=headers) as r:
        await r.read()  # a stream is read to its end
        if tid := r.headers.get("x-gateway-trace-id"):
            stack.trace_ids.add(tid)
        return r.status, r.headers.get("x-gateway-cache", "")


FAILS = 5
FAIL = {"x-mock-status": "500"}


async def _workload(s: aiohttp.ClientSession, stack: Stack, n: int) -> list[tuple[int, str]]:
    """One round: misses, cache hits (JSON and stream), a budget 429, a 503 retried into a
    200, upstream 500s."""
    fault = uuid.uuid4().hex  # a fresh fault id: the mock fails its first request only
    retried = {"x-mock-fail-first": "503:1", "x-mock-fault-id": fault}
    return [
        await _post(s, stack, "search", {"model": MODEL, "input": f"question {n}"}),
        await _post(s, stack, "search", {"model": MODEL, "input": "the same question"}),
        await _post(s, stack, "search", {"model": MODEL, "input": f"story {n}", "stream": True}),
        await _post(
            s, stack, "search", {"model": MODEL, "input": "the same story", "stream": True}
        ),
        await _post(s, stack, "over", {"model": MODEL, "input": f"more {n}"}),
        # a 503, retried: a unique input, or a cache hit would never reach the upstream
        await _post(s, stack, "search", {"model": MODEL, "input": f"retry {fault}"}, **retried),
        # rate(...[5m]) divides by 5 minutes: a burst gets upstream errors past 0.1/s soon
        *[
            await _post(s, stack, "search", {"model": MODEL, "input": "fail"}, **FAIL)
            for _ in range(FAILS)
        ],
    ]


async def _keep_driving(s: aiohttp.ClientSession, stack: Stack) -> None:
    n = 1
    while True:
        await _workload(s, stack, n)
        n += 1
        await asyncio.sleep(0.3)


async def _query(s: aiohttp.ClientSession, prom: str, expr: str) -> dict[str, Any]:
    async with s.post(f"{prom}/api/v1/query", data={"query": expr}) as r:
        body: dict[str, Any] = await r.json()
        return body


@dataclass
class Observed:
    dashboard: dict[str, dict[str, Any]]  # where -> API answer
    alerts: dict[str, dict[str, Any]]  # alert name -> API answer
    groups: list[dict[str, Any]]
    active: set[tuple[str, str]]  # (alert name, the label that tells which) pending or firing
    exemplars: list[dict[str, Any]]

    def empty_panels(self) -> list[str]:
        return [
            w
            for w, a in self.dashboard.items()
            if a.get("status") != "success" or not a["data"]["result"]
        ]

    def series(self, where: str, *labels: str) -> dict[tuple[str, ...], float]:
        """A panel query's answer: the values of `labels` -> the value."""
        answer = self.dashboard[where]
        if answer.get("status") != "success":
            return {}
        return {
            tuple(r["metric"].get(name, "") for name in labels): float(r["value"][1])
            for r in answer["data"]["result"]
        }

    def upstream_problems(self) -> list[str]:
        """What the upstream panels miss of the workload: a 503 retried, 500s that were the
        last attempt, the refused key ejected (auth), `flaky` and its key ejected (failures)."""
        problems = []
        attempts = self.series(
            "Upstream attempts/s by upstream and outcome [A]", "upstream", "outcome"
        )
        wanted = {("mock", "ok"), ("mock", "retried"), ("mock", "failed"), ("flaky", "failed")}
        if missing := wanted - attempts.keys():
            problems.append(f"attempts: no {sorted(missing)}")
        health = self.series("Upstream health [A]", "upstream")
        if health != {("mock",): 1.0, ("flaky",): 0.0}:
            problems.append(f"health: {health}")
        ejections = self.series("Key ejections by upstream and reason [A]", "upstream", "reason")
        if missing := {("mock", "auth"), ("flaky", "failures")} - ejections.keys():
            problems.append(f"key ejections: no {sorted(missing)}")
        return problems


async def _observe(s: aiohttp.ClientSession, prom: str) -> Observed:
    dash = {w: await _query(s, prom, substitute(e)) for w, e in dashboard_queries()}
    alerts = {r["alert"]: await _query(s, prom, r["expr"]) for r in alert_rules()}
    async with s.get(f"{prom}/api/v1/rules") as r:
        groups = (await r.json())["data"]["groups"]
    async with s.get(f"{prom}/api/v1/alerts") as r:
        active = {
            (
                a["labels"]["alertname"],
                a["labels"].get("team")
                or a["labels"].get("upstream")
                or a["labels"].get("job", ""),
            )
            for a in (await r.json())["data"]["alerts"]
        }
    now = time.time()
    async with s.get(
        f"{prom}/api/v1/query_exemplars",
        params={
            "query": "gateway_request_duration_seconds_bucket",
            "start": str(now - 300),
            "end": str(now),
        },
    ) as r:
        exemplars = (await r.json()).get("data") or []
    return Observed(dash, alerts, groups, active, exemplars)


async def _wait_for_everything(s: aiohttp.ClientSession, prom: str, deadline: float) -> Observed:
    while True:
        seen = await _observe(s, prom)
        rules_ok = [r for g in seen.groups for r in g["rules"] if r["health"] == "ok"]
        done = (
            not seen.empty_panels()
            and not seen.upstream_problems()
            and seen.active >= EXPECTED_ACTIVE
            and seen.exemplars
            and len(rules_ok) == len(alert_rules())
        )
        if done or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(1)


EXPECTED_ACTIVE = {
    ("GatewayTeamBudgetNearlyExhausted", "near"),
    ("GatewayTeamBudgetExhausted", "over"),
    ("GatewayTeamBudgetRejections", "over"),
    ("GatewayHighErrorRatio", "llm-gateway"),
    ("GatewayUpstreamErrors", "mock"),
    ("GatewayUpstreamHighErrorRatio", "mock"),
    # pending only: it needs 5 minutes of ejection to fire (alerts_test.yml has it firing)
    ("GatewayUpstreamEjected", "flaky"),
}


@pytest.mark.prometheus
@pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the prometheus binary is not on PATH (apt-get install prometheus)",
)
async def test_a_real_prometheus_gets_data_for_every_panel_and_alert(
    gateway_stack: Stack, prometheus: str
) -> None:
    stack = gateway_stack
    async with aiohttp.ClientSession() as s:
        first = [
            *await _workload(s, stack, 0),
            await _post(
                s,
                stack,
                "near",
                {"model": MODEL, "input": "a long answer", "max_output_tokens": 850},
            ),
            # the upstream sends more than the reservation allowed for: the budget overshoots
            await _post(
                s,
                stack,
                "over",
                {"model": MODEL, "input": "x", "max_output_tokens": 8},
                **{"x-mock-output-tokens": "100"},
            ),
            await _post(s, stack, "over", {"model": MODEL, "input": "y"}),
            await _post(s, stack, "nobody", {"model": MODEL, "input": "z"}),
        ]
        assert [st for st, _ in first] == [200] * 6 + [500] * FAILS + [200, 200, 429, 401]
        assert [c for _, c in first[:4]] == ["miss", "miss", "miss", "miss"]
        again = await _workload(s, stack, 1)
        assert [st for st, _ in again] == [200, 200, 200, 200, 429, 200] + [500] * FAILS
        assert [c for _, c in again[:4]] == ["miss", "hit", "miss", "hit"]
        # `flaky` fails eject_after times in a row: ejected, with its key (reason failures)
        eject_after = stack.gw.settings.health.eject_after
        assert eject_after > FAILS  # the bursts at `mock` never eject it
        down = [
            await _post(s, stack, "search", {"model": FLAKY_MODEL, "input": f"down {i}"}, **FAIL)
            for i in range(eject_after)
        ]
        assert [st for st, _ in down] == [500] * eject_after
        assert not stack.gw.health.healthy("flaky", stack.gw.health.clock())

        # keep traffic flowing while Prometheus scrapes, until everything expected shows up
        async with asyncio.TaskGroup() as tg:
            driver = tg.create_task(_keep_driving(s, stack))
            try:
                seen = await _wait_for_everything(s, prometheus, deadline=time.monotonic() + 40)
            finally:
                driver.cancel()

        async with s.get(f"{prometheus}/api/v1/targets") as r:
            (target,) = (await r.json())["data"]["activeTargets"]
        assert target["health"] == "up", target

    # every dashboard query is valid PromQL and has data for this workload
    bad = {w: a.get("error") for w, a in seen.dashboard.items() if a.get("status") != "success"}
    assert not bad, bad
    assert not seen.empty_panels(), f"panels without data: {seen.empty_panels()}"
    assert not seen.upstream_problems(), seen.upstream_problems()
    # every alert expression is valid PromQL
    bad = {n: a.get("error") for n, a in seen.alerts.items() if a.get("status") != "success"}
    assert not bad, bad
    # the rules loaded and evaluate cleanly
    (group,) = seen.groups
    assert group["name"] == "llm-gateway"
    assert {r["name"]: r["health"] for r in group["rules"]} == {
        r["alert"]: "ok" for r in alert_rules()
    }
    # the alerts this workload should trip are pending (their `for` has not run out yet)...
    assert seen.active >= EXPECTED_ACTIVE, f"missing: {EXPECTED_ACTIVE - seen.active}"
    # ...and the ones it should not trip are quiet
    assert ("GatewayTeamBudgetExhausted", "near") not in seen.active
    assert ("GatewayUpstreamEjected", "mock") not in seen.active
    assert not {a for a in seen.active if a[1] == "search" or a[0] == "GatewayHighLatencyP99"}
    # latency histograms carry trace ids as exemplars (OpenMetrics scrape); each is a trace
    # that was exported and that a client got in x-gateway-trace-id
    ids = {e["labels"].get("trace_id") for series in seen.exemplars for e in series["exemplars"]}
    stack.gw.tracing.flush()
    exported = {format(sp.context.trace_id, "032x") for sp in stack.spans.get_finished_spans()}
    assert ids, "no exemplars stored"
    assert ids <= exported & stack.trace_ids, sorted(ids - exported)[:5]
