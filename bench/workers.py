"""Requests per second of `gateway serve --workers N` for several N, against the mock upstream.

    python bench/workers.py [--workers 1 2] [--concurrency 32] [--duration 5] [--rounds 2]
                            [--scenario json|stream] [--store redis://127.0.0.1:6379/0]
                            [--prefix gwbench_]

Each round starts the gateway afresh with N workers (cache off, logs on, no trace export), in
front of one mock upstream (no delay, no pacing), and drives it with bench/load.py (closed loop,
`--concurrency` keep-alive connections, which SO_REUSEPORT spreads over the workers). Nothing is
pinned: the workers, the mock and the load generator share the machine's cores, as they would.
`--store local` is allowed only for `--workers 1`. A measurement, not a test: the best round
of each N is printed, with CPU milliseconds per request of the gateway (supervisor and
workers), the mock and the load generator: on a small machine their sum says what is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as harness  # the harness next to this file


def gateway_cpu(supervisor: int) -> float:
    """CPU seconds used so far by the gateway: the process and its children (the workers)."""
    pids = [supervisor]
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text()
        pids += [int(p) for p in children.split()]
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            raw = Path(f"/proc/{pid}/stat").read_text()
            fields = raw[raw.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / harness.CLK_TCK
    return total


def config(mock_url: str, tmp: Path, workers: int, store: str, prefix: str) -> dict[str, Any]:
    cfg = harness.gateway_config(
        mock_url,
        tmp / f"state-{workers}-{uuid.uuid4().hex[:6]}",
        harness.free_port(),
        harness.free_port(),
        cache=False,
        traces_endpoint="",
        log_level="info",
        budget=None,
    )
    cfg["state"]["store"] = store
    if store != "local" and prefix:
        cfg["state"]["prefix"] = f"{prefix}{uuid.uuid4().hex[:8]}:"
    return cfg


@contextlib.contextmanager
def gateway(tmp: Path, cfg: dict[str, Any], workers: int, key: str) -> Any:
    path = tmp / f"gateway-{workers}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = harness.server_env()
    env["BENCH_KEY"] = key
    admin = f"http://127.0.0.1:{cfg['admin']['port']}"
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(path)]
    with harness.running(
        "gateway",
        [*cmd, "--workers", str(workers)],
        f"{admin}/readyz",  # with N workers: 200 once every worker is ready
        f"http://127.0.0.1:{cfg['listen']['port']}",
        tmp / f"gateway-{workers}.log",
        env,
        None,
    ) as server:
        yield server


def load(url: str, key: str, args: argparse.Namespace) -> dict[str, Any]:
    body = {"model": harness.MODEL, "input": harness.PROMPT, "max_output_tokens": 64}
    if args.scenario == "stream":
        body["stream"] = True
    cmd = [
        sys.executable,
        str(harness.LOAD),
        "--url",
        f"{url}/v1/responses",
        "--body",
        json.dumps(body),
        "--header",
        f"authorization: Bearer {key}",
        "--concurrency",
        str(args.concurrency),
        "--duration",
        str(args.duration),
        "--warmup",
        "1",
        *(["--stream"] if args.scenario == "stream" else []),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--scenario", choices=("json", "stream"), default="json")
    p.add_argument("--store", default="redis://127.0.0.1:6379/0")
    p.add_argument(
        "--prefix",
        default="gwbench_",
        help="state.prefix of each run, made unique (empty: the store's default)",
    )
    args = p.parse_args(argv)
    key = "bench-" + secrets.token_hex(12)
    pin = harness.Pinning.choose(None, False)
    rows = []
    with tempfile.TemporaryDirectory() as raw, contextlib.ExitStack() as stack:
        tmp = Path(raw)
        mock = stack.enter_context(harness.start_mock(tmp, pin))
        for n in args.workers:
            store = args.store
            best: dict[str, Any] | None = None
            for round_ in range(args.rounds):
                cfg = config(mock.url, tmp, n, store, args.prefix)
                with gateway(tmp, cfg, n, key) as gw:
                    cpu, mock_cpu = gateway_cpu(gw.pid), gateway_cpu(mock.pid)
                    result = load(gw.url, key, args)
                    done = max(1, result["requests"])
                    result["cpu_per_request_ms"] = 1000 * (gateway_cpu(gw.pid) - cpu) / done
                    result["mock_ms"] = 1000 * (gateway_cpu(mock.pid) - mock_cpu) / done
                    result["load_ms"] = 1000 * result["load_cpu_s"] / done
                if result["errors"] or result["warmup_errors"]:
                    raise SystemExit(f"--workers {n}: failed requests: {result['statuses']}")
                print(f"--workers {n} round {round_}: {result['rps']} req/s", file=sys.stderr)
                if best is None or result["rps"] > best["rps"]:
                    best = result
            assert best is not None
            rows.append((n, store, best))
    print(f"scenario {args.scenario}, concurrency {args.concurrency}, {args.duration} s, best of "
          f"{args.rounds}")  # fmt: skip
    print("| workers | store | req/s | p50 ms | p99 ms | CPU ms/request: gateway | mock | load |")
    print("|---|---|---|---|---|---|---|---|")
    for n, store, r in rows:
        cpu = f"{r['cpu_per_request_ms']:.2f} | {r['mock_ms']:.2f} | {r['load_ms']:.2f}"
        print(f"| {n} | {store.split('://')[0]} | {r['rps']:.0f} | {r['p50_ms']} | {r['p99_ms']} "
              f"| {cpu} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
