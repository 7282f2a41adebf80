"""What a response costs over the Responses WebSocket mode, beside the same response as an
SSE stream, on one gateway in one run (`run.py`'s harness and pinning: the gateway on one CPU,
the mock and the load generator on the other).

    python bench/websocket.py [--concurrency 1 16] [--duration 5] [--rounds 2]

Both go to the mock upstream as the same streamed `POST /v1/responses` (bridge mode), 58 SSE
events each: over SSE the client makes one HTTP request per response; over the WebSocket each
load worker keeps one connection and sends a `response.create` per response, and gets each
event as one message. The report is gateway CPU per response (the smallest of the rounds) and
the ratio WebSocket / SSE.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as harness  # the harness next to this file

WEBSOCKET = harness.Scenario(
    "websocket", stream=True, cache=False, concurrency=(1,), websocket=True
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--profile", type=Path, help="py-spy each measured phase into this directory")
    ours = p.parse_args(argv)
    args = harness.parse_args(["--duration", str(ours.duration)])
    pin = harness.Pinning.choose(None, True)
    key = "bench-" + secrets.token_hex(12)
    print(pin.describe(), file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as raw, contextlib.ExitStack() as stack:
        tmp = Path(raw)
        mock = stack.enter_context(harness.start_mock(tmp, pin))
        cfg = harness.gateway_config(
            mock.url,
            tmp / "state",
            harness.free_port(),
            harness.free_port(),
            cache=False,
            traces_endpoint="",
            log_level="info",
            budget=None,
        )
        gw = stack.enter_context(harness.start_gateway(tmp, "gateway", cfg, key, pin))
        target = harness.Target("gateway", gw.url, key, gw, True)
        for c in ours.concurrency:
            cpu: dict[str, list[float]] = {"sse": [], "websocket": []}
            for round_ in range(ours.rounds):
                order = (("sse", harness.SCENARIOS["stream"]), ("websocket", WEBSOCKET))
                for name, scenario in order[:: -1 if round_ % 2 else 1]:
                    spy = ours.profile / f"{name}-c{c}-{round_}.raw" if ours.profile else None
                    result = harness.measure(args, scenario, c, target, mock, None, pin, spy)
                    if result["errors"] or result["warmup_errors"]:
                        raise SystemExit(
                            f"{name} c={c}: failed: {result['statuses']} {result['error_samples']}"
                        )
                    cpu[name].append(result["proxy_cpu_us_per_request"])
                    print(
                        f"c={c} round {round_} {name}: {result['proxy_cpu_us_per_request']} us,"
                        f" {result['rps']} responses/s, events {result['sse_events']}",
                        file=sys.stderr,
                    )
                    if "profile" in result:
                        print(result["profile"], file=sys.stderr)
            sse, ws = min(cpu["sse"]), min(cpu["websocket"])
            rows.append((c, sse, ws, ws / sse))
    print("| concurrency | SSE, µs CPU/response | WebSocket, µs CPU/response | ratio |")
    print("|---|---|---|---|")
    for c, sse, ws, ratio in rows:
        print(f"| {c} | {sse:.0f} | {ws:.0f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
