"""One `gateway serve --workers N` process: the whole gateway, on the shared client port.

Started by the supervisor (`gateway.workers.pool.worker_argv`). It binds the client
port with SO_REUSEPORT beside its siblings, serves its admin app (metrics, readiness, the
admin API) on a private Unix socket the supervisor calls, and stops as `gateway serve` does
on SIGTERM/SIGINT (drain, flush) and reloads on SIGHUP. It also drains and stops when its
standard input closes: the supervisor holds the other end, so a supervisor that dies, even by
SIGKILL, leaves no worker serving behind it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from gateway import config
from gateway.cli_run import ListenError, run_gateway, use_uvloop
from gateway.telemetry.logging import configure_logging

__all__ = ["main"]


class _UntilEof(asyncio.Protocol):
    """Sets `stop` when the pipe from the supervisor closes."""

    def __init__(self, stop: asyncio.Event) -> None:
        self._stop = stop

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop.set()


async def _serve(args: argparse.Namespace, settings: config.Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: _UntilEof(stop), sys.stdin)
    await run_gateway(
        settings,
        args.host,
        args.port,
        args.config,
        announce=False,
        reuse_port=True,
        admin_path=args.admin_socket,
        stop=stop,
    )


def main(argv: Sequence[str] | None = None) -> int:
    # until run_gateway installs its handlers, a reload the supervisor forwards must not end
    # the process (SIGHUP's default); the supervisor sends it again once this worker is ready
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    p = argparse.ArgumentParser(prog="gateway.workers.worker")
    p.add_argument("--config", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--admin-socket", required=True)
    args = p.parse_args(argv)
    try:
        settings = config.load(args.config)
    except config.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    logs = settings.telemetry.logs
    fields = {"worker": args.index, "pid": os.getpid()}
    configure_logging(logs.level, logs.format, fields, shared_stdout=True)
    use_uvloop()
    try:
        asyncio.run(_serve(args, settings))
    except ListenError as e:
        print(f"gateway worker {args.index}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
