"""What capture costs: gateway CPU per 1 KB JSON request with capture off, on at
`sample_ratio: 0` (every request held until its end in case it fails: `errors: true`), and
on at `sample_ratio: 1.0` (every request stored, redacted and written to SQLite), in one run
with the same pinning (`run.py`'s harness: the gateway on one CPU, the rest on the other).

    python bench/capture.py [--concurrency 1 8] [--duration 5] [--rounds 2]

The CPU is the gateway process's, all threads included: the writer's redaction, rendering and
SQLite writes count too. The last column is the CPU of every thread but the event loop's,
ratio 1.0 minus off: the writer's own cost, free of the event loop's round-to-round noise.
Target: at most 100 µs more per request at ratio 1.0 than with capture off, and nothing
measurable at ratio 0. Results and where the time goes: bench/README.md, "Capture".
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

# about 1 KB of request body, as a prompt of sentences (keys and ids are rare in prompts)
PROMPT = " ".join(f"Line {i}: write a short poem about the harbor at dawn." for i in range(18))
SETUPS: dict[str, dict[str, Any] | None] = {
    "off": None,
    "ratio 0": {"enabled": True, "sample_ratio": 0.0, "errors": True},
    "ratio 1.0": {"enabled": True, "sample_ratio": 1.0, "errors": True},
}


def gateway(
    tmp: Path, label: str, mock: Any, key: str, pin: harness.Pinning, capture: Any
) -> contextlib.AbstractContextManager[Any]:
    cfg = harness.gateway_config(
        mock.url,
        tmp / f"state-{label.replace(' ', '-')}",
        harness.free_port(),
        harness.free_port(),
        cache=False,
        traces_endpoint="",
        log_level="info",
        budget=None,
    )
    if capture is not None:
        cfg["capture"] = capture
    return harness.start_gateway(tmp, label.replace(" ", "-"), cfg, key, pin)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2)
    ours = p.parse_args(argv)
    harness.PROMPT = PROMPT  # `request_body` reads it at each run
    args = harness.parse_args(["--duration", str(ours.duration)])
    pin = harness.Pinning.choose(None, True)
    scenario = harness.SCENARIOS["json"]
    key = "bench-" + secrets.token_hex(12)
    print(pin.describe(), file=sys.stderr)
    print(f"request body: {len(harness.request_body(scenario, args))} bytes", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as raw, contextlib.ExitStack() as stack:
        tmp = Path(raw)
        mock = stack.enter_context(harness.start_mock(tmp, pin))
        gws = {
            name: stack.enter_context(gateway(tmp, name, mock, key, pin, capture))
            for name, capture in SETUPS.items()
        }
        for c in ours.concurrency:
            cpu: dict[str, list[float]] = {name: [] for name in gws}
            background: dict[str, list[float]] = {name: [] for name in gws}
            for round_ in range(ours.rounds):
                for name, gw in gws.items():
                    target = harness.Target("gateway", gw.url, key, gw, True)
                    result = harness.measure(args, scenario, c, target, mock, None, pin, None)
                    if result["errors"] or result["warmup_errors"]:
                        raise SystemExit(f"{name} c={c}: failed requests: {result['statuses']}")
                    total = result["proxy_cpu_us_per_request"]
                    rest = total - result["proxy_main_thread_cpu_us_per_request"]
                    cpu[name].append(total)
                    background[name].append(rest)
                    print(f"c={c} round {round_} {name}: {total} us, {rest:.1f} off the loop",
                          file=sys.stderr)  # fmt: skip
            best = {name: min(values) for name, values in cpu.items()}
            bg = {name: min(values) for name, values in background.items()}
            rows.append((c, best, bg))
    print(
        "| concurrency | off, µs CPU/request | ratio 0 | ratio 1.0 | ratio 1.0 minus off"
        " | of which off the event loop |"
    )
    print("|---|---|---|---|---|---|")
    for c, best, bg in rows:
        off, zero, one = best["off"], best["ratio 0"], best["ratio 1.0"]
        writer = bg["ratio 1.0"] - bg["off"]
        print(f"| {c} | {off:.0f} | {zero:.0f} | {one:.0f} | {one - off:+.0f} | {writer:+.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
