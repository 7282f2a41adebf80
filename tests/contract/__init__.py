"""Contract suites: one per backend protocol, run against every implementation of it.

Each suite names its implementations in one place, marked by a comment: one `pytest.param`
each, whose value is a factory (an async context manager) that builds a fresh instance sharing
nothing with any other test, and removes what it made afterwards (a Redis key prefix, a
PostgreSQL schema). The suite's fixture enters it for every test; where instances need no
arguments, `implementations` makes that fixture. A backend that needs a server carries that
server's marker: `pytest.param(redis_store, id="redis", marks=pytest.mark.redis)`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def in_process(make: Callable[[], T]) -> Callable[[], AbstractAsyncContextManager[T]]:
    """The factory of an in-process implementation: a new instance, nothing to remove."""

    @asynccontextmanager
    async def factory() -> AsyncIterator[T]:
        yield make()

    return factory


def implementations(name: str, *params: object) -> Any:
    """A fixture `name`, parametrized over `params`: a fresh instance of each implementation
    for every test, built by the param's factory and removed after the test."""

    @pytest.fixture(name=name, params=params)
    async def fixture(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
        async with request.param() as made:
            yield made

    return fixture
