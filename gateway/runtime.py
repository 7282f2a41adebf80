"""The gateway's components for one set of settings: built once, started and closed by the app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import structlog
from aiohttp import web

from gateway.backends import Backends, build_backends, build_captures
from gateway.budget.store import BudgetStore
from gateway.budget.windows import window_bounds
from gateway.cache.flight import FlightRegistry
from gateway.cache.lookup import CacheCounters
from gateway.cache.store import CacheStore
from gateway.capture.writer import CaptureWriter
from gateway.ledger.records import Charge, LedgerReader, LedgerWriter
from gateway.owners import OwnerStore
from gateway.policy import Policy, next_clients
from gateway.redact import Redactor
from gateway.redis_state import StateUnavailable
from gateway.settings import Settings
from gateway.telemetry.metrics import Metrics, named_models
from gateway.telemetry.tracing import Tracing
from gateway.upstream.client import UpstreamClient
from gateway.upstream.health import Health
from gateway.upstream.retry_budget import RetryBudget


class Cuttable(Protocol):
    def cut(self) -> None: ...


class Stoppable(Protocol):
    def stop(self) -> None: ...


CUT_GRACE = 2.0  # seconds cut streams get to send their error event and finish


class Gateway:
    """Everything a request needs, held on the app under one key."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        backends: Backends | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.clock = clock
        self.metrics = Metrics(
            settings.telemetry.max_model_labels, known_models=named_models(settings)
        )
        self.tracing = tracing or Tracing.from_settings(settings.telemetry)
        redactor = Redactor.from_settings(settings)
        clients = {u.name: UpstreamClient(u) for u in settings.upstreams}
        self.policy = Policy(settings, clients, redactor)
        # per replica: each keeps its own view of upstream and key health
        self.health = Health(settings.health.eject_after, settings.health.eject_for, time.monotonic)
        self.health.on_ejection = self._ejected
        self.metrics.watch_upstreams(self._healthy, clients)
        self.retry_budget = RetryBudget(settings.retries.budget if settings.retries else 0.0)
        self.backends = backends or build_backends(
            settings, clock=clock, on_state_error=self.state_error
        )
        self.budget: BudgetStore = self.backends.budget
        self.cache: CacheStore = self.backends.cache
        self.flights: FlightRegistry = self.backends.flights
        self.ledger: LedgerWriter = self.backends.ledger
        self.reports: LedgerReader = self.backends.reports
        self.cache_counts = CacheCounters()
        # sampled and failed requests' bodies, written off the request path
        self.captures = CaptureWriter(
            self.backends.captures or build_captures(settings),
            self.metrics,
            settings.capture.retention,
            clock,
            interval=settings.ledger.flush_interval,
        )
        # response id -> (team, upstream), in front of the ledger, which has them all: routes
        # requests by id to the upstream that made the response and keeps teams apart
        self.owners: OwnerStore = self.backends.owners
        self.log = structlog.get_logger("gateway")
        self.ready = False
        self.draining = False
        self.inflight = 0  # client requests admitted before a drain began, being handled
        self.active = 0  # every /v1 request being handled, until its end is recorded
        self.cutting = False  # a graceful stop's deadline passed: streams end now
        self._reloading = asyncio.Lock()
        self.streams: set[Cuttable] = set()  # upstream streams being read
        self.sockets: set[Stoppable] = set()  # open WebSocket connections
        self._tasks: set[asyncio.Task[Any]] = set()

    def state_error(self, operation: str) -> None:
        """The shared state store did not answer `operation`."""
        self.metrics.state_errors.labels(operation).inc()

    async def state_ok(self) -> bool:
        """False while requests are refused because the shared state store does not answer
        (`state.on_unavailable: reject`); under `admit` they are served all the same."""
        if self.settings.state.on_unavailable == "admit":
            return True
        return await self.budget.reachable()

    def _healthy(self, upstream: str) -> bool:
        return self.health.healthy(upstream, self.health.clock())

    def _ejected(self, upstream: str, reason: str) -> None:
        self.metrics.key_ejections.labels(upstream, reason).inc()

    @property
    def settings(self) -> Settings:
        return self.policy.settings

    @property
    def redactor(self) -> Redactor:
        return self.policy.redactor

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run work that must finish even if the request that started it goes away."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start(self) -> None:
        for client in self.policy.upstreams.values():
            await client.start()
        await self.backends.start()
        await self.captures.start()
        await self.restore_budgets()
        self.ready = True

    async def restore_budgets(self) -> None:
        """Rebuild window counters from the ledger, so a restart never resets a budget.

        A store shared with other replicas holds their spend too, which this replica's view
        of the ledger may lack (records they have not written yet): its counters are never
        set at a start; it rebuilds those it lacks from the ledger by itself."""
        if self.budget.shared:
            await self.refresh_budget_gauges()
            return
        now = self.clock()
        teams = list(self.policy.teams.values())
        starts = {window_bounds(rule.per, now)[0] for t in teams for rule in t.budgets}
        charged: dict[float, dict[str, Charge]] = {}
        for start in starts:
            charged[start] = await self.reports.charged_since(start)
        await self.budget.restore(teams, charged, now)
        await self.refresh_budget_gauges()

    async def refresh_budget_gauges(self) -> None:
        """Set every token budget's limit and spend gauges (at start, reload and scrape);
        those of a store that does not answer keep their last values."""
        now = self.clock()
        for t in list(self.policy.teams.values()):
            try:
                windows = await self.budget.windows(t, now)
            except StateUnavailable:
                return
            for w in windows:
                if w.unit == "tokens":
                    self.metrics.budget_limit.labels(t.name, w.per).set(w.limit)
                    self.metrics.budget_used.labels(t.name, w.per).set(w.used)

    async def reload(self, settings: Settings) -> None:
        """Swap in a new policy. Requests already admitted keep theirs to their end; an
        upstream client that the new settings replace closes when its last request ends."""
        async with self._reloading:  # two at once would both replace the same clients
            clients, retired = next_clients(settings, self.policy.upstreams)
            for client in clients.values():
                if not client.started:
                    await client.start()
            redactor = Redactor.from_settings(settings)
            self.policy = Policy(settings, clients, redactor)
            self.health.configure(
                settings.health.eject_after,
                settings.health.eject_for,
                ((c.name, c.key_ids) for c in clients.values()),
                changed=(c.name for c in retired),  # its settings changed: a new upstream
            )
            self.retry_budget.ratio = settings.retries.budget if settings.retries else 0.0
            self.captures.retention = settings.capture.retention
            self.metrics.watch_upstreams(self._healthy, clients)
            self.metrics.model.know(named_models(settings))
            await self.refresh_budget_gauges()
            for client in retired:
                await client.retire()

    def track(self, stream: Cuttable) -> None:
        """An upstream stream starts: a graceful stop past its deadline cuts it, also one
        that starts after the cut began."""
        self.streams.add(stream)
        if self.cutting:
            stream.cut()

    async def drain(self, within: float) -> None:
        """Let requests in flight finish, for at most `within` seconds; then cut the streams
        running or starting (each ends with an error event) and give them a moment to end.

        The caller has set `draining` first: meanwhile /readyz answers 503 and new requests
        503 `shutting_down`, so a load balancer sees the drain and clients retry elsewhere.
        """
        for socket in list(self.sockets):  # each closes once its response under way ends
            socket.stop()
        await self._until_idle(within, lambda: self.inflight + len(self.sockets))
        if self.inflight or self.streams:
            self.cutting = True
            for stream in list(self.streams):
                stream.cut()
            await self._until_idle(CUT_GRACE, lambda: self.inflight)

    async def _until_idle(self, within: float, requests: Callable[[], int]) -> None:
        """Until no request counted by `requests` and no upstream stream is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        # polling, once a stop: cheaper to read than an event set from every request's end
        while (requests() or self.streams) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        self.ready = False
        self.draining = True
        limit = self.settings.limits.drain_timeout
        # a handler whose client left is neither awaited nor cancelled by aiohttp's stop: its
        # ledger record must still land before the ledger closes
        await self._until_idle(limit, lambda: self.active)
        if self.active:
            self.log.warning("closing with requests still running", requests=self.active)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=limit)
        try:
            try:
                await self.captures.close()
            finally:
                await self.backends.close()
        finally:
            for client in self.policy.upstreams.values():
                await client.close()
        # the exporter's last flush blocks on network I/O: keep it off the event loop
        await asyncio.to_thread(self.tracing.shutdown)


GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)
