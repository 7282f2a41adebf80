"""What a retry costs: gateway CPU per client request when every request's first attempt fails
with a 503 and its retry succeeds, beside the same gateway whose upstream never fails, in one
run with the same pinning (`run.py`'s harness: the gateway on one CPU, the rest on the other).

    python bench/retry.py [--concurrency 1 8] [--duration 5] [--rounds 2]

The retried gateway routes every request to an upstream that always fails (a mock with
`--fail-ratio 1.0`, never ejected) and then to a healthy one, so each client request takes
exactly two attempts (the report shows the measured mean; a run with any failed request stops).
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
HEALTH = {"eject_after": 1_000_000_000, "eject_for": 1}  # the failing upstream stays in


def failing_mock(tmp: Path, pin: harness.Pinning) -> contextlib.AbstractContextManager[Any]:
    port = harness.free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gateway", "mock-upstream", "--port", str(port)]
    return harness.running(
        "mock-failing",
        [*cmd, "--fail-ratio", "1.0", "--fail-status", "503"],
        f"{base}/mock/faults",  # /v1 fails every call; the control route answers
        base,
        tmp / "mock-failing.log",
        harness._with_path(harness.server_env(), harness.REPO_ROOT),
        pin.other,
    )


def gateway(
    tmp: Path, label: str, mock: Any, key: str, pin: harness.Pinning, failing: Any = None
) -> tuple[contextlib.AbstractContextManager[Any], str]:
    """The gateway's context manager and its /metrics URL; with `failing`, every request goes
    there first, then to `mock`."""
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
    if failing is not None:
        ok = cfg["upstreams"].pop("mock")
        cfg["upstreams"] = {"failing": {**ok, "base_url": failing.url}, "mock": ok}
        cfg["routes"] = [{"models": ["*"], "upstreams": ["failing", "mock"]}]
        cfg["health"] = HEALTH
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
        retried_cm, retried_metrics = gateway(tmp, "retried", ok_mock, key, pin, bad_mock)
        plain = stack.enter_context(plain_cm)
        retried = stack.enter_context(retried_cm)
        for c in ours.concurrency:
            cpu: dict[str, list[float]] = {"plain": [], "retried": []}
            attempts: list[float] = []
            for round_ in range(ours.rounds):
                for name, gw in (("plain", plain), ("retried", retried)):
                    target = harness.Target("gateway", gw.url, key, gw, True)
                    calls = attempts_so_far(retried_metrics)
                    result = harness.measure(args, scenario, c, target, ok_mock, None, pin, None)
                    if result["errors"] or result["warmup_errors"]:
                        raise SystemExit(f"{name} c={c}: failed requests: {result['statuses']}")
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
