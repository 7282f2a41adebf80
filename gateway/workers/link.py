"""HTTP to one worker's private admin socket: how the supervisor reads a worker's metrics and
readiness and hands it admin API calls."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

__all__ = ["Answer", "WorkerLink"]


@dataclass(frozen=True, slots=True)
class Answer:
    """A worker's answer, read whole (admin answers are small)."""

    status: int
    content_type: str
    body: bytes


class WorkerLink:
    """One connection pool to the Unix socket `path`; opened on first use, inside the loop.

    `call` raises `aiohttp.ClientError`, `OSError` or `TimeoutError` when the worker does not
    answer (not started yet, restarting, stopped)."""

    __slots__ = ("_session", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self._session: aiohttp.ClientSession | None = None

    async def call(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        within: float = 5.0,
    ) -> Answer:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.path),
                timeout=aiohttp.ClientTimeout(total=within),
                auto_decompress=True,
            )
        async with self._session.request(
            method,
            f"http://worker{path}",
            headers=dict(headers or {}),
            data=body or None,
            timeout=aiohttp.ClientTimeout(total=within),
        ) as r:
            data = await r.read()
            return Answer(r.status, r.headers.get("content-type", ""), data)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
