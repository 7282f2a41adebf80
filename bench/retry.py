"""What a retry costs: gateway CPU per client request when every request's first attempt fails
with a 503 and its retry succeeds, beside the same gateway whose upstream never fails, in one
run with the same pinning (`run.py`'s harness: the gateway on one CPU, the rest on the other).

    python bench/retry.py [--concurrency 1 8] [--duration 5] [--rounds 2]

The failing upstream is the mock with `--fail-ratio 0.5`: every other upstream call fails, so
with retries on, nearly every client request takes two attempts (the report shows the mean).
Target: a retried request costs at most what two single attempts cost (ratio <= 2.0).
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as harness  # the harness next to this file

RETRIES = {"attempts": 2, "backoff": {"base": 0.0001, "max": 0.001}, "budget": 10.0}


def failing_mock(tmp: Path, pin: harness.Pinning) -> contextlib.AbstractContextManager[Any]:
    port = harness.free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gateway", "mock-upstream", "--port", str(port)]
    return harness.running(
        "mock-failing",
        [*cmd, "--fail-ratio", "0.5", "--fail-status", "503"],
        f"{base}/v1/models",  # fails every other call too: the harness retries until ready
        base,
        tmp / "mock-failing.log",
        harness._with_path(harness.server_env(), harness.REPO_ROOT),
        pin.other,
    )


def gateway(
    tmp: Path, label: str, mock: Any, key: str, pin: harness.Pinning
) -> tuple[contextlib.AbstractContextManager[Any], str]:
    """The gateway's context manager and its /metrics URL."""
    cfg = harness.gateway_config(
        mock.url,
        tmp / f"state-{label}",
        harness.free_port(),
        harness.free_port(),
        cache=False,
        traces_endpoint="",
        log_level="info",
        budget=None,
    )
    cfg["retries"] = RETRIES
    metrics = f"http://127.0.0.1:{cfg['admin']['port']}/metrics"
    return harness.start_gateway(tmp, label, cfg, key, pin), metrics


def attempts_so_far(metrics_url: str) -> float:
    """Upstream attempts the gateway has made (`gateway_upstream_attempts_total`)."""
    _, body = harness.http_get(metrics_url)
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line.startswith("gateway_upstream_attempts_total{")
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2)
    ours = p.parse_args(argv)
    args = harness.parse_args(["--duration", str(ours.duration)])
    pin = harness.Pinning.choose(None, True)
    scenario = harness.SCENARIOS["json"]
    key = "bench-" + secrets.token_hex(12)
    print(pin.describe(), file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as raw, contextlib.ExitStack() as stack:
        tmp = Path(raw)
        ok_mock = stack.enter_context(harness.start_mock(tmp, pin))
        bad_mock = stack.enter_context(failing_mock(tmp, pin))
        plain_cm, _ = gateway(tmp, "plain", ok_mock, key, pin)
        retried_cm, retried_metrics = gateway(tmp, "retried", bad_mock, key, pin)
        plain = stack.enter_context(plain_cm)
        retried = stack.enter_context(retried_cm)
        for c in ours.concurrency:
            cpu: dict[str, list[float]] = {"plain": [], "retried": []}
            attempts: list[float] = []
            for round_ in range(ours.rounds):
                for name, gw, mock in (("plain", plain, ok_mock), ("retried", retried, bad_mock)):
                    target = harness.Target("gateway", gw.url, key, gw, True)
                    calls = attempts_so_far(retried_metrics)
                    result = harness.measure(args, scenario, c, target, mock, None, pin, None)
                    cpu[name].append(result["proxy_cpu_us_per_request"])
                    if name == "retried" and result["requests"]:
                        total = result["requests"] + result["warmup_requests"]
                        attempts.append((attempts_so_far(retried_metrics) - calls) / total)
                    print(f"c={c} round {round_} {name}: {result['proxy_cpu_us_per_request']} us",
                          file=sys.stderr)  # fmt: skip
            one, two = min(cpu["plain"]), min(cpu["retried"])
            rows.append((c, one, two, two / one, sum(attempts) / len(attempts)))
    print("| concurrency | one attempt, µs CPU/request | retried, µs CPU/request | ratio | "
          "attempts/request |")  # fmt: skip
    print("|---|---|---|---|---|")
    for c, one, two, ratio, per in rows:
        print(f"| {c} | {one:.0f} | {two:.0f} | {ratio:.2f} | {per:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
