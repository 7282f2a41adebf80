"""Benchmark: what sharing the cache and single-flight through Redis costs the gateway in CPU.

Measures gateway CPU (user + system, from /proc/<pid>/stat) per request for

- ``hit``: the same request repeated, every answer a cache hit (JSON and stream);
- ``miss``: a new request each time (a wave of one): the leader's cost, which with Redis
  includes claiming the flight and sending its answer to the log;
- ``coalesced``: waves of identical requests, each wave a new body: the first request of a
  wave leads, the others arrive while it waits on the upstream (the mock's time to first
  token) and follow it. With the local store all go to one gateway; with Redis the leader
  goes to replica A and the followers to replica B, so each follower reads A's flight from
  Redis, and B's CPU over its requests is the cost of a follower on another replica.
  For the local store the cost of a follower is (CPU of a wave of N - CPU of a wave of 1)
  / (N - 1): the leader's call is taken out.

Each gateway is a subprocess of its own (``--serve``, which builds the Gateway straight from a
config, so a Redis store can be measured before `serve` accepts it); load comes from this
process. A measurement, not a test. Needs Redis on 127.0.0.1:6379 for the redis rows; it
writes only under a fresh ``gwbench_<hex>:`` prefix and deletes those keys at the end.

    python bench/shared_state.py --duration 4 --waves 40 --followers 15
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
KEY = "bench-key-" + secrets.token_hex(8)
REDIS = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_ready(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens at {url}")


@contextlib.contextmanager
def process(cmd: list[str], url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "BENCH_KEY": KEY}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(url)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def config(mock: str, store: str, prefix: str, state: Path, port: int) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "upstreams": {
            "mock": {
                "base_url": mock,
                "api_key": "up",
                "auth_header": "authorization",
                "models": ["*"],
            }
        },
        "teams": {"bench": {"keys": ["${BENCH_KEY}"], "models": ["*"]}},
        "cache": {"enabled": True, "ttl": 3600},
        "state": {"store": store, "prefix": prefix, "path": str(state)},
        "telemetry": {"logs": {"level": "warning", "format": "json"}},
    }


@contextlib.contextmanager
def gateway(tmp: Path, name: str, mock: str, store: str, prefix: str) -> Iterator[tuple[str, int]]:
    port = free_port()
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config(mock, store, prefix, tmp / name, port)))
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, __file__, "--serve", str(path)]
    with process(cmd, url, tmp / f"{name}.log") as proc:
        yield url, proc.pid


async def send(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> str:
    async with s.post(
        f"{url}/v1/responses", json=body, headers={"authorization": f"Bearer {KEY}"}
    ) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{r.status} from {url}: {(await r.read())[:300]!r}")
        return r.headers.get("x-gateway-cache", "")


def body(stream: bool, text: str) -> dict[str, Any]:
    return {"model": "nusantara-base", "input": text, "max_output_tokens": 16, "stream": stream}


async def hits(urls: list[str], pid: int, stream: bool, duration: float) -> dict[str, Any]:
    """Closed loop, 8 clients, every request a hit (primed through the first gateway, read
    through the last)."""
    b = body(stream, "hit " + secrets.token_hex(4))
    async with aiohttp.ClientSession() as s:
        await send(s, urls[0], b)
        await asyncio.sleep(0.3)
        assert await send(s, urls[-1], b) == "hit"
        count = 0
        stop = time.monotonic() + duration

        async def client() -> None:
            nonlocal count
            while time.monotonic() < stop:
                kind = await send(s, urls[-1], b)
                assert kind == "hit", kind
                count += 1

        await asyncio.sleep(0.5)
        before = cpu_seconds(pid)
        await asyncio.gather(*(client() for _ in range(8)))
        await asyncio.sleep(0.3)
        cpu = cpu_seconds(pid) - before
    return {"requests": count, "cpu_us_per_request": round(cpu * 1e6 / count, 1)}


async def waves(
    lead_url: str, follow_url: str, pid: int, stream: bool, n: int, followers: int
) -> tuple[float, int, list[str]]:
    """`n` waves: one leader, then `followers` identical requests; CPU of `pid` over them."""
    kinds: list[str] = []
    async with aiohttp.ClientSession() as s:
        await send(s, lead_url, body(stream, "warm"))
        await asyncio.sleep(0.5)
        before = cpu_seconds(pid)
        for w in range(n):
            b = body(stream, f"wave {w} {secrets.token_hex(4)}")
            leader = asyncio.ensure_future(send(s, lead_url, b))
            await asyncio.sleep(0.05)  # the leader has claimed the flight
            got = await asyncio.gather(*(send(s, follow_url, b) for _ in range(followers)))
            kinds += [await leader, *got]
        await asyncio.sleep(0.3)
        return cpu_seconds(pid) - before, n * (1 + followers), kinds


async def measure(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    mock_port = free_port()
    mock = f"http://127.0.0.1:{mock_port}"
    rows = []
    prefix = f"gwbench_{secrets.token_hex(6)}:"
    mock_cmd = [sys.executable, "-m", "gateway", "mock-upstream", "--port", str(mock_port)]
    mock_cmd += ["--ttft-ms", str(args.ttft_ms)]
    try:
        with process(mock_cmd, mock, tmp / "mock.log"):
            for stream in (False, True):
                kind = "stream" if stream else "json"
                with gateway(tmp, "local", mock, "local", prefix) as (url, pid):
                    r = await hits([url], pid, stream, args.duration)
                    rows.append({"case": f"hit {kind}", "store": "local", **r})
                    one, n1, _ = await waves(url, url, pid, stream, args.waves, 0)
                    rows.append(
                        {
                            "case": f"miss {kind}",
                            "store": "local",
                            "requests": n1,
                            "cpu_us_per_request": round(one * 1e6 / n1, 1),
                        }
                    )
                    many, n2, kinds = await waves(url, url, pid, stream, args.waves, args.followers)
                    per = (many - one) / (args.waves * args.followers)
                    rows.append(
                        {
                            "case": f"coalesced {kind}",
                            "store": "local",
                            "requests": n2,
                            "coalesced": kinds.count("coalesced"),
                            "cpu_us_per_request": round(per * 1e6, 1),
                        }
                    )
                with (
                    gateway(tmp, "a", mock, REDIS, prefix) as (a, pid_a),
                    gateway(tmp, "b", mock, REDIS, prefix) as (b, pid_b),
                ):
                    led, n1, _ = await waves(a, a, pid_a, stream, args.waves, 0)
                    rows.append(
                        {
                            "case": f"miss {kind}",
                            "store": "redis (leads, publishes)",
                            "requests": n1,
                            "cpu_us_per_request": round(led * 1e6 / n1, 1),
                        }
                    )
                    r = await hits([a, b], pid_b, stream, args.duration)
                    rows.append({"case": f"hit {kind}", "store": "redis", **r})
                    cpu, _, kinds = await waves(a, b, pid_b, stream, args.waves, args.followers)
                    followed = args.waves * args.followers
                    rows.append(
                        {
                            "case": f"coalesced {kind}",
                            "store": "redis (follower on another replica)",
                            "requests": followed,
                            "coalesced": kinds.count("coalesced"),
                            "cpu_us_per_request": round(cpu * 1e6 / followed, 1),
                        }
                    )
    finally:
        await drop_keys(prefix)
    return rows


async def drop_keys(prefix: str) -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(REDIS)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def serve(path: str) -> None:
    """A gateway built straight from a config file (no `problems` check), until SIGTERM."""
    from aiohttp import web

    from gateway.app import create_app, make_runner
    from gateway.cli_run import use_uvloop
    from gateway.config import load
    from gateway.runtime import Gateway

    settings = load(path)

    async def run() -> None:
        runner = make_runner(create_app(Gateway(settings)))
        await runner.setup()
        await web.TCPSite(runner, settings.listen.host, settings.listen.port).start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(15, stop.set)
        await stop.wait()
        await runner.cleanup()

    use_uvloop()
    asyncio.run(run())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--duration", type=float, default=4.0, help="seconds of hits per case")
    p.add_argument("--waves", type=int, default=30)
    p.add_argument("--followers", type=int, default=15, help="per wave")
    p.add_argument("--ttft-ms", type=int, default=200, help="the mock's, so followers overlap")
    args = p.parse_args()
    if args.serve:
        serve(args.serve)
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = asyncio.run(measure(args, Path(tmp)))
    width = max(len(r["store"]) for r in rows)
    print(f"{'case':<18} {'store':<{width}} {'requests':>8} {'CPU us/request':>15}")
    for r in rows:
        cpu = r["cpu_us_per_request"]
        print(f"{r['case']:<18} {r['store']:<{width}} {r['requests']:>8} {cpu:>15}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
