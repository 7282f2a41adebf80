"""Running the gateway in this process until a signal stops it: the listeners, SIGTERM's
drain, SIGHUP's reload. Shared by `gateway serve` and `gateway demo`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from collections.abc import Callable

from aiohttp import web

from gateway import config
from gateway.admin import CONFIG_PATH
from gateway.app import create_admin_app, create_app, make_runner
from gateway.listener import LimitedSite
from gateway.runtime import Gateway

STOP_GRACE = 2.0  # seconds a request still running after the drain gets before it is cancelled

# The cyclic garbage collector runs once this many more container objects were made than
# freed (CPython's default: 700). Requests in flight each hold a few hundred (parsed bodies,
# headers, the context, futures), so under load the default threshold is crossed every request
# or two and each collection scans them all again: about 23 µs of CPU a request over a mixed
# benchmark run, about 40 µs per JSON request at concurrency 32 (bench/README.md, "Garbage
# collection"). Nearly everything a
# request makes is freed by reference counting when it ends, so a higher threshold leaves
# the collector nothing to do on that path; the few cycles (exceptions with their frames) wait
# for it a little longer. The older generations keep CPython's ratios.
GC_THRESHOLD = 10_000


class ListenError(Exception):
    """A listener could not bind its address: one line says which and why."""

    def __init__(self, what: str, host: str, port: int, error: OSError) -> None:
        # asyncio words a failed bind with the address tuple: the errno says it plainly
        reason = (os.strerror(error.errno) if error.errno else str(error)).lower()
        if host.startswith("/"):  # a Unix socket
            where = host
        else:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        super().__init__(f"cannot listen on {where} ({what}): {reason}")


def tune_gc() -> None:
    """The garbage collector set for a server process (see GC_THRESHOLD)."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, older, oldest)


def use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def run_gateway(
    settings: config.Settings,
    host: str,
    port: int,
    config_path: str | None = None,
    announce: bool = True,
    ready: Callable[[], None] | None = None,
    *,
    reuse_port: bool = False,
    admin_path: str | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set); SIGHUP reloads the config. A stop
    drains and flushes.

    `ready` runs once both listeners are bound; an address that cannot be bound raises
    ListenError with everything started closed again. A `--workers` process binds the
    client port with `reuse_port` and serves its admin app on the Unix socket `admin_path`
    instead of `admin.host:admin.port`, which its supervisor serves."""
    gw = Gateway(settings)
    app = create_app(gw)
    admin = create_admin_app(gw)
    if config_path:
        admin[CONFIG_PATH] = config_path
    # the drain happens before the runner stops (gw.drain): what is left by then is cut
    runner = make_runner(app, shutdown_timeout=STOP_GRACE)
    admin_runner = make_runner(admin, shutdown_timeout=5)
    await runner.setup()  # starts the Gateway (cleanup_ctx)
    await admin_runner.setup()
    where = ("listen", host, port)
    try:
        site = LimitedSite(
            runner,
            host,
            port,
            max_connections=settings.limits.max_connections,
            reuse_port=reuse_port,
        )
        await site.start()
        where = ("admin", settings.admin.host, settings.admin.port)
        admin_site: web.BaseSite
        if admin_path is None:
            admin_site = web.TCPSite(admin_runner, settings.admin.host, settings.admin.port)
        else:
            where = ("admin", admin_path, 0)
            admin_site = web.UnixSite(admin_runner, admin_path)
        await admin_site.start()
    except OSError as e:
        await admin_runner.cleanup()
        await runner.cleanup()
        raise ListenError(*where, e) from None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def on_hup() -> None:
        if config_path:
            gw.spawn(_reload(gw, config_path))

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    tune_gc()  # a process of its own from here: the settings are this server's
    if announce:
        gw.log.info(
            "listening",
            url=f"http://{host}:{port}",
            admin=f"http://{settings.admin.host}:{settings.admin.port}",
        )
    if ready is not None:
        ready()
    await stop.wait()
    await shut_down(gw, runner, admin_runner)


async def shut_down(gw: Gateway, runner: web.AppRunner, admin_runner: web.AppRunner) -> None:
    """A graceful stop: drain, then close both listeners and the Gateway."""
    # both listeners stay open while requests in flight finish: /readyz answers 503 and new
    # requests 503 shutting_down, so a load balancer sees the drain and clients go elsewhere
    gw.draining = True
    drain = gw.settings.limits.drain_timeout  # as the last reload left it
    gw.log.info("draining", inflight=gw.inflight, timeout=drain)
    await gw.drain(drain)
    # the admin listener first: a replay still running there is cancelled and ends (its
    # ledger record written) while the Gateway it uses is still open
    await admin_runner.cleanup()
    await runner.cleanup()  # closes the listener and what is left, then the Gateway


async def _reload(gw: Gateway, path: str) -> None:
    try:
        settings = config.load(path)
    except config.ConfigError as e:
        gw.log.error("reload refused", problems=e.problems)
        return
    await gw.reload(settings)
    gw.log.info("reloaded", config=path)
