"""The shared-state backends, chosen from the settings in one place.

Budgets, the cache, single-flight and the ledger each sit behind a protocol; `build_backends`
is the only code that knows which implementation a configuration gets, and `problems` the
only code that knows which ones this version can build.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.budget.local import LocalBudgetStore
from gateway.budget.store import BudgetStore
from gateway.cache.flight import FlightRegistry, Flights
from gateway.cache.store import CacheStore, MemoryCacheStore
from gateway.ledger.records import LedgerWriter, ReportReader
from gateway.ledger.sqlite import SqliteLedger
from gateway.owners import LocalOwners, OwnerStore
from gateway.settings import Settings
from gateway.shared import Shared

__all__ = ["BackendUnavailable", "Backends", "build_backends", "problems"]

LEDGER_FILE = "ledger.sqlite3"  # under state.path


class BackendUnavailable(Exception):
    """The settings name a backend this version cannot build.

    `problems` holds ``key.path: what is wrong`` lines, as `ConfigError` does, so a caller
    that knows the config's path reports them the same way: ``PATH: key.path: ...``.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def problems(settings: Settings) -> list[str]:
    """What in `settings` names a backend this version cannot serve with; empty when all is
    well. A Redis store builds (cache, single-flight, response owners) but is refused here
    until budgets are shared too: replicas with budgets of their own would each let a team
    spend its whole budget."""
    found = []
    if settings.state.store != "local":
        found.append("state.store: only the local store is available in this version")
    return found + _unbuildable(settings)


def _unbuildable(settings: Settings) -> list[str]:
    found = []
    if settings.ledger.url:
        found.append(
            "ledger.url: only the SQLite ledger under state.path is available in this version;"
            " leave it empty"
        )
    return found


@dataclass(frozen=True, slots=True)
class Backends:
    """The gateway's state: one of each backend, built for one set of settings.

    `reports` reads what `ledger` writes and shares its lifecycle (valid between
    `start` and `close`); with SQLite both are the same object.
    """

    budget: BudgetStore
    cache: CacheStore
    flights: FlightRegistry
    ledger: LedgerWriter
    reports: ReportReader
    owners: OwnerStore = field(default_factory=LocalOwners)
    shared: Shared | None = None  # the Redis behind the cache, flights and owners, if any

    async def start(self) -> None:
        """Open what needs opening (the ledger's storage); the other backends are ready."""
        await self.ledger.start()

    def count_state_errors(self, count: Callable[[str], None]) -> None:
        """Tell `count(operation)` of every call to the shared state that failed."""
        if self.shared is not None:
            self.shared.link.on_error = count

    async def close(self) -> None:
        """The ledger first, so every record reaches storage even if another close fails;
        then the cache, and the shared state's connections last."""
        try:
            await self.ledger.close()
        finally:
            try:
                await self.cache.close()
                await self.owners.close()
            finally:
                if self.shared is not None:
                    await self.shared.close()


def build_backends(settings: Settings, *, clock: Callable[[], float] = time.time) -> Backends:
    """The backends `settings` ask for; raises BackendUnavailable for one this version lacks.

    Does no I/O: `Backends.start` opens them. `clock` is the gateway's: the cache measures
    the age of entries by it, as the `age` header does.
    """
    found = _unbuildable(settings)
    if found:
        raise BackendUnavailable(found)
    c = settings.cache
    ledger = SqliteLedger(Path(settings.state.path) / LEDGER_FILE, settings.ledger.flush_interval)
    if settings.state.store != "local":
        shared = Shared.build(settings, clock)
        return Backends(
            budget=LocalBudgetStore(),
            cache=shared.cache,
            flights=shared.flights,
            ledger=ledger,
            reports=ledger,
            owners=shared.owners,
            shared=shared,
        )
    return Backends(
        budget=LocalBudgetStore(),
        cache=MemoryCacheStore(c.ttl, c.max_bytes, c.max_entry_bytes, clock),
        flights=Flights(),
        ledger=ledger,
        reports=ledger,
    )
