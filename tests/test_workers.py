"""`gateway serve --workers N`: workers on one port, one admin listener, signals to all.

The supervisor's mechanics (sharing the port, summed metrics, reload, restart, drain) are
tested with the local store, through `supervise` directly: the CLI refuses `--workers` with
it, since budgets would split per process, but that split is harmless here. The same flow
through the CLI with the Redis store is the `redis` test at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families
from servers import REDIS_URL
from test_cli import Reply, call, post

from gateway import backends, config
from gateway.workers.supervisor import socket_dir

ADMIN = {"Authorization": "Bearer admin-secret"}
CONFIG = """
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin_port}, key: admin-secret}}
limits: {{drain_timeout: 10}}
upstreams:
  mock: {{base_url: "{upstream}"}}
teams:
  alpha: {{keys: ["sha256:{digest}"]}}
state: {{store: "{store}", path: {state}{prefix}}}
"""
# `supervise` as `gateway serve --workers N` calls it, minus the CLI's refusal of `local`
SUPERVISE = """
import asyncio, sys
from gateway import config
from gateway.telemetry.logging import configure_logging
from gateway.cli_run import ListenError
from gateway.workers import supervise
settings = config.load(sys.argv[1])
host, port = settings.listen.host, settings.listen.port
configure_logging()
try:
    code = asyncio.run(supervise(settings, sys.argv[2], host, port, int(sys.argv[3])))
except ListenError as e:
    print(f"gateway serve: {e}", file=sys.stderr)
    code = 1
sys.exit(code)
"""


@dataclass
class Served:
    """A config for a supervisor and, once `start`ed, its process, stdout in a file."""

    cfg: Path
    out: Path
    fields: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.fields['port']}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.fields['admin_port']}"

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self.proc is not None
        return self.proc

    def write(self, key: str) -> None:
        self.cfg.write_text(
            CONFIG.format(digest=hashlib.sha256(key.encode()).hexdigest(), **self.fields)
        )

    def start(self, argv: list[str]) -> Served:
        """Run argv, with `{cfg}` standing for the config file."""
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [a.replace("{cfg}", str(self.cfg)) for a in argv],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.out.read_text().splitlines() if x.startswith("{")]

    def events(self, event: str) -> list[dict[str, Any]]:
        return [x for x in self.lines() if x.get("event") == event]

    def wait_for(self, event: str, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(event)
            if len(found) >= count:
                return found
            assert self.process.poll() is None, self.out.read_text()
            time.sleep(0.05)
        raise AssertionError(f"no {count} {event!r} lines: {self.out.read_text()}")

    def pids(self) -> list[int]:
        pids: list[int] = self.wait_for("listening", 1)[-1]["workers"]
        return pids

    def ready(self, timeout: float = 20.0) -> Reply:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = call("GET", f"{self.admin}/readyz", timeout=2)
                if r.status_code == 200:
                    return r
            except OSError:
                pass
            assert self.process.poll() is None, self.out.read_text()
            time.sleep(0.05)
        raise AssertionError(f"never ready: {self.out.read_text()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        """Whatever a failed test left running (workers follow: their stdin closes)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def prepare(
    tmp_path: Path, upstream: str, store: str = "local", prefix: str = "", port: int = 0
) -> Served:
    fields = {
        "port": port or free_port(),
        "admin_port": free_port(),
        "upstream": upstream,
        "state": tmp_path / "state",
        "store": store,
        "prefix": f', prefix: "{prefix}"' if prefix else "",
    }
    served = Served(tmp_path / "gw.yaml", tmp_path / "out.log", fields)
    served.write("first-key")
    return served


@pytest.fixture
def supervised(mock_upstream_process: str, tmp_path: Path) -> Iterator[Served]:
    """Two workers with the local store, under `supervise`."""
    served = prepare(tmp_path, mock_upstream_process)
    served.start([sys.executable, "-c", SUPERVISE, "{cfg}", "{cfg}", "2"])
    try:
        yield served
    finally:
        served.kill()


def generate(url: str, key: str = "first-key", **headers: str) -> Reply:
    return post(
        f"{url}/v1/responses",
        headers={"Authorization": f"Bearer {key}", **headers},
        json={"model": "nusantara-base", "input": "hi"},
    )


def requests_counted(admin: str) -> float:
    text = call("GET", f"{admin}/metrics").body.decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "gateway_requests"
        for s in f.samples
        if s.name == "gateway_requests_total"
    )


def spread_and_count(served: Served, n: int = 40) -> None:
    """n requests, each on a new connection: both workers answer some, /metrics counts all,
    each request's log line names its worker."""
    before = requests_counted(served.admin)
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: generate(served.url).status_code, range(n)))
    assert statuses == [200] * n
    assert requests_counted(served.admin) == before + n
    lines = served.wait_for("request", n)
    assert {x["worker"] for x in lines} == {0, 1}
    assert {x["pid"] for x in lines} == set(served.pids())


def reload_both(served: Served) -> None:
    """SIGHUP to the supervisor: every worker re-reads the file."""
    before = len(served.events("reloaded"))
    served.write("second-key")
    served.process.send_signal(signal.SIGHUP)
    reloaded = served.wait_for("reloaded", before + 2)
    assert {x["worker"] for x in reloaded[before:]} == {0, 1}
    with ThreadPoolExecutor(4) as pool:
        new = list(pool.map(lambda _: generate(served.url, "second-key").status_code, range(20)))
        old = list(pool.map(lambda _: generate(served.url, "first-key").status_code, range(20)))
    assert new == [200] * 20 and old == [401] * 20


def drain_both(served: Served, key: str) -> None:
    """SIGTERM while slow requests are in flight on both workers: all finish, all exit 0."""
    slow = {"x-mock-ttft-ms": "1500", "cache-control": "no-store"}
    began = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        flying = [pool.submit(generate, served.url, key, **slow) for _ in range(16)]
        time.sleep(0.7)
        served.process.send_signal(signal.SIGTERM)
        assert [f.result().status_code for f in flying] == [200] * 16
    assert time.monotonic() - began >= 1.5  # they were answered after the SIGTERM
    served.wait_for("request", 16)
    assert served.process.wait(timeout=60) == 0
    draining = served.events("draining")
    assert {x["worker"] for x in draining if "worker" in x} == {0, 1}
    # each worker finished its requests before it stopped
    assert {x["worker"] for x in served.events("request")} == {0, 1}
    stopped = served.events("worker stopped")
    assert sorted(x["index"] for x in stopped) == [0, 1] and {x["code"] for x in stopped} == {0}


def test_workers_share_one_port_one_admin_listener(supervised: Served) -> None:
    r = supervised.ready()
    assert r.json() == {"status": "ready", "workers": 2}
    assert len(set(supervised.pids())) == 2
    spread_and_count(supervised)
    # the admin API is answered by a worker, with the key checked there
    teams = call("GET", f"{supervised.admin}/admin/teams", ADMIN)
    assert teams.status_code == 200 and teams.json()["teams"][0]["team"] == "alpha"
    denied = call("GET", f"{supervised.admin}/admin/teams")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    missing = call("GET", f"{supervised.admin}/nowhere")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert call("GET", f"{supervised.admin}/healthz").json() == {"status": "ok"}


def test_sighup_and_admin_reload_reach_every_worker(supervised: Served) -> None:
    supervised.ready()
    reload_both(supervised)
    supervised.write("third-key")
    r = post(f"{supervised.admin}/admin/reload", headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"reloaded": True}
    with ThreadPoolExecutor(4) as pool:
        third = list(
            pool.map(lambda _: generate(supervised.url, "third-key").status_code, range(20))
        )
    assert third == [200] * 20
    supervised.cfg.write_text("upstreams: {}\n")  # broken: refused, every worker keeps its own
    r = post(f"{supervised.admin}/admin/reload", headers=ADMIN)
    assert r.status_code == 400 and r.json()["reloaded"] is False
    supervised.process.send_signal(signal.SIGHUP)
    supervised.wait_for("reload refused", 2)
    assert generate(supervised.url, "third-key").status_code == 200
    assert supervised.stop() == 0


def test_a_worker_that_dies_is_replaced_and_counters_never_drop(supervised: Served) -> None:
    supervised.ready()
    for _ in range(10):
        assert generate(supervised.url).status_code == 200
    counted = requests_counted(supervised.admin)  # a scrape just before: nothing is lost
    victim = supervised.pids()[0]
    os.kill(victim, signal.SIGKILL)
    exited = supervised.wait_for("worker exited", 1)[0]
    assert exited["pid"] == victim and exited["code"] == "SIGKILL"
    started = supervised.wait_for("worker started", 3)[-1]
    assert started["index"] == exited["index"] and started["pid"] != victim
    supervised.ready()
    assert requests_counted(supervised.admin) == counted
    for _ in range(10):
        assert generate(supervised.url).status_code == 200
    assert requests_counted(supervised.admin) == counted + 10
    assert supervised.stop() == 0


def test_workers_that_keep_dying_stop_serve_with_exit_1(supervised: Served) -> None:
    """A replacement that cannot start is tried again, paced, five times in a minute; then
    the supervisor stops the rest and exits 1 for its own supervisor to see."""
    supervised.ready()
    supervised.cfg.write_text("upstreams: {}\n")  # what a replacement reads: it cannot start
    victim = supervised.pids()[0]
    began = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    assert supervised.process.wait(timeout=60) == 1
    assert time.monotonic() - began >= 0.5 + 1 + 2 + 4  # the pauses between the replacements
    exited = supervised.events("worker exited")
    assert len(exited) == 6 and {x["index"] for x in exited} == {exited[0]["index"]}
    assert supervised.events("workers keep failing: stopping")
    stopped = supervised.events("worker stopped")  # the healthy worker drained
    assert [x["code"] for x in stopped] == [0]


def test_sigterm_drains_every_worker(supervised: Served) -> None:
    supervised.ready()
    drain_both(supervised, "first-key")


def test_a_worker_that_cannot_start_stops_serve(mock_upstream_process: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("upstreams: {}\n")  # what the workers read: they cannot start
    served = prepare(tmp_path, mock_upstream_process)
    served.start([sys.executable, "-c", SUPERVISE, "{cfg}", str(broken), "2"])
    try:
        assert served.process.wait(timeout=60) == 1
        assert served.events("a worker failed to start: stopping")
    finally:
        served.kill()


def serve(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_workers_with_the_local_store_are_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        CONFIG.format(
            port=free_port(),
            admin_port=free_port(),
            upstream="http://127.0.0.1:9",
            digest="0" * 64,
            store="local",
            state=tmp_path / "state",
            prefix="",
        )
    )
    r = serve(cfg, "--workers", "2")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "state.store: --workers 2 needs a shared store" in r.stderr
    r = serve(cfg, "--workers", "0")
    assert r.returncode == 2 and "--workers must be 1 or more" in r.stderr
    assert not (tmp_path / "state").exists()  # nothing started


def test_a_taken_port_is_one_line(mock_upstream_process: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        served = prepare(tmp_path, mock_upstream_process, port=taken.getsockname()[1])
        r = subprocess.run(
            [sys.executable, "-c", SUPERVISE, str(served.cfg), str(served.cfg), "2"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert r.returncode == 1
    assert r.stderr == f"gateway serve: cannot listen on 127.0.0.1:{served.fields['port']}" + (
        " (listen): address already in use\n"
    )


@pytest.mark.redis
def test_two_workers_with_the_redis_store(mock_upstream_process: str, tmp_path: Path) -> None:
    """The CLI's `--workers 2` as the contract runs it: shared state in Redis."""
    prefix = f"gwtest_workers_{uuid.uuid4().hex[:12]}:"
    served = prepare(tmp_path, mock_upstream_process, store=REDIS_URL, prefix=prefix)
    try:
        found = backends.problems(config.load(str(served.cfg)))
    except config.ConfigError as e:
        found = e.problems
    if found:
        pytest.skip(f"this version cannot run the Redis store: {found[0]}")
    served.start([sys.executable, "-m", "gateway", "serve", "--config", "{cfg}", "--workers", "2"])
    try:
        served.ready()
        spread_and_count(served)
        reload_both(served)
        drain_both(served, "second-key")
    finally:
        served.kill()
        forget(prefix)


def forget(prefix: str) -> None:
    """Delete every Redis key under `prefix` (never an empty one: that would be every key,
    other tests' too)."""
    import redis

    assert prefix, "an empty prefix matches every key"

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def test_socket_dir_is_fresh_and_clears_what_killed_supervisors_left() -> None:
    with tempfile.TemporaryDirectory(prefix="gw-") as short:  # pytest's own are long
        socket_dir_cases(Path(short))


def socket_dir_cases(tmp_path: Path) -> None:
    base = tmp_path / "state" / "workers"
    stale = base / "999999999-abc"  # no such process: its supervisor was killed outright
    stale.mkdir(parents=True)
    (stale / "w0.sock").touch()
    alive = base / f"{os.getpid()}-other"  # a supervisor that runs: left alone
    alive.mkdir()
    made = socket_dir(str(tmp_path / "state"))
    try:
        assert made.parent == base and made.name.startswith(f"{os.getpid()}-")
        assert not stale.exists() and alive.exists() and made != alive
    finally:
        shutil.rmtree(made)
    deep = tmp_path / ("d" * 90)  # too long for a socket path: the system's temporary folder
    made = socket_dir(str(deep))
    try:
        assert not str(made).startswith(str(tmp_path)) and len(str(made)) < 80
    finally:
        shutil.rmtree(made)
