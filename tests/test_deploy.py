"""deploy/ for many replicas: the Kubernetes manifests against the Kubernetes schemas, the
compose stack's replicas, balancer, Redis and PostgreSQL, and the nginx balancer's config,
statically and (where nginx is installed) end to end in front of two gateway processes.

How the configs agree with the gateway's own config is tested in test_dashboards.py.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml
from conftest import free_port, wait_listening
from test_cli import CONFIG, wait_ready

from gateway.config import load

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
# the oldest Kubernetes minor still supported by the major clouds (2026): the schemas ship
# inside the kubernetes-validate wheel, so this runs offline
KUBERNETES = "1.31"
NGINX_CONF = DEPLOY / "nginx.conf"
DEPLOY_ENV = {
    "UPSTREAM_API_KEY": "sk-test",
    "SEARCH_TEAM_KEY": "k-search",
    "SUPPORT_TEAM_KEY": "k-support",
}


def manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{f.name}#{i}", doc)
        for f in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for i, doc in enumerate(yaml.safe_load_all(f.read_text()))
        if doc is not None
    ]


@pytest.mark.parametrize(("where", "doc"), manifests(), ids=[w for w, _ in manifests()])
def test_every_k8s_manifest_is_valid_for_kubernetes(where: str, doc: dict[str, Any]) -> None:
    # strict: an unknown field (a typo the API server would drop silently) fails too
    assert kubernetes_validate.validate(doc, KUBERNETES, strict=True) == KUBERNETES


def test_the_schema_check_catches_a_misspelt_field() -> None:
    (doc,) = [d for _, d in manifests() if d["kind"] == "Deployment"]
    broken = copy.deepcopy(doc)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)
    broken = copy.deepcopy(doc)
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_k8s_has_the_pieces_of_a_replicated_deployment() -> None:
    kinds = sorted(d["kind"] for _, d in manifests())
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "Service"]


# --- compose -------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    return services


def upstream_servers() -> list[str]:
    """`server` lines of the nginx upstream block: host:port."""
    block = re.search(r"upstream llm_gateway \{(.*?)\}", NGINX_CONF.read_text(), re.S)
    assert block
    return re.findall(r"^\s*server\s+(\S+)", block.group(1), re.M)


def test_compose_runs_two_replicas_behind_the_balancer() -> None:
    services = compose()
    replicas = sorted(n for n in services if n.startswith("gateway-"))
    assert replicas == ["gateway-1", "gateway-2"]
    settings = load(DEPLOY / "gateway.yaml", env=DEPLOY_ENV)
    assert upstream_servers() == [f"{n}:{settings.listen.port}" for n in replicas]
    lb = services["balancer"]
    assert lb["image"].startswith("nginx:")
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in lb["volumes"]
    assert lb["ports"] == [f"{settings.listen.port}:8080"]
    # the balancer waits for ready replicas; clients reach replicas only through it
    assert lb["depends_on"] == {n: {"condition": "service_healthy"} for n in replicas}
    assert "healthcheck" in lb
    first, second = (services[n] for n in replicas)
    for key in ("image", "build", "environment", "healthcheck", "depends_on"):
        assert first[key] == second[key]  # one definition, two copies
    for name in replicas:
        gw = services[name]
        assert not any(str(p).endswith(f":{settings.listen.port}") for p in gw.get("ports", []))
        check = " ".join(gw["healthcheck"]["test"])
        assert f"127.0.0.1:{settings.admin.port}/readyz" in check
    state = [v for n in replicas for v in services[n]["volumes"] if v.endswith("/state")]
    assert len({v.split(":")[0] for v in state}) == 2  # each replica its own state.path


def test_compose_has_redis_and_postgres_where_the_config_points() -> None:
    services = compose()
    gw = services["gateway-1"]
    settings = load(DEPLOY / "gateway.yaml", env=DEPLOY_ENV | {"POSTGRES_PASSWORD": "pw"})
    redis_host = re.fullmatch(r"redis://([\w-]+):6379/0", settings.state.store)
    pg = re.fullmatch(r"postgresql://(\w+):pw@([\w-]+):5432/(\w+)", settings.ledger.url)
    assert redis_host and pg
    redis, postgres = services[redis_host.group(1)], services[pg.group(2)]
    assert redis["image"].startswith("redis:") and postgres["image"].startswith("postgres:")
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert "pg_isready" in postgres["healthcheck"]["test"]
    env = postgres["environment"]
    assert (env["POSTGRES_USER"], env["POSTGRES_DB"]) == (pg.group(1), pg.group(3))
    # the gateways and PostgreSQL take the password from the same variable and default
    assert env["POSTGRES_PASSWORD"] == gw["environment"]["POSTGRES_PASSWORD"]
    for store in (redis_host.group(1), pg.group(2)):
        assert gw["depends_on"][store] == {"condition": "service_healthy"}


# --- nginx: static -------------------------------------------------------------------------


def directives(text: str) -> dict[str, list[str]]:
    """Every `name args;` line, args joined, by name (comments dropped)."""
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.endswith(";"):
            name, _, args = line[:-1].partition(" ")
            found.setdefault(name, []).append(" ".join(args.split()))
    return found


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m|h)?", value)
    assert m, value
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def test_nginx_streams_unbuffered_and_passes_upgrades() -> None:
    d = directives(NGINX_CONF.read_text())
    settings = load(DEPLOY / "gateway.yaml", env=DEPLOY_ENV)
    assert d["proxy_buffering"] == ["off"] and d["proxy_request_buffering"] == ["off"]
    assert d["proxy_http_version"] == ["1.1"]
    assert "Upgrade $http_upgrade" in d["proxy_set_header"]
    assert "Connection $connection_upgrade" in d["proxy_set_header"]
    assert d["keepalive"] and "least_conn" in NGINX_CONF.read_text()
    idle = max(u.timeouts.idle for u in settings.upstreams)
    assert _seconds(d["proxy_read_timeout"][0]) >= max(idle, settings.limits.drain_timeout)
    max_body = int(d["client_max_body_size"][0].rstrip("m")) * 1024 * 1024
    assert max_body > settings.limits.max_body_bytes  # the gateway's own 413 answers


# --- nginx: end to end ---------------------------------------------------------------------


def local_nginx_conf(port: int, backends: list[int]) -> str:
    """deploy/nginx.conf for this machine: the replicas on 127.0.0.1, no Docker DNS (and no
    `resolve`, which the Debian nginx predates); everything else as deployed."""
    text = NGINX_CONF.read_text()
    servers = upstream_servers()
    assert len(servers) == len(backends)
    for name, backend in zip(servers, backends, strict=True):
        text = re.sub(rf"server {re.escape(name)}[^;]*;", f"server 127.0.0.1:{backend};", text)
    text = re.sub(r"^\s*resolver .*$", "", text, flags=re.M)
    return text.replace("listen 8080;", f"listen 127.0.0.1:{port};")


@pytest.fixture
def balanced(mock_upstream_process: str, tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """nginx with deploy/nginx.conf in front of two `gateway serve` processes: the balancer's
    URL and the gateways' admin URLs."""
    procs: list[subprocess.Popen[bytes]] = []
    ports, admins = [], []
    try:
        for i in range(2):
            port, admin_port = free_port(), free_port()
            cfg = tmp_path / f"gw{i}.yaml"
            cfg.write_text(
                CONFIG.format(
                    port=port,
                    admin_port=admin_port,
                    upstream=mock_upstream_process,
                    digest=hashlib.sha256(b"client-key").hexdigest(),
                    state=tmp_path / f"state{i}",
                )
            )
            out = (tmp_path / f"gw{i}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)], stdout=out
                )
            )
            out.close()
            ports.append(port)
            admins.append(f"http://127.0.0.1:{admin_port}")
        for port in ports:
            wait_ready(f"http://127.0.0.1:{port}")
        lb_port = free_port()
        conf = tmp_path / "nginx.conf"
        conf.write_text(local_nginx_conf(lb_port, ports))
        errors = (tmp_path / "nginx.err").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    "nginx",
                    "-c",
                    str(conf),
                    "-p",
                    str(tmp_path),
                    "-g",
                    f"daemon off; pid {tmp_path / 'nginx.pid'};",
                ],
                stdout=subprocess.DEVNULL,
                stderr=errors,
            )
        )
        errors.close()
        wait_listening(lb_port)
        yield f"http://127.0.0.1:{lb_port}", admins
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def requests_total(session: aiohttp.ClientSession, admin: str) -> float:
    async with session.get(f"{admin}/metrics") as r:
        text = await r.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gateway_requests_total{")
    )


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
async def test_nginx_relays_a_stream_as_it_comes_and_spreads_requests(
    balanced: tuple[str, list[str]],
) -> None:
    url, admins = balanced
    headers = {
        "Authorization": "Bearer client-key",
        "x-mock-output-tokens": "30",
        "x-mock-tokens-per-s": "15",  # about two seconds of events
    }
    body = {"model": "nusantara-base", "input": "hi", "stream": True}
    async with aiohttp.ClientSession() as session:
        began = time.monotonic()
        arrivals: list[float] = []
        data = b""
        async with session.post(f"{url}/v1/responses", json=body, headers=headers) as r:
            assert r.status == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            async for chunk in r.content.iter_any():
                arrivals.append(time.monotonic() - began)
                data += chunk
        total = arrivals[-1]
        assert total > 1.5 and b"response.completed" in data
        # unbuffered: the first event comes at once, and the rest keep coming over the
        # stream's life rather than in one piece at its end
        assert arrivals[0] < total / 3
        assert len(arrivals) >= 10
        assert sum(1 for t in arrivals if t < total / 2) >= 3
        # least_conn with nothing in flight takes the replicas in turn: both serve
        before = [await requests_total(session, a) for a in admins]
        for _ in range(6):
            async with session.post(
                f"{url}/v1/responses",
                json={"model": "nusantara-base", "input": "hi"},
                headers={"Authorization": "Bearer client-key"},
            ) as r:
                assert r.status == 200
                assert r.headers["x-request-id"]
        after = [await requests_total(session, a) for a in admins]
    served = [b - a for a, b in zip(before, after, strict=True)]
    assert sum(served) == 6 and min(served) >= 1


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
async def test_nginx_passes_the_websocket_upgrade(balanced: tuple[str, list[str]]) -> None:
    url, _ = balanced
    create = {"type": "response.create", "model": "nusantara-base", "input": "hi"}
    seen: list[str] = []
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"{url}/v1/responses", headers={"Authorization": "Bearer client-key"}
        ) as ws,
        asyncio.timeout(20),
    ):
        for _ in range(2):  # two responses on one upgraded connection
            await ws.send_str(json.dumps(create))
            while not seen or seen[-1] not in ("response.completed", "error"):
                seen.append(json.loads(await ws.receive_str())["type"])
            assert seen[-1] == "response.completed", seen
            seen.clear()
