"""`gateway serve --workers N`: the supervisor process.

It binds the client address first, without listening, to hold the port and to fail with one
line when it is taken; each worker then binds the same address with SO_REUSEPORT and the
kernel spreads connections over them. The supervisor serves the admin listener itself
(`gateway.workers.admin`), forwards SIGHUP to every worker, turns SIGTERM and SIGINT into a
drain of every worker, and exits once all have stopped: 0 after a requested stop, 1 when a
worker failed to start or the workers kept dying.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Awaitable
from pathlib import Path

import structlog
from aiohttp import web

from gateway.cli_run import STOP_GRACE, ListenError
from gateway.listener import bind_sockets
from gateway.runtime import CUT_GRACE
from gateway.server import GatewayRunner, http_logger
from gateway.settings import Settings
from gateway.workers.admin import create_supervisor_admin_app
from gateway.workers.pool import Pool

__all__ = ["supervise"]

# AF_UNIX paths hold at most 107 bytes on Linux; a socket's path adds up to 30 to the folder's
# (`/<pid>-<random>/w<index>.sock`), and longer state paths put the sockets in /tmp
MAX_SOCKET_PATH = 107
SOCKET_NAME_ROOM = 30
STOP_MARGIN = 10.0  # seconds past a worker's own worst-case stop before it is killed


def stop_deadline(settings: Settings) -> float:
    """How long a worker may take to stop: its drain, the cut streams' grace, the listener's
    grace, the close that waits for records still being written, and a margin."""
    drain = settings.limits.drain_timeout
    return 2 * drain + CUT_GRACE + STOP_GRACE + STOP_MARGIN


def socket_dir(state_path: str) -> Path:
    """A fresh private folder for the workers' admin sockets: under state.path, or in the
    system's temporary folder when that path is too long for a Unix socket. Folders left by
    a supervisor that no longer runs (killed outright) are removed."""
    base = Path(state_path).resolve() / "workers"
    if len(os.fsencode(base)) + SOCKET_NAME_ROOM > MAX_SOCKET_PATH:
        return Path(tempfile.mkdtemp(prefix="gateway-workers-"))
    base.mkdir(parents=True, exist_ok=True)
    for old in base.iterdir():
        pid = old.name.partition("-")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


async def supervise(settings: Settings, config_path: str, host: str, port: int, count: int) -> int:
    """Run `count` workers until SIGTERM/SIGINT; the exit status of `gateway serve`.

    Raises ListenError when the client or the admin address cannot be bound."""
    log = structlog.get_logger("gateway.workers")
    loop = asyncio.get_running_loop()
    try:
        held = await bind_sockets(loop, host, port, reuse_port=True)
    except OSError as e:
        raise ListenError("listen", host, port, e) from None
    port = held[0].getsockname()[1]
    sockets = socket_dir(settings.state.path)
    pool = Pool(config_path, host, port, [str(sockets / f"w{i}.sock") for i in range(count)])
    admin = GatewayRunner(
        create_supervisor_admin_app(pool),
        header_timeout=settings.limits.header_timeout,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=5,
        logger=http_logger(),
    )
    await admin.setup()
    try:
        await web.TCPSite(admin, settings.admin.host, settings.admin.port).start()
    except OSError as e:
        await admin.cleanup()
        for sock in held:
            sock.close()
        shutil.rmtree(sockets, ignore_errors=True)
        raise ListenError("admin", settings.admin.host, settings.admin.port, e) from None
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, pool.reload)
    try:
        if await _started(pool, stop):
            log.info(
                "listening",
                url=f"http://{host}:{port}",
                admin=f"http://{settings.admin.host}:{settings.admin.port}",
                workers=[w.pid for w in pool.workers],
            )
            await _first(stop.wait(), pool.stopped.wait())
        if not pool.failed:
            log.info("draining", workers=count)
    finally:
        await pool.stop(stop_deadline(settings))
        await admin.cleanup()
        for sock in held:
            sock.close()
        shutil.rmtree(sockets, ignore_errors=True)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 1 if pool.failed else 0


async def _started(pool: Pool, stop: asyncio.Event) -> bool:
    """Start the workers; False when one failed first or a stop came before all were ready."""
    starting = asyncio.get_running_loop().create_task(pool.start())
    await _first(starting, stop.wait())
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return False
    return starting.result()


async def _first(*aws: Awaitable[object]) -> None:
    """Wait until the first of these finishes; cancel the others, unless they are tasks of
    the caller's."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task, given in zip(tasks, aws, strict=True):
        if task is not given:
            task.cancel()
