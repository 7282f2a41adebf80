"""Closed-loop HTTP load generator for the benchmark (run as a subprocess by bench/run.py).

N workers each send one request at a time, back to back, over keep-alive connections:
first for ``--warmup`` seconds (not recorded), then for ``--duration`` seconds (recorded).
Between the two phases every worker finishes its request in flight, so the measured phase
starts with nothing in flight. With ``--handshake`` the generator then prints
``{"event": "warm"}`` and waits for a line on stdin before measuring, so the caller can read
the servers' CPU counters while they are idle. At the end it prints one JSON line::

    {"event": "result", "requests": ..., "errors": ..., "rps": ...,
     "p50_ms": ..., "p99_ms": ..., "ttfb_p50_ms": ..., "ttfb_p99_ms": ..., ...}

Latency is from just before the request is sent to the end of the response body;
TTFB is to the first non-empty body chunk (for a stream: the first SSE event).
A request is an error unless it gets HTTP 200 and a completed response
(``"status":"completed"`` in a JSON body, ``response.completed`` in a stream).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

_MAX_ERROR_SAMPLES = 5


@dataclass
class Phase:
    record: bool
    latencies: list[float] = field(default_factory=list)
    ttfbs: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)  # x-gateway-cache values
    sse_events: Counter[int] = field(default_factory=Counter)  # events per stream
    error_samples: list[dict[str, Any]] = field(default_factory=list)

    def error(self, sample: dict[str, Any]) -> None:
        self.errors += 1
        if self.record and len(self.error_samples) < _MAX_ERROR_SAMPLES:
            self.error_samples.append(sample)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of unsorted values, None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    stream: bool,
    phase: Phase,
) -> None:
    start = time.perf_counter()
    ttfb: float | None = None
    chunks: list[bytes] = []
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            async for chunk in resp.content.iter_any():
                if ttfb is None and chunk:
                    ttfb = time.perf_counter() - start
                chunks.append(chunk)
            status = resp.status
            cache = resp.headers.get("x-gateway-cache")
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        phase.statuses["exception"] += 1
        phase.error({"exception": repr(e)})
        return
    elapsed = time.perf_counter() - start
    data = b"".join(chunks)
    phase.statuses[str(status)] += 1
    if cache is not None:
        phase.cache[cache] += 1
    marker = b"response.completed" if stream else b'"status":"completed"'
    if status != 200 or marker not in data:
        phase.error({"status": status, "body": data[:500].decode(errors="replace")})
        return
    phase.latencies.append(elapsed)
    if stream:
        phase.sse_events[data.count(b"\n\n")] += 1
    if ttfb is not None:
        phase.ttfbs.append(ttfb)


async def one_response(
    ws: aiohttp.ClientWebSocketResponse, body: str, phase: Phase, within: float
) -> None:
    """One `response.create` on an open WebSocket, read to its `response.completed`."""
    start = time.perf_counter()
    ttfb: float | None = None
    events = 0
    try:
        await ws.send_str(body)
        async with asyncio.timeout(within):
            while True:
                msg = await ws.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise ConnectionError(f"the connection ended: {msg.type!r}")
                if ttfb is None:
                    ttfb = time.perf_counter() - start
                events += 1
                head = msg.data[:60]
                if '"response.completed"' in head:
                    break
                if '"error"' in head:
                    phase.statuses["error_event"] += 1
                    phase.error({"event": msg.data[:500]})
                    return
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        phase.statuses["exception"] += 1
        phase.error({"exception": repr(e)})
        return
    phase.statuses["200"] += 1
    phase.latencies.append(time.perf_counter() - start)
    phase.sse_events[events] += 1
    phase.ttfbs.append(ttfb)


async def run_phase(
    session: aiohttp.ClientSession,
    args: argparse.Namespace,
    body: bytes,
    headers: dict[str, str],
    seconds: float,
    phase: Phase,
    sockets: list[aiohttp.ClientWebSocketResponse],
) -> float:
    """All workers loop until the deadline, then finish their request in flight. WebSocket
    workers take their connection from `sockets` (or open one) and put it back at the end."""
    started = time.perf_counter()
    deadline = started + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            await one_request(session, args.url, body, headers, args.stream, phase)

    async def websocket_worker() -> None:
        # one connection per worker, kept across phases, as a WebSocket client keeps it
        ws = sockets.pop() if sockets else await session.ws_connect(args.url, headers=headers)
        try:
            while time.perf_counter() < deadline:
                await one_response(ws, body.decode(), phase, args.timeout)
        finally:
            sockets.append(ws)

    if args.websocket:
        await asyncio.gather(*(websocket_worker() for _ in range(args.concurrency)))
        return time.perf_counter() - started

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return time.perf_counter() - started


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    body = args.body.encode()
    headers = {"content-type": "application/json"}
    for h in args.header:
        name, _, value = h.partition(":")
        headers[name.strip()] = value.strip()
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=False)
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        warm = Phase(record=False)
        if args.warmup > 0:
            await run_phase(session, args, body, headers, args.warmup, warm, sockets)
        if args.handshake:
            print(
                json.dumps(
                    {
                        "event": "warm",
                        "warmup_requests": len(warm.latencies),
                        "warmup_errors": warm.errors,
                    }
                ),
                flush=True,
            )
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        phase = Phase(record=True)
        cpu = time.process_time()
        wall = await run_phase(session, args, body, headers, args.duration, phase, sockets)
        cpu = time.process_time() - cpu
    ok = len(phase.latencies)
    return {
        "event": "result",
        "url": args.url,
        "stream": args.stream,
        "websocket": args.websocket,
        "concurrency": args.concurrency,
        "seconds": round(wall, 3),
        "load_cpu_s": round(cpu, 3),  # this generator's own CPU time in the measured phase
        "requests": ok,
        "errors": phase.errors,
        "rps": round(ok / wall, 1) if wall > 0 else 0.0,
        "p50_ms": ms(percentile(phase.latencies, 0.50)),
        "p99_ms": ms(percentile(phase.latencies, 0.99)),
        "ttfb_p50_ms": ms(percentile(phase.ttfbs, 0.50)),
        "ttfb_p99_ms": ms(percentile(phase.ttfbs, 0.99)),
        "statuses": dict(phase.statuses),
        "cache": dict(phase.cache),
        "sse_events": dict(phase.sse_events),
        "warmup_errors": warm.errors,
        "error_samples": phase.error_samples or warm.error_samples,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--body", required=True, help="request body (JSON text), sent as is")
    p.add_argument("--stream", action="store_true", help="the response is an SSE stream")
    p.add_argument(
        "--websocket",
        action="store_true",
        help="each worker sends --body as a message on its own WebSocket at --url",
    )
    p.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    p.add_argument(
        "--handshake",
        action="store_true",
        help='print {"event": "warm"} after warm-up and wait for a stdin line',
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The generator competes with the servers for CPU; uvloop makes it cheaper per request.
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(main_async(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
