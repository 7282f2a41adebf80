"""Benchmark: the gateway's CPU per request and added latency, next to a bare aiohttp proxy.

Starts the mock upstream (``gateway mock-upstream``, no delay, no pacing), a bare aiohttp +
uvloop passthrough proxy (bench/bare_proxy.py, the floor) and the gateway (``python -m gateway
serve`` with a generated config) as subprocesses, and drives load from another process
(bench/load.py) at each target in turn: the mock directly, the bare proxy, the gateway. Both
proxies are pinned to one CPU, the mock, the load generator and this script to the others.
CPU per request is read from the proxy's /proc/<pid>/stat around each measured phase. A
measurement, not a test: nothing here fails on a time.

The gateway measured is the ``gateway`` package this interpreter imports (PYTHONPATH is
passed through), so ``PYTHONPATH=/some/tree python bench/run.py`` measures that tree.

    python bench/run.py                      # json, stream, cache-json, cache-stream
    python bench/run.py --scenarios stream --concurrency 8 --duration 10
    python bench/run.py --scenarios json --concurrency 32 --duration 8 --profile /tmp/prof
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent  # the mock upstream always comes from this tree
LOAD = BENCH_DIR / "load.py"
SINK = BENCH_DIR / "otlp_sink.py"
BARE = BENCH_DIR / "bare_proxy.py"
PROFILE_TOP = BENCH_DIR / "profile_top.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MODEL = "nusantara-base"
PROMPT = "Write a short poem about the harbor."
UPSTREAM_KEY = "bench-upstream-key"
IDLE_SETTLE = 0.2  # s before and after a phase for targets with no background work


@dataclass(frozen=True)
class Scenario:
    name: str
    stream: bool
    cache: bool  # through a gateway with the cache on, the same request repeated
    concurrency: tuple[int, ...]  # default
    websocket: bool = False  # each worker sends response.create events on one WebSocket

    @property
    def targets(self) -> tuple[str, ...]:
        # a cache hit has no direct equivalent: the bare proxy still asks the mock
        return ("bare", "gateway") if self.cache else ("direct", "bare", "gateway")


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("json", stream=False, cache=False, concurrency=(1, 32)),
        Scenario("stream", stream=True, cache=False, concurrency=(1, 16)),
        Scenario("cache-json", stream=False, cache=True, concurrency=(1, 32)),
        Scenario("cache-stream", stream=True, cache=True, concurrency=(1, 16)),
    )
}
ALIASES = {"cache": "cache-json"}

# the README's targets: gateway CPU per request over the bare proxy's, and added TTFB
CPU_TARGETS = {"json": 1.5, "stream": 1.5, "cache-json": 0.7, "cache-stream": 0.7}
TTFB_TARGET_MS = 0.3


# ------------------------------------------------------------------ CPU pinning


@dataclass(frozen=True)
class Pinning:
    """The proxy under test on `proxy` CPUs; the mock, load generator, sink, py-spy and this
    script on `other`. None: nothing pinned."""

    proxy: frozenset[int] | None
    other: frozenset[int] | None

    @classmethod
    def choose(cls, proxy_cpu: int | None, enabled: bool) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        if not enabled or len(cpus) < 2:
            return cls(None, None)
        chosen = cpus[-1] if proxy_cpu is None else proxy_cpu
        if chosen not in cpus:
            raise SystemExit(f"--proxy-cpu {chosen}: not one of the usable CPUs {cpus}")
        return cls(frozenset({chosen}), frozenset(c for c in cpus if c != chosen))

    def describe(self) -> str:
        if self.proxy is None or self.other is None:
            return "no CPU pinning"
        return (
            f"proxies pinned to CPU {_cpus(self.proxy)}; mock upstream, load generator and "
            f"harness to CPU {_cpus(self.other)}"
        )


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


def pinned(cpus: frozenset[int] | None) -> Callable[[], None] | None:
    """A preexec_fn that pins the child (and every thread it starts) before it runs."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def thread_cpus(pid: int) -> set[str]:
    """`Cpus_allowed_list` of every thread of a process."""
    found = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("Cpus_allowed_list:"):
                        found.add(line.split(":", 1)[1].strip())
    return found


# ------------------------------------------------------------------ processes


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    cpus: frozenset[int] | None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> tuple[float, float]:
        """User and system CPU time of the process (all its threads), from /proc/<pid>/stat."""
        raw = Path(f"/proc/{self.pid}/stat").read_text()
        fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "; fields 3.. of stat(5)
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # utime, stime

    def main_thread_cpu_seconds(self) -> float:
        """User plus system CPU time of the process's main thread (the event loop's)."""
        raw = Path(f"/proc/{self.pid}/task/{self.pid}/stat").read_text()
        fields = raw[raw.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def pin_problem(self) -> str | None:
        if self.cpus is None:
            return None
        found = thread_cpus(self.pid)
        if found and found != {_cpus(self.cpus)}:
            return f"{self.name}: threads allowed on CPUs {sorted(found)}, not {_cpus(self.cpus)}"
        return None

    def unusual_log_lines(self) -> list[str]:
        """Log lines other than per-request records and the start-up and drain lines (errors,
        warnings, tracebacks, shutdown messages)."""
        with contextlib.suppress(OSError):
            return [
                line
                for line in self.log.read_text(errors="replace").splitlines()
                if line.strip()
                and '"event":"request"' not in line
                and '"event":"listening"' not in line
                and '"event":"draining"' not in line
                and not line.startswith(("bare proxy on ", "mock upstream listening"))
            ]
        return []

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(server: Server, url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}"
            )
        with contextlib.suppress(OSError):
            if http_get(url, timeout=1.0)[0] == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{server.name} not ready at {url} after {timeout}s:\n{server.log_tail()}")


def stop(server: Server, timeout: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL if it will not go."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"  {server.name} ignored SIGTERM for {timeout}s; killing", file=sys.stderr)
            server.proc.kill()
            server.proc.wait()


@contextlib.contextmanager
def running(
    name: str,
    cmd: list[str],
    ready_url: str,
    url: str,
    log: Path,
    env: dict[str, str],
    cpus: frozenset[int] | None,
) -> Iterator[Server]:
    with log.open("wb") as out:
        # own session: a Ctrl-C reaches only this script, which stops the servers in order
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            # not the caller's directory: `-m` puts it first on sys.path, and a checkout there
            # would shadow the tree PYTHONPATH names
            cwd=log.parent,
            start_new_session=True,
            preexec_fn=pinned(cpus),  # noqa: PLW1509 - this script starts no threads
        )
    server = Server(name, proc, url, log, cpus)
    try:
        wait_ready(server, ready_url)
        yield server
    finally:
        stop(server)


def _with_path(env: dict[str, str], first: Path) -> dict[str, str]:
    out = dict(env)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(first), env.get("PYTHONPATH")) if p)
    return out


def server_env() -> dict[str, str]:
    """The environment of the servers: this one (PYTHONPATH included) without OTEL_*, so only
    the generated config decides tracing."""
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}


def start_mock(tmp: Path, pin: Pinning) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # the mock has no /healthz; its model list is the cheapest route. It comes from this
    # tree whatever gateway is measured, so two trees are compared against the same upstream.
    return running(
        "mock",
        [sys.executable, "-m", "gateway", "mock-upstream", "--port", str(port)],
        f"{base}/v1/models",
        base,
        tmp / "mock.log",
        _with_path(server_env(), REPO_ROOT),
        pin.other,
    )


def start_bare(tmp: Path, pin: Pinning, mock_url: str) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(BARE), "--port", str(port), "--upstream", mock_url]
    return running(
        "bare",
        [*cmd, "--key", UPSTREAM_KEY],
        f"{base}/v1/models",  # through to the mock: the proxy path works end to end
        base,
        tmp / "bare.log",
        server_env(),
        pin.proxy,
    )


def start_sink(tmp: Path, pin: Pinning) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    return running(
        "otlp-sink",
        [sys.executable, str(SINK), "--port", str(port)],
        f"{base}/healthz",
        base,
        tmp / "sink.log",
        server_env(),
        pin.other,
    )


def gateway_config(
    mock_url: str,
    state: Path,
    port: int,
    admin_port: int,
    *,
    cache: bool,
    traces_endpoint: str,
    log_level: str,
    budget: int | None,
) -> dict[str, Any]:
    team: dict[str, Any] = {"keys": ["${BENCH_KEY}"], "models": ["*"]}
    if budget:
        team["budgets"] = [{"tokens": budget, "per": "day"}]
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "limits": {"drain_timeout": 5},
        "upstreams": {
            "mock": {
                "base_url": mock_url,
                "api_key": UPSTREAM_KEY,
                "auth_header": "authorization",
                "models": ["*"],
            }
        },
        "teams": {"bench": team},
        "cache": {"enabled": cache},
        "state": {"store": "local", "path": str(state)},
        "telemetry": {
            "traces": {"endpoint": traces_endpoint, "sample_ratio": 1.0},
            "logs": {"level": log_level, "format": "json"},
        },
    }


def start_gateway(
    tmp: Path, label: str, config: dict[str, Any], key: str, pin: Pinning
) -> contextlib.AbstractContextManager[Server]:
    path = tmp / f"gateway-{label}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = server_env()
    env["BENCH_KEY"] = key
    base = f"http://127.0.0.1:{config['listen']['port']}"
    return running(
        "gateway",
        [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
        f"{base}/healthz",
        base,
        tmp / f"gateway-{label}.log",
        env,
        pin.proxy,
    )


def gateway_under_test() -> dict[str, Any]:
    """Where the `gateway` package the servers import lives, and its git commit."""
    probe = subprocess.run(
        [sys.executable, "-c", "import gateway; print(gateway.__file__)"],
        env=server_env(),
        cwd=tempfile.gettempdir(),  # as the servers run: not from a checkout that shadows it
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        raise SystemExit(
            "no importable `gateway` package: run with PYTHONPATH=<a source tree> or "
            f"`pip install -e .` in this venv\n{probe.stderr.strip()}"
        )
    file = probe.stdout.strip()
    info: dict[str, Any] = {"file": file, "commit": None, "package_commit": None, "dirty": None}
    tree = str(Path(file).parent)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["commit"] = subprocess.run(
            ["git", "-C", tree, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        info["package_commit"] = subprocess.run(
            ["git", "-C", tree, "log", "-1", "--format=%h", "--", "."],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", tree, "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        info["dirty"] = bool(status.strip())
    return info


# ------------------------------------------------------------------ one measured run


def request_body(scenario: Scenario, args: argparse.Namespace) -> str:
    body: dict[str, Any] = {
        "model": MODEL,
        "input": PROMPT,
        "max_output_tokens": (
            args.stream_output_tokens if scenario.stream else args.max_output_tokens
        ),
    }
    if scenario.websocket:
        return json.dumps({"type": "response.create", **body})
    if scenario.stream:
        body["stream"] = True
    return json.dumps(body)


def sink_stats(sink: Server | None) -> dict[str, int] | None:
    if sink is None:
        return None
    stats: dict[str, int] = json.loads(http_get(f"{sink.url}/stats")[1])
    return stats


@dataclass
class Target:
    """What one load run is aimed at."""

    name: str  # direct | bare | gateway
    url: str
    key: str
    proxy: Server | None  # the process whose CPU is measured (None: direct)
    background: bool  # has trailing work after a request (ledger, spans): settle longer


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def measure(
    args: argparse.Namespace,
    scenario: Scenario,
    concurrency: int,
    target: Target,
    mock: Server,
    sink: Server | None,
    pin: Pinning,
    profile_to: Path | None,
) -> dict[str, Any]:
    """One load run; CPU of the watched servers is read while they are idle around it."""
    watched = [s for s in (target.proxy, mock, sink) if s is not None]
    settle = args.settle if target.background else IDLE_SETTLE
    cmd = [
        sys.executable,
        str(LOAD),
        "--url",
        f"{target.url}/v1/responses",
        "--body",
        request_body(scenario, args),
        "--header",
        f"authorization: Bearer {target.key}",
        "--concurrency",
        str(concurrency),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--handshake",
    ]
    if scenario.stream:
        cmd.append("--stream")
    if scenario.websocket:
        cmd.append("--websocket")
    spy: subprocess.Popen[bytes] | None = None
    with (
        tempfile.TemporaryFile("w+") as errors,
        subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            preexec_fn=pinned(pin.other),  # noqa: PLW1509 - this script starts no threads
        ) as load,
    ):
        try:
            assert load.stdin is not None
            warm = read_event(load, "warm", errors)
            time.sleep(settle)  # let the warm-up's trailing work (ledger, spans) finish
            before = {s.name: s.cpu_seconds() for s in watched}
            main_before = target.proxy.main_thread_cpu_seconds() if target.proxy else 0.0
            sink_before = sink_stats(sink)
            if profile_to is not None and target.proxy is not None:
                spy = start_py_spy(
                    target.proxy.pid, args.duration, profile_to, pin, args.profile_nonblocking
                )
            load.stdin.write("go\n")
            load.stdin.flush()
            result = read_event(load, "result", errors)
            time.sleep(settle)  # ... and count the measured phase's trailing work
            after = {s.name: s.cpu_seconds() for s in watched}
            main_after = target.proxy.main_thread_cpu_seconds() if target.proxy else 0.0
            sink_after = sink_stats(sink)
            pin_problems = [p for s in watched if (p := s.pin_problem())]
        finally:
            if load.poll() is None:
                load.kill()
            if spy is not None:
                try:
                    spy.wait(args.duration + 15)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait()
    n = result["requests"]
    result["target"] = target.name
    result["warmup_requests"] = warm["warmup_requests"]
    user_sys = {
        name: (after[name][0] - before[name][0], after[name][1] - before[name][1]) for name in after
    }
    result["cpu_user_sys_s"] = {
        name: [round(u, 3), round(k, 3)] for name, (u, k) in user_sys.items()
    }
    result["cpu_s"] = {name: round(u + k, 3) for name, (u, k) in user_sys.items()}
    result["cpu_us_per_request"] = {
        name: round(cpu * 1e6 / n, 1) if n else None for name, cpu in result["cpu_s"].items()
    }
    result["proxy_cpu_us_per_request"] = (
        result["cpu_us_per_request"][target.proxy.name] if target.proxy is not None else None
    )
    # the event loop's thread alone: the rest is background threads (writers, exporters)
    result["proxy_main_thread_cpu_us_per_request"] = (
        round((main_after - main_before) * 1e6 / n, 1) if target.proxy is not None and n else None
    )
    # CPU cores each process kept busy during the measured phase (the servers' CPU also holds
    # the phase's trailing work, done during the settle pause)
    busy = {name: cpu / result["seconds"] for name, cpu in result["cpu_s"].items()}
    busy["load"] = result["load_cpu_s"] / result["seconds"]
    result["cpu_cores_busy"] = {name: round(v, 2) for name, v in busy.items()}
    result["pin_problems"] = pin_problems
    if sink_before is not None and sink_after is not None:
        result["otlp"] = {k: sink_after[k] - sink_before[k] for k in sink_after}
    if spy is not None and profile_to is not None:
        result["profile"] = summarize_profile(profile_to)
    return result


def start_py_spy(
    pid: int, seconds: float, raw: Path, pin: Pinning, nonblocking: bool
) -> subprocess.Popen[bytes]:
    exe = py_spy()
    if exe is None:
        raise RuntimeError("--profile needs py-spy (pip install py-spy)")
    raw.parent.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    cmd += ["--rate", "250", "--format", "raw", "--function"]
    if nonblocking:
        cmd.append("--nonblocking")
    with raw.with_suffix(".log").open("wb") as log:
        return subprocess.Popen(
            [*cmd, "--output", str(raw)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=pinned(pin.other),  # noqa: PLW1509 - this script starts no threads
        )


def summarize_profile(raw: Path) -> str:
    """Run profile_top on a py-spy raw file; the tables go next to it as .txt. Shares only:
    the profiled run's CPU per request is inflated by the sampling."""
    if not raw.exists():
        return f"{raw}: py-spy wrote nothing (see {raw.with_suffix('.log')})"
    cmd = [sys.executable, str(PROFILE_TOP), str(raw), "--top", "25"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    txt = raw.with_suffix(".txt")
    txt.write_text(out)
    return str(txt)


def read_event(proc: subprocess.Popen[str], event: str, errors: IO[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        errors.seek(0)
        err = errors.read()[-4000:]
        raise RuntimeError(f"load generator exited ({proc.returncode}) before {event!r}:\n{err}")
    data: dict[str, Any] = json.loads(line)
    if data.get("event") != event:
        raise RuntimeError(f"load generator: expected {event!r}, got {line!r}")
    return data


# ------------------------------------------------------------------ a suite


def cell(scenario: str, concurrency: int, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One scenario at one concurrency: every target's result and the comparisons."""
    direct, bare, gw = results.get("direct"), results.get("bare"), results.get("gateway")

    def cpu(r: dict[str, Any] | None) -> float | None:
        return None if r is None else r.get("proxy_cpu_us_per_request")

    def ttfb(r: dict[str, Any] | None) -> float | None:
        return None if r is None else r.get("ttfb_p50_ms")

    def minus(a: float | None, b: float | None, digits: int = 3) -> float | None:
        return None if a is None or b is None else round(a - b, digits)

    bare_cpu, gw_cpu = cpu(bare), cpu(gw)
    streams = SCENARIOS[scenario].stream and not SCENARIOS[scenario].cache
    return {
        "scenario": scenario,
        "concurrency": concurrency,
        "results": results,
        "gateway_cpu_ratio": round(gw_cpu / bare_cpu, 3) if gw_cpu and bare_cpu else None,
        "added_ttfb_p50_ms": {
            "bare": minus(ttfb(bare), ttfb(direct)) if streams else None,
            "gateway": minus(ttfb(gw), ttfb(direct)) if streams else None,
        },
        "added_p50_ms": {
            "bare": minus(_p50(bare), _p50(direct)),
            "gateway": minus(_p50(gw), _p50(direct)),
        },
    }


def _p50(r: dict[str, Any] | None) -> float | None:
    return None if r is None else r.get("p50_ms")


def run_suite(
    args: argparse.Namespace, otel: bool, tmp: Path, pin: Pinning, log_notes: list[str]
) -> list[dict[str, Any]]:
    label = "otel-on" if otel else "otel-off"
    key = "bench-" + secrets.token_hex(12)
    cells: list[dict[str, Any]] = []
    log_level = "warning" if args.quiet_logs else "info"

    def check_logs(server: Server) -> None:
        lines = server.unusual_log_lines()
        if lines:
            log_notes.append(
                f"{server.name} ({label}): {len(lines)} unusual log lines, first: "
                + "\n    ".join(line[:400] for line in lines[:5])
            )

    with contextlib.ExitStack() as stack:
        mock = stack.enter_context(start_mock(tmp, pin))
        sink = stack.enter_context(start_sink(tmp, pin)) if otel else None
        bare = stack.enter_context(start_bare(tmp, pin, mock.url))
        direct_t = Target("direct", mock.url, UPSTREAM_KEY, None, False)
        bare_t = Target("bare", bare.url, "unused", bare, False)
        for cache in (False, True):
            group = [SCENARIOS[s] for s in args.scenarios if SCENARIOS[s].cache == cache]
            if not group:
                continue
            name = f"{label}-{'cache' if cache else 'nocache'}"
            cfg = gateway_config(
                mock.url,
                tmp / f"state-{name}",
                free_port(),
                free_port(),
                cache=cache,
                traces_endpoint=sink.url if sink else "",
                log_level=log_level,
                budget=args.budget,
            )
            with start_gateway(tmp, name, cfg, key, pin) as gw:
                gw_t = Target("gateway", gw.url, key, gw, True)
                targets = {"direct": direct_t, "bare": bare_t, "gateway": gw_t}
                for scenario in group:
                    for c in args.concurrency or scenario.concurrency:
                        runs: dict[str, list[dict[str, Any]]] = {t: [] for t in scenario.targets}
                        for round_ in range(args.rounds):
                            # every other round in reverse order: no target always goes first
                            order = scenario.targets[:: -1 if round_ % 2 else 1]
                            for t in order:
                                progress(label, scenario.name, c, t, round_, args.rounds)
                                profile_to = None
                                if args.profile and t in args.profile_targets and not round_:
                                    name = f"{t}-{label}-{scenario.name}-c{c}.raw"
                                    profile_to = args.profile / name
                                runs[t].append(
                                    measure(
                                        args, scenario, c, targets[t], mock, sink, pin, profile_to
                                    )
                                )
                                check_alive(gw, bare, mock)
                        results = {t: pooled(runs[t]) for t in scenario.targets}
                        cells.append(cell(scenario.name, c, results))
            check_logs(gw)  # after the stop, so shutdown problems show too
    check_logs(bare)
    return cells


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one target in one cell as one result: counts and CPU summed (so CPU per
    request and rps are over all rounds), latency percentiles the median of the rounds'."""
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    out: dict[str, Any] = {k: first[k] for k in ("target", "url", "stream", "concurrency")}
    for key in ("requests", "errors", "warmup_requests", "warmup_errors"):
        out[key] = sum(r[key] for r in runs)
    out["seconds"] = round(sum(r["seconds"] for r in runs), 3)
    out["load_cpu_s"] = round(sum(r["load_cpu_s"] for r in runs), 3)
    out["rps"] = round(out["requests"] / out["seconds"], 1) if out["seconds"] else 0.0
    for key in ("p50_ms", "p99_ms", "ttfb_p50_ms", "ttfb_p99_ms"):
        values = sorted(r[key] for r in runs if r[key] is not None)
        out[key] = values[len(values) // 2] if values else None
    for key in ("statuses", "cache", "sse_events"):
        merged: Counter[str] = Counter()
        for r in runs:
            merged.update(r.get(key) or {})
        out[key] = dict(merged)
    names = first["cpu_s"].keys()
    user_sys = {n: [sum(r["cpu_user_sys_s"][n][i] for r in runs) for i in (0, 1)] for n in names}
    out["cpu_user_sys_s"] = {n: [round(u, 3), round(k, 3)] for n, (u, k) in user_sys.items()}
    out["cpu_s"] = {n: round(u + k, 3) for n, (u, k) in user_sys.items()}
    n_req = out["requests"]
    out["cpu_us_per_request"] = {
        n: round(cpu * 1e6 / n_req, 1) if n_req else None for n, cpu in out["cpu_s"].items()
    }
    proxy = next((n for n in names if n not in ("mock", "otlp-sink")), None)
    out["proxy_cpu_us_per_request"] = out["cpu_us_per_request"][proxy] if proxy else None
    busy = {n: cpu / out["seconds"] for n, cpu in out["cpu_s"].items()}
    busy["load"] = out["load_cpu_s"] / out["seconds"]
    out["cpu_cores_busy"] = {n: round(v, 2) for n, v in busy.items()}
    out["error_samples"] = [e for r in runs for e in r["error_samples"]][:5]
    out["pin_problems"] = [p for r in runs for p in r["pin_problems"]]
    if all("otlp" in r for r in runs):
        out["otlp"] = {k: sum(r["otlp"][k] for r in runs) for k in first["otlp"]}
    if "profile" in first:
        out["profile"] = first["profile"]
    out["rounds"] = [
        {k: r[k] for k in ("rps", "p50_ms", "p99_ms", "ttfb_p50_ms", "proxy_cpu_us_per_request")}
        for r in runs
    ]
    return out


def check_alive(*servers: Server) -> None:
    for s in servers:
        if s.proc.poll() is not None:
            raise RuntimeError(f"{s.name} died (exit {s.proc.returncode}):\n{s.log_tail()}")


def progress(label: str, scenario: str, c: int, target: str, round_: int, rounds: int) -> None:
    of = f" (round {round_ + 1}/{rounds})" if rounds > 1 else ""
    print(f"  [{label}] {scenario:<12} c={c:<3} {target}{of} ...", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ output


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


COLUMNS = (
    "scenario",
    "conc",
    "target",
    "rps",
    "p50 ms",
    "p99 ms",
    "ttfb50 ms",
    "+ttfb ms",
    "CPU µs/req",
    "x bare",
    "mock µs/req",
    "errors",
)


def table(cells: list[dict[str, Any]]) -> str:
    lines: list[list[str]] = [list(COLUMNS)]
    for c in cells:
        stream = SCENARIOS[c["scenario"]].stream
        for target, r in c["results"].items():
            ratio = None
            if target == "bare":
                ratio = 1.0
            elif target == "gateway":
                ratio = c["gateway_cpu_ratio"]
            added = c["added_ttfb_p50_ms"].get(target) if c["concurrency"] == 1 else None
            lines.append(
                [
                    c["scenario"],
                    str(c["concurrency"]),
                    target,
                    fmt(r["rps"], 0),
                    fmt(r["p50_ms"]),
                    fmt(r["p99_ms"]),
                    fmt(r["ttfb_p50_ms"]) if stream else "-",
                    fmt(added),
                    fmt(r["proxy_cpu_us_per_request"], 0),
                    fmt(ratio),
                    fmt(r["cpu_us_per_request"].get("mock"), 0),
                    str(r["errors"]),
                ]
            )
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    out = []
    for i, line in enumerate(lines):
        cells_ = [
            c.ljust(w) if j < 3 else c.rjust(w)
            for j, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells_))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def targets_check(cells: list[dict[str, Any]]) -> list[str]:
    """The README's targets against this run: met or missed, cell by cell."""
    out = []
    for c in cells:
        where = f"{c['scenario']} c={c['concurrency']}"
        ratio, limit = c["gateway_cpu_ratio"], CPU_TARGETS[c["scenario"]]
        if ratio is not None:
            verdict = "met" if ratio <= limit else "MISSED"
            out.append(f"{where}: gateway CPU {ratio:.2f}x bare (target <= {limit}x): {verdict}")
        added = c["added_ttfb_p50_ms"]
        if c["concurrency"] == 1 and added["gateway"] is not None and added["bare"] is not None:
            over = added["gateway"] - added["bare"]
            verdict = "met" if over <= TTFB_TARGET_MS else "MISSED"
            out.append(
                f"{where}: added TTFB gateway {added['gateway']:.2f} ms, bare "
                f"{added['bare']:.2f} ms: +{over:.2f} ms (target <= {TTFB_TARGET_MS} ms): {verdict}"
            )
    return out


def notes(cells: list[dict[str, Any]]) -> list[str]:
    out = []
    for c in cells:
        where = f"{c['scenario']} c={c['concurrency']}"
        for target, r in c["results"].items():
            busy = ", ".join(f"{name} {v:.2f}" for name, v in r["cpu_cores_busy"].items())
            line = f"{where} {target}: cores busy {busy}"
            if r["proxy_cpu_us_per_request"] is not None:
                user, system = r["cpu_user_sys_s"][target]
                total = max(user + system, 1e-9)
                line += f"; {target} user/sys {100 * user / total:.0f}/{100 * system / total:.0f}%"
            if "rounds" in r and r["proxy_cpu_us_per_request"] is not None:
                each = ", ".join(f"{x['proxy_cpu_us_per_request']:.0f}" for x in r["rounds"])
                line += f"; CPU µs/req by round {each}"
            if r.get("sse_events"):
                line += f"; SSE events per stream {r['sse_events']}"
            if r.get("cache"):
                line += f"; x-gateway-cache {r['cache']}"
            if "otlp" in r:
                line += f"; OTLP spans {r['otlp']['spans']} in {r['otlp']['exports']} exports"
            out.append(line)
            if r["errors"] or r["warmup_errors"]:
                out.append(
                    f"{where} {target}: {r['errors']} errors "
                    f"(+{r['warmup_errors']} in warm-up), statuses {r['statuses']}, "
                    f"first: {json.dumps(r['error_samples'][:2])}"
                )
            out.extend(f"{where} {target}: PINNING {p}" for p in r["pin_problems"])
            if "profile" in r:
                out.append(f"{where} {target}: profile {r['profile']}")
    return out


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    loadavg = ""
    with contextlib.suppress(OSError):
        loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": loadavg,
    }


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of: {', '.join(SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--concurrency",
        default=None,
        help="comma-separated, for every scenario (default: json and cache-json 1,32; "
        "stream and cache-stream 1,16)",
    )
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each cell's targets this many times, in alternating order, and pool them "
        "(on a busy machine: e.g. --rounds 3 --duration 2)",
    )
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each")
    p.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="idle seconds before and after each measured gateway phase, so background "
        "work (ledger flush every 0.5 s, span batches every 1 s) lands in the right phase",
    )
    p.add_argument("--max-output-tokens", type=int, default=16, help="of JSON requests")
    p.add_argument(
        "--stream-output-tokens",
        type=int,
        default=50,
        help="max_output_tokens of streamed requests (50: the mock sends 58 SSE events)",
    )
    p.add_argument(
        "--budget",
        type=int,
        default=None,
        metavar="TOKENS",
        help="give the team a daily token budget (default: no budget)",
    )
    p.add_argument(
        "--quiet-logs",
        action="store_true",
        help="gateway log level warning (default info: one log line per request, "
        "part of the real cost)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--otel",
        action="store_true",
        help="export traces (sample ratio 1.0) to a local OTLP/HTTP sink",
    )
    mode.add_argument(
        "--compare-otel",
        action="store_true",
        help="run everything twice: without and with the trace exporter",
    )
    p.add_argument(
        "--proxy-cpu",
        type=int,
        default=None,
        help="the CPU the proxies run on (default: the last usable one)",
    )
    p.add_argument("--no-pin", action="store_true", help="pin nothing")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="run py-spy on the proxy during each measured phase; raw stacks and "
        "profile_top tables go to DIR",
    )
    p.add_argument(
        "--profile-targets",
        default="gateway",
        help="comma-separated targets to profile with --profile (gateway, bare)",
    )
    p.add_argument(
        "--profile-nonblocking",
        action="store_true",
        help="py-spy reads the proxy while it runs instead of pausing it for each sample: "
        "less overhead, but about a third of the stacks come out cut short or mixed",
    )
    p.add_argument("--output", type=Path, default=BENCH_DIR / "results" / "latest.json")
    p.add_argument(
        "--keep-tmp", action="store_true", help="keep the temp dir (configs, server logs, ledgers)"
    )
    args = p.parse_args(argv)
    names = [ALIASES.get(s.strip(), s.strip()) for s in args.scenarios.split(",") if s.strip()]
    unknown = set(names) - set(SCENARIOS)
    if unknown or not names:
        p.error(
            f"--scenarios: unknown {', '.join(sorted(unknown))} "
            f"(choose from {', '.join(SCENARIOS)})"
        )
    args.scenarios = list(dict.fromkeys(names))
    if args.concurrency is not None:
        args.concurrency = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
        if not args.concurrency or min(args.concurrency) < 1:
            p.error("--concurrency: positive integers, e.g. 1,32")
    if args.rounds < 1:
        p.error("--rounds: at least 1")
    args.profile_targets = {t.strip() for t in args.profile_targets.split(",") if t.strip()}
    if not args.profile_targets <= {"gateway", "bare"}:
        p.error("--profile-targets: gateway and/or bare")
    return args


def _terminate(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the context managers, which stop the servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pin = Pinning.choose(args.proxy_cpu, not args.no_pin)
    if pin.other is not None:
        os.sched_setaffinity(0, pin.other)  # this script too: off the proxies' CPU
    under_test = gateway_under_test()
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    modes = [False, True] if args.compare_otel else [args.otel]
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "gateway_under_test": under_test,
        "pinning": {
            "proxy_cpus": sorted(pin.proxy) if pin.proxy else None,
            "other_cpus": sorted(pin.other) if pin.other else None,
        },
        "settings": {
            "scenarios": args.scenarios,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "settle_s": args.settle,
            "max_output_tokens": args.max_output_tokens,
            "stream_output_tokens": args.stream_output_tokens,
            "budget_tokens_per_day": args.budget,
            "gateway_log_level": "warning" if args.quiet_logs else "info",
            "profiled": args.profile is not None,
        },
        "suites": {},
    }
    commit = under_test["commit"] or "no git"
    if under_test["package_commit"] and under_test["package_commit"] != under_test["commit"]:
        commit = f"HEAD {commit}, package last changed in {under_test['package_commit']}"
    dirty = " + uncommitted changes" if under_test["dirty"] else ""
    m = report["machine"]
    print(f"gateway under test: {under_test['file']} ({commit}{dirty})")
    print(f"bare proxy: {BARE}; mock upstream from {REPO_ROOT}")
    print(
        f"{m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}, load average "
        f"{m['loadavg_at_start']}; {pin.describe()}"
    )
    rounds = f", {args.rounds} rounds per cell pooled" if args.rounds > 1 else ""
    print(
        f"{args.duration:g} s measured after {args.warmup:g} s warm-up per run{rounds}; "
        f"gateway log level {report['settings']['gateway_log_level']}, metrics on; "
        "latencies in ms",
        flush=True,
    )
    if args.profile is not None:
        print(
            f"PROFILED with py-spy ({', '.join(sorted(args.profile_targets))}): "
            "CPU figures are perturbed",
            flush=True,
        )
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    failed = False
    log_notes: list[str] = []
    report["log_notes"] = log_notes
    try:
        for otel in modes:
            label = "otel-on" if otel else "otel-off"
            report["suites"][label] = run_suite(args, otel, tmp, pin, log_notes)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"\nbenchmark failed: {e}", file=sys.stderr)
        failed = True
    finally:
        if args.keep_tmp or failed:
            print(f"configs and server logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        return 1
    for label, cells in report["suites"].items():
        print(
            f"\n== traces {'exported to a local OTLP sink' if label == 'otel-on' else 'off'}"
            f" ({label})\n"
        )
        print(table(cells))
        print("\ntargets:")
        for line in targets_check(cells):
            print(f"  {line}")
        print("notes:")
        for line in notes(cells):
            print(f"  * {line}")
    for note in log_notes:
        print(f"\n! {note}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nraw results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
