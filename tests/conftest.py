"""Shared fixtures: the fake Parallel server on 127.0.0.1 and a client pointed at it."""

from __future__ import annotations

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
