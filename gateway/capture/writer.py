"""The capture writer: a bounded queue in front of a `CaptureStore`, drained in batches.

`submit` never waits and never fails a request: when `max_queued` captures already wait,
the new one is dropped and counted (`gateway_captures_dropped_total`). A background task
takes batches, renders them (redaction and JSON, on a thread of its own, never on the
request's path) and writes them in one transaction; a batch the store refuses is dropped
and counted too, so a store that is down or full costs captures, never memory or requests.
The same task deletes captures older than `retention`, every `purge_every` seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gateway.capture.draft import Draft, Row, render
from gateway.capture.store import CaptureStore
from gateway.telemetry.metrics import Metrics

logger = logging.getLogger("gateway.capture")

MAX_QUEUED = 1000  # with 1 MB per direction: at most about 2 GB in the worst case
MAX_BATCH = 100


class CaptureWriter:
    """Takes finished requests' drafts and stores them; reads them back by request id."""

    def __init__(
        self,
        store: CaptureStore,
        metrics: Metrics,
        retention: float,
        clock: Callable[[], float],
        *,
        interval: float = 0.5,
        max_queued: int = MAX_QUEUED,
        purge_every: float = 60.0,
    ) -> None:
        self.store = store
        self.retention = retention  # seconds; set anew by a reload
        self._metrics, self._clock = metrics, clock
        self._interval, self._max, self._purge_every = interval, max_queued, purge_every
        self._queue: deque[Draft] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._render = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capture-render")
        self._next_purge = 0.0
        # one flush at a time: a reader's flush must wait for the batch another is writing,
        # or it would find the queue empty and read the store before that batch is in it
        self._flushing = asyncio.Lock()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def start(self) -> None:
        try:
            await self.store.start()
        except Exception:  # the store is tried again at the first batch
            logger.exception("the capture store did not start; captures wait for it")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="capture-writer")

    def submit(self, draft: Draft) -> bool:
        """Queue a capture (counted by reason); dropped and counted when the queue is full."""
        if self._closed or len(self._queue) >= self._max:
            self._metrics.captures_dropped.inc()
            return False
        self._queue.append(draft)
        self._metrics.captures.labels(draft.reason).inc()
        if len(self._queue) >= MAX_BATCH:
            self._wakeup.set()
        return True

    async def flush(self) -> None:
        """Write every queued capture now; stops at the first batch the store refuses (the
        rest waits for the next flush), so a store that is down costs one attempt."""
        async with self._flushing:
            while self._queue:
                if not await self._write_batch():
                    return

    async def purge(self) -> int:
        """Delete captures older than `retention`; how many went."""
        return await self.store.purge(self._clock() - self.retention)

    async def capture(self, request_id: str) -> dict[str, Any] | None:
        """The stored capture of `request_id`, or None (a queued one is written first)."""
        await self.flush()
        return await self.store.capture(request_id)

    async def captured(self, request_ids: Sequence[str]) -> frozenset[str]:
        """Which of `request_ids` have a stored capture (queued ones are written first)."""
        await self.flush()
        return await self.store.captured(request_ids)

    async def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        try:
            if self._task is not None:
                await self._task
            await self.flush()
        finally:
            if self._queue:  # the store refused them: nothing will write them now
                self._metrics.captures_dropped.inc(len(self._queue))
                self._queue.clear()
            self._render.shutdown(wait=True)
            await self.store.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            try:
                async with asyncio.timeout(self._interval):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()
            await self.flush()
            if loop.time() >= self._next_purge:
                self._next_purge = loop.time() + self._purge_every
                try:
                    await self.purge()
                except Exception:
                    logger.exception("deleting old captures failed")

    async def _write_batch(self) -> bool:
        queue = self._queue
        batch = [queue.popleft() for _ in range(min(MAX_BATCH, len(queue)))]
        try:
            rows = await asyncio.get_running_loop().run_in_executor(
                self._render, _render_all, batch
            )
            if len(rows) < len(batch):
                self._metrics.captures_dropped.inc(len(batch) - len(rows))
            await self.store.write(rows)
        except Exception:
            self._metrics.captures_dropped.inc(len(batch))
            logger.exception("writing %d captures failed; they are dropped", len(batch))
            return False
        return True


def _render_all(batch: list[Draft]) -> list[Row]:
    """The batch's rows; a draft that cannot be rendered is left out (and counted dropped by
    the caller), never its batch."""
    rows = []
    for d in batch:
        try:
            rows.append(render(d))
        except Exception:
            logger.exception("a capture could not be rendered; it is dropped")
    return rows
