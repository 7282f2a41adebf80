"""A TCP forwarder to put in front of a real server, to stop and start it under a client."""

from __future__ import annotations

import asyncio
import contextlib


class Forwarder:
    """127.0.0.1:<port> -> 127.0.0.1:<target>, until `stop` drops every connection; `start`
    again listens on the same port."""

    def __init__(self, target: int = 5432, port: int = 0) -> None:
        self.target = target
        self.port = port  # 0: chosen at the first start
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self) -> None:
        self._stopping = False
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, url: str) -> str:
        """`url` (naming the target's port) through this forwarder."""
        return url.replace(f":{self.target}/", f":{self.port}/")

    @property
    def running(self) -> bool:
        return self._server is not None

    async def stop(self) -> None:
        if self._server is None:
            return
        self._stopping = True
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        # the server's close does not wait for its connections' handlers: end them here, so
        # no connection outlives the stop (nor the test)
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._stopping:  # accepted just before the stop, its handler started after it
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            self._writers.add(up_writer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except OSError:
            pass
        finally:
            self._handlers.discard(task)
            for w in (writer, up_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()
