"""The client listener: at most `max_connections` open connections, the rest wait in the
kernel's listen backlog instead of being accepted and closed (or exhausting descriptors)."""

from __future__ import annotations

import asyncio
import errno
import resource
import socket
from collections.abc import Callable
from contextlib import suppress

from aiohttp import web

from gateway.server import GatewayRequestHandler, http_logger

__all__ = ["LimitedSite", "bind_sockets"]

_OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _fd_share() -> int:
    """Client connections the process's descriptor limit allows: half of it, so that upstream
    connections (one per request in flight), the ledger and logs always have descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, soft // 2) if soft != resource.RLIM_INFINITY else 1 << 30


class LimitedSite(web.BaseSite):
    """A listener that accepts at most `max_connections` open connections (capped by
    `_fd_share`); the rest wait in the listen backlog rather than being accepted and closed.

    Its own accept loop (`sock_accept`, then `connect_accepted_socket`), because neither
    asyncio's nor uvloop's `create_server` can stop accepting while a limit is reached."""

    __slots__ = ("_host", "_limit", "_port", "_reuse_port", "_socks", "_tasks")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None = None,
        port: int = 0,
        *,
        max_connections: int,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
        backlog: int = 2048,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host, self._port, self._reuse_port = host, port, reuse_port
        self._limit = min(max_connections, _fd_share())
        self._socks = [sock] if sock is not None else []
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def max_connections(self) -> int:
        return self._limit

    @property
    def port(self) -> int:
        port: int = self._socks[0].getsockname()[1] if self._socks else self._port
        return port

    @property
    def name(self) -> str:
        return f"http://{self._host or '0.0.0.0'}:{self.port}"

    async def start(self) -> None:
        await super().start()  # registers the site: runner.cleanup() stops it
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        if not self._socks:
            self._socks = await bind_sockets(loop, self._host, self._port, self._reuse_port)
        slots = asyncio.Semaphore(self._limit)  # shared by all of this site's sockets
        for sock in self._socks:
            sock.listen(self._backlog)
            sock.setblocking(False)
            self._tasks.append(loop.create_task(_accept(loop, sock, server, slots)))

    async def stop(self) -> None:
        # BaseSite.stop closes `_server`, which this site never has: the accept loops and
        # the listening sockets are closed here; open connections are the runner's to end
        await super().stop()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with suppress(asyncio.CancelledError):
                await task
        for sock in self._socks:
            sock.close()


async def bind_sockets(
    loop: asyncio.AbstractEventLoop, host: str | None, port: int, reuse_port: bool
) -> list[socket.socket]:
    """One bound socket per address `host` resolves to, as loop.create_server makes them;
    not yet listening. With `reuse_port` several processes can bind the same address, and
    the kernel spreads new connections over those that listen."""
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


async def _accept(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    factory: Callable[[], asyncio.Protocol],
    slots: asyncio.Semaphore,
) -> None:
    log = http_logger()
    while True:
        await slots.acquire()  # at the limit, new connections wait in the kernel's backlog
        try:
            conn, _ = await loop.sock_accept(sock)
        except OSError as e:
            slots.release()
            if e.errno in _OUT_OF_FDS:
                # as asyncio does: leave the backlog alone a while, accepting would fail again
                log.warning("accept failed (%s): pausing for 1 s", errno.errorcode[e.errno])
                await asyncio.sleep(1.0)
            continue  # ECONNABORTED and the like: that client is gone
        except BaseException:
            slots.release()
            raise
        conn.setblocking(False)
        handler = factory()
        if not isinstance(handler, GatewayRequestHandler):
            raise TypeError("a LimitedSite serves a GatewayRunner")
        handler.on_lost(slots.release)  # once, whenever this connection ends
        try:
            await loop.connect_accepted_socket(lambda h=handler: h, conn)  # type: ignore[misc]
        except BaseException as e:
            conn.close()
            handler.lost()
            if not isinstance(e, Exception):
                raise  # cancelled: the site is stopping
            # otherwise the client left before its connection was set up: serve the next
