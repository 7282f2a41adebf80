"""Benchmark: what the gateway adds on top of an upstream, in latency and in CPU per request.

Starts the mock upstream (``gateway mock-upstream``, no delay, no pacing) and the gateway
(``gateway serve`` with a generated config) as subprocesses, and drives load from a third
process (bench/load.py) against the mock directly and through the gateway. Reads the servers'
CPU time (user+sys, /proc/<pid>/stat) around each measured phase. A measurement, not a test:
nothing here passes or fails on a time.

    .venv/bin/python bench/run.py                   # json,stream,cache at concurrency 1,32
    .venv/bin/python bench/run.py --compare-otel    # the same, without and with a trace exporter
    .venv/bin/python bench/run.py --scenarios stream --concurrency 8 --duration 10
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
BIN_DIR = Path(sys.executable).parent  # the venv's bin/, not the resolved interpreter
GATEWAY = BIN_DIR / "gateway"
LOAD = BENCH_DIR / "load.py"
SINK = BENCH_DIR / "otlp_sink.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SCENARIOS = ("json", "stream", "cache")
MODEL = "nusantara-base"
UPSTREAM_KEY = "bench-upstream-key"


# ------------------------------------------------------------------ processes


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> tuple[float, float]:
        """User and system CPU time of the process (all its threads), from /proc/<pid>/stat."""
        raw = Path(f"/proc/{self.pid}/stat").read_text()
        fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "; fields 3.. of stat(5)
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # utime, stime

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
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    with log.open("wb") as out:
        # own session: a Ctrl-C reaches only this script, which stops the servers in order
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    server = Server(name, proc, url, log)
    try:
        wait_ready(server, ready_url)
        yield server
    finally:
        stop(server)


def start_mock(tmp: Path) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # the mock has no /healthz; its model list is the cheapest route
    return running(
        "mock",
        [str(GATEWAY), "mock-upstream", "--port", str(port)],
        f"{base}/v1/models",
        base,
        tmp / "mock.log",
    )


def start_sink(tmp: Path) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    return running(
        "otlp-sink",
        [sys.executable, str(SINK), "--port", str(port)],
        f"{base}/healthz",
        base,
        tmp / "sink.log",
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
    tmp: Path, label: str, config: dict[str, Any], key: str
) -> contextlib.AbstractContextManager[Server]:
    path = tmp / f"gateway-{label}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["BENCH_KEY"] = key
    base = f"http://127.0.0.1:{config['listen']['port']}"
    return running(
        f"gateway ({label})",
        [str(GATEWAY), "serve", "--config", str(path)],
        f"{base}/healthz",
        base,
        tmp / f"gateway-{label}.log",
        env,
    )


# ------------------------------------------------------------------ one measured run


def request_body(stream: bool, max_output_tokens: int) -> str:
    body: dict[str, Any] = {
        "model": MODEL,
        "input": "Write a short poem about the harbor.",
        "max_output_tokens": max_output_tokens,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body)


def sink_stats(sink: Server | None) -> dict[str, int] | None:
    if sink is None:
        return None
    stats: dict[str, int] = json.loads(http_get(f"{sink.url}/stats")[1])
    return stats


def measure(
    args: argparse.Namespace,
    url: str,
    key: str,
    stream: bool,
    concurrency: int,
    watched: list[Server],
    sink: Server | None,
) -> dict[str, Any]:
    """One load run; CPU of the watched servers is read while they are idle around it."""
    cmd = [
        sys.executable,
        str(LOAD),
        "--url",
        f"{url}/v1/responses",
        "--body",
        request_body(stream, args.max_output_tokens),
        "--header",
        f"authorization: Bearer {key}",
        "--concurrency",
        str(concurrency),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--handshake",
    ]
    if stream:
        cmd.append("--stream")
    with (
        tempfile.TemporaryFile("w+") as errors,
        subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True
        ) as load,
    ):
        try:
            assert load.stdin is not None
            warm = read_event(load, "warm", errors)
            time.sleep(args.settle)  # let the warm-up's trailing work (ledger, spans) finish
            before = {s.name: s.cpu_seconds() for s in watched}
            sink_before = sink_stats(sink)
            load.stdin.write("go\n")
            load.stdin.flush()
            result = read_event(load, "result", errors)
            time.sleep(args.settle)  # ... and count the measured phase's trailing work
            after = {s.name: s.cpu_seconds() for s in watched}
            sink_after = sink_stats(sink)
        finally:
            if load.poll() is None:
                load.kill()
    n = result["requests"]
    result["warmup_requests"] = warm["warmup_requests"]
    user_sys = {
        name: (after[name][0] - before[name][0], after[name][1] - before[name][1]) for name in after
    }
    result["cpu_user_sys_s"] = {
        name: [round(u, 3), round(k, 3)] for name, (u, k) in user_sys.items()
    }
    result["cpu_s"] = {name: round(u + k, 3) for name, (u, k) in user_sys.items()}
    result["cpu_ms_per_request"] = {
        name: round(cpu * 1000 / n, 3) if n else None for name, cpu in result["cpu_s"].items()
    }
    # CPU cores each process kept busy during the measured phase (the servers' CPU also holds
    # the phase's trailing background work, done during the settle pause)
    busy = {name: cpu / result["seconds"] for name, cpu in result["cpu_s"].items()}
    busy["load"] = result["load_cpu_s"] / result["seconds"]
    result["cpu_cores_busy"] = {name: round(v, 2) for name, v in busy.items()}
    if sink_before is not None and sink_after is not None:
        result["otlp"] = {k: sink_after[k] - sink_before[k] for k in sink_after}
    return result


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


def row(
    scenario: str, concurrency: int, direct: dict[str, Any] | None, gateway: dict[str, Any]
) -> dict[str, Any]:
    def added(field: str) -> float | None:
        if direct is None or direct.get(field) is None or gateway.get(field) is None:
            return None
        return round(float(gateway[field]) - float(direct[field]), 3)

    return {
        "scenario": scenario,
        "concurrency": concurrency,
        "direct": direct,
        "gateway": gateway,
        "added_p50_ms": added("p50_ms"),
        "added_ttfb_p50_ms": added("ttfb_p50_ms"),
    }


def run_suite(
    args: argparse.Namespace, otel: bool, tmp: Path, log_notes: list[str]
) -> list[dict[str, Any]]:
    label = "otel-on" if otel else "otel-off"
    key = "bench-" + secrets.token_hex(12)
    rows: list[dict[str, Any]] = []
    log_level = "warning" if args.quiet_logs else "info"
    with contextlib.ExitStack() as stack:
        mock = stack.enter_context(start_mock(tmp))
        sink = stack.enter_context(start_sink(tmp)) if otel else None

        def gateway(cache: bool) -> contextlib.AbstractContextManager[Server]:
            name = f"{label}-{'cache' if cache else 'nocache'}"
            state = tmp / f"state-{name}"
            cfg = gateway_config(
                mock.url,
                state,
                free_port(),
                free_port(),
                cache=cache,
                traces_endpoint=sink.url if sink else "",
                log_level=log_level,
                budget=args.budget,
            )
            return start_gateway(tmp, name, cfg, key)

        def check_logs(gw: Server) -> None:
            lines = gw.unusual_log_lines()
            if lines:
                log_notes.append(
                    f"{gw.name}: {len(lines)} unusual log lines, first: "
                    + "\n    ".join(line[:400] for line in lines[:5])
                )

        def watched(gw: Server) -> list[Server]:
            return [gw, mock, sink] if sink else [gw, mock]

        plain = [s for s in ("json", "stream") if s in args.scenarios]
        if plain:
            with gateway(cache=False) as gw:
                for scenario in plain:
                    stream = scenario == "stream"
                    for c in args.concurrency:
                        progress(label, scenario, c, "direct")
                        direct = measure(args, mock.url, UPSTREAM_KEY, stream, c, [mock], None)
                        progress(label, scenario, c, "gateway")
                        through = measure(args, gw.url, key, stream, c, watched(gw), sink)
                        rows.append(row(scenario, c, direct, through))
                        check_alive(gw, mock)
            check_logs(gw)  # after the stop, so shutdown problems show too
        if "cache" in args.scenarios:
            with gateway(cache=True) as gw:
                for c in args.concurrency:
                    progress(label, "cache", c, "gateway")
                    through = measure(args, gw.url, key, False, c, watched(gw), sink)
                    rows.append(row("cache", c, None, through))
                    check_alive(gw, mock)
            check_logs(gw)
    return rows


def check_alive(*servers: Server) -> None:
    for s in servers:
        if s.proc.poll() is not None:
            raise RuntimeError(f"{s.name} died (exit {s.proc.returncode}):\n{s.log_tail()}")


def progress(label: str, scenario: str, c: int, target: str) -> None:
    print(f"  [{label}] {scenario:<6} c={c:<3} {target} ...", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ output


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


COLUMNS = (
    "scenario",
    "conc",
    "direct rps",
    "p50",
    "p99",
    "ttfb50",
    "gw rps",
    "p50",
    "p99",
    "ttfb50",
    "+p50 ms",
    "+ttfb ms",
    "gw CPU ms/req",
    "mock CPU ms/req",
    "errors d/g",
)


def table(rows: list[dict[str, Any]]) -> str:
    lines: list[list[str]] = [list(COLUMNS)]
    for r in rows:
        d, g = r["direct"] or {}, r["gateway"]
        cpu = g["cpu_ms_per_request"]
        gw_name = next(n for n in cpu if n.startswith("gateway"))
        lines.append(
            [
                r["scenario"],
                str(r["concurrency"]),
                fmt(d.get("rps"), 0),
                fmt(d.get("p50_ms")),
                fmt(d.get("p99_ms")),
                fmt(d.get("ttfb_p50_ms")) if r["scenario"] == "stream" else "-" if d else "n/a",
                fmt(g["rps"], 0),
                fmt(g["p50_ms"]),
                fmt(g["p99_ms"]),
                fmt(g["ttfb_p50_ms"]) if r["scenario"] == "stream" else "-",
                fmt(r["added_p50_ms"]),
                fmt(r["added_ttfb_p50_ms"]) if r["scenario"] == "stream" else "-",
                fmt(cpu[gw_name], 3),
                fmt(cpu["mock"], 3),
                f"{d.get('errors', 'n/a')}/{g['errors']}",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    out = []
    for i, line in enumerate(lines):
        cells = [
            c.ljust(w) if j < 2 else c.rjust(w)
            for j, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def notes(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        g = r["gateway"]
        where = f"{r['scenario']} c={r['concurrency']}"
        busy = ", ".join(f"{name.split(' ')[0]} {v:.2f}" for name, v in g["cpu_cores_busy"].items())
        user, system = next(v for k, v in g["cpu_user_sys_s"].items() if k.startswith("gate"))
        out.append(
            f"{where}: CPU cores busy in the gateway run: {busy}; "
            f"gateway user/sys {100 * user / max(user + system, 1e-9):.0f}/"
            f"{100 * system / max(user + system, 1e-9):.0f}%"
        )
        if r["scenario"] == "cache":
            total = sum(g["cache"].values()) or 1
            out.append(
                f"{where}: x-gateway-cache {g['cache']} "
                f"({100 * g['cache'].get('hit', 0) / total:.1f}% hits)"
            )
        if "otlp" in g:
            spans = g["otlp"]["spans"]
            out.append(
                f"{where}: OTLP sink got {spans} spans in {g['otlp']['exports']} exports "
                f"({spans / max(1, g['requests']):.2f} per request)"
            )
        for target, res in (("direct", r["direct"]), ("gateway", g)):
            if res and (res["errors"] or res["warmup_errors"]):
                out.append(
                    f"{where} {target}: {res['errors']} errors "
                    f"(+{res['warmup_errors']} in warm-up), statuses {res['statuses']}, "
                    f"first: {json.dumps(res['error_samples'][:2])}"
                )
    return out


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--scenarios",
        default="json,stream,cache",
        help="comma-separated, of: json, stream, cache (default: all)",
    )
    p.add_argument("--concurrency", default="1,32", help="comma-separated (default: 1,32)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each")
    p.add_argument(
        "--settle",
        type=float,
        default=1.2,
        help="idle seconds before and after each measured phase, so background "
        "work (ledger flush 0.5 s, span batches 1 s) lands in the right phase",
    )
    p.add_argument("--max-output-tokens", type=int, default=16)
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
    p.add_argument("--output", type=Path, default=BENCH_DIR / "results" / "latest.json")
    p.add_argument(
        "--keep-tmp", action="store_true", help="keep the temp dir (configs, server logs, ledgers)"
    )
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(
            f"--scenarios: unknown {', '.join(sorted(unknown))} (choose from json, stream, cache)"
        )
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency: positive integers, e.g. 1,32")
    return args


def _terminate(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the context managers, which stop the servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not GATEWAY.exists():
        print(
            f"no gateway entry point at {GATEWAY}; run `pip install -e .` in this venv",
            file=sys.stderr,
        )
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    modes = [False, True] if args.compare_otel else [args.otel]
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "settings": {
            "scenarios": args.scenarios,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "settle_s": args.settle,
            "max_output_tokens": args.max_output_tokens,
            "budget_tokens_per_day": args.budget,
            "gateway_log_level": "warning" if args.quiet_logs else "info",
        },
        "suites": {},
    }
    failed = False
    log_notes: list[str] = []
    report["gateway_log_notes"] = log_notes
    try:
        for otel in modes:
            label = "otel-on" if otel else "otel-off"
            report["suites"][label] = run_suite(args, otel, tmp, log_notes)
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
    m = report["machine"]
    print(
        f"\n{m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}; "
        f"{args.duration:g} s measured after {args.warmup:g} s warm-up per cell; "
        f"gateway log level {report['settings']['gateway_log_level']}; "
        f"latencies in ms"
    )
    for label, rows in report["suites"].items():
        print(
            f"\n== traces {'exported to a local OTLP sink' if label == 'otel-on' else 'off'}"
            f" ({label})\n"
        )
        print(table(rows))
        for line in notes(rows):
            print(f"  * {line}")
    for note in log_notes:
        print(f"\n! {note}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nraw results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
