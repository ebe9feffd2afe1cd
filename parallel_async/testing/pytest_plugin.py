"""Pytest fixtures for the fake Parallel server (for the anyio pytest plugin).

Enable with ``pytest_plugins = ["parallel_async.testing.pytest_plugin"]`` and run the
tests on the asyncio backend (``anyio_backend`` returning ``"asyncio"``):

    @pytest.mark.anyio
    async def test_something(fake_server: FakeServer) -> None:
        ...  # client pointed at fake_server.url with api key "test-key"
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from ._fake import FakeParallel
from ._server import FakeServer

__all__ = ["fake_parallel", "fake_server"]


@pytest.fixture
def fake_parallel() -> Iterator[FakeParallel]:
    """A ``FakeParallel`` with key ``"test-key"``, instant runs and 50 ms long-polls."""
    fake = FakeParallel(api_key="test-key", duration=0.0, max_long_poll=0.05)
    yield fake
    fake.close()


@pytest.fixture
async def fake_server(
    fake_parallel: FakeParallel, anyio_backend: object
) -> AsyncIterator[FakeServer]:
    """A running ``FakeServer`` for ``fake_parallel`` on 127.0.0.1 and a free port."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pytest.fail(f"the fake Parallel server needs the asyncio backend, not {anyio_backend!r}")
    async with FakeServer(fake_parallel) as server:
        yield server
