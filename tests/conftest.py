"""Shared fixtures: the fake Parallel server on 127.0.0.1 and a client pointed at it."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import settings

from parallel_async import AsyncParallel
from parallel_async.testing import FakeServer, set_testing

pytest_plugins = ["parallel_async.testing.pytest_plugin"]

# Shared, noisy machines: a slow example is not a failure (speed is measured in benchmarks).
settings.register_profile("default", deadline=None)
settings.load_profile("default")

API_KEY = "test-key"


@pytest.fixture(autouse=True)
def _keep_the_recursion_limit() -> Iterator[None]:
    """Each test leaves the interpreter's recursion limit as it found it.

    mypy's in-process API (tests/test_hub_typing.py, tests/test_typed_outcomes.py) raises it
    for good, and msgspec's nesting limit follows it: tests run after those would decode the
    too-deep bodies of tests/test_hostile_bodies.py.
    """
    limit = sys.getrecursionlimit()
    yield
    sys.setrecursionlimit(limit)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def no_sleep() -> Iterator[list[float]]:
    """Retries don't sleep; the list records the waits they asked for."""
    with set_testing() as sleeps:
        yield sleeps


@pytest.fixture
async def client(fake_server: FakeServer, no_sleep: list[float]) -> AsyncIterator[AsyncParallel]:
    async with AsyncParallel(api_key=API_KEY, base_url=fake_server.url, max_in_flight=16) as c:
        yield c
