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
from gateway.budget.redis import RedisBudgetStore
from gateway.budget.store import BudgetStore
from gateway.cache.flight import FlightRegistry, Flights
from gateway.cache.store import CacheStore, MemoryCacheStore
from gateway.capture.postgres import PostgresCaptures
from gateway.capture.sqlite import SqliteCaptures
from gateway.capture.store import CaptureStore
from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.records import Ledger, LedgerReader, LedgerWriter
from gateway.ledger.sqlite import SqliteLedger
from gateway.owners import LocalOwners, OwnerStore
from gateway.redis_state import connect
from gateway.schema import LEDGER_SCHEMES
from gateway.settings import Settings
from gateway.shared import Shared

__all__ = [
    "BackendUnavailable",
    "Backends",
    "build_backends",
    "build_captures",
    "build_ledger",
    "is_postgres_url",
    "problems",
]

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
    """What in `settings` names a backend this version cannot build; empty when all is well."""
    found = []
    if settings.ledger.url and not is_postgres_url(settings.ledger.url):
        found.append(  # the URL may carry a password: never shown
            "ledger.url: must be empty (SQLite under state.path) or a postgresql:// URL"
        )
    return found


def is_postgres_url(url: str) -> bool:
    """Whether `ledger.url` names a PostgreSQL ledger."""
    return url.split("://", 1)[0] in LEDGER_SCHEMES and "://" in url


def absent_ledger(settings: Settings) -> Path | None:
    """The SQLite ledger file `settings` name when it does not exist yet (a report command
    has nothing to read, and must not create it); None when it exists or the ledger is
    PostgreSQL."""
    if is_postgres_url(settings.ledger.url):
        return None
    db = Path(settings.state.path) / LEDGER_FILE
    return None if db.exists() else db


def build_ledger(settings: Settings) -> Ledger:
    """The ledger `settings` name: PostgreSQL for a postgresql:// URL (spilling under
    state.path while it is unreachable), else SQLite under state.path. Does no I/O."""
    state = Path(settings.state.path)
    interval = settings.ledger.flush_interval
    if is_postgres_url(settings.ledger.url):
        return PostgresLedger(settings.ledger.url, state, interval)
    return SqliteLedger(state / LEDGER_FILE, interval)


def build_captures(settings: Settings) -> CaptureStore:
    """Captures live in the ledger's database: its SQLite file, or its PostgreSQL database
    (so every replica sees every capture). Does no I/O."""
    if is_postgres_url(settings.ledger.url):
        return PostgresCaptures(settings.ledger.url)
    return SqliteCaptures(Path(settings.state.path) / LEDGER_FILE)


@dataclass(frozen=True, slots=True)
class Backends:
    """The gateway's state: one of each backend, built for one set of settings.

    `reports` reads what `ledger` writes and shares its lifecycle (valid between
    `start` and `close`); with SQLite and PostgreSQL both are the same object.
    """

    budget: BudgetStore
    cache: CacheStore
    flights: FlightRegistry
    ledger: LedgerWriter
    reports: LedgerReader
    owners: OwnerStore = field(default_factory=LocalOwners)
    captures: CaptureStore | None = None  # None: in the ledger's database (`build_captures`)
    shared: Shared | None = None  # the Redis behind the cache, flights and owners, if any

    async def start(self) -> None:
        """Open what needs opening (the ledger's storage); the other backends are ready."""
        await self.ledger.start()

    async def close(self) -> None:
        """The ledger first, so every record reaches storage even if another close fails;
        then the cache, the owners and the budget store, and the shared state's connections
        last."""
        try:
            await self.ledger.close()
        finally:
            try:
                await self.cache.close()
                await self.owners.close()
            finally:
                try:
                    await self.budget.close()
                finally:
                    if self.shared is not None:
                        await self.shared.close()


def build_backends(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    on_state_error: Callable[[str], None] = lambda operation: None,
) -> Backends:
    """The backends `settings` ask for; raises BackendUnavailable for one this version lacks.

    Does no I/O: `Backends.start` opens them. `clock` is the gateway's: the cache measures
    the age of entries by it, as the `age` header does. `on_state_error` is told each
    operation the shared state store (Redis) did not answer. A redis:// `state.store` puts
    budgets, the cache, single-flight and response owners in Redis.
    """
    found = problems(settings)
    if found:
        raise BackendUnavailable(found)
    c = settings.cache
    ledger = build_ledger(settings)
    captures = build_captures(settings)
    if settings.state.store == "local":
        return Backends(
            budget=LocalBudgetStore(),
            cache=MemoryCacheStore(c.ttl, c.max_bytes, c.max_entry_bytes, clock),
            flights=Flights(),
            ledger=ledger,
            reports=ledger,
            captures=captures,
        )
    shared = Shared.build(settings, clock, on_state_error)
    budget = RedisBudgetStore(
        connect(settings.state.store),
        settings.state.prefix,
        ledger.charged_since,
        on_error=on_state_error,
        clock=clock,
    )
    return Backends(
        budget=budget,
        cache=shared.cache,
        flights=shared.flights,
        ledger=ledger,
        reports=ledger,
        owners=shared.owners,
        shared=shared,
        captures=captures,
    )
