"""The worker processes of `gateway serve --workers N`: started, watched, replaced when one
dies, signalled together, and stopped together.

Each worker is a child process (`python -m gateway.workers.worker`) in its own session, so a
terminal's Ctrl-C reaches only the supervisor, which turns it into one orderly stop. Its
standard input is a pipe from here: if the supervisor dies, the worker drains and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client.metrics_core import Metric

from gateway.workers.link import WorkerLink
from gateway.workers.merge import counters_only, merge
from gateway.workers.restarts import RestartBudget

__all__ = ["Pool", "Worker", "worker_argv"]

READY_POLL = 0.1  # seconds between readiness checks of a starting worker


def worker_argv(config_path: str, host: str, port: int, index: int, admin_path: str) -> list[str]:
    """The command line of worker `index` (gateway.workers.worker); not imported here, so
    that `python -m` runs it fresh."""
    return [
        sys.executable,
        "-m",
        "gateway.workers.worker",
        "--config",
        config_path,
        "--host",
        host,
        "--port",
        str(port),
        "--index",
        str(index),
        "--admin-socket",
        admin_path,
    ]


@dataclass
class Worker:
    """One worker slot: the process serving it now, and what the supervisor knows of it."""

    index: int
    link: WorkerLink
    process: asyncio.subprocess.Process | None = None
    ready: bool = False  # answered /readyz 200 since this process started
    reload_pending: bool = False  # a reload came while it was starting
    # the counters of its last scrape, by the pid that sent them
    scraped: tuple[int, list[Metric]] = (0, [])
    keeper: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0


class Pool:
    """N workers on one port. `start` returns once all are ready (False if one failed
    first); from then on a worker that exits is replaced, within `RestartBudget`; when the
    budget runs out `failed` is set and `stopped` fires. `stop` ends them all."""

    def __init__(
        self,
        config_path: str,
        host: str,
        port: int,
        sockets: list[str],
        restarts: RestartBudget | None = None,
    ) -> None:
        self._argv = (config_path, host, port)
        self.workers = [Worker(i, WorkerLink(path)) for i, path in enumerate(sockets)]
        self._restarts = restarts or RestartBudget()
        self.serving = False  # every worker was ready once: later exits are replaced
        self.stopping = False
        self.failed = False
        self.stopped = asyncio.Event()  # set when the pool gives up on its own
        # counters of worker processes that are gone, so sums never go down (a Prometheus
        # counter that drops reads as a reset and its rate jumps)
        self.retired: list[Metric] = []
        self._all_ready = asyncio.Event()
        self._turn = 0
        self._log = structlog.get_logger("gateway.workers")

    async def start(self) -> bool:
        for w in self.workers:
            w.keeper = asyncio.get_running_loop().create_task(self._keep(w))
        done = asyncio.get_running_loop().create_task(self._all_ready.wait())
        gave_up = asyncio.get_running_loop().create_task(self.stopped.wait())
        await asyncio.wait({done, gave_up}, return_when=asyncio.FIRST_COMPLETED)
        for task in (done, gave_up):
            task.cancel()
        self.serving = self._all_ready.is_set() and not self.failed
        return self.serving

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to every worker process that runs."""
        for w in self.workers:
            if w.process is not None and w.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.process.send_signal(sig)

    def reload(self) -> None:
        """SIGHUP to every worker; one still starting gets it once it is ready."""
        self._log.info("reloading workers", workers=len(self.workers))
        for w in self.workers:
            if w.ready and w.process is not None and w.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.process.send_signal(signal.SIGHUP)
            else:
                w.reload_pending = True

    def rotation(self) -> list[Worker]:
        """The workers in the order to try for one admin call: each call starts at the next."""
        n = len(self.workers)
        self._turn = (self._turn + 1) % n
        return [self.workers[(self._turn + i) % n] for i in range(n)]

    def keep_scrape(self, w: Worker, pid: int, families: list[Metric]) -> None:
        """Remember a worker's counters from a scrape it answered (while it still runs)."""
        if pid and pid == w.pid:
            w.scraped = (pid, counters_only(families))

    async def stop(self, within: float) -> None:
        """SIGTERM every worker (each drains), wait up to `within` seconds, then SIGKILL."""
        self.stopping = True
        self.signal(signal.SIGTERM)
        keepers = [w.keeper for w in self.workers if w.keeper is not None]
        if keepers:
            _, late = await asyncio.wait(keepers, timeout=within)
            if late:
                self._log.error("workers did not stop in time: killing", workers=len(late))
                self.signal(signal.SIGKILL)
                await asyncio.wait(keepers)
        for w in self.workers:
            await w.link.close()

    async def _keep(self, w: Worker) -> None:
        """Run slot `w` until the pool stops: start its process, replace it when it dies."""
        while not self.stopping:
            try:
                await self._spawn(w)
            except OSError as e:  # no process could be made (out of memory, of processes)
                self._log.error("worker not started", index=w.index, error=str(e))
            else:
                assert w.process is not None
                watch = asyncio.get_running_loop().create_task(self._until_ready(w, w.process))
                code = await w.process.wait()
                watch.cancel()
                w.ready = False
                self._retire(w)
                if self.stopping:
                    self._log.info("worker stopped", index=w.index, pid=w.pid, code=code)
                    return
                self._log.error("worker exited", index=w.index, pid=w.pid, code=_describe(code))
            delay = self._restarts.next_delay() if self.serving else None
            if delay is None:
                self._log.error(
                    "workers keep failing: stopping"
                    if self.serving
                    else "a worker failed to start: stopping",
                    index=w.index,
                )
                self.failed = True
                self.stopped.set()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping(), delay)

    async def _stopping(self) -> None:
        while not self.stopping:  # noqa: ASYNC110 -- a restart's pause, ended by a stop
            await asyncio.sleep(0.05)

    async def _spawn(self, w: Worker) -> None:
        config_path, host, port = self._argv
        kwargs: dict[str, Any] = {"stdin": asyncio.subprocess.PIPE, "start_new_session": True}
        w.process = await asyncio.create_subprocess_exec(
            *worker_argv(config_path, host, port, w.index, w.link.path), **kwargs
        )
        self._log.info("worker started", index=w.index, pid=w.process.pid)
        if self.stopping:  # the stop's SIGTERM went out while this process was being made
            with contextlib.suppress(ProcessLookupError):
                w.process.send_signal(signal.SIGTERM)

    async def _until_ready(self, w: Worker, process: asyncio.subprocess.Process) -> None:
        while process.returncode is None:
            with contextlib.suppress(Exception):
                if (await w.link.call("GET", "/readyz", within=2.0)).status == 200:
                    break
            await asyncio.sleep(READY_POLL)
        else:
            return
        w.ready = True
        if w.reload_pending:
            w.reload_pending = False
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGHUP)
        if all(x.ready for x in self.workers):
            self._all_ready.set()

    def _retire(self, w: Worker) -> None:
        pid, families = w.scraped
        if pid and pid == w.pid:
            self.retired = merge([self.retired, families])
        w.scraped = (0, [])


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"exit {code}"
