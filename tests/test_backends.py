"""build_backends: which implementation each setting gets, and the ones this version refuses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from contract.ledger_samples import record

from gateway.backends import Backends, BackendUnavailable, build_backends, problems
from gateway.budget.local import LocalBudgetStore
from gateway.budget.redis import RedisBudgetStore
from gateway.cache.entry import CacheEntry
from gateway.cache.flight import Flights
from gateway.cache.redis import RedisCacheStore
from gateway.cache.redis_flight import RedisFlights
from gateway.cache.store import MemoryCacheStore
from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.sqlite import SqliteLedger
from gateway.owners import RedisOwners
from gateway.settings import Cache, LedgerSettings, Settings, State, Team, Upstream


def settings(tmp_path: Path, store: str = "local", ledger_url: str = "") -> Settings:
    return Settings(
        upstreams=(Upstream(name="u", base_url="http://127.0.0.1:9"),),
        teams=(Team(name="t", keys=("sha256:" + "0" * 64,)),),
        cache=Cache(ttl=60, max_bytes=10_000, max_entry_bytes=1_000),
        state=State(store=store, path=str(tmp_path / "state")),
        ledger=LedgerSettings(url=ledger_url, flush_interval=0.25),
    )


async def test_local_settings_build_the_local_backends(tmp_path: Path) -> None:
    now = [1_790_000_000.0]
    backends = build_backends(settings(tmp_path), clock=lambda: now[0])
    assert isinstance(backends.budget, LocalBudgetStore)
    assert isinstance(backends.cache, MemoryCacheStore)
    assert isinstance(backends.flights, Flights)
    assert isinstance(backends.ledger, SqliteLedger)
    assert backends.reports is backends.ledger
    assert not (tmp_path / "state").exists()  # building does no I/O

    # the cache has the configured bounds and ages entries by the given clock
    entry = CacheEntry(200, (), b"{}", False, "a", "m", None, now[0])
    assert await backends.cache.put("k", entry)
    assert not await backends.cache.put("big", dataclasses.replace(entry, body=b"x" * 1_000))
    now[0] += 61
    assert await backends.cache.get("k") is None

    await backends.start()
    backends.ledger.append(record(1))
    await backends.close()
    assert (tmp_path / "state" / "ledger.sqlite3").exists()
    again = build_backends(settings(tmp_path))
    await again.start()
    try:
        assert [r.requests for r in await again.reports.report(None, None, ())] == [1]
    finally:
        await again.close()


class BrokenDisk(SqliteLedger):
    """A ledger whose final write fails."""

    async def close(self) -> None:
        raise OSError("no space left on device")


async def test_close_closes_the_cache_even_when_the_ledger_fails(tmp_path: Path) -> None:
    built = build_backends(settings(tmp_path))
    backends = dataclasses.replace(built, ledger=BrokenDisk(tmp_path / "ledger.db"))
    await backends.cache.put("k", CacheEntry(200, (), b"{}", False, "a", "m", None, 0.0))
    with pytest.raises(OSError, match="no space"):
        await backends.close()
    assert (await backends.cache.stats()).entries == 0


@pytest.mark.parametrize("store", ["redis://127.0.0.1:6379/0", "rediss://cache.internal:6380/2"])
async def test_a_redis_store_puts_all_shared_state_in_redis(tmp_path: Path, store: str) -> None:
    errors: list[str] = []
    built = build_backends(settings(tmp_path, store=store), on_state_error=errors.append)
    assert built.shared is not None  # building does no I/O: nothing connects
    try:
        assert isinstance(built.budget, RedisBudgetStore) and built.budget.shared
        assert isinstance(built.cache, RedisCacheStore)
        assert isinstance(built.flights, RedisFlights)
        assert isinstance(built.owners, RedisOwners)
        assert built.shared.link.prefix == "gw:"
        assert not (tmp_path / "state").exists()
        built.shared.link.on_error("cache_get")  # the link tells the gateway's counter
        assert errors == ["cache_get"]
    finally:
        await built.close()
    assert problems(settings(tmp_path, store=store)) == []  # and `serve` runs it


@pytest.mark.parametrize(
    "url", ["postgresql://gw:pw@127.0.0.1:5432/gw", "postgres://db.internal/gw"]
)
def test_a_postgres_url_builds_the_postgres_ledger_with_its_spill_files_under_state(
    tmp_path: Path, url: str
) -> None:
    backends = build_backends(settings(tmp_path, ledger_url=url))
    assert isinstance(backends.ledger, PostgresLedger)
    assert backends.reports is backends.ledger
    assert backends.ledger._spill_dir == tmp_path / "state"
    assert backends.ledger._flush_interval == 0.25
    assert not (tmp_path / "state").exists()  # building does no I/O
    assert problems(settings(tmp_path, ledger_url=url)) == []


def unchecked(tmp_path: Path, store: str, ledger_url: str) -> Settings:
    """Settings as code may build them without validation (model_construct)."""
    base = settings(tmp_path)
    return base.model_copy(
        update={
            "state": State.model_construct(store=store, path=str(tmp_path / "state")),
            "ledger": LedgerSettings.model_construct(url=ledger_url, flush_interval=0.25),
        }
    )


def test_problems_are_reported_and_no_url_is_echoed(tmp_path: Path) -> None:
    both = unchecked(tmp_path, "redis://:pw@h:6379/0", "mysql://u:pw@h/db")
    assert [p.split(":")[0] for p in problems(both)] == ["ledger.url"]
    assert "postgresql://" in problems(both)[0]
    assert not any("pw" in p or "mysql" in p for p in problems(both))
    assert problems(settings(tmp_path)) == []
    with pytest.raises(BackendUnavailable) as refused:
        build_backends(both)
    assert str(refused.value).splitlines() == problems(both)


def test_backends_is_frozen(tmp_path: Path) -> None:
    built = build_backends(settings(tmp_path))
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.budget = LocalBudgetStore()  # type: ignore[misc]
    assert isinstance(built, Backends)
