"""The gateway's components for one set of settings: built once, started and closed by the app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from cachetools import LRUCache

from gateway.auth import Authenticator
from gateway.budget.local import LocalBudgetStore
from gateway.budget.store import BudgetStore
from gateway.budget.windows import window_bounds
from gateway.cache.flight import Flights
from gateway.cache.store import CacheStore, MemoryCacheStore
from gateway.ledger.records import Charge, Ledger
from gateway.ledger.sqlite import SqliteLedger
from gateway.masking import Secrets
from gateway.prices import PriceBook
from gateway.redact import Redactor
from gateway.routing import GlobSet, Router
from gateway.settings import Settings, Team
from gateway.telemetry.metrics import Metrics, named_models
from gateway.telemetry.tracing import Tracing
from gateway.upstream import UpstreamClient

if TYPE_CHECKING:
    from gateway.relay import StreamPump

CUT_GRACE = 2.0  # seconds cut streams get to send their error event and finish


class Policy:
    """What a config reload swaps at once: teams, keys, routes and prices."""

    __slots__ = ("auth", "prices", "router", "settings", "team_models", "teams")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.auth = Authenticator(settings.teams)
        self.router = Router((u.name, u.models) for u in settings.upstreams)
        self.teams: dict[str, Team] = {t.name: t for t in settings.teams}
        self.team_models = {t.name: GlobSet(t.models) for t in settings.teams}
        self.prices = PriceBook(settings.prices)


class CacheCounters:
    __slots__ = ("bypass", "coalesced", "hits", "misses")

    def __init__(self) -> None:
        self.hits = self.misses = self.coalesced = self.bypass = 0


class Gateway:
    """Everything a request needs, held on the app under one key."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        budget: BudgetStore | None = None,
        ledger: Ledger | None = None,
        cache_store: CacheStore | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.policy = Policy(settings)
        self.clock = clock
        self.upstreams = {u.name: UpstreamClient(u) for u in settings.upstreams}
        self.metrics = Metrics(
            settings.telemetry.max_model_labels, known_models=named_models(settings)
        )
        self.tracing = tracing or Tracing.from_settings(settings.telemetry)
        self.redactor = self.tracing.redactor = Redactor.from_settings(settings)
        self._shown: LRUCache[str, str] = LRUCache(maxsize=1024)
        self.budget: BudgetStore = budget or LocalBudgetStore()
        self.ledger: Ledger = ledger or SqliteLedger(
            Path(settings.state.path) / "ledger.sqlite3", settings.ledger.flush_interval
        )
        c = settings.cache
        self.cache: CacheStore = cache_store or MemoryCacheStore(
            c.ttl, c.max_bytes, c.max_entry_bytes
        )
        self.flights = Flights()
        self.cache_counts = CacheCounters()
        self.secrets = Secrets(tuple(s.encode() for s in settings.secrets()))
        # response id -> (team, upstream), in front of the ledger, which has them all: routes
        # requests by id to the upstream that made the response and keeps teams apart
        self.owners: LRUCache[str, tuple[str, str]] = LRUCache(maxsize=200_000)
        self.log = structlog.get_logger("gateway")
        self.ready = False
        self.draining = False
        self.inflight = 0  # client requests being handled
        self.streams: set[StreamPump] = set()  # upstream streams being read
        self._tasks: set[asyncio.Task[Any]] = set()

    def shown(self, text: str) -> str:
        """Client input (a model name) as logs and spans show it: cut to 128 characters, keys
        redacted. Cached: a request's model is nearly always one seen before."""
        cut = text[:128]
        out = self._shown.get(cut)
        if out is None:
            out = self._shown[cut] = self.redactor(cut)
        return out

    @property
    def settings(self) -> Settings:
        return self.policy.settings

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run work that must finish even if the request that started it goes away."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start(self) -> None:
        for client in self.upstreams.values():
            await client.start()
        await self.ledger.start()
        await self.restore_budgets()
        self.ready = True

    async def restore_budgets(self) -> None:
        """Rebuild window counters from the ledger, so a restart never resets a budget."""
        now = self.clock()
        teams = list(self.policy.teams.values())
        starts = {window_bounds(rule.per, now)[0] for t in teams for rule in t.budgets}
        charged: dict[float, dict[str, Charge]] = {}
        for start in starts:
            charged[start] = await self.ledger.charged_since(start)
        await self.budget.restore(teams, charged, now)
        await self.refresh_budget_gauges()

    async def refresh_budget_gauges(self) -> None:
        """Set every token budget's limit and spend gauges (at start, reload and scrape)."""
        now = self.clock()
        for t in list(self.policy.teams.values()):
            for w in await self.budget.windows(t, now):
                if w.unit == "tokens":
                    self.metrics.budget_limit.labels(t.name, w.per).set(w.limit)
                    self.metrics.budget_used.labels(t.name, w.per).set(w.used)

    async def reload(self, settings: Settings) -> None:
        """Swap teams, keys, routes and prices; upstreams whose settings changed get a new pool."""
        old = self.upstreams
        fresh: dict[str, UpstreamClient] = {}
        retired: list[UpstreamClient] = []
        for u in settings.upstreams:
            current = old.get(u.name)
            if current is not None and current.cfg == u:
                fresh[u.name] = current
            else:
                client = UpstreamClient(u)
                await client.start()
                fresh[u.name] = client
                if current is not None:
                    retired.append(current)
        retired.extend(c for name, c in old.items() if name not in fresh)
        self.upstreams = fresh
        self.policy = Policy(settings)
        self.secrets = Secrets(tuple(s.encode() for s in settings.secrets()))
        self.redactor = self.tracing.redactor = Redactor.from_settings(settings)
        self._shown = LRUCache(maxsize=1024)  # keys may have changed
        self.metrics.model.know(named_models(settings))
        await self.refresh_budget_gauges()
        if retired:
            self.spawn(self._retire(retired, settings.limits.drain_timeout))

    @staticmethod
    async def _retire(clients: list[UpstreamClient], grace: float) -> None:
        await asyncio.sleep(grace)  # requests already using the old pool finish first
        for client in clients:
            await client.close()

    async def drain(self, within: float) -> None:
        """Let requests in flight finish, for at most `within` seconds; then cut the streams
        still running (each ends with an error event) and give them a moment to end.

        The caller has set `draining` first: meanwhile /readyz answers 503 and new requests
        503 `shutting_down`, so a load balancer sees the drain and clients retry elsewhere.
        """
        await self._until_idle(within)
        if self.streams:
            for pump in list(self.streams):
                pump.cut()
            await self._until_idle(CUT_GRACE)

    async def _until_idle(self, within: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        # polling, once a stop: cheaper to read than an event set from every request's end
        while (self.inflight or self.streams) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        self.ready = False
        self.draining = True
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.settings.limits.drain_timeout)
        await self.ledger.close()
        for client in self.upstreams.values():
            await client.close()
        await self.cache.close()
        # the exporter's last flush blocks on network I/O: keep it off the event loop
        await asyncio.to_thread(self.tracing.shutdown)
